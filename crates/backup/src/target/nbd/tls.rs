//! TLS for the client (x509, rustls with the ring provider): credentials
//! from a libnbd/QEMU-style directory, the TLS handshake after
//! `NBD_OPT_STARTTLS`, and one session shared by a connection's reader
//! thread and its writers.
//!
//! **Sharing one session.** A connection is read by its reader thread
//! while callers write requests, but TLS has one session per connection:
//! both directions go through the same `rustls::ClientConnection`, so it
//! sits behind a mutex that is only ever held for in-memory work. The
//! reader takes raw bytes from the socket *without* the lock, then feeds
//! them to the session and takes plaintext out under it; a writer encrypts
//! a piece under it, lets go, and sends the ciphertext. So a reader
//! blocked on a quiet socket never holds up a writer, and a writer blocked
//! on a full socket never keeps the reader from draining replies (which is
//! what lets the server read on, and is what keeps both sides from waiting
//! on each other).
//!
//! Records must leave in the order they were sealed: a second mutex (the
//! "out" lock) is held from sealing until the socket took the bytes, and
//! is always taken before the session lock. Writers are serialized by
//! their connection already, so it is only ever contended by the reader,
//! which sends only what the session queues by itself (a key-update
//! answer, an alert): it tries the out lock and, when a writer has it,
//! leaves those records queued for that writer, which sends them after
//! its own. The plaintext path does not go through any of this.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::conn::Stream;
use super::uri::{Address, TlsParams};
use crate::error::{Error, ErrorKind, Result};

/// Plaintext sealed per turn of the session lock: long enough that a
/// large write costs few lock turns and system calls, short enough that
/// the reader never waits long for the lock.
const PIECE: usize = 256 * 1024;
/// Ciphertext read from the socket at once.
const RAW: usize = 256 * 1024;

/// What a connection needs to start TLS: rustls' configuration and the
/// name the server's certificate is checked against.
#[derive(Clone, Debug)]
pub(crate) struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl ClientTls {
    /// Reads the credentials in `params.certificates` (again on every
    /// call, so a reconnect picks up renewed certificates) for a server at
    /// `address`.
    pub(crate) fn load(params: &TlsParams, address: &Address) -> Result<ClientTls> {
        let dir = &params.certificates;
        let bad = |why: String| {
            Error::new(
                ErrorKind::InvalidTarget,
                format!("TLS credentials in {}: {why}", dir.display()),
            )
        };
        let ca = dir.join("ca-cert.pem");
        if !ca.exists() {
            return Err(bad(
                "no ca-cert.pem: the client needs the CA that signed the server's certificate".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        for c in read_certs(&ca).map_err(bad)? {
            roots.add(c).map_err(|e| bad(format!("ca-cert.pem: {e}")))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?;
        // The name to check: tls-hostname, else the TCP host. A Unix socket
        // has none: then the chain alone is checked, as libnbd and QEMU do.
        let host = params.hostname.as_deref().or(match address {
            Address::Tcp { host, .. } => Some(host.as_str()),
            Address::Unix(_) => None,
        });
        let (builder, name) = match host {
            Some(h) => {
                let name = ServerName::try_from(h.to_string()).map_err(|_| {
                    bad(format!(
                        "'{h}' is not a host name or address to check the server's certificate against"
                    ))
                })?;
                (builder.with_root_certificates(roots), name)
            }
            None => (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly { roots, provider })),
                // Any name will do, the verifier ignores it; an address
                // sends no SNI.
                ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()),
            ),
        };
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let config = match (cert.exists(), key.exists()) {
            (false, false) => builder.with_no_client_auth(),
            (true, true) => {
                let certs = read_certs(&cert).map_err(bad)?;
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| bad(format!("client-key.pem: no private key read: {e}")))?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    bad(format!(
                        "client-cert.pem and client-key.pem: {e} (is the key the certificate's?)"
                    ))
                })?
            }
            (true, false) => return Err(bad("client-cert.pem without client-key.pem".into())),
            (false, true) => return Err(bad("client-key.pem without client-cert.pem".into())),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            name,
        })
    }

    /// Runs the TLS handshake over `sock` (blocking, under the socket's
    /// read timeout). rustls' own errors say what failed (an unknown
    /// issuer, a name mismatch, an alert from the server).
    pub(crate) fn connect(&self, sock: Stream) -> io::Result<rustls::StreamOwned<ClientConnection, Stream>> {
        let conn = ClientConnection::new(self.config.clone(), self.name.clone()).map_err(io::Error::other)?;
        let mut s = rustls::StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            let (r, w) = s.conn.complete_io(&mut s.sock)?;
            if r == 0 && w == 0 && s.conn.is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                ));
            }
        }
        Ok(s)
    }
}

fn read_certs(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| format!("{name}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{name}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// Checks that the server's certificate chains to the CA and is for a
/// server, without a name: for Unix sockets without `tls-hostname`.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One TLS session in transmission, shared by a connection's reader and
/// writers. See the [module docs](self) for the locking.
#[derive(Debug)]
pub(crate) struct TlsSession {
    session: Mutex<ClientConnection>,
    /// The socket's sending side and a buffer for ciphertext; held from
    /// sealing records until they are sent. Taken before `session`.
    out: Mutex<(Stream, Vec<u8>)>,
}

impl TlsSession {
    /// The session of a finished handshake; `sock` is a handle on its
    /// socket for sending.
    pub(crate) fn new(mut session: ClientConnection, sock: Stream) -> TlsSession {
        // Ciphertext is taken out after every piece: the limit would only
        // turn a large piece into a short write.
        session.set_buffer_limit(None);
        TlsSession {
            session: Mutex::new(session),
            out: Mutex::new((sock, Vec::with_capacity(PIECE + 4096))),
        }
    }

    fn session(&self) -> MutexGuard<'_, ClientConnection> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `data`, sealed, after whatever the session had queued.
    pub(crate) fn send(&self, data: &[u8]) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let (sock, cipher) = &mut *out;
        for piece in data.chunks(PIECE) {
            self.seal(Some(piece), cipher)?;
            sock.write_all(cipher)?;
            cipher.clear();
        }
        // Records the reader queued meanwhile and could not send.
        self.seal(None, cipher)?;
        let sent = sock.write_all(cipher);
        cipher.clear();
        sent
    }

    /// Queues close_notify and sends what is queued.
    pub(crate) fn close(&self) -> io::Result<()> {
        self.session().send_close_notify();
        self.send(&[])
    }

    /// Sends what the session queued by itself, unless a writer is at it
    /// (it sends the queue after its own records).
    fn send_queued(&self) -> io::Result<()> {
        let Ok(mut out) = self.out.try_lock() else {
            return Ok(());
        };
        let (sock, cipher) = &mut *out;
        self.seal(None, cipher)?;
        let sent = sock.write_all(cipher);
        cipher.clear();
        sent
    }

    /// Under the session lock: seals `plain` (if any) and moves every
    /// queued record into `cipher`.
    fn seal(&self, plain: Option<&[u8]>, cipher: &mut Vec<u8>) -> io::Result<()> {
        let mut s = self.session();
        if let Some(p) = plain {
            s.writer().write_all(p)?;
        }
        while s.wants_write() {
            s.write_tls(cipher)?;
        }
        Ok(())
    }
}

/// The reading side of a TLS connection: ciphertext from the socket in,
/// plaintext out.
#[derive(Debug)]
pub(crate) struct TlsReader {
    sock: Stream,
    session: Arc<TlsSession>,
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

impl TlsReader {
    pub(crate) fn new(sock: Stream, session: Arc<TlsSession>) -> TlsReader {
        TlsReader {
            sock,
            session,
            raw: vec![0; RAW],
            start: 0,
            end: 0,
        }
    }
}

impl Read for TlsReader {
    /// Plaintext, as much as is ready up to `buf.len()`; reads the socket
    /// (without the session lock) only when none is. 0 at the end: the
    /// server's close_notify, or the socket closed.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut filled = 0;
            let mut queued = false;
            {
                let mut s = self.session.session();
                loop {
                    // The session wants input only while its plaintext is
                    // taken out: one record at a time.
                    while self.start < self.end && s.wants_read() {
                        let mut raw = &self.raw[self.start..self.end];
                        let n = s.read_tls(&mut raw)?;
                        if n == 0 {
                            break;
                        }
                        self.start += n;
                        if let Err(e) = s.process_new_packets() {
                            drop(s);
                            // The alert that says why, if the socket takes it.
                            let _ = self.session.send_queued();
                            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                        }
                    }
                    match s.reader().read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // Closed without close_notify: the end all the same.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                        Err(e) => return Err(e),
                    }
                }
                if filled == 0 && !s.wants_read() {
                    // close_notify came: nothing more will.
                    return Ok(0);
                }
                queued |= s.wants_write();
            }
            if queued {
                self.session.send_queued()?;
            }
            if filled > 0 {
                return Ok(filled);
            }
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.end == self.raw.len() {
                // Unreachable in practice (the session takes a record at a
                // time while it has no plaintext), but never spin.
                self.raw.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            let n = loop {
                match self.sock.read(&mut self.raw[self.end..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                return Ok(0);
            }
            self.end += n;
        }
    }
}
