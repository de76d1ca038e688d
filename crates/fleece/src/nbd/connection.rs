//! One client connection: the handshake, then one thread that owns the
//! socket for the whole transmission phase.
//!
//! The owner reads requests and writes replies; nobody else touches the
//! socket. Requests that cannot block (cached reads, writes that need no
//! copy-before-write or new bitmap bit, block status) run on the owner
//! itself; the rest go to the shared worker pool, whose threads compute
//! the reply and hand it back through the connection's completion queue,
//! waking the owner. So a client that does not read its replies only fills
//! its own queue: the owner stops reading its requests once the replies it
//! owes reach [`MAX_REPLY_BYTES`], and no worker ever waits on its socket.
//! TLS sits here too: a session needs one owner, and the owner's
//! transport is either the socket or a TLS session over it
//! ([`Transport`]); per-command counters would belong here as well.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fleece_nbd::consts::CMD_DISC;
use fleece_nbd::{Negotiated, ReplyMode, Request, ServerHandshake, Step, TlsMode};
use rustls::ServerConnection;

use super::access::Access;
use super::command::{self, Chunk, Ctx, Exec, Out};
use super::door::{Deadline, FrontDoor, Ticket};
use super::exports::ClientCatalog;
use super::frame::{Frame, Input, Payload};
use super::identity::{self, Identity};
use super::tls::{self, TlsStream};
use super::{Connections, Pool, Stream};
use crate::registry::Registry;

/// Requests one connection may have at the workers at once.
const MAX_INFLIGHT: usize = 256;
/// Reply bytes a connection may owe (queued, plus what its requests at the
/// workers will produce or hold) before it stops reading requests: the
/// bound on what one client that does not read its replies can cost (one
/// request may go past it, up to the largest payload). Reading further
/// ahead of a socket that does not drain only costs memory.
const MAX_REPLY_BYTES: u64 = 4 << 20;
/// Requests that move at least this many bytes run on a worker.
const INLINE_MAX: u64 = 128 << 10;
/// Replies batched before they are written, even with more requests
/// waiting in the input.
const BATCH: usize = 256 << 10;
/// Chunks per `writev`.
const IOV_MAX: usize = 64;

/// Serves one accepted client until it leaves.
pub(super) fn serve(
    mut stream: Stream,
    ticket: Ticket,
    door: Arc<FrontDoor>,
    registry: Arc<Registry>,
    conns: Arc<Connections>,
    pool: Arc<Pool>,
) {
    let deadline = ticket.deadline;
    let mut who = Identity::of_socket(&stream);
    let mut io = Deadline {
        stream: &mut stream,
        deadline,
    };
    let (neg, leftover, last, session) = match handshake(&mut io, &door, &registry, &mut who) {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, client = %who, "handshake ended");
            return;
        }
    };
    // No longer negotiating: the client gets its place in transmission.
    drop(ticket);
    let read_only = ClientCatalog {
        registry: &registry,
        access: door.access.as_ref(),
        who: &who,
    }
    .grant(&neg.export.name)
        != Some(Access::ReadWrite);
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    // Counted before the client hears that it may send requests: once it
    // has, a removal must see it.
    let Some((export, id)) = conns.attach(&registry, &neg.export.name, neg.export.size, handle) else {
        // Removed (or shrunk) between negotiation and now.
        return;
    };
    // Forgotten however this function ends, a panic included: a connection
    // left counted would hold its export (and its image's lock) forever.
    let _attached = Attached { conns: &conns, id };
    let mut session = session;
    let mut io = Deadline {
        stream: &mut stream,
        deadline,
    };
    let ready = match session.as_mut() {
        None => io.write_all(&last),
        Some(tls) => tls::send(tls, &mut io, &last),
    }
    .and_then(|_| stream.set_read_timeout(None))
    .and_then(|_| stream.set_write_timeout(None))
    .and_then(|_| stream.set_nonblocking(true));
    let reason = match ready {
        Err(e) => format!("cannot finish the handshake: {e}"),
        Ok(()) => {
            tracing::debug!(export = %export.name, mode = ?neg.mode, client = %who, tls = session.is_some(), read_only, "client connected");
            let ctx = Ctx {
                replies: fleece_nbd::Replies::new(neg.mode),
                export: export.clone(),
                contexts: neg.contexts.clone(),
                structured: neg.mode != ReplyMode::Simple,
                read_only,
            };
            // One loop per transport, each compiled for its own: the
            // plaintext one has no TLS in it at all.
            match session {
                None => match Connection::new(stream, ctx, pool, &leftover) {
                    Ok(mut c) => c.run(),
                    Err(e) => format!("cannot set up the connection: {e}"),
                },
                Some(tls) => match Connection::new(TlsStream::new(tls, stream), ctx, pool, &leftover) {
                    Ok(mut c) => c.run(),
                    Err(e) => format!("cannot set up the connection: {e}"),
                },
            }
        }
    };
    tracing::debug!(export = %export.name, %reason, "client disconnected");
}

/// A counted connection; dropping it forgets the connection.
struct Attached<'a> {
    conns: &'a Connections,
    id: u64,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.conns.detach(self.id);
    }
}

/// What a finished handshake leaves: what was negotiated, what the client
/// sent past it, the last reply, not yet sent, and the TLS session if the
/// client started one.
type Handshaken = (Negotiated, Vec<u8>, Vec<u8>, Option<ServerConnection>);

fn handshake(
    io: &mut Deadline<'_>,
    door: &FrontDoor,
    registry: &Registry,
    who: &mut Identity,
) -> io::Result<Option<Handshaken>> {
    let mut out = Vec::new();
    let mode = door.tls.as_ref().map_or(TlsMode::Off, |t| t.mode);
    let mut hs = ServerHandshake::with_tls(&mut out, mode);
    io.write_all(&out)?;
    let mut session: Option<ServerConnection> = None;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = match session.as_mut() {
            None => io.read(&mut chunk)?,
            Some(tls) => tls::recv(tls, io, &mut chunk)?,
        };
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let catalog = ClientCatalog {
            registry,
            access: door.access.as_ref(),
            who,
        };
        let (used, step) = hs
            .process(&buf, &catalog, &mut out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        buf.drain(..used);
        match step {
            Step::NeedMore => send(&mut session, io, &out)?,
            Step::Ready(neg) => return Ok(Some((*neg, buf, out, session))),
            Step::Close => {
                send(&mut session, io, &out)?;
                return Ok(None);
            }
            Step::StartTls => {
                // The ACK goes in plaintext; everything after it is TLS.
                io.write_all(&out)?;
                let Some(tls) = door.tls.as_ref() else {
                    return Err(io::Error::other("STARTTLS without TLS"));
                };
                let conn = tls::accept(tls, io, &buf).inspect_err(|e| {
                    // Worth an admin's eye: a certificate refused, a client
                    // that does not trust ours.
                    tracing::info!(client = %who, error = %e, "TLS handshake failed");
                })?;
                buf.clear();
                who.dn = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| identity::subject_dn(c));
                tracing::debug!(client = %who, "TLS started");
                session = Some(conn);
            }
        }
    }
}

/// Sends negotiation replies, through TLS once it started.
fn send(session: &mut Option<ServerConnection>, io: &mut Deadline<'_>, out: &[u8]) -> io::Result<()> {
    match session {
        None => io.write_all(out),
        Some(tls) => tls::send(tls, io, out),
    }
}

/// What a connection's owner reads requests from and writes replies to:
/// the socket itself, or a TLS session over it.
trait Transport: Read + Write {
    /// The socket, for `poll`.
    fn fd(&self) -> RawFd;
    /// Output the transport holds that has not reached the socket yet.
    fn has_pending(&self) -> bool {
        false
    }
    /// Hands held output to the socket, as far as it takes it now; true if
    /// anything went.
    fn push(&mut self) -> io::Result<bool> {
        Ok(false)
    }
    /// Stops the connection both ways.
    fn shutdown_both(&self);
    /// The connection is over: say goodbye if the protocol has a way.
    fn close(&mut self) {}
}

impl Transport for Stream {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn shutdown_both(&self) {
        Stream::shutdown_both(self)
    }
}

impl Transport for TlsStream {
    fn fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }
    fn has_pending(&self) -> bool {
        TlsStream::has_pending(self)
    }
    fn push(&mut self) -> io::Result<bool> {
        TlsStream::push(self)
    }
    fn shutdown_both(&self) {
        self.socket().shutdown_both()
    }
    fn close(&mut self) {
        TlsStream::close(self)
    }
}

/// What workers hand back to the connection's owner.
struct Completions {
    /// Finished replies, with the cost their requests reserved.
    done: Vec<(Out, u64)>,
}

/// The part of a connection that worker threads see.
struct Shared {
    ctx: Ctx,
    done: Mutex<Completions>,
    /// The owner is (about to be) asleep in `poll`: a completion must wake
    /// it through `wake`.
    sleeping: AtomicBool,
    wake: EventFd,
}

impl Shared {
    fn complete(&self, out: Out, cost: u64) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .done
            .push((out, cost));
        // Ordered after the push: the owner sets `sleeping` before it looks
        // at the queue a last time, so one of the two sees the other.
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.signal();
        }
    }
}

struct Connection<T: Transport> {
    sock: T,
    input: Input,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    /// Replies to write, in order, and how far into the first one.
    queue: VecDeque<Chunk>,
    sent: usize,
    queued: u64,
    /// Replies being built by inline requests, not yet in `queue`.
    batch: Out,
    /// Requests at the workers, and the bytes they reserved.
    inflight: usize,
    reserved: u64,
    /// Why reading stopped (end of input, NBD_CMD_DISC, a protocol error).
    ended: Option<String>,
    /// The socket failed for writing: replies are dropped.
    broken: bool,
}

impl<T: Transport> Connection<T> {
    fn new(sock: T, ctx: Ctx, pool: Arc<Pool>, leftover: &[u8]) -> io::Result<Connection<T>> {
        let mode = ctx.replies.mode();
        Ok(Connection {
            sock,
            input: Input::new(mode, leftover),
            shared: Arc::new(Shared {
                ctx,
                done: Mutex::new(Completions { done: Vec::new() }),
                sleeping: AtomicBool::new(false),
                wake: EventFd::new()?,
            }),
            pool,
            queue: VecDeque::new(),
            sent: 0,
            queued: 0,
            batch: Out::default(),
            inflight: 0,
            reserved: 0,
            ended: None,
            broken: false,
        })
    }

    /// Serves requests until the client leaves and every reply it is owed
    /// is written (or cannot be); returns why it ended.
    fn run(&mut self) -> String {
        loop {
            let mut progress = self.collect();
            if self.may_read() {
                progress |= self.read_requests();
            }
            progress |= self.write();
            let flushed = self.queue.is_empty() && !self.sock.has_pending();
            if self.ended.is_some() && self.inflight == 0 && (flushed || self.broken) {
                break;
            }
            if !progress {
                self.wait();
            }
        }
        if self.broken {
            // Also unblocks a registry waiting on this connection.
            self.sock.shutdown_both();
        } else {
            self.sock.close();
        }
        self.ended.take().unwrap_or_default()
    }

    fn may_read(&self) -> bool {
        self.ended.is_none()
            && !self.broken
            && self.inflight < MAX_INFLIGHT
            && self.reserved + self.queued < MAX_REPLY_BYTES
    }

    /// Takes the replies workers finished into the write queue.
    fn collect(&mut self) -> bool {
        let done = std::mem::take(&mut self.shared.done.lock().unwrap_or_else(|p| p.into_inner()).done);
        if done.is_empty() {
            return false;
        }
        for (out, cost) in done {
            self.inflight -= 1;
            self.reserved -= cost;
            self.enqueue(out);
        }
        true
    }

    fn enqueue(&mut self, out: Out) {
        if self.broken {
            return;
        }
        for c in out.into_chunks() {
            self.queued += c.len() as u64;
            self.queue.push_back(c);
        }
    }

    /// Reads and runs requests until the input has nothing whole, the batch
    /// of replies is big enough to send, or the budget is spent. True if
    /// any request was taken.
    fn read_requests(&mut self) -> bool {
        let mut any = false;
        while self.may_read() {
            // Replies go out before a read that may find nothing: the client
            // may be waiting for them before it sends more.
            if !self.batch.is_empty() && (self.batch.len() >= BATCH || !self.input.has_buffered_request()) {
                break;
            }
            let frame = match self.input.next(&mut self.sock) {
                Ok(f) => f,
                Err(why) => {
                    self.ended = Some(why);
                    break;
                }
            };
            let (req, payload): (Request, Result<&[u8], Payload>) = match frame {
                Frame::WouldBlock => break,
                Frame::Buffered(req, p) => (req, Ok(p)),
                Frame::Owned(req, p) => (req, Err(p)),
            };
            any = true;
            if req.command == CMD_DISC {
                self.ended = Some("NBD_CMD_DISC".into());
                break;
            }
            let data: &[u8] = match &payload {
                Ok(p) => p,
                Err(p) => p,
            };
            // Large transfers go to a worker even when they could run here:
            // their copy (into the page cache, or out of it) then overlaps
            // with this thread's socket copy of the next one, instead of
            // taking turns with it on one core.
            if command::cost(&req) < INLINE_MAX
                && command::run(&self.shared.ctx, &req, data, &mut self.batch, Exec::Inline)
            {
                continue;
            }
            // Would block (or is large): a worker runs it, with a payload of
            // its own.
            let payload = match payload {
                Ok(p) => Payload::copy_of(p),
                Err(p) => p,
            };
            let cost = command::cost(&req);
            self.inflight += 1;
            self.reserved += cost;
            let shared = self.shared.clone();
            self.pool.submit(move || {
                // Whatever happens in the request, the connection gets a
                // reply and its budget back: a panic must not leave the
                // owner waiting for a completion forever.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut out = Out::default();
                    command::run(&shared.ctx, &req, &payload, &mut out, Exec::Blocking);
                    out
                }));
                let out = match run {
                    Ok(out) if !out.is_empty() => out,
                    _ => {
                        tracing::error!(export = %shared.ctx.export.name, cmd = req.command, "request failed inside the server");
                        let mut out = Out::default();
                        command::internal_error(&shared.ctx, &req, &mut out);
                        out
                    }
                };
                drop(payload);
                shared.complete(out, cost);
            });
        }
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.enqueue(batch);
        }
        any
    }

    /// Writes what it can of the queue without blocking. True if anything
    /// was written.
    fn write(&mut self) -> bool {
        let mut any = false;
        // TLS records that the socket did not take last time go first.
        if self.sock.has_pending() && !self.broken {
            match self.sock.push() {
                Ok(pushed) => any |= pushed,
                Err(e) => self.fail(&format!("reply write failed: {e}")),
            }
        }
        while !self.queue.is_empty() && !self.broken {
            let r = match &self.queue[0] {
                // Large read data goes alone, from its start (see Chunk).
                Chunk::Data(..) => self.sock.write(&self.queue[0].bytes()[self.sent..]),
                Chunk::Bytes(_) => {
                    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(IOV_MAX);
                    iov.push(IoSlice::new(&self.queue[0].bytes()[self.sent..]));
                    for c in self.queue.iter().skip(1).take(IOV_MAX - 1) {
                        match c {
                            Chunk::Bytes(v) => iov.push(IoSlice::new(v)),
                            Chunk::Data(..) => break,
                        }
                    }
                    self.sock.write_vectored(&iov)
                }
            };
            match r {
                Ok(0) => self.fail("the socket took nothing"),
                Ok(mut n) => {
                    any = true;
                    self.queued -= n as u64;
                    while n > 0 {
                        let left = self.queue[0].len() - self.sent;
                        if n >= left {
                            n -= left;
                            self.queue.pop_front();
                            self.sent = 0;
                        } else {
                            self.sent += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => self.fail(&format!("reply write failed: {e}")),
            }
        }
        any
    }

    fn fail(&mut self, why: &str) {
        tracing::debug!(export = %self.shared.ctx.export.name, %why, "closing connection");
        self.broken = true;
        self.queue.clear();
        self.sent = 0;
        self.queued = 0;
        self.ended.get_or_insert_with(|| why.to_string());
    }

    /// Sleeps until the socket can take replies or give requests (as far
    /// as they are wanted), or a worker finished one.
    fn wait(&mut self) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let pending = !self
            .shared
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .done
            .is_empty();
        if !pending {
            let mut events: libc::c_short = 0;
            if self.may_read() {
                events |= libc::POLLIN;
            }
            if (!self.queue.is_empty() || self.sock.has_pending()) && !self.broken {
                events |= libc::POLLOUT;
            }
            let mut fds = [
                libc::pollfd {
                    // A negative descriptor is skipped: with nothing wanted
                    // of the socket, only a worker can wake us.
                    fd: if events == 0 { -1 } else { self.sock.fd() },
                    events,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.shared.wake.fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: the array outlives the call and its length is passed.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r > 0 && fds[1].revents != 0 {
                self.shared.wake.clear();
            }
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
    }
}

/// A Linux eventfd: how workers wake a connection's owner in `poll`.
struct EventFd {
    fd: RawFd,
}

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: creates a descriptor we own; no memory is passed.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd { fd })
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our descriptor. A full
        // counter (EAGAIN) still wakes the poller, which is all we need.
        unsafe {
            libc::write(self.fd, (&one as *const u64).cast(), 8);
        }
    }

    fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a local from our descriptor.
        unsafe {
            libc::read(self.fd, (&mut v as *mut u64).cast(), 8);
        }
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor once.
        unsafe {
            libc::close(self.fd);
        }
    }
}
