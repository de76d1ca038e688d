//! One client connection: handshake, then the request loop.

use std::cell::RefCell;
use std::io::{self, Cursor, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fleece_block::{AlignedBuf, ErrorKind, Mapping, ZeroFlags};
use fleece_nbd::consts::*;
use fleece_nbd::{decode_request, Extent, Negotiated, Replies, ReplyMode, Request, ServerHandshake, Step};

use super::{Pool, Stream};
use crate::registry::{Export, Registry, DIRTY_BITMAP_PREFIX, MAX_PAYLOAD};

/// A client that stalls mid-handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads that take turns reading a connection's requests and running the
/// non-blocking ones. Two let one parse while the other writes to the disk
/// or the socket (measured: 2 beat 1, 3 and 4 on a 2-core machine).
const READERS_PER_CONNECTION: usize = 2;
/// Requests one connection may have queued or running at once.
const MAX_INFLIGHT: usize = 256;
/// Payload bytes one connection may have buffered at once (at least one
/// request of the largest size always fits).
const MAX_INFLIGHT_BYTES: u64 = 128 << 20;

pub(super) fn serve(mut stream: Stream, registry: Arc<Registry>, pool: Arc<Pool>) {
    let negotiated = match handshake(&mut stream, &registry) {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "handshake ended");
            return;
        }
    };
    let (neg, leftover) = negotiated;
    if let Err(e) = stream.set_read_timeout(None) {
        tracing::debug!(error = %e, "cannot clear handshake timeout");
        return;
    }
    let (Ok(reader), Ok(handle)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let Some((export, id)) = registry.attach(&neg.export.name, neg.export.size, handle) else {
        // Removed (or shrunk) between negotiation and now.
        return;
    };
    tracing::debug!(export = %export.name, mode = ?neg.mode, "client connected");
    let conn = Arc::new(Conn {
        replies: Replies::new(neg.mode),
        writer: Mutex::new(stream),
        export: export.clone(),
        contexts: neg.contexts.clone(),
        structured: neg.mode != ReplyMode::Simple,
        inflight: Mutex::new((0, 0)),
        idle: Condvar::new(),
        broken: AtomicBool::new(false),
    });
    let reason = read_loop(&conn, Cursor::new(leftover).chain(reader), &pool);
    tracing::debug!(export = %export.name, %reason, "client disconnecting");
    conn.wait_idle();
    if let Ok(w) = conn.writer.lock() {
        w.shutdown_both();
    }
    registry.detach(id);
}

type Handshaken = (Negotiated, Vec<u8>);

fn handshake(stream: &mut Stream, registry: &Registry) -> io::Result<Option<Handshaken>> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut out = Vec::new();
    let mut hs = ServerHandshake::new(&mut out);
    stream.write_all(&out)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let (used, step) = hs
            .process(&buf, registry, &mut out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        buf.drain(..used);
        stream.write_all(&out)?;
        match step {
            Step::NeedMore => {}
            Step::Ready(neg) => return Ok(Some((*neg, buf))),
            Step::Close => return Ok(None),
        }
    }
}

struct Conn {
    replies: Replies,
    writer: Mutex<Stream>,
    export: Arc<Export>,
    contexts: Vec<(u32, String)>,
    structured: bool,
    /// (requests, payload bytes) queued or running.
    inflight: Mutex<(usize, u64)>,
    idle: Condvar,
    broken: AtomicBool,
}

impl Conn {
    fn acquire(&self, bytes: u64) {
        let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 > 0 && (g.0 >= MAX_INFLIGHT || g.1 + bytes > MAX_INFLIGHT_BYTES) {
            g = self.idle.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.0 += 1;
        g.1 += bytes;
    }

    fn release(&self, bytes: u64) {
        let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        g.1 -= bytes;
        self.idle.notify_all();
    }

    fn wait_idle(&self) {
        let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 > 0 {
            g = self.idle.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn send(&self, bytes: &[u8]) {
        self.send_groups(&[&[IoSlice::new(bytes)]]);
    }

    /// Writes the groups back to back, under one hold of the writer lock,
    /// each group with its own write calls. Large read data goes in a group
    /// of its own so that it starts a new socket buffer: after a reply
    /// header it would sit 16-32 bytes into one, an offset at which the
    /// kernel's copy is slow on some CPUs (see [`AlignedBuf`]).
    fn send_groups(&self, groups: &[&[IoSlice<'_>]]) {
        if self.broken.load(Ordering::Relaxed) || groups.iter().all(|g| g.iter().all(|p| p.is_empty())) {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        for group in groups {
            // An empty slice left at the end would make a write return 0.
            let mut owned: Vec<IoSlice<'_>> = group
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| IoSlice::new(p))
                .collect();
            let mut parts = &mut owned[..];
            while !parts.is_empty() && !self.broken.load(Ordering::Relaxed) {
                match w.write_vectored(parts) {
                    Ok(0) => {
                        self.broken.store(true, Ordering::Relaxed);
                    }
                    Ok(n) => IoSlice::advance_slices(&mut parts, n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "reply write failed; closing connection");
                        self.broken.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        if self.broken.load(Ordering::Relaxed) {
            w.shutdown_read();
        }
    }
}

/// Reads requests until the client leaves or breaks the protocol; returns why.
///
/// A few reader threads take turns on the socket (leader/follower, as in
/// nbdkit). Requests that cannot block (cached reads, plain writes that need
/// no copy-before-write, block status) run on the reader that read them, and
/// their replies are batched until the input runs dry; everything else goes
/// to the worker pool. On a fast disk this saves a thread hand-off and most
/// syscalls per request.
fn read_loop<R: Read + Send>(conn: &Arc<Conn>, raw: R, pool: &Arc<Pool>) -> String {
    let reader = Mutex::new((Input::new(raw), None::<String>));
    std::thread::scope(|s| {
        for _ in 1..READERS_PER_CONNECTION {
            s.spawn(|| read_turns(conn, &reader, pool));
        }
        read_turns(conn, &reader, pool);
    });
    let why = reader.into_inner().unwrap_or_else(|p| p.into_inner()).1;
    why.unwrap_or_default()
}

type SharedReader<R> = Mutex<(Input<R>, Option<String>)>;

/// A write's data. Large ones are read straight from the socket, so they
/// use aligned buffers, recycled: a fresh one would cost page faults on
/// every request (measured: 1 MiB writes at a third of the speed).
enum Payload {
    Small(Vec<u8>),
    Large(AlignedBuf, usize),
}

/// Large payload buffers kept for reuse, and the most bytes they may hold.
static SPARE: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());
const SPARE_BYTES: usize = 16 << 20;

impl Payload {
    fn new(len: usize) -> Self {
        if len < DIRECT_INPUT {
            return Payload::Small(vec![0; len]);
        }
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        let found = spare.iter().position(|b| b.len() >= len && b.len() <= 2 * len);
        let buf = match found {
            Some(i) => spare.swap_remove(i),
            None => {
                drop(spare);
                AlignedBuf::zeroed(len.next_power_of_two())
            }
        };
        Payload::Large(buf, len)
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Small(v) => v,
            Payload::Large(b, len) => &b[..*len],
        }
    }
}

impl std::ops::DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Payload::Small(v) => v,
            Payload::Large(b, len) => &mut b[..*len],
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Payload::Large(b, _) = self {
            let b = std::mem::replace(b, AlignedBuf::zeroed(0));
            let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
            if spare.iter().map(|s| s.len()).sum::<usize>() + b.len() <= SPARE_BYTES {
                spare.push(b);
            }
        }
    }
}

/// Reads of at least this many bytes skip [`Input`]'s buffer.
const DIRECT_INPUT: usize = 64 << 10;

/// A buffered reader over the socket whose buffer is page-aligned, and
/// whose large reads land on 64-byte boundaries (see [`AlignedBuf`] for
/// why); `std::io::BufReader` gives neither.
struct Input<R> {
    inner: R,
    buf: AlignedBuf,
    pos: usize,
    filled: usize,
}

impl<R: Read> Input<R> {
    fn new(inner: R) -> Self {
        Input {
            inner,
            buf: AlignedBuf::zeroed(256 << 10),
            pos: 0,
            filled: 0,
        }
    }

    fn buffered(&self) -> usize {
        self.filled - self.pos
    }

    fn read_some(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(dst) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads a request header. With nothing buffered, the header and
    /// whatever follows arrive in one vectored read that puts the bytes
    /// after the header at the start of the aligned buffer: a write's
    /// payload then lands where the kernel copies it fast. (Clients send a
    /// request at a time, so a read that returns several is rare.)
    fn read_header(&mut self, hdr: &mut [u8]) -> io::Result<()> {
        if self.buffered() > 0 {
            return self.read_exact(hdr);
        }
        let mut buf = std::mem::replace(&mut self.buf, AlignedBuf::zeroed(0));
        let got = loop {
            let mut iov = [io::IoSliceMut::new(hdr), io::IoSliceMut::new(&mut buf)];
            match self.inner.read_vectored(&mut iov) {
                Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => break Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.buf = buf;
        self.pos = 0;
        let got = got?;
        if got < hdr.len() {
            self.filled = 0;
            return self.read_exact(&mut hdr[got..]);
        }
        self.filled = got - hdr.len();
        Ok(())
    }

    fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            let take = self.buffered().min(dst.len() - done);
            if take > 0 {
                dst[done..done + take].copy_from_slice(&self.buf[self.pos..self.pos + take]);
                self.pos += take;
                done += take;
                continue;
            }
            let rest = &mut dst[done..];
            if rest.len() >= DIRECT_INPUT {
                // Straight into the destination, first a few bytes to
                // bring it to a 64-byte boundary.
                let skew = (64 - rest.as_ptr() as usize % 64) % 64;
                let want = if skew > 0 { skew } else { rest.len() };
                done += self.read_some(&mut rest[..want])?;
            } else {
                let mut buf = std::mem::replace(&mut self.buf, AlignedBuf::zeroed(0));
                let got = self.read_some(&mut buf);
                self.buf = buf;
                self.pos = 0;
                self.filled = got?;
            }
        }
        Ok(())
    }
}

/// One reader's turns: take the reader, read one request, let go, run it.
fn read_turns<R: Read>(conn: &Arc<Conn>, shared: &SharedReader<R>, pool: &Arc<Pool>) {
    let mode = conn.replies.mode();
    let hlen = if mode == ReplyMode::Extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
    let mut pending: Vec<u8> = Vec::with_capacity(64 << 10);
    loop {
        // Another reader may hold the lock while it waits for input that
        // only comes after the client sees our replies: never wait for the
        // lock with replies unsent.
        let mut g = match shared.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if !pending.is_empty() {
                    conn.send(&pending);
                    pending.clear();
                }
                shared.lock().unwrap_or_else(|p| p.into_inner())
            }
        };
        if g.1.is_some() {
            drop(g);
            conn.send(&pending);
            return;
        }
        if !pending.is_empty() && (g.0.buffered() < hlen || pending.len() >= 256 << 10) {
            drop(g);
            conn.send(&pending);
            pending.clear();
            continue;
        }
        let (reader, stop) = &mut *g;
        let got = (|| {
            reader
                .read_header(&mut hdr[..hlen])
                .map_err(|e| format!("read: {e}"))?;
            let req = match decode_request(&hdr[..hlen], mode) {
                Ok(Some((req, _))) => req,
                Ok(None) => return Err("short header".to_string()),
                Err(e) => return Err(e.to_string()),
            };
            if req.command == CMD_DISC {
                return Err("NBD_CMD_DISC".into());
            }
            if req.payload_len > MAX_PAYLOAD as u64 {
                return Err(format!(
                    "payload of {} bytes exceeds the maximum",
                    req.payload_len
                ));
            }
            // About to wait for the rest of a payload: the client may be
            // waiting for our replies before it sends more.
            if !pending.is_empty() && reader.buffered() < req.payload_len as usize {
                conn.send(&pending);
                pending.clear();
            }
            let mut payload = Payload::new(req.payload_len as usize);
            reader
                .read_exact(&mut payload)
                .map_err(|e| format!("read payload: {e}"))?;
            Ok((req, payload))
        })();
        let (req, payload) = match got {
            Ok(x) => x,
            Err(why) => {
                *stop = Some(why);
                drop(g);
                conn.send(&pending);
                return;
            }
        };
        drop(g);
        if handle(conn, &req, &payload, &mut pending, Exec::Inline) {
            continue;
        }
        let cost = if req.command == CMD_READ {
            req.length.min(MAX_PAYLOAD as u64)
        } else {
            req.payload_len
        };
        if !pending.is_empty() {
            // acquire may wait for the pool to drain.
            conn.send(&pending);
            pending.clear();
        }
        conn.acquire(cost);
        let c = conn.clone();
        pool.submit(move || {
            let mut reply = Vec::new();
            handle(&c, &req, &payload, &mut reply, Exec::Blocking);
            drop(payload);
            c.send(&reply);
            c.release(cost);
        });
    }
}

/// Where a request runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exec {
    /// On the reader thread: must not block; may decline.
    Inline,
    /// On a worker thread: may block; always answers.
    Blocking,
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

fn errno(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::OutOfRange | ErrorKind::Invalid => EINVAL,
        ErrorKind::NoSpace | ErrorKind::StoreFull => ENOSPC,
        ErrorKind::NotSupported => ENOTSUP,
        ErrorKind::ReadOnly | ErrorKind::AccessDenied => EPERM,
        ErrorKind::Broken | ErrorKind::TimedOut | ErrorKind::Io | ErrorKind::Locked => EIO,
    }
}

/// Runs one request and appends its whole reply to `out`. Returns false,
/// with nothing appended, when `exec` is inline and the request would block.
fn handle(conn: &Conn, req: &Request, payload: &[u8], out: &mut Vec<u8>, exec: Exec) -> bool {
    let r = &conn.replies;
    let mut fail = |code: u32, msg: &str| {
        r.error(out, req, code, msg);
        true
    };
    if req.flags & !allowed_flags(req.command, conn.structured) != 0 {
        return fail(EINVAL, "flags not valid for this command");
    }
    if req.command != CMD_WRITE && req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        return fail(EINVAL, "this command takes no payload");
    }
    let dev = &conn.export.dev;
    let size = dev.size();
    let in_range = req.offset.checked_add(req.length).is_some_and(|end| end <= size);
    // Trim on a read-only snapshot view means "discard", which it allows.
    let writes = matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES)
        || (req.command == CMD_TRIM && !dev.capabilities().trim);
    if writes && conn.export.read_only {
        return fail(
            EPERM,
            "export is read-only (snapshot views accept only reads and trim, which discards)",
        );
    }
    let inline = exec == Exec::Inline;
    let result = match req.command {
        CMD_READ => {
            if req.length > MAX_PAYLOAD as u64 {
                return fail(EINVAL, "read is larger than the maximum block size");
            }
            if !in_range {
                return fail(EINVAL, "read beyond the end of the export");
            }
            if req.length == 0 {
                r.ok(out, req);
                return true;
            }
            return read(conn, req, out, exec);
        }
        CMD_WRITE => {
            if !in_range {
                return fail(ENOSPC, "write beyond the end of the export");
            }
            let fua = req.flags & CMD_FLAG_FUA != 0;
            if inline {
                if fua {
                    return false;
                }
                match dev.try_write_at(payload, req.offset) {
                    Some(res) => res,
                    None => return false,
                }
            } else {
                dev.write_at(payload, req.offset, fua)
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
            block_status(conn, req, out);
            return true;
        }
        _ => return fail(EINVAL, "unknown command"),
    };
    match result {
        Ok(()) => r.ok(out, req),
        Err(e) => {
            if e.kind() != ErrorKind::NotSupported {
                tracing::warn!(export = %conn.export.name, cmd = req.command, offset = req.offset, error = %e, "request failed");
            }
            r.error(out, req, errno(e.kind()), &e.to_string());
        }
    }
    true
}

/// Reads at least this large skip the reply buffer: the data goes from a
/// reused per-thread buffer straight to the socket with the header in one
/// vectored write, which saves zeroing and copying it.
const DIRECT_READ: usize = 32 << 10;

thread_local! {
    /// Per-thread read buffer, page-aligned (see [`AlignedBuf`]); zeroed
    /// only when it grows.
    static SCRATCH: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::zeroed(0));
}

fn read(conn: &Conn, req: &Request, out: &mut Vec<u8>, exec: Exec) -> bool {
    let r = &conn.replies;
    let len = req.length as usize;
    let dev = &conn.export.dev;
    let fill = |buf: &mut [u8]| match exec {
        Exec::Inline => dev.try_read_at(buf, req.offset),
        Exec::Blocking => Some(dev.read_at(buf, req.offset)),
    };
    // Data goes into the aligned per-thread buffer first, even for small
    // reads that are then batched into `out`: the kernel's copy into an
    // unaligned spot of `out` costs more than our copy out of `scratch`.
    let res = SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        scratch.ensure(len.max(DIRECT_READ));
        let res = fill(&mut scratch[..len])?;
        if res.is_ok() {
            if len >= DIRECT_READ {
                let mut head = Vec::with_capacity(r.read_data_header_len());
                r.read_data_header(&mut head, req, req.offset, req.length, true);
                // Earlier batched replies go first, in the same write.
                conn.send_groups(&[
                    &[IoSlice::new(out), IoSlice::new(&head)],
                    &[IoSlice::new(&scratch[..len])],
                ]);
                out.clear();
            } else {
                r.read_data_header(out, req, req.offset, req.length, true);
                out.extend_from_slice(&scratch[..len]);
            }
        }
        Some(res)
    });
    match res {
        None => false,
        Some(Ok(())) => true,
        Some(Err(e)) => {
            tracing::warn!(export = %conn.export.name, offset = req.offset, error = %e, "read failed");
            r.error(out, req, errno(e.kind()), &e.to_string());
            true
        }
    }
}

fn block_status(conn: &Conn, req: &Request, out: &mut Vec<u8>) {
    let r = &conn.replies;
    let start = out.len();
    let size = conn.export.dev.size();
    if conn.contexts.is_empty() {
        r.error(out, req, EINVAL, "no metadata context was negotiated");
        return;
    }
    if req.length == 0 || req.offset >= size {
        r.error(out, req, EINVAL, "block status range is empty or beyond the end");
        return;
    }
    let len = req.length.min(size - req.offset);
    for (i, (id, name)) in conn.contexts.iter().enumerate() {
        let mut wire: Vec<Extent> = if let Some(bitmap) = name.strip_prefix(DIRTY_BITMAP_PREFIX) {
            match conn.export.bitmap_extents(bitmap, req.offset, len) {
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
        } else {
            match conn.export.dev.block_status(req.offset, len) {
                Ok(e) => e
                    .iter()
                    .map(|e| Extent {
                        length: e.length,
                        flags: match e.mapping {
                            Mapping::Data => 0,
                            Mapping::Zero => STATE_ZERO as u64,
                            Mapping::Hole => (STATE_HOLE | STATE_ZERO) as u64,
                            // Not part of a snapshot view (discarded, or
                            // outside its bitmap): the spec's "hole" without
                            // "zero" is a trimmed range of unknown contents,
                            // which is what it is; reads of it fail.
                            Mapping::Unavailable => STATE_HOLE as u64,
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
        r.block_status(out, req, *id, &wire, i + 1 == conn.contexts.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out the stream in chunks of the given sizes (cycled), across
    /// vectored buffers the way readv does.
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl Chunked {
        fn next_len(&mut self) -> usize {
            let n = self.sizes[self.turn % self.sizes.len()];
            self.turn += 1;
            n.min(self.data.len() - self.at)
        }
    }

    impl Read for Chunked {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.next_len().min(buf.len());
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
        fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
            let mut left = self.next_len();
            let mut done = 0;
            for b in bufs.iter_mut() {
                let n = left.min(b.len());
                b[..n].copy_from_slice(&self.data[self.at..self.at + n]);
                self.at += n;
                left -= n;
                done += n;
            }
            Ok(done)
        }
    }

    #[test]
    fn input_returns_headers_and_payloads_exactly_however_the_stream_is_cut() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let lens = [
            0usize,
            1,
            511,
            4096,
            DIRECT_INPUT - 1,
            DIRECT_INPUT,
            300 << 10,
            1 << 20,
        ];
        let records: Vec<(Vec<u8>, Vec<u8>)> = (0..120)
            .map(|_| {
                let hdr: Vec<u8> = (0..REQUEST_LEN).map(|_| rand() as u8).collect();
                let len = lens[rand() as usize % lens.len()];
                let payload: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
                (hdr, payload)
            })
            .collect();
        let stream: Vec<u8> = records
            .iter()
            .flat_map(|(h, p)| h.iter().chain(p).copied())
            .collect();
        for sizes in [
            vec![1],
            vec![3, 7000, 5],
            vec![REQUEST_LEN],
            vec![REQUEST_LEN + 4096],
            vec![1 << 30],
        ] {
            let mut input = Input::new(Chunked {
                data: stream.clone(),
                at: 0,
                sizes: sizes.clone(),
                turn: 0,
            });
            for (i, (h, p)) in records.iter().enumerate() {
                let mut hdr = [0u8; REQUEST_LEN];
                input.read_header(&mut hdr).unwrap();
                assert_eq!(&hdr[..], &h[..], "header {i}, chunks {sizes:?}");
                let mut payload = Payload::new(p.len());
                input.read_exact(&mut payload).unwrap();
                assert!(
                    payload[..] == p[..],
                    "payload {i} ({} bytes), chunks {sizes:?}",
                    p.len()
                );
            }
            let mut hdr = [0u8; REQUEST_LEN];
            let end = input.read_header(&mut hdr).unwrap_err();
            assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
        }
    }
}
