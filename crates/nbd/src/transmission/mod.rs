//! Transmission phase: requests (encoded by clients, decoded by servers),
//! replies (encoded by servers with [`Replies`], decoded by clients with
//! [`ReplyDecoder`]).

mod decoder;
mod replies;

pub use decoder::{ReplyDecoder, ReplyEvent, DEFAULT_REPLY_LIMIT};
pub use replies::Replies;

use crate::consts::*;
use crate::wire::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::{ProtocolError, ReplyMode};

/// A decoded request header. For writes the payload follows on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits as sent.
    pub flags: u16,
    /// `NBD_CMD_*` type as sent (unknown values are kept, to be refused).
    pub command: u16,
    /// Opaque client value echoed in every reply chunk.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Effect length, or payload length for writes.
    pub length: u64,
    /// Bytes of payload that follow this header on the wire.
    pub payload_len: u64,
}

/// Decodes one request header from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed (that is not an error), and
/// the header with its size otherwise. A bad magic is a protocol violation
/// after which the stream cannot be re-synchronised.
pub fn decode_request(buf: &[u8], mode: ReplyMode) -> Result<Option<(Request, usize)>, ProtocolError> {
    let extended = mode == ReplyMode::Extended;
    let need = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    if buf.len() < need {
        return Ok(None);
    }
    let magic = get_u32(buf);
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(ProtocolError::BadMagic);
    }
    let flags = get_u16(&buf[4..]);
    let command = get_u16(&buf[6..]);
    let cookie = get_u64(&buf[8..]);
    let offset = get_u64(&buf[16..]);
    let length = if extended {
        get_u64(&buf[24..])
    } else {
        get_u32(&buf[24..]) as u64
    };
    // A write always carries `length` bytes. qemu 10 sends extended writes
    // without NBD_CMD_FLAG_PAYLOAD_LEN, so the flag only matters for other
    // commands (whose payload is then consumed and refused).
    let payload_len = if command == CMD_WRITE || (extended && flags & CMD_FLAG_PAYLOAD_LEN != 0) {
        length
    } else {
        0
    };
    Ok(Some((
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
            payload_len,
        },
        need,
    )))
}

/// Encodes a request header (the client side); a write's payload goes next.
///
/// In extended mode a write gets `NBD_CMD_FLAG_PAYLOAD_LEN`, which the spec
/// requires there. In compact mode the length must fit in 32 bits: the
/// caller splits longer requests.
pub fn encode_request(out: &mut Vec<u8>, req: &Request, mode: ReplyMode) {
    if mode == ReplyMode::Extended {
        let payload = if req.command == CMD_WRITE {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        put_u32(out, EXTENDED_REQUEST_MAGIC);
        put_u16(out, req.flags | payload);
        put_u16(out, req.command);
        put_u64(out, req.cookie);
        put_u64(out, req.offset);
        put_u64(out, req.length);
    } else {
        debug_assert!(
            req.length <= u32::MAX as u64,
            "compact request of {} bytes",
            req.length
        );
        put_u32(out, REQUEST_MAGIC);
        put_u16(out, req.flags);
        put_u16(out, req.command);
        put_u64(out, req.cookie);
        put_u64(out, req.offset);
        put_u32(out, req.length as u32);
    }
}

/// One extent of a block-status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub length: u64,
    /// Context-specific status bits.
    pub flags: u64,
}
