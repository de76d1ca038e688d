//! The push client's reply decoder, `ReplyDecoder`, against any server.
//!
//! Input: byte 0 picks the mode, byte 1 the payload limit (0: the
//! default; else that many 16-byte units), byte 2 how the stream is cut
//! (0: whole; else that many bytes per call, mod 32), the rest is what the
//! server sends. The requests in flight are a function of the cookie (see
//! `request`), so simple replies to reads of any length can be reached.
//!
//! Checked besides "no panic": the stream cut into pieces gives the same
//! events (read data merged where one piece follows another) and the same
//! end as in one piece; no event consumes more than it was given, nor a
//! non-data payload over the limit; data events are never empty, extents
//! never empty nor of length 0, errors never 0, holes never empty.
#![no_main]

use fleece_nbd::consts::*;
use fleece_nbd::{ReplyDecoder, ReplyEvent, ReplyMode, Request, DEFAULT_REPLY_LIMIT};
use libfuzzer_sys::fuzz_target;

/// The request a cookie stands for: none for cookies ending in 0xff, a
/// read for odd ones (length from bits 8-19, offset from the top half),
/// else a write.
fn request(cookie: u64) -> Option<Request> {
    if cookie & 0xff == 0xff {
        return None;
    }
    let read = cookie & 1 == 1;
    Some(Request {
        flags: 0,
        command: if read { CMD_READ } else { CMD_WRITE },
        cookie,
        offset: cookie >> 32,
        length: (cookie >> 8) & 0xfff,
        payload_len: 0,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Data { cookie: u64, offset: u64, data: Vec<u8> },
    Other(String),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Event>,
    error: Option<String>,
    idle: bool,
}

fn check(ev: &ReplyEvent<'_>) {
    match ev {
        ReplyEvent::Data { data, .. } => assert!(!data.is_empty(), "an empty data event"),
        ReplyEvent::Hole { length, .. } => assert!(*length > 0),
        ReplyEvent::BlockStatus { extents, .. } => {
            assert!(!extents.is_empty(), "no extents");
            assert!(extents.iter().all(|e| e.length > 0), "an extent of length 0");
        }
        ReplyEvent::Error { error, .. } => assert_ne!(*error, 0),
        ReplyEvent::Done { .. } => {}
    }
}

fn run(mode: ReplyMode, limit: u64, input: &[u8], cut: usize) -> Outcome {
    let mut dec = ReplyDecoder::with_limit(mode, limit);
    let header = match mode {
        ReplyMode::Simple => 16,
        ReplyMode::Structured => 20,
        ReplyMode::Extended => 32,
    };
    let mut events: Vec<Event> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut error = None;
    'feed: loop {
        let n = cut.min(input.len() - fed);
        pending.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            let (ev, used) = match dec.decode(&pending, request) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    error = Some(e.to_string());
                    break 'feed;
                }
            };
            assert!(used <= pending.len());
            check(&ev);
            if !matches!(ev, ReplyEvent::Data { .. }) {
                // Whole payloads only: bounded by the limit.
                assert!(used as u64 <= header + limit, "{used} bytes for {ev:?}");
            }
            let ev = match ev {
                ReplyEvent::Data { cookie, offset, data } => {
                    // Merge with the piece before it: cuts may split a chunk.
                    if let Some(Event::Data {
                        cookie: c,
                        offset: o,
                        data: d,
                    }) = events.last_mut()
                    {
                        if *c == cookie && o.wrapping_add(d.len() as u64) == offset {
                            d.extend_from_slice(data);
                            pending.drain(..used);
                            continue;
                        }
                    }
                    Event::Data {
                        cookie,
                        offset,
                        data: data.to_vec(),
                    }
                }
                other => Event::Other(format!("{other:?}")),
            };
            events.push(ev);
            pending.drain(..used);
        }
        if fed == input.len() {
            break;
        }
    }
    Outcome {
        events,
        error,
        idle: dec.is_idle(),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mode = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended][data[0] as usize % 3];
    let limit = match data[1] {
        0 => DEFAULT_REPLY_LIMIT,
        n => n as u64 * 16,
    };
    let cut = match data[2] % 32 {
        0 => usize::MAX,
        n => n as usize,
    };
    let input = &data[3..];
    let whole = run(mode, limit, input, usize::MAX);
    if cut != usize::MAX {
        let pieces = run(mode, limit, input, cut);
        assert_eq!(
            whole, pieces,
            "cut into pieces of {cut}, the stream gave another outcome"
        );
    }
});
