//! Sans-IO engine of the NBD protocol as fleece speaks it.
//!
//! Nothing here opens a socket, spawns a thread or reads a clock: callers feed
//! bytes in and send the bytes that come out. The daemon's server and (later)
//! the push-backup client share this code, and tests and fuzzers drive it
//! with slices. Spec: NetworkBlockDevice/nbd `doc/proto.md`, with the
//! extended-headers extension that qemu 10 negotiates first.
#![warn(missing_docs)]

#[allow(missing_docs)]
pub mod consts;
mod handshake;
mod transmission;
mod wire;

pub use handshake::{Catalog, ExportInfo, Negotiated, ServerHandshake, Step, MAX_OPTION_LEN};
pub use transmission::{decode_request, encode_request, Extent, Replies, Request};

/// Which reply headers a connection uses, fixed at the end of negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyMode {
    /// 16-byte simple replies only.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: 20-byte chunk headers.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and replies, 64-bit lengths.
    Extended,
}

/// A violation after which the connection cannot continue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// A message did not start with the magic number its position requires.
    #[error("bad magic number: the client is not speaking NBD or lost framing")]
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
    /// `NBD_OPT_EXPORT_NAME` after extended headers, which the spec forbids.
    #[error("NBD_OPT_EXPORT_NAME after extended headers")]
    ExportNameAfterExtendedHeaders,
    /// An export name that is not UTF-8.
    #[error("export name is not valid UTF-8")]
    BadString,
    /// Input fed after the handshake finished.
    #[error("handshake already finished")]
    HandshakeFinished,
}

#[cfg(test)]
mod tests;
