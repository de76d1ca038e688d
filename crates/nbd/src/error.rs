//! The crate's one error type, for both sides of the protocol.

use std::fmt;

use crate::consts::*;
use crate::handshake::option_name;

/// A violation or refusal after which the connection (or, for a
/// [`Refusal`], the negotiation) cannot continue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// A message did not start with the magic number its position requires.
    #[error("bad magic number: the peer is not speaking NBD or framing was lost")]
    BadMagic,
    /// The client set flag bits this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An unknown option from a client that did not negotiate fixed newstyle.
    #[error("unknown option {0} from a client without fixed newstyle")]
    UnknownOption(u32),
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist; the protocol
    /// has no error reply for it.
    #[error("client asked for unknown export '{0}' with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` for an export this client may not open; the
    /// protocol has no error reply for it.
    #[error("client may not open export '{0}' ({1}); asked with NBD_OPT_EXPORT_NAME")]
    Denied(String, String),
    /// An option other than `NBD_OPT_STARTTLS` that cannot be refused
    /// (`NBD_OPT_EXPORT_NAME`) before TLS, on a server that requires it.
    #[error(
        "client asked for an export with NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS"
    )]
    TlsRequired,
    /// `NBD_OPT_EXPORT_NAME` after extended headers, which the spec forbids.
    #[error("NBD_OPT_EXPORT_NAME after extended headers")]
    ExportNameAfterExtendedHeaders,
    /// An export name that is not UTF-8.
    #[error("export name is not valid UTF-8")]
    BadString,
    /// Input fed after the handshake finished.
    #[error("handshake already finished")]
    HandshakeFinished,
    /// A string longer than the protocol's 4096-byte limit.
    #[error("a string of {0} bytes is longer than NBD's 4096-byte limit")]
    StringTooLong(usize),
    /// The server greeted with the oldstyle handshake, gone from servers
    /// since 2012 and not spoken here.
    #[error("the server speaks oldstyle NBD, which this client does not support")]
    OldstyleServer,
    /// TLS was asked for, but the server's greeting lacks fixed newstyle,
    /// without which there is no `NBD_OPT_STARTTLS`; going on would send
    /// the export name in clear text (and anyone on the path can clear
    /// that flag to make it so).
    #[error("TLS was asked for, but the server does not speak fixed newstyle NBD, which STARTTLS needs")]
    NoTlsWithoutFixedNewstyle,
    /// The server refused an option the client could not do without.
    #[error("{0}")]
    Refused(Box<Refusal>),
    /// The server closed the connection after `NBD_OPT_EXPORT_NAME`, which
    /// is how that option says no.
    #[error(
        "the server closed the connection after NBD_OPT_EXPORT_NAME: export '{0}' is unknown or \
         refused (that option cannot say why)"
    )]
    ExportNameRefused(String),
    /// The server closed the connection in the middle of the handshake.
    #[error("the server closed the connection during {0}")]
    ServerClosed(&'static str),
    /// The server sent a message that breaks the protocol.
    #[error("malformed message from the server: {0}")]
    BadReply(String),
    /// A reply payload larger than the decoder's bound: a broken or hostile
    /// server, or framing was lost.
    #[error("the server sent a payload of {length} bytes, more than the limit of {limit}")]
    ReplyTooLarge {
        /// Payload length announced by the server.
        length: u64,
        /// The decoder's bound.
        limit: u64,
    },
}

/// An option the server answered with an `NBD_REP_ERR_*` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The option refused (`NBD_OPT_*`).
    pub option: u32,
    /// The error reply (`NBD_REP_ERR_*`).
    pub reply: u32,
    /// The export the negotiation was for.
    pub export: String,
    /// What the server said, possibly empty.
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = option_name(self.option);
        match self.reply {
            REP_ERR_UNSUP => write!(f, "the server does not support {opt}")?,
            REP_ERR_POLICY => write!(f, "the server's policy forbids {opt}")?,
            REP_ERR_INVALID => write!(f, "the server found {opt} invalid")?,
            REP_ERR_PLATFORM => write!(f, "{opt} is not available on the server's platform")?,
            REP_ERR_TLS_REQD => write!(f, "the server requires TLS for export '{}' ({opt})", self.export)?,
            REP_ERR_UNKNOWN => write!(f, "the server has no export '{}'", self.export)?,
            REP_ERR_SHUTDOWN => write!(f, "the server is shutting down")?,
            REP_ERR_BLOCK_SIZE_REQD => write!(f, "the server requires block size negotiation before {opt}")?,
            REP_ERR_TOO_BIG => write!(f, "the server found {opt} too big")?,
            REP_ERR_EXT_HEADER_REQD => write!(f, "the server requires extended headers ({opt})")?,
            other => write!(f, "the server refused {opt} with error {other:#x}")?,
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}
