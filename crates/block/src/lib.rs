//! Block layer of fleece: small nodes behind one trait ([`BlockDev`]).
//!
//! A live disk is a [`RawFile`]; the daemon exports any `BlockDev` over NBD.
#![warn(missing_docs)]

mod dev;
mod error;
mod raw;

pub use dev::{check_range, BlockDev, Capabilities, Extent, Mapping, ZeroFlags};
pub use error::{Error, ErrorKind, Result};
pub use raw::RawFile;
