//! Sans-IO engine of the NBD protocol, both sides, as fleece speaks it.
//!
//! Nothing here opens a socket, spawns a thread or reads a clock: callers feed
//! bytes in and send the bytes that come out. The daemon's server and the
//! push-backup client (`fleece-backup`) share this code, and tests and
//! fuzzers drive it with slices. Spec: NetworkBlockDevice/nbd `doc/proto.md`,
//! with the extended-headers extension that qemu 10 negotiates first.
//!
//! | | server | client |
//! | --- | --- | --- |
//! | handshake | [`ServerHandshake`] over a [`Catalog`] | [`ClientHandshake`] |
//! | requests | [`decode_request`] | [`encode_request`] |
//! | replies | [`Replies`] | [`ReplyDecoder`] → [`ReplyEvent`] |
//!
//! A client in a few lines, with a server in memory standing in for the
//! socket:
//!
//! ```
//! use fleece_nbd::*;
//! # struct One;
//! # impl Catalog for One {
//! #     fn list(&self) -> Vec<ExportInfo> { self.lookup("").into_iter().collect() }
//! #     fn lookup(&self, _: &str) -> Option<ExportInfo> {
//! #         Some(ExportInfo { name: "disk".into(), description: String::new(), size: 1 << 20,
//! #             flags: 0, block_sizes: (1, 4096, 1 << 25), contexts: vec![] })
//! #     }
//! # }
//! let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
//! let mut server = ServerHandshake::new(&mut to_client);
//! let mut client = ClientHandshake::new(ClientOptions::new("disk")).unwrap();
//! let negotiated = loop {
//!     let (n, step) = client.process(&to_client, &mut to_server).unwrap();
//!     to_client.drain(..n);
//!     if let ClientStep::Ready(neg) = step {
//!         break neg;
//!     }
//!     let (n, _) = server.process(&to_server, &One, &mut to_client).unwrap();
//!     to_server.drain(..n);
//! };
//! assert_eq!(negotiated.size, 1 << 20);
//! assert_eq!(negotiated.mode, ReplyMode::Extended);
//! ```
#![warn(missing_docs)]

#[allow(missing_docs)]
pub mod consts;
mod error;
mod handshake;
mod transmission;
mod wire;

pub use error::{ProtocolError, Refusal};
pub use handshake::{
    BlockSizes, Catalog, ClientHandshake, ClientNegotiated, ClientOptions, ClientStep, ExportInfo,
    Negotiated, ServerHandshake, Step, TlsMode, MAX_OPTION_LEN,
};
pub use transmission::{
    decode_request, encode_request, Extent, Replies, ReplyDecoder, ReplyEvent, Request, DEFAULT_REPLY_LIMIT,
};

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

#[cfg(test)]
mod tests;
