//! One request, run against its export: a reply, or "would block" when it
//! was asked to run inline and cannot without waiting.

use std::cell::RefCell;
use std::sync::Arc;

use fleece_block::{AlignedBuf, ErrorKind, IoFlags, Mapping, ZeroFlags};
use fleece_nbd::consts::*;
use fleece_nbd::{Extent, Replies, Request};

use super::exports::{max_payload, ALLOCATION_DEPTH, COPY_ORDER, DIRTY_BITMAP_PREFIX, MAX_PAYLOAD};
use super::frame::{give_buf, take_buf};
use crate::registry::Export;

/// What a connection's requests run against, shared with worker threads.
pub struct Ctx {
    /// Reply encoder of the negotiated mode.
    pub replies: Replies,
    /// The export.
    pub export: Arc<Export>,
    /// Negotiated metadata contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
    /// Structured (or extended) replies were negotiated.
    pub structured: bool,
    /// The client may only read (its access rule says so): writes, zeroes
    /// and trims (a view's discards too) are refused with EPERM.
    pub read_only: bool,
}

/// Where a request runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// On the connection's thread: must not block; may decline.
    Inline,
    /// On a worker thread: may block; always answers.
    Blocking,
}

/// A piece of reply output, in order.
pub enum Chunk {
    /// Headers and small data.
    Bytes(Vec<u8>),
    /// Large read data, in a buffer of its own (it is sent in its own
    /// write call, so that it starts a socket buffer: after a reply header
    /// it would sit 16-32 bytes into one, where the kernel's copy is slow
    /// on some CPUs; see `AlignedBuf`).
    Data(AlignedBuf, usize),
}

impl Chunk {
    /// Bytes to send.
    pub fn len(&self) -> usize {
        match self {
            Chunk::Bytes(v) => v.len(),
            Chunk::Data(_, n) => *n,
        }
    }

    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Bytes(v) => v,
            Chunk::Data(b, n) => &b[..*n],
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Chunk::Data(b, _) = self {
            give_buf(std::mem::replace(b, AlignedBuf::zeroed(0)));
        }
    }
}

/// Replies of one or more requests, to be sent in order.
#[derive(Default)]
pub struct Out {
    chunks: Vec<Chunk>,
    tail: Vec<u8>,
}

impl Out {
    /// Bytes to send so far.
    pub fn len(&self) -> usize {
        self.tail.len() + self.chunks.iter().map(Chunk::len).sum::<usize>()
    }

    /// True if nothing is to be sent.
    pub fn is_empty(&self) -> bool {
        self.tail.is_empty() && self.chunks.is_empty()
    }

    /// The chunks, in order.
    pub fn into_chunks(mut self) -> Vec<Chunk> {
        let mut chunks = std::mem::take(&mut self.chunks);
        if !self.tail.is_empty() {
            chunks.push(Chunk::Bytes(std::mem::take(&mut self.tail)));
        }
        chunks
    }

    fn data(&mut self, buf: AlignedBuf, len: usize) {
        if !self.tail.is_empty() {
            self.chunks.push(Chunk::Bytes(std::mem::take(&mut self.tail)));
        }
        self.chunks.push(Chunk::Data(buf, len));
    }
}

/// Flags a command may carry. FUA is valid on every command (the spec says
/// a server that advertises it must accept it everywhere); it only matters
/// for writes.
fn allowed_flags(command: u16, structured: bool) -> u16 {
    CMD_FLAG_FUA
        | match command {
            CMD_READ if structured => CMD_FLAG_DF,
            CMD_WRITE => CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// The one place block errors become NBD error numbers.
pub fn errno(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::OutOfRange | ErrorKind::Invalid => EINVAL,
        ErrorKind::BeyondEnd | ErrorKind::StoreFull => ENOSPC,
        ErrorKind::NotSupported => ENOTSUP,
        ErrorKind::ReadOnly | ErrorKind::AccessDenied => EPERM,
        // WouldBlock never reaches a client: inline requests that get it
        // go to a worker, which runs them without `no_wait`.
        ErrorKind::Broken
        | ErrorKind::TimedOut
        | ErrorKind::Io
        | ErrorKind::Locked
        | ErrorKind::WouldBlock => EIO,
    }
}

/// The reply for a request that failed inside the server (a bug): EIO.
pub fn internal_error(ctx: &Ctx, req: &Request, out: &mut Out) {
    ctx.replies
        .error(&mut out.tail, req, EIO, "internal error in the server");
}

/// What a request costs while it is in flight: the bytes it holds (a
/// write's payload) or will produce (a read's data).
pub fn cost(req: &Request) -> u64 {
    if req.command == CMD_READ {
        req.length.min(MAX_PAYLOAD as u64)
    } else {
        req.payload_len
    }
}

/// Runs one request and appends its whole reply to `out`. Returns false,
/// with nothing appended, when `exec` is inline and the request would block.
pub fn run(ctx: &Ctx, req: &Request, payload: &[u8], out: &mut Out, exec: Exec) -> bool {
    let r = &ctx.replies;
    let mut fail = |code: u32, msg: &str| {
        r.error(&mut out.tail, req, code, msg);
        true
    };
    if req.flags & !allowed_flags(req.command, ctx.structured) != 0 {
        return fail(EINVAL, "flags not valid for this command");
    }
    if req.command != CMD_WRITE && req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        return fail(EINVAL, "this command takes no payload");
    }
    let dev = &ctx.export.dev;
    let caps = &ctx.export.caps;
    let size = dev.size();
    let in_range = req.offset.checked_add(req.length).is_some_and(|end| end <= size);
    // Trim on a read-only snapshot view means "discard", which it allows.
    let writes =
        matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) || (req.command == CMD_TRIM && !caps.trim);
    if writes && caps.read_only {
        return fail(
            EPERM,
            "export is read-only (snapshot views accept only reads and trim, which discards)",
        );
    }
    if ctx.read_only && matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM) {
        return fail(EPERM, "this client may only read this export");
    }
    let inline = exec == Exec::Inline;
    let result = match req.command {
        CMD_READ => {
            if req.length > max_payload(caps) as u64 {
                return fail(EINVAL, "read is larger than the maximum block size");
            }
            if !in_range {
                return fail(EINVAL, "read beyond the end of the export");
            }
            if req.length == 0 {
                r.ok(&mut out.tail, req);
                return true;
            }
            return read(ctx, req, out, exec);
        }
        CMD_WRITE => {
            if !in_range {
                return fail(ENOSPC, "write beyond the end of the export");
            }
            // The framing refuses payloads past MAX_PAYLOAD; a device may
            // take less (the export says so).
            if payload.len() as u64 > max_payload(caps) as u64 {
                return fail(EINVAL, "write is larger than the maximum block size");
            }
            let fua = req.flags & CMD_FLAG_FUA != 0;
            if inline {
                if fua {
                    return false;
                }
                match dev.write_at(payload, req.offset, IoFlags::NO_WAIT) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                    res => res,
                }
            } else {
                dev.write_at(payload, req.offset, IoFlags { fua, no_wait: false })
            }
        }
        CMD_WRITE_ZEROES => {
            if !in_range {
                return fail(ENOSPC, "write beyond the end of the export");
            }
            if inline {
                return false;
            }
            let flags = ZeroFlags {
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
                fua: req.flags & CMD_FLAG_FUA != 0,
            };
            dev.write_zeroes(req.offset, req.length, flags)
        }
        CMD_TRIM => {
            if !in_range {
                return fail(EINVAL, "trim beyond the end of the export");
            }
            if inline {
                return false;
            }
            let res = dev.trim(req.offset, req.length);
            if res.is_ok() && req.flags & CMD_FLAG_FUA != 0 {
                dev.flush()
            } else {
                res
            }
        }
        CMD_FLUSH => {
            if inline {
                return false;
            }
            dev.flush()
        }
        CMD_CACHE => {
            if !in_range {
                return fail(EINVAL, "cache beyond the end of the export");
            }
            if inline {
                return false;
            }
            dev.cache(req.offset, req.length)
        }
        CMD_BLOCK_STATUS => {
            block_status(ctx, req, &mut out.tail);
            return true;
        }
        _ => return fail(EINVAL, "unknown command"),
    };
    match result {
        Ok(()) => r.ok(&mut out.tail, req),
        Err(e) => {
            if e.kind() != ErrorKind::NotSupported {
                tracing::warn!(export = %ctx.export.name, cmd = req.command, offset = req.offset, error = %e, "request failed");
            }
            r.error(&mut out.tail, req, errno(e.kind()), &e.to_string());
        }
    }
    true
}

/// Reads at least this large get a data buffer of their own, sent in its
/// own write call; smaller ones are copied in with their reply header.
const DIRECT_READ: usize = 32 << 10;

thread_local! {
    /// Per-thread buffer for small reads, page-aligned (see [`AlignedBuf`]);
    /// zeroed only when it grows.
    static SCRATCH: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::zeroed(0));
}

fn read(ctx: &Ctx, req: &Request, out: &mut Out, exec: Exec) -> bool {
    let r = &ctx.replies;
    let len = req.length as usize;
    let dev = &ctx.export.dev;
    let flags = match exec {
        Exec::Inline => IoFlags::NO_WAIT,
        Exec::Blocking => IoFlags::NONE,
    };
    // None: declined, for a worker to run. Only an inline read may
    // decline: a worker always answers (a device that says "would block"
    // to a blocking read gets the client an EIO, not a lost reply).
    let fill = |buf: &mut [u8]| match dev.read_at(buf, req.offset, flags) {
        Err(e) if e.kind() == ErrorKind::WouldBlock && exec == Exec::Inline => None,
        res => Some(res),
    };
    let res = if len >= DIRECT_READ {
        let mut buf = take_buf(len);
        match fill(&mut buf[..len]) {
            None => {
                give_buf(buf);
                return false;
            }
            Some(Ok(())) => {
                r.read_data_header(&mut out.tail, req, req.offset, req.length, true);
                out.data(buf, len);
                Ok(())
            }
            Some(Err(e)) => {
                give_buf(buf);
                Err(e)
            }
        }
    } else {
        // Into the aligned per-thread buffer first, then copied in with the
        // header: the kernel's copy into an unaligned spot of `out` costs
        // more than our copy out of the scratch buffer.
        let res = SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            scratch.ensure(DIRECT_READ);
            let res = fill(&mut scratch[..len])?;
            if res.is_ok() {
                r.read_data_header(&mut out.tail, req, req.offset, req.length, true);
                out.tail.extend_from_slice(&scratch[..len]);
            }
            Some(res)
        });
        match res {
            None => return false,
            Some(res) => res,
        }
    };
    if let Err(e) = res {
        tracing::warn!(export = %ctx.export.name, offset = req.offset, error = %e, "read failed");
        r.error(&mut out.tail, req, errno(e.kind()), &e.to_string());
    }
    true
}

fn block_status(ctx: &Ctx, req: &Request, out: &mut Vec<u8>) {
    let r = &ctx.replies;
    let start = out.len();
    let size = ctx.export.dev.size();
    if ctx.contexts.is_empty() {
        r.error(out, req, EINVAL, "no metadata context was negotiated");
        return;
    }
    if req.length == 0 || req.offset >= size {
        r.error(out, req, EINVAL, "block status range is empty or beyond the end");
        return;
    }
    let len = req.length.min(size - req.offset);
    for (i, (id, name)) in ctx.contexts.iter().enumerate() {
        let mut wire: Vec<Extent> = if let Some(bitmap) = name.strip_prefix(DIRTY_BITMAP_PREFIX) {
            match ctx.export.bitmap_extents(bitmap, req.offset, len) {
                Ok(runs) => runs
                    .into_iter()
                    .map(|(length, dirty)| Extent {
                        length,
                        flags: dirty as u64,
                    })
                    .collect(),
                Err(why) => {
                    out.truncate(start);
                    r.error(out, req, EINVAL, &why);
                    return;
                }
            }
        } else if name == COPY_ORDER {
            match ctx.export.copy_order(req.offset, len) {
                Ok(runs) => runs
                    .into_iter()
                    .map(|(length, hint)| Extent {
                        length,
                        flags: hint as u64,
                    })
                    .collect(),
                Err(why) => {
                    out.truncate(start);
                    r.error(out, req, EINVAL, &why);
                    return;
                }
            }
        } else {
            let depth = name == ALLOCATION_DEPTH;
            match ctx.export.dev.block_status(req.offset, len) {
                Ok(e) => e
                    .iter()
                    .map(|e| Extent {
                        length: e.length,
                        flags: if depth {
                            // Unallocated in the whole chain is 0, as qemu
                            // counts (a zero cluster is a hole at its depth).
                            e.depth.unwrap_or(0) as u64
                        } else {
                            match e.mapping {
                                // Unknown may be data: claim nothing.
                                Mapping::Data | Mapping::Unknown => 0,
                                Mapping::Zero => STATE_ZERO as u64,
                                Mapping::Hole => (STATE_HOLE | STATE_ZERO) as u64,
                                // Not part of a snapshot view (discarded, or
                                // outside its bitmap): the spec's "hole" without
                                // "zero" is a trimmed range of unknown contents,
                                // which is what it is; reads of it fail.
                                Mapping::Unavailable => STATE_HOLE as u64,
                            }
                        },
                    })
                    .collect(),
                Err(e) => {
                    out.truncate(start);
                    r.error(out, req, errno(e.kind()), &e.to_string());
                    return;
                }
            }
        };
        if wire.is_empty() {
            wire.push(Extent {
                length: len,
                flags: 0,
            });
        }
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            wire.truncate(1);
            wire[0].length = wire[0].length.min(req.length);
        }
        r.block_status(out, req, *id, &wire, i + 1 == ctx.contexts.len());
    }
}
