//! The daemon's and CLI's one error type.

use hyper::StatusCode;

/// A kind that decides the HTTP status and the JSON `error.code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bad input from a user or a request.
    InvalidArgument,
    /// The named thing does not exist.
    NotFound,
    /// The name is taken.
    Exists,
    /// The thing is in use.
    Busy,
    /// Talking to the daemon failed (CLI side).
    Unavailable,
    /// Anything else.
    Internal,
}

impl Kind {
    /// Wire code of this kind, used in JSON errors.
    pub fn code(self) -> &'static str {
        match self {
            Kind::InvalidArgument => "invalid_argument",
            Kind::NotFound => "not_found",
            Kind::Exists => "exists",
            Kind::Busy => "busy",
            Kind::Unavailable => "unavailable",
            Kind::Internal => "internal",
        }
    }

    /// The one place kinds map to HTTP statuses.
    pub fn status(self) -> StatusCode {
        match self {
            Kind::InvalidArgument => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Exists | Kind::Busy => StatusCode::CONFLICT,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Error with a kind and a message for people.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// What kind of failure.
    pub kind: Kind,
    /// What to tell a person.
    pub message: String,
}

impl Error {
    /// New error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    /// Shorthand for invalid input.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidArgument, message)
    }
    /// Shorthand for a missing thing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(Kind::NotFound, message)
    }
}

impl From<fleece_block::Error> for Error {
    fn from(e: fleece_block::Error) -> Self {
        use fleece_block::ErrorKind as B;
        let kind = match e.kind() {
            B::Invalid | B::OutOfRange => Kind::InvalidArgument,
            _ => Kind::Internal,
        };
        Error::new(kind, e.to_string())
    }
}

/// Result of daemon and CLI operations.
pub type Result<T> = std::result::Result<T, Error>;
