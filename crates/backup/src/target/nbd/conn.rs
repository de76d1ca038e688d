//! One connection: the socket, its handshake, and the sending side.
//!
//! Callers send requests themselves, under the connection's writer lock:
//! no hand-off to a sender thread, and a large write's payload goes from
//! the caller's buffer to the socket (a small one is copied behind its
//! header, so the request is one system call). Each request's [`Entry`]
//! goes to the connection's reader thread (`reader.rs`) before the request
//! goes out, so its reply always finds it there.
//!
//! With TLS (`tls.rs`), the socket is wrapped after `NBD_OPT_STARTTLS`; the
//! writers then send through the shared session ([`Sink::Tls`]) and the
//! reader reads through it. The plain path is the socket itself.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fleece_nbd::consts::*;
use fleece_nbd::{
    encode_request, ClientHandshake, ClientNegotiated, ClientOptions, ClientStep, ReplyMode, Request,
};

use super::flow::{Flow, Permit};
use super::pending::Slot;
use super::tls::{ClientTls, TlsReader, TlsSession};
use super::uri::Address;
use super::ConnectOptions;
use crate::error::{Error, ErrorKind, Result};

/// Payloads up to this size are copied behind their header and sent in one
/// call; larger ones are sent from the caller's buffer in a second call.
const COALESCE: usize = 64 * 1024;

/// A socket of either family.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn connect(address: &Address, timeout: Option<Duration>) -> io::Result<Stream> {
        match address {
            Address::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
            Address::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolves to nothing");
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    let s = match timeout {
                        Some(t) => TcpStream::connect_timeout(&addr, t),
                        None => TcpStream::connect(addr),
                    };
                    match s {
                        Ok(s) => {
                            // Requests are small and latency-bound; do not
                            // let Nagle hold one back for the next.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        // It fails only on a socket that is already shut, which is the goal.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A negotiated connection, before its reader and writers are set up.
pub(crate) enum Link {
    Plain(Stream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Stream>>),
}

impl Link {
    fn socket(&self) -> &Stream {
        match self {
            Link::Plain(s) => s,
            Link::Tls(t) => &t.sock,
        }
    }

    /// The reading side (for the reader thread), the writing side, and a
    /// handle to shut the socket with.
    pub(crate) fn split(self) -> io::Result<(Source, Sink, Stream)> {
        match self {
            Link::Plain(s) => Ok((Source::Plain(s.try_clone()?), Sink::Plain(s.try_clone()?), s)),
            Link::Tls(t) => {
                let t = *t;
                let session = Arc::new(TlsSession::new(t.conn, t.sock.try_clone()?));
                let reader = TlsReader::new(t.sock.try_clone()?, session.clone());
                Ok((Source::Tls(Box::new(reader)), Sink::Tls(session), t.sock))
            }
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(_) => Ok(()),
            Link::Tls(t) => t.flush(),
        }
    }
}

/// What the reader thread reads replies from.
#[derive(Debug)]
pub(crate) enum Source {
    Plain(Stream),
    Tls(Box<TlsReader>),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(s) => s.read(buf),
            Source::Tls(t) => t.read(buf),
        }
    }
}

/// What requests are written to.
#[derive(Debug)]
pub(crate) enum Sink {
    Plain(Stream),
    Tls(Arc<TlsSession>),
}

impl Sink {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(s) => s.write_all(data),
            Sink::Tls(t) => t.send(data),
        }
    }
}

/// Connects and negotiates (with TLS when `tls` is given); returns the
/// connection, what was agreed, and any bytes that came after the
/// handshake.
pub(crate) fn open(
    label: &str,
    address: &Address,
    export: &str,
    tls: Option<&ClientTls>,
    options: &ConnectOptions,
) -> Result<(Link, ClientNegotiated, Vec<u8>)> {
    let connect_err = |e| Error::io(ErrorKind::Connect, format!("cannot connect to {label}"), e);
    let stream = Stream::connect(address, options.handshake_timeout).map_err(connect_err)?;
    // A server that accepts and then says nothing must not hang the caller.
    stream
        .set_read_timeout(options.handshake_timeout)
        .map_err(connect_err)?;
    let mut stream = Link::Plain(stream);
    let mut hs = ClientHandshake::new(ClientOptions {
        export: export.to_string(),
        extended_headers: options.extended_headers,
        structured_replies: options.structured_replies,
        meta_contexts: if options.block_status {
            vec![BASE_ALLOCATION.to_string()]
        } else {
            Vec::new()
        },
        starttls: tls.is_some(),
    })
    .map_err(|e| Error::protocol(ErrorKind::InvalidTarget, label, e))?;
    let context = format!("NBD handshake with {label}");
    // Inside TLS and nothing heard yet: an end now is the server refusing
    // this client (see REFUSED_CERTIFICATE).
    let mut unheard = false;
    let refused = |e: fleece_nbd::ProtocolError, unheard: bool| handshake_error(&context, e, unheard);
    let (mut input, mut out) = (Vec::with_capacity(4096), Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        let (used, step) = hs.process(&input, &mut out).map_err(|e| refused(e, unheard))?;
        input.drain(..used);
        if !out.is_empty() {
            stream
                .write_all(&out)
                .map_err(|e| io_error(&context, e, unheard))?;
            out.clear();
        }
        match step {
            ClientStep::Ready(neg) => {
                stream.socket().set_read_timeout(None).map_err(connect_err)?;
                return Ok((stream, *neg, input));
            }
            ClientStep::StartTls => {
                let (Link::Plain(sock), Some(tls)) = (stream, tls) else {
                    return Err(Error::new(
                        ErrorKind::Handshake,
                        format!("{context}: STARTTLS agreed twice"),
                    ));
                };
                if !input.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Handshake,
                        format!("{context}: the server sent data in clear text after agreeing to STARTTLS"),
                    ));
                }
                let t = tls
                    .connect(sock)
                    .map_err(|e| Error::io(ErrorKind::Handshake, format!("TLS handshake with {label}"), e))?;
                stream = Link::Tls(Box::new(t));
                unheard = true;
                continue;
            }
            ClientStep::NeedMore => {}
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(refused(hs.closed(), unheard)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(&context, e, unheard)),
        };
        unheard = false;
        input.extend_from_slice(&chunk[..n]);
    }
}

/// What a server that refuses this client's certificate looks like from
/// here: with TLS 1.3 the client's side of the handshake ends before the
/// server has looked at its certificate, so the refusal comes as an alert
/// or as the connection closing, at the first option inside TLS.
const REFUSED_CERTIFICATE: &str = "the server ended the connection right after the TLS handshake: it does not accept this client (its certificate, or no certificate: see the server's CA, tls-authz or access list)";

fn io_error(context: &str, e: io::Error, unheard: bool) -> Error {
    let alert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(_)));
    let ended = matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    );
    if unheard && (alert || ended) {
        return Error::io(
            ErrorKind::Handshake,
            format!("{context}: {REFUSED_CERTIFICATE}"),
            e,
        );
    }
    Error::io(ErrorKind::Handshake, context, e)
}

fn handshake_error(context: &str, e: fleece_nbd::ProtocolError, unheard: bool) -> Error {
    use fleece_nbd::ProtocolError;
    match &e {
        ProtocolError::Refused(r) if r.reply == REP_ERR_TLS_REQD => Error::protocol(
            ErrorKind::Handshake,
            format!("{context}: plain NBD refused (use nbds:// or nbds+unix:// with ?tls-certificates=DIR)"),
            e,
        ),
        ProtocolError::Refused(r) if r.option == OPT_STARTTLS => Error::protocol(
            ErrorKind::Handshake,
            format!("{context}: the server does not do TLS (it refused NBD_OPT_STARTTLS)"),
            e,
        ),
        ProtocolError::ServerClosed(_) if unheard => Error::protocol(
            ErrorKind::Handshake,
            format!("{context}: {REFUSED_CERTIFICATE}"),
            e,
        ),
        _ => Error::protocol(ErrorKind::Handshake, context, e),
    }
}

/// What a request expects back, and what has come of it so far.
#[derive(Debug)]
pub(crate) enum Expect {
    /// Nothing but success or an error.
    Ack,
    /// Read data into `buf` (zeroed, so holes need nothing); `filled` counts
    /// the bytes the reply has covered.
    Data { buf: Vec<u8>, filled: u64 },
    /// Extents of one metadata context.
    Extents {
        context: u32,
        extents: Option<Vec<fleece_nbd::Extent>>,
    },
}

/// A request in flight, owned by the connection's reader.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) req: Request,
    pub(crate) expect: Expect,
    /// The first error chunk of the reply.
    pub(crate) error: Option<(u32, String)>,
    pub(crate) slot: Arc<Slot>,
    pub(crate) flow: Arc<Flow>,
    pub(crate) label: Arc<str>,
    _permit: Permit,
}

impl Drop for Entry {
    // An entry dropped unanswered (the reader ended, or never got it) is a
    // request whose outcome nobody will learn: say so, so no caller waits
    // forever. For an answered one this does nothing (the first outcome wins).
    fn drop(&mut self) {
        if self.slot.is_set() {
            return;
        }
        let cause = self
            .flow
            .lost()
            .unwrap_or_else(|| "the connection was closed".into());
        self.slot.set(Err(Error::new(
            ErrorKind::Disconnected,
            format!(
                "connection to {} lost before {} was acknowledged (it may or may not have been done): {cause}",
                self.label,
                describe(&self.req)
            ),
        )));
    }
}

/// A request, for messages: "WRITE of 4096 bytes at offset 0".
pub(crate) fn describe(req: &Request) -> String {
    let name = match req.command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => return "FLUSH".into(),
        CMD_TRIM => "TRIM",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "a request",
    };
    format!("{name} of {} bytes at offset {}", req.length, req.offset)
}

/// The sending side of one connection.
#[derive(Debug)]
pub(crate) struct Conn {
    writer: Mutex<(Sink, Vec<u8>)>,
    /// To shut the socket without waiting for the writer lock.
    control: Stream,
    entries: Sender<Entry>,
    reader: Mutex<Option<JoinHandle<()>>>,
    mode: ReplyMode,
    next_cookie: AtomicU64,
    flow: Arc<Flow>,
    label: Arc<str>,
}

impl Conn {
    pub(crate) fn new(
        sink: Sink,
        control: Stream,
        mode: ReplyMode,
        entries: Sender<Entry>,
        reader: JoinHandle<()>,
        flow: Arc<Flow>,
        label: Arc<str>,
    ) -> Conn {
        Conn {
            control,
            writer: Mutex::new((sink, Vec::with_capacity(EXTENDED_REQUEST_LEN + COALESCE))),
            entries,
            reader: Mutex::new(Some(reader)),
            mode,
            next_cookie: AtomicU64::new(1),
            flow,
            label,
        }
    }

    /// Sends one request; its outcome arrives in `slot`.
    pub(crate) fn send(
        &self,
        mut req: Request,
        payload: &[u8],
        expect: Expect,
        slot: Arc<Slot>,
        permit: Permit,
    ) {
        req.cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            req,
            expect,
            error: None,
            slot,
            flow: self.flow.clone(),
            label: self.label.clone(),
            _permit: permit,
        };
        // If the reader is gone the entry comes back and is dropped, which
        // fails its slot: nothing to send then.
        if self.entries.send(entry).is_err() {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (stream, buf) = &mut *w;
        buf.clear();
        encode_request(buf, &req, self.mode);
        let sent = if payload.len() <= COALESCE {
            buf.extend_from_slice(payload);
            stream.write_all(buf)
        } else {
            stream.write_all(buf).and_then(|()| stream.write_all(payload))
        };
        if let Err(e) = sent {
            // Part of a request may be out: the stream cannot go on. The
            // reader wakes up to a dead socket and fails what is in flight.
            self.flow.lose(format!("sending {} failed: {e}", describe(&req)));
            self.control.shutdown(Shutdown::Both);
        }
    }

    /// Starts ending the connection: `NBD_CMD_DISC` (the server answers
    /// what is in flight, then closes); a server that does not close within
    /// `patience` is cut off. [`join`](Self::join) waits for the end.
    pub(crate) fn disconnect(&self, patience: Duration) {
        let disc = Request {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
            payload_len: 0,
        };
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (stream, buf) = &mut *w;
        buf.clear();
        encode_request(buf, &disc, self.mode);
        // A connection already dead has nothing to say goodbye to.
        let _ = stream.write_all(buf);
        if let Sink::Tls(t) = stream {
            let _ = t.close();
        }
        self.control.shutdown(Shutdown::Write);
        let _ = self.control.set_read_timeout(Some(patience));
    }

    /// Waits for the reader to see the end of the connection.
    pub(crate) fn join(&self) {
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = reader {
            let _ = r.join();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.control.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = r.join();
        }
    }
}
