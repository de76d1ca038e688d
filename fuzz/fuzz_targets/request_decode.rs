//! The transmission phase's request header decoder, `decode_request`.
//!
//! Input: byte 0 picks the mode (compact headers or extended), the rest is
//! a stream of requests; each header's payload is skipped as the server
//! skips it.
//!
//! Checked besides "no panic": a short header asks for more and nothing
//! else; a decoded header is as long as the mode says and encodes back to
//! the same bytes (the client side of the crate writes what the server
//! side reads); only writes, and in extended mode requests flagged with
//! `NBD_CMD_FLAG_PAYLOAD_LEN`, carry a payload.
#![no_main]

use fleece_nbd::consts::*;
use fleece_nbd::{decode_request, encode_request, ReplyMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&m, mut rest)) = data.split_first() else {
        return;
    };
    let mode = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended][m as usize % 3];
    let hlen = if mode == ReplyMode::Extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    loop {
        for short in 0..hlen.min(rest.len() + 1) {
            assert!(matches!(decode_request(&rest[..short], mode), Ok(None)));
        }
        let (req, n) = match decode_request(rest, mode) {
            Ok(Some(r)) => r,
            Ok(None) => {
                assert!(rest.len() < hlen);
                return;
            }
            Err(_) => return,
        };
        assert_eq!(n, hlen);
        let extended = mode == ReplyMode::Extended;
        let carries = req.command == CMD_WRITE || (extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        assert_eq!(req.payload_len, if carries { req.length } else { 0 });
        let mut again = Vec::new();
        encode_request(&mut again, &req, mode);
        let mut want = rest[..n].to_vec();
        if extended && req.command == CMD_WRITE {
            // The encoder always flags an extended write's payload, as the
            // spec requires; qemu 10 does not, and the decoder takes both.
            want[4..6].copy_from_slice(&(req.flags | CMD_FLAG_PAYLOAD_LEN).to_be_bytes());
        }
        assert_eq!(again, want, "{req:?} encodes to other bytes");
        match req.payload_len.checked_add(n as u64) {
            Some(skip) if skip <= rest.len() as u64 => rest = &rest[skip as usize..],
            _ => return,
        }
    }
});
