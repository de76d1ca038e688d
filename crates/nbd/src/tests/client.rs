//! The client handshake against this crate's server, and against scripted
//! servers for what ours never does (refusals, old servers, TLS).

use super::OneExport;
use crate::consts::*;
use crate::*;

/// Runs a client against `ServerHandshake`, moving at most `chunk` bytes at
/// a time in each direction; returns what each side ended with.
fn against_server(
    opts: ClientOptions,
    chunk: usize,
) -> Result<(ClientNegotiated, Negotiated), ProtocolError> {
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    let mut server = ServerHandshake::new(&mut to_client);
    let mut client = ClientHandshake::new(opts)?;
    let (mut c_in, mut s_in) = (Vec::new(), Vec::new());
    let (mut c_done, mut s_done) = (None, None);
    for _ in 0..100_000 {
        let n = chunk.min(to_client.len());
        c_in.extend(to_client.drain(..n));
        let n = chunk.min(to_server.len());
        s_in.extend(to_server.drain(..n));
        if c_done.is_none() {
            let (used, step) = client.process(&c_in, &mut to_server)?;
            c_in.drain(..used);
            if let ClientStep::Ready(neg) = step {
                c_done = Some(*neg);
            }
        }
        if s_done.is_none() {
            let (used, step) = server.process(&s_in, &OneExport, &mut to_client)?;
            s_in.drain(..used);
            if let Step::Ready(neg) = step {
                s_done = Some(*neg);
            }
        }
        if let (Some(c), Some(s)) = (&c_done, &s_done) {
            assert!(
                to_client.is_empty() && c_in.is_empty(),
                "the server said more than the client read"
            );
            return Ok((c.clone(), s.clone()));
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn client_and_server_agree_on_extended_headers_contexts_and_block_sizes() {
    let mut opts = ClientOptions::new("disk");
    opts.meta_contexts.push("qemu:dirty-bitmap:b0".into());
    let (c, s) = against_server(opts, usize::MAX).unwrap();
    assert_eq!(c.mode, ReplyMode::Extended);
    assert_eq!(c.mode, s.mode);
    assert_eq!(c.size, s.export.size);
    assert_eq!(c.flags, s.flags);
    assert_eq!(c.contexts, s.contexts);
    assert_eq!(c.context_id(BASE_ALLOCATION), Some(1));
    assert_eq!(c.context_id("qemu:dirty-bitmap:b0"), Some(2));
    assert_eq!(
        c.block_sizes,
        Some(BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20
        })
    );
    assert!(!c.used_export_name);
    assert!(c.has(TF_SEND_FLUSH) && c.has(TF_HAS_FLAGS));
}

#[test]
fn the_mode_follows_what_the_client_allows() {
    for (extended, structured, mode) in [
        (true, true, ReplyMode::Extended),
        (true, false, ReplyMode::Extended),
        (false, true, ReplyMode::Structured),
        (false, false, ReplyMode::Simple),
    ] {
        let mut opts = ClientOptions::new("");
        opts.extended_headers = extended;
        opts.structured_replies = structured;
        let (c, s) = against_server(opts, usize::MAX).unwrap();
        assert_eq!((c.mode, s.mode), (mode, mode));
        // Contexts need structured replies; without them none is asked for.
        assert_eq!(c.contexts.is_empty(), mode == ReplyMode::Simple);
        assert_eq!(c.contexts, s.contexts);
        // DF is only for clients with structured replies.
        assert_eq!(c.has(TF_SEND_DF), mode != ReplyMode::Simple);
    }
}

#[test]
fn handshake_split_byte_by_byte_gives_the_same_result() {
    let whole = against_server(ClientOptions::new("disk"), usize::MAX).unwrap().0;
    for chunk in [1, 3, 7, 19] {
        assert_eq!(
            against_server(ClientOptions::new("disk"), chunk).unwrap().0,
            whole
        );
    }
}

#[test]
fn unknown_export_is_refused_with_its_name() {
    let err = against_server(ClientOptions::new("nope"), usize::MAX).unwrap_err();
    let ProtocolError::Refused(r) = &err else {
        panic!("{err:?}")
    };
    assert_eq!((r.option, r.reply), (OPT_GO, REP_ERR_UNKNOWN));
    assert!(
        err.to_string().starts_with("the server has no export 'nope'"),
        "{err}"
    );
}

#[test]
fn a_server_without_starttls_is_reported_as_such() {
    let mut opts = ClientOptions::new("disk");
    opts.starttls = true;
    let err = against_server(opts, usize::MAX).unwrap_err();
    assert!(
        err.to_string().contains("does not support NBD_OPT_STARTTLS"),
        "{err}"
    );
}

#[test]
fn unknown_contexts_are_left_out() {
    let mut opts = ClientOptions::new("disk");
    opts.meta_contexts = vec!["x-nothing:here".into()];
    let (c, _) = against_server(opts, usize::MAX).unwrap();
    assert!(c.contexts.is_empty());
}

#[test]
fn names_longer_than_the_protocol_allows_are_refused_up_front() {
    let opts = ClientOptions::new(&"x".repeat(MAX_STRING + 1));
    assert_eq!(
        ClientHandshake::new(opts).unwrap_err(),
        ProtocolError::StringTooLong(MAX_STRING + 1)
    );
}

// Scripted servers.

fn greeting(flags: u16) -> Vec<u8> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&flags.to_be_bytes());
    g
}

fn opt_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    opt_reply(OPT_GO, REP_INFO, &p)
}

/// Splits what the client sent (after its 4 flag bytes) into options.
fn options(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    while b.len() >= 16 {
        assert_eq!(&b[..8], &IHAVEOPT.to_be_bytes());
        let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(b[12..16].try_into().unwrap()) as usize;
        v.push((opt, b[16..16 + len].to_vec()));
        b = &b[16 + len..];
    }
    assert!(b.is_empty());
    v
}

/// What the client did with some input: its step, and the options it sent.
struct Fed {
    step: Result<ClientStep, ProtocolError>,
    sent: Vec<(u32, Vec<u8>)>,
}

fn feed(client: &mut ClientHandshake, server_says: &[u8]) -> Fed {
    let mut out = Vec::new();
    let r = client.process(server_says, &mut out).map(|(n, step)| {
        assert_eq!(n, server_says.len(), "input left over");
        step
    });
    // The client's flags come before its first option only.
    let skip = if out.is_empty() || out.starts_with(&IHAVEOPT.to_be_bytes()) {
        0
    } else {
        4
    };
    Fed {
        step: r,
        sent: options(&out[skip..]),
    }
}

#[test]
fn a_server_without_go_gets_export_name_and_its_trailing_zeroes() {
    for no_zeroes in [false, true] {
        let mut c = ClientHandshake::new(ClientOptions::new("disk")).unwrap();
        let flags = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
        let sent = feed(&mut c, &greeting(flags)).sent;
        assert_eq!(sent[0].0, OPT_EXTENDED_HEADERS);
        let sent = feed(&mut c, &opt_reply(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, b"")).sent;
        assert_eq!(sent[0].0, OPT_STRUCTURED_REPLY);
        let sent = feed(&mut c, &opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, b"")).sent;
        assert_eq!(sent[0].0, OPT_SET_META_CONTEXT);
        let mut ctx = 9u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let mut r = opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
        r.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, b""));
        let sent = feed(&mut c, &r).sent;
        assert_eq!(sent[0].0, OPT_GO);
        let sent = feed(&mut c, &opt_reply(OPT_GO, REP_ERR_UNSUP, b"what is GO?")).sent;
        assert_eq!(sent, vec![(OPT_EXPORT_NAME, b"disk".to_vec())]);
        assert!(matches!(c.closed(), ProtocolError::ExportNameRefused(ref n) if n == "disk"));
        let mut r = (5u64 << 20).to_be_bytes().to_vec();
        r.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_TRIM).to_be_bytes());
        if !no_zeroes {
            r.extend_from_slice(&[0; 124]);
        }
        // One byte short is not enough.
        let mut out = Vec::new();
        let (n, step) = c.process(&r[..r.len() - 1], &mut out).unwrap();
        assert!(n == 0 && matches!(step, ClientStep::NeedMore));
        let step = feed(&mut c, &r).step;
        let Ok(ClientStep::Ready(neg)) = step else {
            panic!("{step:?}")
        };
        assert_eq!(neg.size, 5 << 20);
        assert_eq!(neg.mode, ReplyMode::Structured);
        assert!(neg.used_export_name && neg.has(TF_SEND_TRIM));
        assert_eq!(neg.block_sizes, None);
        assert_eq!(neg.block_sizes_or_default(), BlockSizes::DEFAULT);
        assert_eq!(neg.contexts, vec![(9, BASE_ALLOCATION.to_string())]);
    }
}

#[test]
fn a_plain_newstyle_server_gets_export_name_at_once() {
    let mut c = ClientHandshake::new(ClientOptions::new("d")).unwrap();
    let mut out = Vec::new();
    c.process(&greeting(0), &mut out).unwrap();
    assert_eq!(&out[..4], &0u32.to_be_bytes());
    assert_eq!(options(&out[4..]), vec![(OPT_EXPORT_NAME, b"d".to_vec())]);
}

#[test]
fn a_client_asking_for_tls_stops_at_a_greeting_without_fixed_newstyle() {
    // Found by the handshake_client fuzz target: plain newstyle has no
    // STARTTLS, and the client went on to EXPORT_NAME in clear text.
    let mut opts = ClientOptions::new("d");
    opts.starttls = true;
    let mut c = ClientHandshake::new(opts).unwrap();
    let mut out = Vec::new();
    let err = c.process(&greeting(FLAG_NO_ZEROES), &mut out).unwrap_err();
    assert_eq!(err, ProtocolError::NoTlsWithoutFixedNewstyle);
    assert!(out.is_empty(), "sent {out:?}");
    assert!(c.process(&[], &mut out).is_err());
}

#[test]
fn no_export_name_fallback_after_extended_headers() {
    let mut c = ClientHandshake::new(ClientOptions::new("disk")).unwrap();
    feed(&mut c, &greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    feed(&mut c, &opt_reply(OPT_EXTENDED_HEADERS, REP_ACK, b""));
    let sent = feed(&mut c, &opt_reply(OPT_SET_META_CONTEXT, REP_ERR_POLICY, b"")).sent;
    assert_eq!(sent[0].0, OPT_GO);
    let step = feed(&mut c, &opt_reply(OPT_GO, REP_ERR_UNSUP, b"")).step;
    let err = step.unwrap_err();
    assert!(err.to_string().contains("does not support NBD_OPT_GO"), "{err}");
}

#[test]
fn tls_required_and_shutdown_stop_at_the_first_option() {
    for (kind, text) in [
        (REP_ERR_TLS_REQD, "requires TLS for export 'disk'"),
        (REP_ERR_SHUTDOWN, "shutting down: bye"),
    ] {
        let mut c = ClientHandshake::new(ClientOptions::new("disk")).unwrap();
        feed(&mut c, &greeting(FLAG_FIXED_NEWSTYLE));
        let step = feed(&mut c, &opt_reply(OPT_EXTENDED_HEADERS, kind, b"bye")).step;
        let err = step.unwrap_err();
        assert!(err.to_string().contains(text), "{err}");
    }
}

#[test]
fn every_go_refusal_has_its_own_message() {
    let mut seen = std::collections::HashSet::new();
    for kind in [
        REP_ERR_UNSUP,
        REP_ERR_POLICY,
        REP_ERR_INVALID,
        REP_ERR_PLATFORM,
        REP_ERR_TLS_REQD,
        REP_ERR_UNKNOWN,
        REP_ERR_SHUTDOWN,
        REP_ERR_BLOCK_SIZE_REQD,
        REP_ERR_TOO_BIG,
        REP_ERR_EXT_HEADER_REQD,
        (1 << 31) + 99,
    ] {
        let mut opts = ClientOptions::new("disk");
        opts.extended_headers = false;
        opts.structured_replies = false;
        let mut c = ClientHandshake::new(opts).unwrap();
        feed(&mut c, &greeting(FLAG_FIXED_NEWSTYLE));
        let mut r = opt_reply(OPT_GO, REP_INFO, &[0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 255, 255]);
        r.extend(opt_reply(OPT_GO, kind, b""));
        let Fed { step, sent } = feed(&mut c, &r);
        if kind == REP_ERR_UNSUP {
            assert_eq!(sent[0].0, OPT_EXPORT_NAME);
            continue;
        }
        let err = step.unwrap_err();
        assert!(matches!(&err, ProtocolError::Refused(r) if r.reply == kind));
        assert!(seen.insert(err.to_string()), "{err}");
    }
}

#[test]
fn starttls_stops_for_the_caller_then_goes_on() {
    let mut opts = ClientOptions::new("disk");
    opts.starttls = true;
    let mut c = ClientHandshake::new(opts).unwrap();
    let sent = feed(&mut c, &greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).sent;
    assert_eq!(sent, vec![(OPT_STARTTLS, vec![])]);
    let Fed { step, sent } = feed(&mut c, &opt_reply(OPT_STARTTLS, REP_ACK, b""));
    assert!(matches!(step, Ok(ClientStep::StartTls)));
    assert!(sent.is_empty(), "nothing may go out before TLS is up");
    let Fed { step, sent } = feed(&mut c, &[]);
    assert!(matches!(step, Ok(ClientStep::NeedMore)));
    assert_eq!(sent[0].0, OPT_EXTENDED_HEADERS);
}

#[test]
fn malformed_server_messages_are_errors() {
    let fresh = || {
        let mut o = ClientOptions::new("disk");
        o.extended_headers = false;
        o.structured_replies = false;
        let mut c = ClientHandshake::new(o).unwrap();
        feed(&mut c, &greeting(FLAG_FIXED_NEWSTYLE));
        c
    };
    let mut old = NBDMAGIC.to_be_bytes().to_vec();
    old.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    old.extend_from_slice(&[0, 0]);
    let mut c = ClientHandshake::new(ClientOptions::new("")).unwrap();
    assert_eq!(
        c.process(&old, &mut Vec::new()).unwrap_err(),
        ProtocolError::OldstyleServer
    );

    let mut r = opt_reply(OPT_GO, REP_ACK, b"");
    r[0] ^= 1;
    assert_eq!(
        fresh().process(&r, &mut Vec::new()).unwrap_err(),
        ProtocolError::BadMagic
    );

    let r = opt_reply(OPT_LIST, REP_ACK, b"");
    assert!(matches!(
        fresh().process(&r, &mut Vec::new()),
        Err(ProtocolError::BadReply(_))
    ));

    let r = opt_reply(OPT_GO, REP_ACK, b"");
    let err = fresh().process(&r, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("without NBD_INFO_EXPORT"), "{err}");

    let mut r = opt_reply(OPT_GO, REP_INFO, b"");
    r[16..20].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    assert!(matches!(
        fresh().process(&r, &mut Vec::new()),
        Err(ProtocolError::ReplyTooLarge { .. })
    ));

    // Block sizes that are not a power of two cannot be aligned to.
    let r = opt_reply(OPT_GO, REP_INFO, &[0, 3, 0, 0, 0, 3, 0, 0, 16, 0, 0, 0, 255, 255]);
    assert!(matches!(
        fresh().process(&r, &mut Vec::new()),
        Err(ProtocolError::BadReply(_))
    ));

    // Unknown info types are ignored, as the spec asks.
    let mut r = opt_reply(OPT_GO, REP_INFO, &[0, 42, 1, 2, 3]);
    r.extend(info_export(4096, TF_HAS_FLAGS));
    r.extend(opt_reply(OPT_GO, REP_ACK, b""));
    let step = feed(&mut fresh(), &r).step;
    assert!(matches!(step, Ok(ClientStep::Ready(n)) if n.size == 4096));
}

#[test]
fn closed_names_the_step_the_server_hung_up_in() {
    let mut c = ClientHandshake::new(ClientOptions::new("disk")).unwrap();
    assert_eq!(
        c.closed().to_string(),
        "the server closed the connection during the greeting"
    );
    feed(&mut c, &greeting(FLAG_FIXED_NEWSTYLE));
    assert!(c
        .closed()
        .to_string()
        .ends_with("during NBD_OPT_EXTENDED_HEADERS"));
}
