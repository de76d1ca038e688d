//! A remote NBD server as a push target: a blocking client over
//! `fleece-nbd`'s sans-IO engine.
//!
//! [`NbdTarget::connect`] opens one connection, or several when the server
//! advertises `CAN_MULTI_CONN` (up to [`ConnectOptions::connections`]).
//! Each connection has a reader thread that matches replies to requests
//! by cookie, so requests complete out of order and many are in flight at
//! once: up to [`ConnectOptions::window`] per connection, each new one
//! going to the least busy connection. Callers send their own requests
//! (no sender thread), from as many threads as they like.
//!
//! Two ways to use it: the blocking calls ([`write`](NbdTarget::write),
//! [`read`](NbdTarget::read), ...) wait for their reply; the `submit_*`
//! calls return a [`Pending`] at once, so one thread can keep a window
//! full and [`wait`](Pending::wait) for each later.
//!
//! **What was acknowledged.** Every operation resolves exactly once: `Ok`
//! when the server acknowledged all of it, [`ErrorKind::Server`] when the
//! server refused it (the connection goes on), or
//! [`ErrorKind::Disconnected`] when the connection was lost (or the server
//! broke the protocol) first: then it may or may not have been done. After
//! a loss the target takes no new request; requests already sent on other
//! connections still complete and say so. A job resumes by connecting
//! again and redoing what was not `Ok` (writes, zeroes and trims can be
//! redone), then flushing.
//!
//! An `Err` from a `submit_*` call means nothing was sent: a bad request,
//! a command the server lacks, or a target already lost.
//!
//! **Flush.** `NBD_CMD_FLUSH` covers the writes whose replies came before
//! it was sent (on every connection, which is what `CAN_MULTI_CONN`
//! promises): wait for the writes, then flush.
//!
//! ```no_run
//! use fleece_backup::{ConnectOptions, NbdTarget};
//! # fn main() -> fleece_backup::Result<()> {
//! let target = NbdTarget::connect("nbd+unix:///disk?socket=/run/backup.sock", &ConnectOptions::default())?;
//! let block = vec![7u8; 64 * 1024];
//! let writes: Vec<_> = (0..16)
//!     .map(|i| target.submit_write(i * block.len() as u64, &block))
//!     .collect::<Result<_, _>>()?;
//! for w in writes {
//!     w.wait()?;
//! }
//! target.write_zeroes(1 << 20, 1 << 20)?;
//! target.flush()?;
//! # Ok(()) }
//! ```

mod conn;
mod flow;
mod info;
mod pending;
mod reader;
mod tls;
mod uri;

pub use fleece_nbd::{BlockSizes, Extent, ReplyMode};
pub use info::{ConnectOptions, TargetInfo};
pub use pending::{Outcome, Pending};
pub use uri::{Address, NbdUri, TlsParams, DEFAULT_PORT};

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fleece_nbd::consts::*;
use fleece_nbd::{ReplyDecoder, Request, DEFAULT_REPLY_LIMIT};

use crate::error::{Error, ErrorKind, Result};
use conn::{Conn, Expect};
use flow::Flow;
use pending::Slot;

/// Zeroes for servers without `NBD_CMD_WRITE_ZEROES`; in `.bss`, so free
/// until used.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// Longest effect length of one trim, zero or block-status request: fits
/// compact headers and any minimum block size, and keeps each request short
/// enough for a server to finish in reasonable time.
const MAX_EFFECT: u64 = 1 << 30;

/// Largest read or write of one request, whatever the server allows: what
/// the spec says every server takes.
const MAX_IO: u64 = 32 << 20;

/// A remote NBD export, open for pushing data. See the [module docs](self).
#[derive(Debug)]
pub struct NbdTarget {
    label: Arc<str>,
    info: TargetInfo,
    base_allocation: Option<u32>,
    flow: Arc<Flow>,
    conns: Vec<Conn>,
}

impl NbdTarget {
    /// Connects to `uri` (`nbd://HOST[:PORT]/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`, or the same over TLS:
    /// `nbds://...?tls-certificates=DIR`, `nbds+unix://...`; see
    /// [`TlsParams`]) and negotiates.
    pub fn connect(uri: &str, options: &ConnectOptions) -> Result<NbdTarget> {
        let parsed = NbdUri::parse(uri)?;
        let label: Arc<str> = Arc::from(uri);
        let tls = match &parsed.tls {
            Some(params) => Some(tls::ClientTls::load(params, &parsed.address)?),
            None => None,
        };
        let open = || conn::open(&label, &parsed.address, &parsed.export, tls.as_ref(), options);
        let first = open()?;
        let neg = first.1.clone();
        let wanted = if neg.flags & TF_CAN_MULTI_CONN != 0 {
            options.connections.max(1)
        } else {
            1
        };
        let mut opened = vec![first];
        while opened.len() < wanted {
            let next = open()?;
            // Requests go to any connection, so they must all be the same.
            if (next.1.size, next.1.flags, next.1.mode) != (neg.size, neg.flags, neg.mode) {
                return Err(Error::new(
                    ErrorKind::Handshake,
                    format!(
                        "{label}: connection {} negotiated differently from the first",
                        opened.len() + 1
                    ),
                ));
            }
            opened.push(next);
        }
        let info = TargetInfo::new(&neg, opened.len());
        let max_io = max_io(&info.block_sizes);
        let flow = Flow::new(opened.len(), options.window);
        let mut conns = Vec::with_capacity(opened.len());
        for (i, (link, _, initial)) in opened.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let io_err = |e| Error::io(ErrorKind::Connect, format!("{label}: connection {}", i + 1), e);
            let (source, sink, control) = link.split().map_err(io_err)?;
            let reader = reader::Reader {
                stream: source,
                entries: rx,
                // Data is streamed, not buffered; the bound is for the rest.
                decoder: ReplyDecoder::with_limit(neg.mode, DEFAULT_REPLY_LIMIT.max(max_io + 8)),
                flow: flow.clone(),
                initial,
            };
            let thread = std::thread::Builder::new()
                .name(format!("nbd-reader-{i}"))
                .spawn(move || reader.run())
                .map_err(io_err)?;
            conns.push(Conn::new(
                sink,
                control,
                neg.mode,
                tx,
                thread,
                flow.clone(),
                label.clone(),
            ));
        }
        Ok(NbdTarget {
            label,
            base_allocation: neg.context_id(BASE_ALLOCATION),
            info,
            flow,
            conns,
        })
    }

    /// What was negotiated.
    pub fn info(&self) -> &TargetInfo {
        &self.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The size at which requests avoid read-modify-write on the server.
    pub fn preferred_block_size(&self) -> u32 {
        self.info.block_sizes.preferred
    }

    /// Whether the target still takes requests (no connection was lost).
    pub fn is_connected(&self) -> bool {
        self.flow.lost().is_none()
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.submit_write(offset, data)?.wait()
    }

    /// Makes `len` bytes at `offset` read as zeroes (with
    /// `NBD_CMD_WRITE_ZEROES`, else by writing zeroes).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.submit_write_zeroes(offset, len, false)?.wait()
    }

    /// Like [`write_zeroes`](Self::write_zeroes), but only if the server can
    /// do it faster than writing: else [`ErrorKind::Unsupported`], and the
    /// caller writes the zeroes (or skips them, on a target known zeroed).
    pub fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<()> {
        self.submit_write_zeroes(offset, len, true)?.wait()
    }

    /// Tells the server it may discard `len` bytes at `offset`
    /// ([`ErrorKind::Unsupported`] if it does not offer TRIM). What they
    /// read afterwards is undefined.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.submit_trim(offset, len)?.wait()
    }

    /// Makes the writes acknowledged so far durable.
    pub fn flush(&self) -> Result<()> {
        self.submit_flush()?.wait()
    }

    /// Reads `buf.len()` bytes at `offset` (for a verify pass).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.submit_read(offset, buf.len())?.wait()?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// `base:allocation` extents from `offset`, covering at most `len`
    /// bytes and maybe fewer (the server says as much as it likes): ask
    /// again from where they end. Flags are `STATE_HOLE` and `STATE_ZERO`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.submit_block_status(offset, len)?.wait()
    }

    /// Sends a write (split into requests the server takes) and returns at
    /// once; `data` is sent before this returns.
    pub fn submit_write(&self, offset: u64, data: &[u8]) -> Result<Pending<()>> {
        self.check_writable("WRITE")?;
        self.check(offset, data.len() as u64, "WRITE")?;
        self.split(
            offset,
            data.len() as u64,
            max_io(&self.info.block_sizes),
            |at, n| {
                let from = (at - offset) as usize;
                (CMD_WRITE, 0, &data[from..from + n as usize], Expect::Ack)
            },
        )
    }

    /// Sends a zeroing; with `fast`, see [`write_zeroes_fast`](Self::write_zeroes_fast).
    pub fn submit_write_zeroes(&self, offset: u64, len: u64, fast: bool) -> Result<Pending<()>> {
        self.check_writable("WRITE_ZEROES")?;
        self.check(offset, len, "WRITE_ZEROES")?;
        if fast && !self.info.can_fast_zero() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{}: the server cannot write zeroes faster than data", self.label),
            ));
        }
        if !self.info.can_write_zeroes() {
            let piece = max_io(&self.info.block_sizes).min(ZEROES.len() as u64);
            return self.split(offset, len, piece, |_, n| {
                (CMD_WRITE, 0, &ZEROES[..n as usize], Expect::Ack)
            });
        }
        let flags = if fast { CMD_FLAG_FAST_ZERO } else { 0 };
        self.split(offset, len, MAX_EFFECT, |_, _| {
            (CMD_WRITE_ZEROES, flags, &[][..], Expect::Ack)
        })
    }

    /// Sends a trim.
    pub fn submit_trim(&self, offset: u64, len: u64) -> Result<Pending<()>> {
        self.check_writable("TRIM")?;
        if !self.info.can_trim() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{}: the server does not offer TRIM", self.label),
            ));
        }
        self.check(offset, len, "TRIM")?;
        self.split(offset, len, MAX_EFFECT, |_, _| {
            (CMD_TRIM, 0, &[][..], Expect::Ack)
        })
    }

    /// Sends a flush. A server that offers no flush has nothing to flush:
    /// that is `Ok` at once.
    pub fn submit_flush(&self) -> Result<Pending<()>> {
        if !self.info.can_flush() {
            return Ok(Pending::empty());
        }
        Ok(Pending::new(vec![self.send(
            CMD_FLUSH,
            0,
            0,
            0,
            &[],
            Expect::Ack,
        )?]))
    }

    /// Sends a read of `len` bytes at `offset`.
    pub fn submit_read(&self, offset: u64, len: usize) -> Result<Pending<Vec<u8>>> {
        self.check(offset, len as u64, "READ")?;
        self.split(offset, len as u64, max_io(&self.info.block_sizes), |_, n| {
            let buf = vec![0; n as usize];
            (CMD_READ, 0, &[][..], Expect::Data { buf, filled: 0 })
        })
    }

    /// Sends a block-status query (one request of at most 1 GiB).
    pub fn submit_block_status(&self, offset: u64, len: u64) -> Result<Pending<Vec<Extent>>> {
        let Some(context) = self.base_allocation else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{}: {BASE_ALLOCATION} was not negotiated", self.label),
            ));
        };
        self.check(offset, len, "BLOCK_STATUS")?;
        let len = len.min(MAX_EFFECT);
        if len == 0 {
            return Ok(Pending::empty());
        }
        let expect = Expect::Extents {
            context,
            extents: None,
        };
        Ok(Pending::new(vec![self.send(
            CMD_BLOCK_STATUS,
            0,
            offset,
            len,
            &[],
            expect,
        )?]))
    }

    /// Waits for every request in flight, then says goodbye to the server
    /// (`NBD_CMD_DISC`). Fails if a connection had been lost.
    pub fn close(self) -> Result<()> {
        self.flow.drain();
        let lost = self.flow.lost();
        drop(self);
        match lost {
            Some(cause) => Err(Error::new(ErrorKind::Disconnected, cause)),
            None => Ok(()),
        }
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.info.read_only() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{}: {what} on a read-only export", self.label),
            ));
        }
        Ok(())
    }

    /// The spec's rules for a request: inside the export, aligned to the
    /// minimum block size.
    fn check(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        let min = self.info.block_sizes.minimum as u64;
        let size = self.info.size;
        let inside = offset.checked_add(len).is_some_and(|end| end <= size);
        let why = if !inside {
            format!("beyond the end of the export ({size} bytes)")
        } else if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            format!("not aligned to the export's minimum block size of {min} bytes")
        } else {
            return Ok(());
        };
        Err(Error::new(
            ErrorKind::InvalidRequest,
            format!("{}: {what} of {len} bytes at offset {offset}: {why}", self.label),
        ))
    }

    /// Sends `offset..offset + len` as requests of at most `max` bytes each,
    /// made by `make(at, n)`.
    fn split<'a, T: Outcome>(
        &self,
        offset: u64,
        len: u64,
        max: u64,
        mut make: impl FnMut(u64, u64) -> (u16, u16, &'a [u8], Expect),
    ) -> Result<Pending<T>> {
        if len == 0 {
            return Ok(Pending::empty());
        }
        let mut parts = Vec::with_capacity(len.div_ceil(max) as usize);
        let mut at = offset;
        while at < offset + len {
            let n = max.min(offset + len - at);
            let (command, flags, payload, expect) = make(at, n);
            match self.send(command, flags, at, n, payload, expect) {
                Ok(slot) => parts.push(slot),
                Err(e) if parts.is_empty() => return Err(e),
                // Part of it is out: the caller learns the outcome of the
                // whole by waiting, like for any operation that was sent.
                Err(e) => {
                    let failed = Slot::new();
                    failed.set(Err(e));
                    parts.push(failed);
                    break;
                }
            }
            at += n;
        }
        Ok(Pending::new(parts))
    }

    fn send(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
        expect: Expect,
    ) -> Result<Arc<Slot>> {
        let req = Request {
            flags,
            command,
            cookie: 0,
            offset,
            length,
            payload_len: payload.len() as u64,
        };
        let permit = self.flow.acquire().map_err(|cause| {
            Error::new(
                ErrorKind::Disconnected,
                format!(
                    "{}: {} not sent, the connection is lost: {cause}",
                    self.label,
                    conn::describe(&req)
                ),
            )
        })?;
        let slot = Slot::new();
        self.conns[permit.conn()].send(req, payload, expect, slot.clone(), permit);
        Ok(slot)
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        // All goodbyes first, so slow servers wait in parallel.
        for c in &self.conns {
            c.disconnect(Duration::from_secs(10));
        }
        for c in &self.conns {
            c.join();
        }
    }
}

/// Largest read or write: the server's maximum, at most [`MAX_IO`], aligned
/// down to its minimum block.
fn max_io(b: &BlockSizes) -> u64 {
    let min = b.minimum as u64;
    let max = (b.maximum as u64).min(MAX_IO);
    (max - max % min).max(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_is_not_there_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("nbd+unix:///x?socket={}/none.sock", dir.path().display());
        let e = NbdTarget::connect(&uri, &ConnectOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connect);
        assert!(
            e.to_string().starts_with(&format!("cannot connect to {uri}: ")),
            "{e}"
        );
        // Port 1 on loopback: nothing listens there.
        let e = NbdTarget::connect("nbd://127.0.0.1:1/x", &ConnectOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    }

    #[test]
    fn targets_and_pending_operations_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<NbdTarget>();
        send_sync::<Pending<Vec<u8>>>();
        send_sync::<crate::Error>();
    }

    #[test]
    fn the_largest_request_is_aligned_and_bounded() {
        let b = |minimum, maximum| BlockSizes {
            minimum,
            preferred: 4096,
            maximum,
        };
        assert_eq!(max_io(&b(1, u32::MAX)), MAX_IO);
        assert_eq!(max_io(&b(512, 1_000_000)), 999_936);
        assert_eq!(max_io(&b(4096, 100)), 4096);
    }
}
