//! The push-backup engine of fleece: copies a snapshot to a target.
//!
//! This step holds the NBD target ([`NbdTarget`]): a blocking,
//! multi-threaded client that pushes to qemu-nbd, qemu-storage-daemon,
//! nbdkit or another fleece, over `fleece-nbd`'s sans-IO protocol engine.
//! No async runtime: like the daemon's data path, it runs on plain threads
//! (a reader per connection; callers send their own requests). The job
//! layer (copy order, workers, retries, progress) comes next and builds on
//! [`Pending`] to know exactly what the target acknowledged.
#![warn(missing_docs)]

mod error;
pub mod target;

pub use error::{Error, ErrorKind, Result};
pub use target::nbd::{ConnectOptions, NbdTarget, Pending, TargetInfo};
