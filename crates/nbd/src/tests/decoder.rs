//! Replies written by the server side (`Replies`) and read back by the
//! client side (`ReplyDecoder`), in every mode; and what the decoder does
//! with replies no server of ours writes.

use std::collections::HashMap;

use crate::consts::*;
use crate::*;

/// An event with its data owned, read data merged per contiguous run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Ev {
    Data(u64, u64, Vec<u8>),
    Hole(u64, u64, u32),
    Status(u64, u32, Vec<Extent>),
    Error(u64, u32, String, Option<u64>),
    Done(u64),
}

/// Decodes `stream` handed over in pieces ending at `cuts`, the way a
/// socket would; returns the events and how it ended.
pub(super) fn run(
    mode: ReplyMode,
    stream: &[u8],
    requests: &HashMap<u64, Request>,
    cuts: &[usize],
) -> (Vec<Ev>, Result<bool, ProtocolError>) {
    let mut dec = ReplyDecoder::new(mode);
    let mut events: Vec<Ev> = Vec::new();
    let mut buf = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        let cut = cut.clamp(from, stream.len());
        buf.extend_from_slice(&stream[from..cut]);
        from = cut;
        loop {
            let r = dec.decode(&buf, |c| requests.get(&c).copied());
            let (ev, used) = match r {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => return (events, Err(e)),
            };
            let ev = match ev {
                ReplyEvent::Data { cookie, offset, data } => {
                    if let Some(Ev::Data(c, o, d)) = events.last_mut() {
                        if *c == cookie && *o + d.len() as u64 == offset {
                            d.extend_from_slice(data);
                            buf.drain(..used);
                            continue;
                        }
                    }
                    Ev::Data(cookie, offset, data.to_vec())
                }
                ReplyEvent::Hole {
                    cookie,
                    offset,
                    length,
                } => Ev::Hole(cookie, offset, length),
                ReplyEvent::BlockStatus {
                    cookie,
                    context,
                    extents,
                } => Ev::Status(cookie, context, extents),
                ReplyEvent::Error {
                    cookie,
                    error,
                    message,
                    offset,
                } => Ev::Error(cookie, error, message, offset),
                ReplyEvent::Done { cookie } => Ev::Done(cookie),
            };
            events.push(ev);
            buf.drain(..used);
        }
    }
    (events, Ok(buf.is_empty() && dec.is_idle()))
}

pub(super) fn req(command: u16, cookie: u64, offset: u64, length: u64) -> Request {
    Request {
        flags: 0,
        command,
        cookie,
        offset,
        length,
        payload_len: 0,
    }
}

const MODES: [ReplyMode; 3] = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended];

#[test]
fn every_reply_the_server_writes_decodes_to_what_it_meant_in_every_mode() {
    for mode in MODES {
        let r = Replies::new(mode);
        let write = req(CMD_WRITE, 1, 0, 512);
        let flush = req(CMD_FLUSH, 2, 0, 0);
        let read = req(CMD_READ, 3, 4096, 8);
        let failed = req(CMD_READ, 4, 0, 4096);
        let reqs: HashMap<u64, Request> = [write, flush, read, failed].map(|q| (q.cookie, q)).into();
        let mut out = Vec::new();
        r.ok(&mut out, &write);
        r.error(&mut out, &flush, EIO, "disk on fire");
        r.read_data_header(&mut out, &read, 4096, 8, true);
        out.extend_from_slice(b"abcdefgh");
        r.error(&mut out, &failed, EINVAL, "beyond the end");
        let message = |m: &str| {
            if mode == ReplyMode::Simple {
                String::new()
            } else {
                m.into()
            }
        };
        let expected = vec![
            Ev::Done(1),
            Ev::Error(2, EIO, message("disk on fire"), None),
            Ev::Done(2),
            Ev::Data(3, 4096, b"abcdefgh".to_vec()),
            Ev::Done(3),
            Ev::Error(4, EINVAL, message("beyond the end"), None),
            Ev::Done(4),
        ];
        let (events, end) = run(mode, &out, &reqs, &[]);
        assert_eq!(events, expected, "{mode:?}");
        assert_eq!(end, Ok(true));
        // A byte at a time gives the same.
        let cuts: Vec<usize> = (0..out.len()).collect();
        assert_eq!(run(mode, &out, &reqs, &cuts), (expected, Ok(true)), "{mode:?}");
    }
}

#[test]
fn holes_data_chunks_and_block_status_decode_in_structured_and_extended_modes() {
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let r = Replies::new(mode);
        let read = req(CMD_READ, 7, 0, 8192);
        let status = req(CMD_BLOCK_STATUS, 8, 0, 1 << 20);
        let mut out = Vec::new();
        r.read_hole(&mut out, &read, 4096, 4096, false);
        r.read_data_header(&mut out, &read, 0, 4096, false);
        out.extend(std::iter::repeat_n(0xa5, 4096));
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 65536,
                flags: (STATE_HOLE | STATE_ZERO) as u64,
            },
        ];
        r.block_status(&mut out, &status, 1, &extents, true);
        r.done(&mut out, &read);
        let (events, end) = run(mode, &out, &HashMap::new(), &[25, 100, 4000]);
        assert_eq!(
            events,
            vec![
                Ev::Hole(7, 4096, 4096),
                Ev::Data(7, 0, vec![0xa5; 4096]),
                Ev::Status(8, 1, extents.to_vec()),
                Ev::Done(8),
                Ev::Done(7),
            ]
        );
        assert_eq!(end, Ok(true));
    }
}

#[test]
fn read_data_comes_out_as_it_arrives_without_waiting_for_the_whole_chunk() {
    let r = Replies::new(ReplyMode::Extended);
    let read = req(CMD_READ, 1, 0, 1 << 20);
    let mut out = Vec::new();
    r.read_data_header(&mut out, &read, 0, 1 << 20, true);
    out.extend(std::iter::repeat_n(1, 100));
    let mut dec = ReplyDecoder::new(ReplyMode::Extended);
    let (ev, used) = dec.decode(&out, |_| None).unwrap().unwrap();
    assert_eq!(used, out.len());
    assert!(matches!(ev, ReplyEvent::Data { offset: 0, data, .. } if data.len() == 100));
    assert!(!dec.is_idle());
    assert_eq!(dec.decode(&[], |_| None).unwrap(), None);
    let (ev, _) = dec.decode(&[2; 50], |_| None).unwrap().unwrap();
    assert!(matches!(ev, ReplyEvent::Data { offset: 100, data, .. } if data == [2; 50]));
}

/// A chunk header and payload, written by hand for what `Replies` never sends.
pub(super) fn chunk(mode: ReplyMode, flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    if mode == ReplyMode::Extended {
        v.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    } else {
        v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

pub(super) fn error_payload(error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let mut p = error.to_be_bytes().to_vec();
    p.extend_from_slice(&(message.len() as u16).to_be_bytes());
    p.extend_from_slice(message.as_bytes());
    if let Some(o) = offset {
        p.extend_from_slice(&o.to_be_bytes());
    }
    p
}

#[test]
fn error_offset_and_unknown_error_chunks_fail_the_request_and_decoding_goes_on() {
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut out = chunk(
            mode,
            0,
            REPLY_TYPE_ERROR_OFFSET,
            5,
            &error_payload(EIO, "bad sector", Some(512)),
        );
        // An unknown error type with a trailing field the decoder skips.
        let mut p = error_payload(ENOSPC, "full", None);
        p.extend_from_slice(&[9; 5]);
        out.extend(chunk(mode, REPLY_FLAG_DONE, 0x8077, 5, &p));
        // Zero is not a valid error; it must not read as success.
        out.extend(chunk(
            mode,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            6,
            &error_payload(0, "", None),
        ));
        let (events, end) = run(mode, &out, &HashMap::new(), &[]);
        assert_eq!(
            events,
            vec![
                Ev::Error(5, EIO, "bad sector".into(), Some(512)),
                Ev::Error(5, ENOSPC, "full".into(), None),
                Ev::Done(5),
                Ev::Error(6, EINVAL, String::new(), None),
                Ev::Done(6),
            ]
        );
        assert_eq!(end, Ok(true));
    }
}

fn first_error(mode: ReplyMode, bytes: &[u8], reqs: &HashMap<u64, Request>) -> ProtocolError {
    let (_, end) = run(mode, bytes, reqs, &[]);
    end.expect_err("malformed input was accepted")
}

#[test]
fn malformed_replies_are_errors_not_panics() {
    use ReplyMode::*;
    let none = HashMap::new();
    let bad = |e: ProtocolError| matches!(e, ProtocolError::BadReply(_));
    // Each mode accepts only its own magic numbers.
    let simple = [SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec(), vec![0; 12]].concat();
    assert_eq!(first_error(Extended, &simple, &none), ProtocolError::BadMagic);
    assert_eq!(
        first_error(Simple, &chunk(Structured, 1, 0, 1, &[]), &none),
        ProtocolError::BadMagic
    );
    assert_eq!(
        first_error(Structured, &chunk(Extended, 1, 0, 1, &[]), &none),
        ProtocolError::BadMagic
    );
    // Simple mode cannot frame a reply to a cookie it does not know.
    assert!(bad(first_error(Simple, &simple, &none)));
    // A simple reply to a read after structured replies were agreed.
    let reads = HashMap::from([(0, req(CMD_READ, 0, 0, 512))]);
    assert!(bad(first_error(Structured, &simple, &reads)));
    for mode in [Structured, Extended] {
        let c = |flags, kind, p: &[u8]| chunk(mode, flags, kind, 1, p);
        assert!(bad(first_error(mode, &c(0, REPLY_TYPE_NONE, &[]), &none)));
        assert!(bad(first_error(mode, &c(1, REPLY_TYPE_NONE, &[0]), &none)));
        assert!(bad(first_error(
            mode,
            &c(1, REPLY_TYPE_OFFSET_DATA, &[0; 8]),
            &none
        )));
        assert!(bad(first_error(
            mode,
            &c(1, REPLY_TYPE_OFFSET_HOLE, &[0; 11]),
            &none
        )));
        assert!(bad(first_error(
            mode,
            &c(1, REPLY_TYPE_OFFSET_HOLE, &[0; 12]),
            &none
        )));
        assert!(bad(first_error(mode, &c(1, 3, &[]), &none)));
        assert!(bad(first_error(
            mode,
            &c(1, REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0]),
            &none
        )));
        assert!(bad(first_error(
            mode,
            &c(1, REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9]),
            &none
        )));
        assert!(bad(first_error(
            mode,
            &c(1, REPLY_TYPE_ERROR_OFFSET, &[0, 0, 0, 5, 0, 0]),
            &none
        )));
        // Data running past the end of the export's address space.
        let mut p = (u64::MAX - 2).to_be_bytes().to_vec();
        p.extend_from_slice(&[0; 8]);
        assert!(bad(first_error(mode, &c(1, REPLY_TYPE_OFFSET_DATA, &p), &none)));
    }
    // Block status: the chunk type must match the mode, extents be whole
    // and nonzero, and the extended count match.
    let bs = |n: u32, len: u32| [1u32, n, len, 0].map(u32::to_be_bytes).concat();
    let bs_ext = |n: u32, len: u64| {
        [1u32.to_be_bytes(), n.to_be_bytes()]
            .concat()
            .into_iter()
            .chain(len.to_be_bytes())
            .chain(0u64.to_be_bytes())
            .collect::<Vec<u8>>()
    };
    let s = |mode, kind, p: &[u8]| chunk(mode, 1, kind, 1, p);
    assert!(bad(first_error(
        Structured,
        &s(Structured, REPLY_TYPE_BLOCK_STATUS_EXT, &bs_ext(1, 512)),
        &none
    )));
    assert!(bad(first_error(
        Extended,
        &s(Extended, REPLY_TYPE_BLOCK_STATUS, &bs(512, 0)),
        &none
    )));
    assert!(bad(first_error(
        Structured,
        &s(Structured, REPLY_TYPE_BLOCK_STATUS, &bs(512, 0)[..8]),
        &none
    )));
    assert!(bad(first_error(
        Structured,
        &s(Structured, REPLY_TYPE_BLOCK_STATUS, &[0; 4]),
        &none
    )));
    assert!(bad(first_error(
        Extended,
        &s(Extended, REPLY_TYPE_BLOCK_STATUS_EXT, &bs_ext(2, 512)),
        &none
    )));
    assert!(bad(first_error(
        Extended,
        &s(Extended, REPLY_TYPE_BLOCK_STATUS_EXT, &bs_ext(1, 0)),
        &none
    )));
}

#[test]
fn payloads_beyond_the_limit_are_refused_before_they_are_buffered() {
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut dec = ReplyDecoder::with_limit(mode, 1024);
        let mut h = chunk(mode, 1, REPLY_TYPE_BLOCK_STATUS, 1, &[]);
        let at = if mode == ReplyMode::Extended { 24 } else { 16 };
        let width = h.len() - at;
        h[at..].copy_from_slice(&2048u64.to_be_bytes()[8 - width..]);
        assert_eq!(
            dec.decode(&h, |_| None),
            Err(ProtocolError::ReplyTooLarge {
                length: 2048,
                limit: 1024
            })
        );
        let mut h = chunk(mode, 1, REPLY_TYPE_OFFSET_DATA, 1, &[]);
        h[at..].copy_from_slice(&(8 + 2048u64).to_be_bytes()[8 - width..]);
        assert!(matches!(
            ReplyDecoder::with_limit(mode, 1024).decode(&h, |_| None),
            Err(ProtocolError::ReplyTooLarge { length: 2048, .. })
        ));
    }
    // An extended length that does not fit in memory at all.
    let mut h = chunk(ReplyMode::Extended, 1, REPLY_TYPE_BLOCK_STATUS_EXT, 1, &[]);
    h[24..].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        ReplyDecoder::with_limit(ReplyMode::Extended, u64::MAX).decode(&h, |_| None),
        Err(ProtocolError::ReplyTooLarge { .. })
    ));
}
