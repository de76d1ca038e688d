//! Fixed-newstyle negotiation ("option haggling"), both sides.
//!
//! [`ServerHandshake`] is what the daemon runs for each client;
//! [`ClientHandshake`] is what a push job runs against a remote server. Both
//! are sans-IO: the caller feeds them the bytes it received and sends what
//! they append to `out`. What they share is the framing of options and
//! option replies (proto.md, "Fixed newstyle negotiation").

mod client;
mod server;

pub use client::{BlockSizes, ClientHandshake, ClientNegotiated, ClientOptions, ClientStep};
pub use server::{Catalog, ExportInfo, Negotiated, ServerHandshake, Step, TlsMode, MAX_OPTION_LEN};

use crate::consts::*;
use crate::wire::{get_u32, put_u32, put_u64};

/// `IHAVEOPT`, option, length.
const OPTION_HEADER_LEN: usize = 16;
/// Magic, option, reply type, length.
const OPTION_REPLY_HEADER_LEN: usize = 20;

/// A client option: header, then `data`.
fn put_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    put_u64(out, IHAVEOPT);
    put_u32(out, option);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// A server reply to `option`.
fn put_option_reply(out: &mut Vec<u8>, option: u32, kind: u32, payload: &[u8]) {
    put_u64(out, OPT_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, kind);
    put_u32(out, payload.len() as u32);
    out.extend_from_slice(payload);
}

/// A u32-length-prefixed string.
fn put_string(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// A u32-length-prefixed UTF-8 string within the protocol's length limit.
fn take_string(data: &[u8]) -> Option<(&str, &[u8])> {
    if data.len() < 4 {
        return None;
    }
    let len = get_u32(data) as usize;
    if len > MAX_STRING || data.len() - 4 < len {
        return None;
    }
    let s = std::str::from_utf8(&data[4..4 + len]).ok()?;
    if s.contains('\0') {
        return None;
    }
    Some((s, &data[4 + len..]))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The spec's name of an option, for messages.
pub(crate) fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "an unknown option",
    }
}
