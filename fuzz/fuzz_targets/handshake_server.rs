//! The server's option haggling, STARTTLS included, against any client.
//!
//! Input: byte 0 picks the TLS policy (off, allowed, required), byte 1 how
//! the stream is cut (0: whole; else that many bytes per call, mod 16), the
//! rest is what the client sends. When the machine asks for TLS, the bytes
//! after the STARTTLS option are fed to it as if they came out of the TLS
//! session, which reaches the negotiation inside TLS.
//!
//! Checked besides "no panic": the stream cut into pieces gives the same
//! replies and outcome as in one piece; every reply is well framed and
//! bounded; a TLS-required server answers nothing but "TLS required" (or
//! "too big") before STARTTLS and never finishes in clear text; a denied
//! export is never opened; STARTTLS is never acknowledged twice or with
//! TLS off.
#![no_main]

use fleece_nbd::consts::*;
use fleece_nbd::{Catalog, ExportInfo, ServerHandshake, Step, TlsMode};
use libfuzzer_sys::fuzz_target;

/// Two exports any client may open, with metadata contexts, and one the
/// access list denies.
struct Exports;

fn export(name: &str) -> ExportInfo {
    ExportInfo {
        name: name.to_string(),
        description: format!("the {name} disk"),
        size: 1 << 30,
        flags: TF_SEND_FLUSH | TF_SEND_DF | TF_SEND_TRIM | TF_CAN_MULTI_CONN,
        block_sizes: (1, 4096, 32 << 20),
        contexts: vec![BASE_ALLOCATION.to_string(), "qemu:dirty-bitmap:b0".to_string()],
    }
}

impl Catalog for Exports {
    fn list(&self) -> Vec<ExportInfo> {
        // A real catalog filters what the client may not open.
        vec![export("vm"), export("vm@snap")]
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "" | "vm" => Some(export("vm")),
            "vm@snap" | "secret" => Some(export(name)),
            _ => None,
        }
    }
    fn permit(&self, name: &str) -> Result<(), String> {
        if name == "secret" {
            return Err("identity 'nobody' may not open 'secret'".into());
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Input ran out while the machine waited for more.
    Waiting,
    Ready(String, u16, String),
    Close,
    Error(String),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    end: End,
    /// How many STARTTLS steps the machine took.
    tls_steps: usize,
}

fn run(tls: TlsMode, input: &[u8], cut: usize) -> Outcome {
    let mut out = Vec::new();
    let mut hs = ServerHandshake::with_tls(&mut out, tls);
    let mut pending: Vec<u8> = Vec::new();
    let mut tls_steps = 0;
    let mut fed = 0;
    let end = 'feed: loop {
        let n = cut.min(input.len() - fed);
        pending.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            let (used, step) = match hs.process(&pending, &Exports, &mut out) {
                Ok(r) => r,
                Err(e) => break 'feed End::Error(e.to_string()),
            };
            assert!(
                used <= pending.len(),
                "consumed {used} of {} bytes",
                pending.len()
            );
            pending.drain(..used);
            match step {
                Step::NeedMore => break,
                Step::StartTls => {
                    assert_ne!(tls, TlsMode::Off, "STARTTLS acknowledged with TLS off");
                    assert_eq!(tls_steps, 0, "a second STARTTLS acknowledged");
                    assert!(hs.tls_started());
                    tls_steps += 1;
                }
                Step::Ready(neg) => {
                    if tls == TlsMode::Required {
                        assert!(hs.tls_started(), "negotiation finished in clear text");
                    }
                    assert_ne!(neg.export.name, "secret", "a denied export was opened");
                    assert!(neg.flags & TF_HAS_FLAGS != 0);
                    for (id, name) in &neg.contexts {
                        assert!(
                            *id != 0 && neg.export.contexts.contains(name),
                            "context {id} {name}"
                        );
                    }
                    let mode = format!("{:?}", neg.mode);
                    break 'feed End::Ready(neg.export.name.clone(), neg.flags, mode);
                }
                Step::Close => break 'feed End::Close,
            }
        }
        if fed == input.len() {
            break End::Waiting;
        }
    };
    Outcome { out, end, tls_steps }
}

/// Walks the server's output: greeting, option replies, and the answer to
/// `NBD_OPT_EXPORT_NAME` only at the very end.
fn check_output(tls: TlsMode, o: &Outcome, input_len: usize) {
    let out = &o.out;
    assert!(out.len() >= 18 && out[..8] == NBDMAGIC.to_be_bytes()[..]);
    // Each option takes 16 bytes of input at least; what one is answered
    // with is bounded (names and refusals are cut short).
    let bound = 18 + 134 + (input_len / 16 + 1) * 2048;
    assert!(out.len() <= bound, "{} bytes out for {input_len} in", out.len());
    let mut at = 18;
    let mut tls_on = false;
    while out.len() - at >= 20 && out[at..at + 8] == OPT_REPLY_MAGIC.to_be_bytes()[..] {
        let be32 = |i: usize| u32::from_be_bytes(out[i..i + 4].try_into().unwrap());
        let (option, kind, len) = (be32(at + 8), be32(at + 12), be32(at + 16));
        // Far below what a client may send (MAX_OPTION_LEN): names and
        // refusals are cut short, and the catalog is small.
        assert!(len <= 2048, "a reply of {len} bytes");
        assert!(out.len() - at - 20 >= len as usize, "a reply cut short");
        if tls == TlsMode::Required && !tls_on {
            // An option over the size limit is refused (and the connection
            // closed) from its header alone, whatever it is: that says nothing.
            let allowed = kind == REP_ERR_TLS_REQD
                || kind == REP_ERR_TOO_BIG
                || (kind == REP_ACK && matches!(option, OPT_STARTTLS | OPT_ABORT))
                || (kind == REP_ERR_INVALID && option == OPT_STARTTLS);
            assert!(allowed, "reply {kind:#x} to option {option} before TLS");
        }
        if option == OPT_STARTTLS && kind == REP_ACK {
            assert!(!tls_on, "STARTTLS acknowledged twice");
            tls_on = true;
        }
        at += 20 + len as usize;
    }
    let rest = out.len() - at;
    match &o.end {
        // EXPORT_NAME's answer: size, flags and maybe 124 zeroes.
        End::Ready(..) if rest > 0 => {
            assert!(rest == 10 || rest == 134, "{rest} bytes of EXPORT_NAME answer")
        }
        _ => assert_eq!(rest, 0, "{rest} bytes that are no reply"),
    }
    assert_eq!(tls_on, o.tls_steps == 1);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let tls = [TlsMode::Off, TlsMode::Allowed, TlsMode::Required][data[0] as usize % 3];
    let cut = match data[1] % 16 {
        0 => usize::MAX,
        n => n as usize,
    };
    let input = &data[2..];
    let whole = run(tls, input, usize::MAX);
    check_output(tls, &whole, input.len());
    if cut != usize::MAX {
        let pieces = run(tls, input, cut);
        assert_eq!(
            whole, pieces,
            "cut into pieces of {cut}, the stream gave another outcome"
        );
    }
});
