use crate::consts::*;
use crate::*;

use super::OneExport;

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Splits option replies into (option, type, payload).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), OPT_REPLY_MAGIC);
        let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        v.push((opt, kind, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    v
}

fn start() -> ServerHandshake {
    let mut out = Vec::new();
    let mut hs = ServerHandshake::new(&mut out);
    assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes());
    let (n, step) = hs.process(&3u32.to_be_bytes(), &OneExport, &mut out).unwrap();
    assert_eq!(n, 4);
    assert!(matches!(step, Step::NeedMore));
    hs
}

#[test]
fn unknown_option_is_refused_and_negotiation_continues() {
    let mut hs = start();
    let mut input = option(99, b"some payload");
    input.extend(option(OPT_GO, &go_data("disk")));
    let mut out = Vec::new();
    let (n, step) = hs.process(&input, &OneExport, &mut out).unwrap();
    assert_eq!(n, input.len());
    assert!(matches!(step, Step::Ready(_)));
    let r = replies(&out);
    assert_eq!(r[0].0, 99);
    assert_eq!(r[0].1, REP_ERR_UNSUP);
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn handshake_input_split_byte_by_byte_gives_the_same_result() {
    let mut hs = start();
    let input = option(OPT_GO, &go_data("disk"));
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut done = false;
    for b in input {
        buf.push(b);
        let (n, step) = hs.process(&buf, &OneExport, &mut out).unwrap();
        buf.drain(..n);
        if let Step::Ready(neg) = step {
            assert_eq!(neg.export.name, "disk");
            assert_eq!(neg.mode, ReplyMode::Simple);
            // DF is only for clients with structured replies.
            assert_eq!(neg.flags & TF_SEND_DF, 0);
            done = true;
        }
    }
    assert!(done);
}

#[test]
fn go_for_a_missing_export_answers_unknown_and_allows_retry() {
    let mut hs = start();
    let mut out = Vec::new();
    let input = option(OPT_GO, &go_data("nope"));
    let (_, step) = hs.process(&input, &OneExport, &mut out).unwrap();
    assert!(matches!(step, Step::NeedMore));
    assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
}

#[test]
fn oversized_option_is_refused_from_its_header_alone_and_ends_the_negotiation() {
    let mut hs = start();
    let mut out = Vec::new();
    // Only the header: the answer must not wait for 4 GiB to arrive.
    let mut input = IHAVEOPT.to_be_bytes().to_vec();
    input.extend_from_slice(&OPT_LIST.to_be_bytes());
    input.extend_from_slice(&u32::MAX.to_be_bytes());
    let (n, step) = hs.process(&input, &OneExport, &mut out).unwrap();
    assert_eq!(n, input.len());
    assert!(matches!(step, Step::Close));
    assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
    // The limit itself is fine.
    let mut hs = start();
    let mut out = Vec::new();
    let input = option(99, &vec![0; MAX_OPTION_LEN as usize]);
    let (_, step) = hs.process(&input, &OneExport, &mut out).unwrap();
    assert!(matches!(step, Step::NeedMore));
    assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
}

fn start_tls(mode: TlsMode) -> ServerHandshake {
    let mut out = Vec::new();
    let mut hs = ServerHandshake::with_tls(&mut out, mode);
    // The greeting does not change with TLS.
    let mut plain = Vec::new();
    ServerHandshake::new(&mut plain);
    assert_eq!(out, plain);
    let (_, step) = hs.process(&3u32.to_be_bytes(), &OneExport, &mut out).unwrap();
    assert!(matches!(step, Step::NeedMore));
    hs
}

#[test]
fn with_tls_required_every_option_before_starttls_is_told_tls_is_required() {
    let mut hs = start_tls(TlsMode::Required);
    let mut out = Vec::new();
    let mut input = Vec::new();
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, go_data("disk")),
        (OPT_GO, go_data("disk")),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_EXTENDED_HEADERS, Vec::new()),
        (99, b"x".to_vec()),
    ] {
        input.extend(option(opt, &data));
    }
    let (n, step) = hs.process(&input, &OneExport, &mut out).unwrap();
    assert_eq!(n, input.len());
    assert!(matches!(step, Step::NeedMore));
    let r = replies(&out);
    assert_eq!(r.len(), 6);
    assert!(r.iter().all(|(_, kind, _)| *kind == REP_ERR_TLS_REQD), "{r:?}");
    // EXPORT_NAME cannot be refused: the connection ends.
    let err = hs
        .process(&option(OPT_EXPORT_NAME, b"disk"), &OneExport, &mut out)
        .unwrap_err();
    assert_eq!(err, ProtocolError::TlsRequired);
}

#[test]
fn starttls_is_acknowledged_once_and_negotiation_starts_over_inside() {
    for mode in [TlsMode::Required, TlsMode::Allowed] {
        let mut hs = start_tls(mode);
        let mut out = Vec::new();
        let mut input = Vec::new();
        if mode == TlsMode::Allowed {
            // Chosen in plaintext; must not survive the upgrade.
            input.extend(option(OPT_STRUCTURED_REPLY, b""));
        }
        input.extend(option(OPT_STARTTLS, b""));
        let tls_bytes = b"\x16\x03\x01 a ClientHello";
        input.extend_from_slice(tls_bytes);
        let (n, step) = hs.process(&input, &OneExport, &mut out).unwrap();
        assert!(matches!(step, Step::StartTls), "{mode:?}");
        assert_eq!(n, input.len() - tls_bytes.len(), "TLS bytes are not options");
        assert_eq!(replies(&out).last().unwrap().1, REP_ACK);
        assert!(hs.tls_started());
        // Inside TLS: a second STARTTLS is invalid, other options work.
        let mut out = Vec::new();
        let mut input = option(OPT_STARTTLS, b"");
        input.extend(option(OPT_GO, &go_data("disk")));
        let (_, step) = hs.process(&input, &OneExport, &mut out).unwrap();
        let r = replies(&out);
        assert_eq!(r[0].1, REP_ERR_INVALID);
        let Step::Ready(neg) = step else {
            panic!("no GO inside TLS")
        };
        assert_eq!(
            neg.mode,
            ReplyMode::Simple,
            "{mode:?}: structured replies survived STARTTLS"
        );
    }
}

#[test]
fn starttls_without_tls_configured_is_unsupported_and_with_data_invalid() {
    let mut hs = start();
    let mut out = Vec::new();
    hs.process(&option(OPT_STARTTLS, b""), &OneExport, &mut out)
        .unwrap();
    assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
    let mut hs = start_tls(TlsMode::Allowed);
    let mut out = Vec::new();
    let (_, step) = hs
        .process(&option(OPT_STARTTLS, b"x"), &OneExport, &mut out)
        .unwrap();
    assert!(matches!(step, Step::NeedMore));
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    // In "allowed" mode plaintext negotiation works.
    let mut out = Vec::new();
    let (_, step) = hs
        .process(&option(OPT_GO, &go_data("disk")), &OneExport, &mut out)
        .unwrap();
    assert!(matches!(step, Step::Ready(_)));
}

/// OneExport for a client that may not open it.
struct Denied;

impl Catalog for Denied {
    fn list(&self) -> Vec<ExportInfo> {
        Vec::new()
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        OneExport.lookup(name)
    }
    fn permit(&self, name: &str) -> Result<(), String> {
        Err(format!("not for you: {name}"))
    }
}

#[test]
fn a_denied_export_gets_err_policy_on_info_go_and_meta_and_export_name_hangs_up() {
    let mut hs = start();
    let mut out = Vec::new();
    let mut meta = go_data("disk");
    meta.truncate(meta.len() - 2);
    meta.extend_from_slice(&0u32.to_be_bytes());
    let mut input = option(OPT_INFO, &go_data("disk"));
    input.extend(option(OPT_GO, &go_data("disk")));
    input.extend(option(OPT_STRUCTURED_REPLY, b""));
    input.extend(option(OPT_SET_META_CONTEXT, &meta));
    let (_, step) = hs.process(&input, &Denied, &mut out).unwrap();
    assert!(matches!(step, Step::NeedMore));
    let r = replies(&out);
    let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
    assert_eq!(kinds, [REP_ERR_POLICY, REP_ERR_POLICY, REP_ACK, REP_ERR_POLICY]);
    assert!(String::from_utf8_lossy(&r[0].2).contains("not for you: disk"));
    let err = hs
        .process(&option(OPT_EXPORT_NAME, b"disk"), &Denied, &mut out)
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Denied(..)), "{err:?}");
}

#[test]
fn meta_context_needs_structured_replies_and_selects_base_allocation() {
    let mut hs = start();
    let mut q = go_data("disk");
    q.truncate(q.len() - 2);
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    q.extend_from_slice(BASE_ALLOCATION.as_bytes());
    let mut out = Vec::new();
    hs.process(&option(OPT_SET_META_CONTEXT, &q), &OneExport, &mut out)
        .unwrap();
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);

    let mut input = option(OPT_EXTENDED_HEADERS, &[]);
    input.extend(option(OPT_SET_META_CONTEXT, &q));
    input.extend(option(OPT_GO, &go_data("disk")));
    out.clear();
    let (_, step) = hs.process(&input, &OneExport, &mut out).unwrap();
    let Step::Ready(neg) = step else {
        panic!("not ready")
    };
    assert_eq!(neg.mode, ReplyMode::Extended);
    assert_eq!(neg.contexts, vec![(1, BASE_ALLOCATION.to_string())]);
}

#[test]
fn list_meta_context_wildcard_lists_namespace() {
    let mut hs = start();
    let mut q = go_data("disk");
    q.truncate(q.len() - 2);
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&5u32.to_be_bytes());
    q.extend_from_slice(b"qemu:");
    let mut input = option(OPT_STRUCTURED_REPLY, &[]);
    input.extend(option(OPT_LIST_META_CONTEXT, &q));
    let mut out = Vec::new();
    hs.process(&input, &OneExport, &mut out).unwrap();
    let r = replies(&out);
    assert_eq!(r[1].1, REP_META_CONTEXT);
    assert_eq!(&r[1].2[4..], b"qemu:dirty-bitmap:b0");
    assert_eq!(r[2].1, REP_ACK);
}

#[test]
fn compact_and_extended_requests_round_trip() {
    for mode in [ReplyMode::Simple, ReplyMode::Extended] {
        let req = Request {
            flags: CMD_FLAG_FUA
                | if mode == ReplyMode::Extended {
                    CMD_FLAG_PAYLOAD_LEN
                } else {
                    0
                },
            command: CMD_WRITE,
            cookie: 42,
            offset: 4096,
            length: 512,
            payload_len: 512,
        };
        let mut b = Vec::new();
        encode_request(&mut b, &req, mode);
        assert_eq!(decode_request(&b[..b.len() - 1], mode).unwrap(), None);
        let (got, n) = decode_request(&b, mode).unwrap().unwrap();
        assert_eq!(n, b.len());
        assert_eq!(got, req);
    }
    assert_eq!(
        decode_request(&[0u8; 28], ReplyMode::Simple),
        Err(ProtocolError::BadMagic)
    );
}

#[test]
fn error_messages_are_cut_to_qemus_limit() {
    let r = Replies::new(ReplyMode::Structured);
    let req = Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 1,
        payload_len: 0,
    };
    let mut out = Vec::new();
    r.error(&mut out, &req, EINVAL, &"é".repeat(2000));
    let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
    assert_eq!(out.len(), 20 + len);
    assert!(len - 6 <= MAX_ERROR_MESSAGE);
}

#[test]
fn success_is_a_simple_reply_except_where_the_mode_or_command_forbids_it() {
    let req = |command| Request {
        flags: 0,
        command,
        cookie: 7,
        offset: 0,
        length: 0,
        payload_len: 0,
    };
    let magic = |mode, command| {
        let mut out = Vec::new();
        Replies::new(mode).ok(&mut out, &req(command));
        (u32::from_be_bytes(out[..4].try_into().unwrap()), out.len())
    };
    for cmd in [CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
        assert_eq!(magic(ReplyMode::Simple, cmd), (SIMPLE_REPLY_MAGIC, 16));
        assert_eq!(magic(ReplyMode::Structured, cmd), (SIMPLE_REPLY_MAGIC, 16));
        assert_eq!(magic(ReplyMode::Extended, cmd), (EXTENDED_REPLY_MAGIC, 32));
    }
    // A read (here of length 0) must end with a structured chunk.
    assert_eq!(
        magic(ReplyMode::Structured, CMD_READ),
        (STRUCTURED_REPLY_MAGIC, 20)
    );
    assert_eq!(magic(ReplyMode::Extended, CMD_READ), (EXTENDED_REPLY_MAGIC, 32));
}
