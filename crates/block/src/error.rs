use std::borrow::Cow;
use std::io;

/// What went wrong, coarse enough to map onto an NBD error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Offset or length outside the device.
    OutOfRange,
    /// A write, write-zeroes or trim reaching past the end of the device,
    /// which NBD answers with ENOSPC. Not a full file system: that is
    /// [`StoreFull`](Self::StoreFull).
    BeyondEnd,
    /// The operation is not possible quickly (FAST_ZERO) or at all.
    NotSupported,
    /// The device is read-only.
    ReadOnly,
    /// Read of data the snapshot does not hold (outside its bitmap, or discarded).
    AccessDenied,
    /// The snapshot was broken by an earlier copy-before-write failure.
    Broken,
    /// The store hit its limit or the file system is full.
    StoreFull,
    /// The copy-before-write did not finish within its timeout.
    TimedOut,
    /// An I/O error from the operating system.
    Io,
    /// Bad argument from a caller (not a client request).
    Invalid,
    /// The image is in use by another program.
    Locked,
    /// A request with [`IoFlags::no_wait`](crate::IoFlags::no_wait) would
    /// have had to wait; run it again without the flag.
    WouldBlock,
}

/// The one error type of the block layer: a kind, a message for people,
/// and the OS error underneath when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    // Static messages cost no allocation: a declined no-wait request is
    // an error on a path that must not allocate.
    message: Cow<'static, str>,
    #[source]
    source: Option<io::Error>,
}

impl Error {
    /// An error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The answer of a no-wait request that would have had to wait.
    pub fn would_block() -> Self {
        Error::new(ErrorKind::WouldBlock, "would block")
    }

    /// An I/O error, with what was being done when it happened.
    pub fn io(context: impl std::fmt::Display, err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::StoreFull,
            Some(libc::EOPNOTSUPP) => ErrorKind::NotSupported,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            message: format!("{context}: {err}").into(),
            source: Some(err),
        }
    }

    /// An error of `kind` with a message for people and the OS error that
    /// stands for it, when the message says more than the OS error would.
    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<Cow<'static, str>>,
        source: io::Error,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(source),
        }
    }

    /// The kind, for callers that map errors to wire codes.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The OS error number underneath, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(|e| e.raw_os_error())
    }
}

/// Result of block-layer operations.
pub type Result<T> = std::result::Result<T, Error>;
