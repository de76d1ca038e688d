//! Client side: replies in, events out.
//!
//! The decoder is incremental. It reports one event per call and says how
//! many input bytes that took; with too few bytes it asks for more and
//! consumes nothing. Headers and small payloads (errors, holes, block
//! status) are only decoded once whole, so the caller's buffer must be able
//! to hold the largest of those: the decoder's limit, plus a header. Read
//! data is not buffered: it comes out in pieces as it arrives, so a 32 MiB
//! read needs no 32 MiB buffer. Every length the server sends is checked
//! before it is trusted; malformed input is an error, never a panic.

use super::{Extent, Request};
use crate::consts::*;
use crate::wire::{get_u16, get_u32, get_u64};
use crate::{ProtocolError, ReplyMode};

/// Largest payload, other than read data, that a decoder accepts by default:
/// room for the 2^20 extents that the spec lets a block-status chunk carry,
/// with 64-bit descriptors.
pub const DEFAULT_REPLY_LIMIT: u64 = 8 + 16 * (1 << 20);

const SIMPLE_LEN: usize = 16;
const STRUCTURED_LEN: usize = 20;
const EXTENDED_LEN: usize = 32;

/// What a reply (or one chunk of it) says. Every event names the cookie of
/// the request it answers; the caller matches it against its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyEvent<'a> {
    /// Read data: `data` is the export's content at `offset`. One chunk may
    /// come in several events, as its bytes arrive.
    Data {
        /// The request's cookie.
        cookie: u64,
        /// Absolute offset of `data[0]` in the export.
        offset: u64,
        /// A slice of the input.
        data: &'a [u8],
    },
    /// `length` bytes at `offset` read as zeroes.
    Hole {
        /// The request's cookie.
        cookie: u64,
        /// Absolute offset of the hole.
        offset: u64,
        /// Its length, never zero.
        length: u32,
    },
    /// Block status for one metadata context.
    BlockStatus {
        /// The request's cookie.
        cookie: u64,
        /// The context id chosen in the handshake.
        context: u32,
        /// Consecutive extents from the request's offset; never empty, no
        /// extent of length zero.
        extents: Vec<Extent>,
    },
    /// The request failed (the reply may go on with more chunks until
    /// [`Done`](Self::Done)).
    Error {
        /// The request's cookie.
        cookie: u64,
        /// An `NBD_E*` value, never zero.
        error: u32,
        /// What the server said, possibly empty.
        message: String,
        /// Where it failed, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
        offset: Option<u64>,
    },
    /// The reply is complete; the cookie is free again.
    Done {
        /// The request's cookie.
        cookie: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between messages.
    Header,
    /// In the data of a read (a simple reply's payload or an OFFSET_DATA chunk).
    Data {
        cookie: u64,
        offset: u64,
        remaining: u64,
        done: bool,
    },
    /// A final chunk was reported; its `Done` comes next.
    Done(u64),
}

/// Decodes the replies of one connection in the mode it negotiated.
#[derive(Clone, Debug)]
pub struct ReplyDecoder {
    mode: ReplyMode,
    limit: u64,
    state: State,
}

impl ReplyDecoder {
    /// A decoder for `mode` with [`DEFAULT_REPLY_LIMIT`].
    pub fn new(mode: ReplyMode) -> Self {
        Self::with_limit(mode, DEFAULT_REPLY_LIMIT)
    }

    /// A decoder that refuses payloads (and read chunks) longer than `limit`.
    pub fn with_limit(mode: ReplyMode, limit: u64) -> Self {
        ReplyDecoder {
            mode,
            limit,
            state: State::Header,
        }
    }

    /// The negotiated mode.
    pub fn mode(&self) -> ReplyMode {
        self.mode
    }

    /// Whether the decoder is between messages: a connection that ends here
    /// ends cleanly.
    pub fn is_idle(&self) -> bool {
        self.state == State::Header
    }

    /// Decodes the next event from the start of `input`.
    ///
    /// `request` looks up the request a cookie belongs to; it is only asked
    /// about simple replies, the only ones whose framing depends on the
    /// request (a successful read carries its data without a length).
    /// Returns `Ok(None)` when more input is needed, else the event and how
    /// many bytes of `input` it used (possibly 0).
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
        request: impl FnOnce(u64) -> Option<Request>,
    ) -> Result<Option<(ReplyEvent<'a>, usize)>, ProtocolError> {
        match self.state {
            State::Done(cookie) => {
                self.state = State::Header;
                Ok(Some((ReplyEvent::Done { cookie }, 0)))
            }
            State::Data {
                cookie,
                offset,
                remaining,
                done,
            } => Ok(self.data(input, 0, cookie, offset, remaining, done)),
            State::Header => {
                if input.len() < 4 {
                    return Ok(None);
                }
                match (get_u32(input), self.mode) {
                    (SIMPLE_REPLY_MAGIC, ReplyMode::Simple | ReplyMode::Structured) => {
                        self.simple(input, request)
                    }
                    (STRUCTURED_REPLY_MAGIC, ReplyMode::Structured) => self.chunk(input, STRUCTURED_LEN),
                    (EXTENDED_REPLY_MAGIC, ReplyMode::Extended) => self.chunk(input, EXTENDED_LEN),
                    _ => Err(ProtocolError::BadMagic),
                }
            }
        }
    }

    fn simple<'a>(
        &mut self,
        input: &'a [u8],
        request: impl FnOnce(u64) -> Option<Request>,
    ) -> Result<Option<(ReplyEvent<'a>, usize)>, ProtocolError> {
        if input.len() < SIMPLE_LEN {
            return Ok(None);
        }
        let error = get_u32(&input[4..]);
        let cookie = get_u64(&input[8..]);
        if error != 0 {
            self.state = State::Done(cookie);
            return Ok(Some((
                error_event(cookie, error, String::new(), None),
                SIMPLE_LEN,
            )));
        }
        let req = request(cookie);
        match (self.mode, req) {
            (ReplyMode::Simple, None) => Err(bad(format!("a simple reply for unknown cookie {cookie:#x}"))),
            (_, Some(r)) if r.command == CMD_READ && r.length > 0 => {
                if self.mode != ReplyMode::Simple {
                    return Err(bad("a simple reply to a read with structured replies".into()));
                }
                Ok(self.data(input, SIMPLE_LEN, cookie, r.offset, r.length, true))
            }
            _ => Ok(Some((ReplyEvent::Done { cookie }, SIMPLE_LEN))),
        }
    }

    /// Up to `remaining` bytes of read data after `header` bytes of input.
    fn data<'a>(
        &mut self,
        input: &'a [u8],
        header: usize,
        cookie: u64,
        offset: u64,
        remaining: u64,
        done: bool,
    ) -> Option<(ReplyEvent<'a>, usize)> {
        let avail = input.len().saturating_sub(header);
        if avail == 0 {
            return None;
        }
        let n = remaining.min(avail as u64) as usize;
        self.state = if (n as u64) < remaining {
            State::Data {
                cookie,
                offset: offset.wrapping_add(n as u64),
                remaining: remaining - n as u64,
                done,
            }
        } else if done {
            State::Done(cookie)
        } else {
            State::Header
        };
        let data = &input[header..header + n];
        Some((ReplyEvent::Data { cookie, offset, data }, header + n))
    }

    fn chunk<'a>(
        &mut self,
        input: &'a [u8],
        header: usize,
    ) -> Result<Option<(ReplyEvent<'a>, usize)>, ProtocolError> {
        if input.len() < header {
            return Ok(None);
        }
        let flags = get_u16(&input[4..]);
        let kind = get_u16(&input[6..]);
        let cookie = get_u64(&input[8..]);
        let len = if header == EXTENDED_LEN {
            get_u64(&input[24..])
        } else {
            get_u32(&input[16..]) as u64
        };
        let done = flags & REPLY_FLAG_DONE != 0;
        if kind == REPLY_TYPE_OFFSET_DATA {
            if len < 9 {
                return Err(bad(format!("a data chunk of length {len}")));
            }
            if len - 8 > self.limit {
                return Err(too_large(len - 8, self.limit));
            }
            if input.len() < header + 8 {
                return Ok(None);
            }
            let offset = get_u64(&input[header..]);
            if offset.checked_add(len - 8).is_none() {
                return Err(bad(format!("a data chunk at offset {offset:#x}")));
            }
            return Ok(self.data(input, header + 8, cookie, offset, len - 8, done));
        }
        let total = match usize::try_from(len).ok().and_then(|l| l.checked_add(header)) {
            Some(total) if len <= self.limit => total,
            _ => return Err(too_large(len, self.limit)),
        };
        if input.len() < total {
            return Ok(None);
        }
        let p = &input[header..total];
        let event = match kind {
            REPLY_TYPE_NONE => {
                if len != 0 || !done {
                    return Err(bad(format!("a NONE chunk of length {len}, flags {flags:#x}")));
                }
                return Ok(Some((ReplyEvent::Done { cookie }, total)));
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let length = if len == 12 { get_u32(&p[8..]) } else { 0 };
                if length == 0 {
                    return Err(bad(format!("a hole chunk of length {len}")));
                }
                ReplyEvent::Hole {
                    cookie,
                    offset: get_u64(p),
                    length,
                }
            }
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => self.block_status(cookie, kind, p)?,
            k if k & (1 << 15) != 0 => error_chunk(cookie, k, p)?,
            k => return Err(bad(format!("unknown chunk type {k}"))),
        };
        self.state = if done { State::Done(cookie) } else { State::Header };
        Ok(Some((event, total)))
    }

    fn block_status(&self, cookie: u64, kind: u16, p: &[u8]) -> Result<ReplyEvent<'static>, ProtocolError> {
        // Each mode has its own chunk type; the other one is a violation.
        let extended = kind == REPLY_TYPE_BLOCK_STATUS_EXT;
        if extended != (self.mode == ReplyMode::Extended) {
            return Err(bad(format!(
                "block-status chunk type {kind} in {:?} mode",
                self.mode
            )));
        }
        let (head, width) = if extended { (8, 16) } else { (4, 8) };
        let valid = p.len() >= head + width
            && (p.len() - head).is_multiple_of(width)
            && (!extended || get_u32(&p[4..]) as usize == (p.len() - head) / width);
        if !valid {
            return Err(bad(format!("a block-status chunk of {} bytes", p.len())));
        }
        let extents: Vec<Extent> = p[head..]
            .chunks_exact(width)
            .map(|d| {
                if extended {
                    Extent {
                        length: get_u64(d),
                        flags: get_u64(&d[8..]),
                    }
                } else {
                    Extent {
                        length: get_u32(d) as u64,
                        flags: get_u32(&d[4..]) as u64,
                    }
                }
            })
            .collect();
        if extents.iter().any(|e| e.length == 0) {
            return Err(bad("an extent of length 0".into()));
        }
        Ok(ReplyEvent::BlockStatus {
            cookie,
            context: get_u32(p),
            extents,
        })
    }
}

/// Every error chunk type, known or not, starts with error and message; the
/// spec lets a client go on after an unknown one as long as that much fits.
fn error_chunk(cookie: u64, kind: u16, p: &[u8]) -> Result<ReplyEvent<'static>, ProtocolError> {
    if p.len() < 6 {
        return Err(bad(format!("an error chunk of {} bytes", p.len())));
    }
    let error = get_u32(p);
    let msg_len = get_u16(&p[4..]) as usize;
    let tail = if kind == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
    if 6 + msg_len + tail > p.len() {
        return Err(bad(format!(
            "an error chunk of {} bytes with a {msg_len}-byte message",
            p.len()
        )));
    }
    let message = String::from_utf8_lossy(&p[6..6 + msg_len]).into_owned();
    let offset = (kind == REPLY_TYPE_ERROR_OFFSET).then(|| get_u64(&p[6 + msg_len..]));
    Ok(error_event(cookie, error, message, offset))
}

fn error_event(cookie: u64, error: u32, message: String, offset: Option<u64>) -> ReplyEvent<'static> {
    // An error chunk must carry a nonzero value; the spec says to take
    // anything unexpected as EINVAL, and a zero must not read as success.
    let error = if error == 0 { EINVAL } else { error };
    ReplyEvent::Error {
        cookie,
        error,
        message,
        offset,
    }
}

fn bad(what: String) -> ProtocolError {
    ProtocolError::BadReply(what)
}

fn too_large(length: u64, limit: u64) -> ProtocolError {
    ProtocolError::ReplyTooLarge { length, limit }
}
