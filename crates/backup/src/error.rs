//! The crate's one error type: a kind to decide on, a message for people.

use std::io;

use fleece_nbd::consts::*;
use fleece_nbd::ProtocolError;

/// What went wrong, coarse enough for a job to decide what to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The target's address cannot be parsed.
    InvalidTarget,
    /// Something this client or the server cannot do: plain NBD to a
    /// server that requires TLS, TLS-PSK, a command the server does not
    /// offer, a zeroing that would not be fast.
    Unsupported,
    /// The server could not be reached.
    Connect,
    /// The server refused the negotiation or broke it.
    Handshake,
    /// A request the protocol does not allow: past the end of the export,
    /// or not aligned to its minimum block size.
    InvalidRequest,
    /// The server answered a request with an error ([`Error::errno`]); the
    /// connection goes on.
    Server,
    /// The connection was lost, or the server broke the protocol, before
    /// this request was acknowledged: it may or may not have taken effect.
    /// Every later request fails the same way until the caller reconnects.
    Disconnected,
    /// A local target (a file) failed an I/O.
    Io,
    /// Reading the snapshot failed.
    Source,
    /// A job option or a target does not fit: a size mismatch, a read-only
    /// target, a bad value.
    Invalid,
    /// The job was cancelled.
    Cancelled,
    /// The verify pass found the target differs from the snapshot.
    Mismatch,
}

/// The one error type of the backup engine.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    errno: Option<u32>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            errno: None,
            source: None,
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// For [`ErrorKind::Server`], the server's `NBD_E*` error value (they
    /// are Linux errno values: `EIO` is 5).
    pub fn errno(&self) -> Option<u32> {
        self.errno
    }

    /// An error of `kind` caused by an OS error.
    pub fn io(kind: ErrorKind, context: impl std::fmt::Display, err: io::Error) -> Self {
        Error {
            kind,
            message: format!("{context}: {err}"),
            errno: None,
            source: Some(Box::new(err)),
        }
    }

    pub(crate) fn protocol(kind: ErrorKind, context: impl std::fmt::Display, err: ProtocolError) -> Self {
        // A refusal names its own cause (TLS, an unknown export); keep it
        // as the kind a caller can act on.
        let kind = match &err {
            ProtocolError::Refused(r) if r.reply == REP_ERR_TLS_REQD => ErrorKind::Unsupported,
            _ => kind,
        };
        Error {
            kind,
            message: format!("{context}: {err}"),
            errno: None,
            source: Some(Box::new(err)),
        }
    }

    pub(crate) fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    pub(crate) fn server(what: &str, errno: u32, message: &str) -> Self {
        let mut text = format!("the server failed {what}: {}", errno_name(errno));
        if !message.is_empty() {
            text.push_str(": ");
            text.push_str(message);
        }
        Error {
            kind: ErrorKind::Server,
            message: text,
            errno: Some(errno),
            source: None,
        }
    }
}

/// An NBD error value as people know it.
pub(crate) fn errno_name(errno: u32) -> String {
    let name = match errno {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (out of memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left on device)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (operation not supported)",
        ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
        other => return format!("error {other}"),
    };
    name.to_string()
}

/// Result with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
