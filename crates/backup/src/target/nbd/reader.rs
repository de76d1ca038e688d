//! The reader thread of one connection: decodes replies and settles the
//! requests they answer, in whatever order the server answers them.
//!
//! It owns the entries of the requests in flight (senders hand them over a
//! channel before sending), so read data goes from its buffer into the
//! request's buffer without a lock. When the connection ends, for whatever
//! reason, it marks the target lost and drops every entry it holds, which
//! fails each one as `Disconnected`.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use fleece_nbd::consts::*;
use fleece_nbd::{ReplyDecoder, ReplyEvent, Request};

use super::conn::{describe, Entry, Expect, Source};
use super::flow::Flow;
use super::pending::Output;
use crate::error::{Error, ErrorKind};

const BUFFER: usize = 256 * 1024;

pub(crate) struct Reader {
    pub(crate) stream: Source,
    pub(crate) entries: Receiver<Entry>,
    pub(crate) decoder: ReplyDecoder,
    pub(crate) flow: Arc<Flow>,
    /// Bytes that came right after the handshake.
    pub(crate) initial: Vec<u8>,
}

impl Reader {
    pub(crate) fn run(self) {
        let Reader {
            mut stream,
            entries,
            mut decoder,
            flow,
            initial,
        } = self;
        let mut in_flight = HashMap::new();
        // A bug here must still fail what is in flight and stop the target,
        // not leave callers waiting on a connection nobody reads.
        let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve(
                &mut stream,
                &entries,
                &mut in_flight,
                &mut decoder,
                &flow,
                initial,
            )
        }));
        let cause = match end {
            Ok(Ok(())) => "the server closed the connection".to_string(),
            Ok(Err(cause)) => cause,
            Err(_) => "internal error: the reply reader panicked".to_string(),
        };
        // The cause first: dropping the entries reads it for their errors.
        flow.lose(cause);
        in_flight.clear();
        drop(entries);
    }
}

/// Reads and settles replies until the connection ends: `Ok` at a clean end
/// (nothing in flight, between messages), else why it ended.
fn serve(
    stream: &mut Source,
    entries: &Receiver<Entry>,
    in_flight: &mut HashMap<u64, Entry>,
    decoder: &mut ReplyDecoder,
    flow: &Flow,
    initial: Vec<u8>,
) -> Result<(), String> {
    let mut buf = vec![0u8; BUFFER.max(initial.len())];
    buf[..initial.len()].copy_from_slice(&initial);
    let (mut start, mut end) = (0, initial.len());
    loop {
        loop {
            let input = &buf[start..end];
            let step = decoder.decode(input, |cookie| find(in_flight, entries, cookie).map(|e| e.req));
            match step {
                Ok(Some((event, used))) => {
                    settle(event, in_flight, entries, flow)?;
                    start += used;
                }
                Ok(None) => break,
                Err(e) => return Err(format!("the server broke the protocol: {e}")),
            }
        }
        // Keep what is left at the front; grow only for a message larger
        // than the buffer (the decoder bounds how large).
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match stream.read(&mut buf[end..]) {
            Ok(0) => {
                while let Ok(e) = entries.try_recv() {
                    in_flight.insert(e.req.cookie, e);
                }
                if in_flight.is_empty() && end == 0 && decoder.is_idle() {
                    return Ok(());
                }
                return Err(format!(
                    "the server closed the connection with {} requests in flight",
                    in_flight.len().max(1)
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading from the server failed: {e}")),
        };
        end += n;
    }
}

/// The entry of `cookie`, taking in the entries sent since the last look.
fn find<'a>(
    in_flight: &'a mut HashMap<u64, Entry>,
    entries: &Receiver<Entry>,
    cookie: u64,
) -> Option<&'a mut Entry> {
    if !in_flight.contains_key(&cookie) {
        while let Ok(e) = entries.try_recv() {
            in_flight.insert(e.req.cookie, e);
        }
    }
    in_flight.get_mut(&cookie)
}

/// Applies one event to the request it answers. An error is a violation
/// after which the connection cannot be trusted.
fn settle(
    event: ReplyEvent<'_>,
    in_flight: &mut HashMap<u64, Entry>,
    entries: &Receiver<Entry>,
    flow: &Flow,
) -> Result<(), String> {
    let cookie = match &event {
        ReplyEvent::Data { cookie, .. }
        | ReplyEvent::Hole { cookie, .. }
        | ReplyEvent::BlockStatus { cookie, .. }
        | ReplyEvent::Error { cookie, .. }
        | ReplyEvent::Done { cookie } => *cookie,
    };
    let entry = find(in_flight, entries, cookie)
        .ok_or_else(|| format!("the server answered cookie {cookie:#x}, which no request in flight has"))?;
    let unexpected =
        |what: &str, req: &Request| format!("the server sent {what} in reply to {}", describe(req));
    match event {
        ReplyEvent::Data { offset, data, .. } => {
            let Expect::Data { buf, filled } = &mut entry.expect else {
                return Err(unexpected("read data", &entry.req));
            };
            let at = within(&entry.req, offset, data.len() as u64)?;
            buf[at..at + data.len()].copy_from_slice(data);
            *filled += data.len() as u64;
        }
        ReplyEvent::Hole { offset, length, .. } => {
            let Expect::Data { filled, .. } = &mut entry.expect else {
                return Err(unexpected("a hole", &entry.req));
            };
            // The buffer starts zeroed: a hole only counts.
            within(&entry.req, offset, length as u64)?;
            *filled += length as u64;
        }
        ReplyEvent::BlockStatus { context, extents, .. } => {
            let Expect::Extents {
                context: ours,
                extents: got,
            } = &mut entry.expect
            else {
                return Err(unexpected("block status", &entry.req));
            };
            // Contexts this client did not select are none of its business.
            if context == *ours {
                *got = Some(extents);
            }
        }
        ReplyEvent::Error { error, message, .. } => {
            entry.error.get_or_insert((error, message));
            if error == ESHUTDOWN {
                // The spec: a client told ESHUTDOWN must disconnect; new
                // requests are refused from now on, those in flight finish.
                flow.lose("the server is shutting down (ESHUTDOWN)".into());
            }
        }
        ReplyEvent::Done { .. } => {
            let Some(mut entry) = in_flight.remove(&cookie) else {
                return Ok(());
            };
            match finish(&mut entry) {
                Ok(outcome) => entry.slot.set(outcome),
                Err(violation) => {
                    // Lost before the entry drops, so its error says why.
                    flow.lose(violation.clone());
                    return Err(violation);
                }
            }
        }
    }
    Ok(())
}

/// Where a piece of a read reply goes in the request's buffer.
fn within(req: &Request, offset: u64, len: u64) -> Result<usize, String> {
    let inside = match offset.checked_add(len) {
        Some(end) => offset >= req.offset && end <= req.offset + req.length,
        None => false,
    };
    if !inside {
        return Err(format!(
            "the server sent {len} bytes at offset {offset} in reply to {}",
            describe(req)
        ));
    }
    Ok((offset - req.offset) as usize)
}

/// The outcome of a completed reply, or a violation.
fn finish(entry: &mut Entry) -> Result<Result<Output, Error>, String> {
    let req = entry.req;
    if let Some((errno, message)) = entry.error.take() {
        let what = format!("{} on {}", describe(&req), entry.label);
        let err = Error::server(&what, errno, &message);
        // A fast zero that would not be fast is an answer, not a failure:
        // the caller writes zeroes the slow way.
        let fast_zero = req.command == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0;
        let err = if fast_zero && errno == ENOTSUP {
            err.with_kind(ErrorKind::Unsupported)
        } else {
            err
        };
        return Ok(Err(err));
    }
    match std::mem::replace(&mut entry.expect, Expect::Ack) {
        Expect::Ack => Ok(Ok(Output::Done)),
        Expect::Data { buf, filled } if filled == req.length => Ok(Ok(Output::Data(buf))),
        Expect::Data { filled, .. } => Err(format!(
            "the server's reply to {} covered {filled} bytes",
            describe(&req)
        )),
        Expect::Extents {
            extents: Some(extents),
            ..
        } => Ok(Ok(Output::Extents(clamp(extents, req.length)))),
        Expect::Extents { extents: None, .. } => Err(format!(
            "the server's reply to {} had no extents for {BASE_ALLOCATION}",
            describe(&req)
        )),
    }
}

/// Extents cut to the request: the last one may run past it (the spec lets
/// a server say more than it was asked).
fn clamp(extents: Vec<fleece_nbd::Extent>, length: u64) -> Vec<fleece_nbd::Extent> {
    let mut at = 0;
    let mut out = Vec::with_capacity(extents.len());
    for mut e in extents {
        if at >= length {
            break;
        }
        e.length = e.length.min(length - at);
        at += e.length;
        out.push(e);
    }
    out
}
