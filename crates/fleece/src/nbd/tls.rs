//! TLS for NBD (x509, rustls with the ring provider): the server's
//! credentials, and a TLS session as the transport of a connection.
//!
//! rustls is sans-IO: its `ServerConnection` takes ciphertext with
//! `read_tls`, gives plaintext through `reader()`, takes plaintext through
//! `writer()` and gives ciphertext with `write_tls`. So TLS sits on the
//! connection's owner thread, over the same non-blocking socket, and the
//! plaintext path does not change at all (the connection is generic over
//! its transport; see `connection.rs`).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleece_nbd::TlsMode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::Stream;
use crate::error::{Error, Result};

/// Ciphertext a session may hold before its writer says "would block":
/// room for a few large read replies, so a 1 MiB reply is encrypted in one
/// go and leaves in few `writev` calls.
const TLS_BUFFER: usize = 4 << 20;

/// Parses `--tls` / `mode`: `require` (the default) or `allow`.
pub fn parse_mode(s: &str) -> Result<TlsMode> {
    match s {
        "require" => Ok(TlsMode::Required),
        "allow" => Ok(TlsMode::Allowed),
        _ => Err(Error::invalid(format!(
            "TLS mode '{s}' is not known: use require (every client must start TLS) or allow"
        ))),
    }
}

/// Where the server's credentials are.
#[derive(Clone, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to; with
    /// it, every client must present one (mutual TLS).
    pub ca: Option<PathBuf>,
    /// `require` or `allow`.
    pub mode: Option<String>,
}

/// The server's TLS setup, shared by every connection.
pub struct Tls {
    /// What the handshake asks of clients.
    pub mode: TlsMode,
    /// rustls' configuration.
    pub config: Arc<ServerConfig>,
}

impl Tls {
    /// Loads certificate, key and CA, checking that they fit together.
    pub fn load(files: &TlsFiles) -> Result<Tls> {
        let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
            return Err(Error::invalid(
                "TLS needs both a certificate and its key (--tls-cert FILE --tls-key FILE)",
            ));
        };
        let mode = parse_mode(files.mode.as_deref().unwrap_or("require"))?;
        let certs = read_certs(cert, "--tls-cert")?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| Error::invalid(format!("--tls-key {}: no private key read: {e}", key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid(format!("TLS: {e}")))?;
        let builder = match &files.ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs(ca, "--tls-ca")? {
                    roots
                        .add(c)
                        .map_err(|e| Error::invalid(format!("--tls-ca {}: {e}", ca.display())))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| Error::invalid(format!("--tls-ca {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            Error::invalid(format!(
                "--tls-cert {} and --tls-key: {e} (is the key the certificate's?)",
                cert.display()
            ))
        })?;
        Ok(Tls {
            mode,
            config: Arc::new(config),
        })
    }
}

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::invalid(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{flag} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// Runs the TLS handshake of a session over a blocking stream (the
/// negotiation phase, under its deadline), starting with `early`: bytes
/// the client sent right after `NBD_OPT_STARTTLS`, already read.
pub fn accept<S: Read + Write>(tls: &Tls, io: &mut S, mut early: &[u8]) -> io::Result<ServerConnection> {
    let mut conn = ServerConnection::new(tls.config.clone()).map_err(io::Error::other)?;
    while !early.is_empty() {
        conn.read_tls(&mut early)?;
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(io);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    while conn.is_handshaking() {
        let (r, w) = conn.complete_io(io)?;
        if r == 0 && w == 0 && conn.is_handshaking() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    // Negotiation replies are small and few; the limit matters only once
    // read replies flow.
    conn.set_buffer_limit(None);
    Ok(conn)
}

/// Sends `data` through the session over a blocking stream.
pub fn send<S: Write>(conn: &mut ServerConnection, io: &mut S, data: &[u8]) -> io::Result<()> {
    conn.writer().write_all(data)?;
    while conn.wants_write() {
        if conn.write_tls(io)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// Reads plaintext through the session over a blocking stream; 0 at the
/// end of input.
pub fn recv<S: Read + Write>(conn: &mut ServerConnection, io: &mut S, buf: &mut [u8]) -> io::Result<usize> {
    match rustls::Stream::new(conn, io).read(buf) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        r => r,
    }
}

/// A TLS session over a non-blocking socket: the transport of a
/// connection in transmission.
pub struct TlsStream {
    conn: ServerConnection,
    sock: Stream,
}

impl TlsStream {
    /// The session (handshake done) over its socket, made non-blocking by
    /// the caller.
    pub fn new(mut conn: ServerConnection, sock: Stream) -> TlsStream {
        conn.set_buffer_limit(Some(TLS_BUFFER));
        TlsStream { conn, sock }
    }

    /// The socket under the session.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// Ciphertext not yet handed to the socket.
    pub fn has_pending(&self) -> bool {
        self.conn.wants_write()
    }

    /// Hands what ciphertext the socket takes now to it; true if any.
    pub fn push(&mut self) -> io::Result<bool> {
        let mut any = false;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(any)
    }

    /// Ends the session politely (close_notify), as far as the socket takes
    /// it without waiting.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.push();
    }
}

impl Read for TlsStream {
    /// Plaintext the session has, else records from the socket; `WouldBlock`
    /// only when both are empty (so a caller that sleeps in `poll` after it
    /// never leaves plaintext behind in the session).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: the end of input all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert that says why, if the socket takes it.
                let _ = self.push();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push()?;
        let n = self.conn.writer().write(buf)?;
        self.push()?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.push()?;
        let n = self.conn.writer().write_vectored(bufs)?;
        self.push()?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
