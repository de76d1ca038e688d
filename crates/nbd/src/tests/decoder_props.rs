//! Property tests of the reply decoder: a stream of replies, interleaved
//! chunk by chunk and cut into arbitrary pieces, decodes to the same events
//! as the whole stream; arbitrary or corrupted bytes never panic it.

use std::collections::HashMap;

use proptest::prelude::*;

use super::decoder::{chunk, error_payload, req, run, Ev};
use crate::consts::*;
use crate::*;

#[derive(Clone, Debug)]
enum Piece {
    Data(Vec<u8>),
    Hole(u32),
}

#[derive(Clone, Debug)]
enum Reply {
    Ok(u16),
    Error(u32, String),
    Read(Vec<Piece>),
    Status(Vec<(u32, u32)>),
    ErrorOffset(u32, String, u64),
    UnknownError(u16, u32, String),
}

fn mode() -> impl Strategy<Value = ReplyMode> {
    prop_oneof![
        Just(ReplyMode::Simple),
        Just(ReplyMode::Structured),
        Just(ReplyMode::Extended)
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..300).prop_map(Piece::Data),
        (1u32..100_000).prop_map(Piece::Hole),
    ];
    let errno = prop_oneof![Just(EIO), Just(EINVAL), Just(ENOSPC), Just(EPERM)];
    prop_oneof![
        prop_oneof![Just(CMD_WRITE), Just(CMD_FLUSH), Just(CMD_TRIM)].prop_map(Reply::Ok),
        (errno.clone(), "[a-z ]{0,20}").prop_map(|(e, m)| Reply::Error(e, m)),
        proptest::collection::vec(piece, 0..4).prop_map(Reply::Read),
        proptest::collection::vec((1u32..1 << 30, 0u32..4), 1..5).prop_map(Reply::Status),
        (errno.clone(), "[a-z]{0,10}", any::<u64>()).prop_map(|(e, m, o)| Reply::ErrorOffset(e, m, o)),
        (0x8003u16..0x8100, errno, "[a-z]{0,10}").prop_map(|(k, e, m)| Reply::UnknownError(k, e, m)),
    ]
}

/// Encodes `reply` as chunks (each with the events it must decode to), the
/// way the server would, and records the request it answers.
fn encode(
    mode: ReplyMode,
    cookie: u64,
    reply: &Reply,
    reqs: &mut HashMap<u64, Request>,
) -> Vec<(Vec<u8>, Vec<Ev>)> {
    let r = Replies::new(mode);
    let simple = mode == ReplyMode::Simple;
    let mut chunks = Vec::new();
    let mut one = |bytes: Vec<u8>, evs: Vec<Ev>| chunks.push((bytes, evs));
    let with_done = |ev: Ev| vec![ev, Ev::Done(cookie)];
    match reply {
        Reply::Ok(cmd) => {
            let q = req(*cmd, cookie, 0, 4096);
            reqs.insert(cookie, q);
            let mut out = Vec::new();
            r.ok(&mut out, &q);
            one(out, vec![Ev::Done(cookie)]);
        }
        Reply::Error(e, m) => {
            let q = req(CMD_WRITE, cookie, 0, 4096);
            reqs.insert(cookie, q);
            let mut out = Vec::new();
            r.error(&mut out, &q, *e, m);
            let m = if simple { String::new() } else { m.clone() };
            one(out, with_done(Ev::Error(cookie, *e, m, None)));
        }
        Reply::Read(pieces) if simple => {
            let data: Vec<u8> = pieces
                .iter()
                .flat_map(|p| match p {
                    Piece::Data(d) => d.clone(),
                    Piece::Hole(n) => vec![0; (*n as usize).min(300)],
                })
                .collect();
            let q = req(CMD_READ, cookie, 1 << 40, data.len() as u64);
            reqs.insert(cookie, q);
            let mut out = Vec::new();
            r.read_data_header(&mut out, &q, q.offset, data.len() as u64, true);
            out.extend_from_slice(&data);
            let mut evs = vec![];
            if !data.is_empty() {
                evs.push(Ev::Data(cookie, q.offset, data));
            }
            evs.push(Ev::Done(cookie));
            one(out, evs);
        }
        Reply::Read(pieces) => {
            let q = req(CMD_READ, cookie, 0, 0);
            let mut at = 0u64;
            for p in pieces {
                let mut out = Vec::new();
                match p {
                    Piece::Data(d) => {
                        r.read_data_header(&mut out, &q, at, d.len() as u64, false);
                        out.extend_from_slice(d);
                        one(out, vec![Ev::Data(cookie, at, d.clone())]);
                        at += d.len() as u64;
                    }
                    Piece::Hole(n) => {
                        r.read_hole(&mut out, &q, at, *n, false);
                        one(out, vec![Ev::Hole(cookie, at, *n)]);
                        at += *n as u64;
                    }
                }
            }
            let mut out = Vec::new();
            r.done(&mut out, &q);
            one(out, vec![Ev::Done(cookie)]);
        }
        Reply::Status(ext) if !simple => {
            let q = req(CMD_BLOCK_STATUS, cookie, 0, 1 << 40);
            let extents: Vec<Extent> = ext
                .iter()
                .map(|&(length, flags)| Extent {
                    length: length as u64,
                    flags: flags as u64,
                })
                .collect();
            let mut out = Vec::new();
            r.block_status(&mut out, &q, 1, &extents, true);
            one(out, with_done(Ev::Status(cookie, 1, extents)));
        }
        Reply::ErrorOffset(e, m, o) if !simple => {
            let p = error_payload(*e, m, Some(*o));
            let bytes = chunk(mode, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, cookie, &p);
            one(bytes, with_done(Ev::Error(cookie, *e, m.clone(), Some(*o))));
        }
        Reply::UnknownError(k, e, m) if !simple => {
            let bytes = chunk(mode, REPLY_FLAG_DONE, *k, cookie, &error_payload(*e, m, None));
            one(bytes, with_done(Ev::Error(cookie, *e, m.clone(), None)));
        }
        // Chunks a simple-mode server cannot send become plain successes.
        _ => return encode(mode, cookie, &Reply::Ok(CMD_FLUSH), reqs),
    }
    chunks
}

/// The stream of `replies` with chunks of different replies interleaved
/// as `schedule` picks them (each reply's own chunks stay in order).
fn stream(
    mode: ReplyMode,
    replies: &[Reply],
    schedule: &[usize],
) -> (Vec<u8>, Vec<Ev>, HashMap<u64, Request>) {
    let mut reqs = HashMap::new();
    let mut queues: Vec<std::collections::VecDeque<_>> = replies
        .iter()
        .enumerate()
        .map(|(i, r)| encode(mode, i as u64 + 100, r, &mut reqs).into())
        .collect();
    let (mut bytes, mut evs) = (Vec::new(), Vec::<Ev>::new());
    let mut take = |q: &mut std::collections::VecDeque<(Vec<u8>, Vec<Ev>)>| {
        let (b, e) = q.pop_front().unwrap();
        bytes.extend(b);
        for ev in e {
            // Merge contiguous data of one cookie, as `run` does.
            if let (Ev::Data(c, o, d), Some(Ev::Data(pc, po, pd))) = (&ev, evs.last_mut()) {
                if c == pc && *po + pd.len() as u64 == *o {
                    pd.extend_from_slice(d);
                    continue;
                }
            }
            evs.push(ev);
        }
    };
    for &pick in schedule {
        let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
        if live.is_empty() {
            break;
        }
        take(&mut queues[live[pick % live.len()]]);
    }
    for q in &mut queues {
        while !q.is_empty() {
            take(q);
        }
    }
    (bytes, evs, reqs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn cut_up_input_decodes_like_the_whole(
        mode in mode(),
        replies in proptest::collection::vec(reply(), 1..8),
        schedule in proptest::collection::vec(any::<usize>(), 0..40),
        mut cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let (bytes, expected, reqs) = stream(mode, &replies, &schedule);
        prop_assert_eq!(run(mode, &bytes, &reqs, &[]), (expected.clone(), Ok(true)));
        let mut cuts: Vec<usize> = cuts.drain(..).map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(run(mode, &bytes, &reqs, &cuts), (expected, Ok(true)));
    }

    #[test]
    fn a_truncated_stream_is_incomplete_not_wrong(
        mode in mode(),
        replies in proptest::collection::vec(reply(), 1..6),
        at in any::<prop::sample::Index>(),
    ) {
        let (bytes, _, reqs) = stream(mode, &replies, &[]);
        let at = at.index(bytes.len());
        // It may end between messages; it must never look malformed.
        let (_, end) = run(mode, &bytes[..at], &reqs, &[]);
        prop_assert!(end.is_ok(), "{:?}", end);
    }

    #[test]
    fn corrupted_streams_never_panic(
        mode in mode(),
        replies in proptest::collection::vec(reply(), 1..6),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..4),
        cuts in proptest::collection::vec(0usize..2000, 0..10),
    ) {
        let (mut bytes, _, reqs) = stream(mode, &replies, &[]);
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        let mut cuts = cuts;
        cuts.sort_unstable();
        let _ = run(mode, &bytes, &reqs, &cuts);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        mode in mode(),
        magic in prop_oneof![
            Just(SIMPLE_REPLY_MAGIC),
            Just(STRUCTURED_REPLY_MAGIC),
            Just(EXTENDED_REPLY_MAGIC)
        ],
        body in proptest::collection::vec(any::<u8>(), 0..200),
        read_len in 0u64..100,
    ) {
        // A plausible magic, so the decoder gets past the first check.
        let bytes = [magic.to_be_bytes().to_vec(), body].concat();
        let reads: HashMap<u64, Request> = (0..=255u64)
            .map(|c| (c, req(CMD_READ, c, 0, read_len)))
            .collect();
        let _ = run(mode, &bytes, &reads, &[7, 20, 33]);
    }
}
