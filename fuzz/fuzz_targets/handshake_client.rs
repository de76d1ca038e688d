//! The push client's option haggling against any server.
//!
//! Input: byte 0 picks what the client asks for (bit 0 STARTTLS, bit 1
//! extended headers, bit 2 structured replies, bits 3-4 how many metadata
//! contexts), byte 1 how the stream is cut (0: whole; else that many bytes
//! per call, mod 16), the rest is what the server sends. After
//! `ClientStep::StartTls` the rest is fed as if it came out of TLS.
//!
//! Checked besides "no panic": the stream cut into pieces gives the same
//! options and outcome as in one piece; the client sends well-framed
//! options, one at a time, only those it was asked to; a client asked for
//! TLS never finishes in clear text; the mode agreed is one it asked for.
#![no_main]

use fleece_nbd::consts::*;
use fleece_nbd::{ClientHandshake, ClientOptions, ClientStep, ReplyMode};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum End {
    Waiting,
    Ready(String),
    Error(String),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    end: End,
    tls_steps: usize,
}

fn run(options: &ClientOptions, input: &[u8], cut: usize) -> Outcome {
    let mut hs = ClientHandshake::new(options.clone()).expect("short names");
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut tls_steps = 0;
    let mut fed = 0;
    let end = 'feed: loop {
        let n = cut.min(input.len() - fed);
        pending.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            let (used, step) = match hs.process(&pending, &mut out) {
                Ok(r) => r,
                Err(e) => break 'feed End::Error(e.to_string()),
            };
            assert!(used <= pending.len());
            pending.drain(..used);
            match step {
                ClientStep::NeedMore => break,
                ClientStep::StartTls => {
                    assert!(options.starttls, "TLS started unasked");
                    assert_eq!(tls_steps, 0, "TLS started twice");
                    tls_steps += 1;
                }
                ClientStep::Ready(neg) => {
                    if options.starttls {
                        assert_eq!(tls_steps, 1, "negotiation finished in clear text");
                    }
                    match neg.mode {
                        ReplyMode::Extended => assert!(options.extended_headers),
                        ReplyMode::Structured => assert!(options.structured_replies),
                        ReplyMode::Simple => {}
                    }
                    if neg.mode == ReplyMode::Simple {
                        assert!(neg.contexts.is_empty(), "contexts without structured replies");
                    }
                    if let Some(b) = neg.block_sizes {
                        assert!(b.minimum.is_power_of_two() && b.maximum >= b.minimum);
                    }
                    break 'feed End::Ready(format!("{neg:?}"));
                }
            }
        }
        if fed == input.len() {
            break End::Waiting;
        }
    };
    Outcome { out, end, tls_steps }
}

/// Walks what the client sent: its flags, then options.
fn check_output(options: &ClientOptions, o: &Outcome) {
    let out = &o.out;
    if out.is_empty() {
        return;
    }
    assert!(out.len() >= 4);
    let flags = u32::from_be_bytes(out[..4].try_into().unwrap());
    assert_eq!(flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES), 0);
    let mut at = 4;
    let mut starttls = 0;
    let mut export_name = false;
    while at < out.len() {
        assert!(!export_name, "an option after NBD_OPT_EXPORT_NAME");
        assert!(out.len() - at >= 16, "an option header cut short");
        assert_eq!(out[at..at + 8], IHAVEOPT.to_be_bytes());
        let option = u32::from_be_bytes(out[at + 8..at + 12].try_into().unwrap());
        let len = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap()) as usize;
        assert!(out.len() - at - 16 >= len, "an option cut short");
        match option {
            OPT_STARTTLS => {
                assert!(options.starttls);
                starttls += 1;
            }
            OPT_EXTENDED_HEADERS => assert!(options.extended_headers),
            OPT_STRUCTURED_REPLY => assert!(options.structured_replies),
            OPT_SET_META_CONTEXT => assert!(!options.meta_contexts.is_empty()),
            OPT_GO => {}
            OPT_EXPORT_NAME => export_name = true,
            other => panic!("the client sent option {other}"),
        }
        at += 16 + len;
    }
    assert!(starttls <= 1, "STARTTLS sent {starttls} times");
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let asks = data[0];
    let mut options = ClientOptions::new("vm");
    options.starttls = asks & 1 != 0;
    options.extended_headers = asks & 2 != 0;
    options.structured_replies = asks & 4 != 0;
    options.meta_contexts = [BASE_ALLOCATION, "qemu:dirty-bitmap:b0"]
        .iter()
        .take(((asks >> 3) & 3) as usize)
        .map(|s| s.to_string())
        .collect();
    let cut = match data[1] % 16 {
        0 => usize::MAX,
        n => n as usize,
    };
    let input = &data[2..];
    let whole = run(&options, input, usize::MAX);
    check_output(&options, &whole);
    if cut != usize::MAX {
        let pieces = run(&options, input, cut);
        assert_eq!(
            whole, pieces,
            "cut into pieces of {cut}, the stream gave another outcome"
        );
    }
});
