//! The daemon's request framing (`fleece::parsers::Input`): headers and
//! payloads out of a non-blocking socket, through its page-aligned input
//! buffer, its compaction, and its own buffers for large payloads.
//!
//! Input: byte 0 picks the mode, byte 1 how the socket hands out the
//! stream (chunk sizes cycle through 1 + the bits of byte 1, times 3, with
//! "would block" between reads), the rest is the stream.
//!
//! Checked besides "no panic": every request comes out with exactly the
//! header and payload bytes at its place in the stream, in order; the
//! connection ends with "end of input" only when the stream is used up,
//! and otherwise exactly at a request the protocol refuses (bad magic, a
//! payload over the limit); it never spins without reading.
#![no_main]

use std::io::{self, Read};

use fleece::parsers::{Frame, Input, MAX_PAYLOAD};
use fleece_nbd::consts::*;
use fleece_nbd::{decode_request, ReplyMode};
use libfuzzer_sys::fuzz_target;

struct Socket<'a> {
    data: &'a [u8],
    at: usize,
    sizes: [usize; 4],
    turn: usize,
    blocked: bool,
    reads: usize,
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        if self.at == self.data.len() {
            return Ok(0);
        }
        self.blocked = !self.blocked;
        if self.blocked {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.sizes[self.turn % 4]
            .min(self.data.len() - self.at)
            .min(buf.len());
        self.turn += 1;
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mode = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended][data[0] as usize % 3];
    let hlen = if mode == ReplyMode::Extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let b = data[1] as usize;
    let sizes = [1 + (b & 3) * 3, 1 + ((b >> 2) & 3) * 7, 1 + (b >> 4) * 13, 4096];
    let stream = &data[2..];
    // A payload of DIRECT_INPUT (64 KiB) or more goes to a buffer of its
    // own, made by zeroing up to 32 MiB: payloads over 256 KiB take the same
    // path as those just over 64 KiB, at a hundred times the cost per run.
    // Inputs that announce one are skipped to keep the target fast.
    let mut at = 0;
    while let Ok(Some((r, n))) = decode_request(&stream[at..], mode) {
        if r.payload_len > 256 << 10 && r.payload_len <= MAX_PAYLOAD as u64 {
            return;
        }
        match (n as u64).checked_add(r.payload_len) {
            Some(skip) if skip <= (stream.len() - at) as u64 => at += skip as usize,
            _ => break,
        }
    }
    let mut sock = Socket {
        data: stream,
        at: 0,
        sizes,
        turn: 0,
        blocked: false,
        reads: 0,
    };
    let mut input = Input::new(mode, &[]);
    let mut pos = 0;
    let mut calls = 0;
    let end = loop {
        calls += 1;
        // Each call reads at least once unless it returns a request.
        assert!(calls <= 4 * stream.len() + 8, "no progress after {calls} calls");
        let (req, payload) = match input.next(&mut sock) {
            Ok(Frame::WouldBlock) => continue,
            Ok(Frame::Buffered(req, p)) => (req, p.to_vec()),
            Ok(Frame::Owned(req, p)) => (req, p.to_vec()),
            Err(e) => break e,
        };
        let (want, n) = decode_request(&stream[pos..], mode)
            .expect("a request the decoder refuses")
            .expect("a request from too few bytes");
        assert_eq!(req, want, "request at byte {pos}");
        assert_eq!(n, hlen);
        assert!(req.payload_len <= MAX_PAYLOAD as u64);
        let p = req.payload_len as usize;
        assert_eq!(payload, stream[pos + n..pos + n + p], "payload at byte {pos}");
        pos += n + p;
    };
    assert!(sock.reads <= 2 * stream.len() + 8);
    if end.contains("end of input") {
        assert_eq!(sock.at, stream.len());
        // What is left is less than one whole request.
        match decode_request(&stream[pos..], mode) {
            Ok(None) => {}
            Ok(Some((r, n))) => assert!((stream.len() - pos - n) < r.payload_len as usize),
            Err(e) => panic!("a bad request at {pos} was not refused: {e}"),
        }
    } else {
        let refused = match decode_request(&stream[pos..], mode) {
            Err(_) => true,
            Ok(Some((r, _))) => r.payload_len > MAX_PAYLOAD as u64,
            Ok(None) => false,
        };
        assert!(refused, "the connection ended at byte {pos} with {end:?}");
    }
});
