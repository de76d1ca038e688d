//! The push-backup engine of fleece: copies a snapshot to a target.
//!
//! - [`target`]: where a job writes, behind one trait ([`Target`]): a raw
//!   file, or a remote NBD server through the blocking, multi-connection
//!   NBD client ([`NbdTarget`]) built on `fleece-nbd`'s sans-IO engine.
//! - [`job`]: the copy engine ([`DiskCopy`], one per disk, under a shared
//!   [`Control`]): workers, retries and resume, speed limit, verify.
//! - [`order`]: copy order (seed 004, item 7), also served to pull clients
//!   as the `fleece:copy-order` NBD meta context.
//!
//! No async runtime: like the daemon's data path, it runs on plain threads.
//! The daemon owns snapshots and bitmaps; this crate only copies and says
//! exactly what the target acknowledged.
#![warn(missing_docs)]

mod control;
mod error;
pub mod job;
pub mod order;
mod rate;
pub mod target;

pub use control::{Control, ControlStatus};
pub use error::{Error, ErrorKind, Result};
pub use job::{CopyOptions, CopyStats, DiskCopy, OnSourceError, OnTargetError};
pub use order::{Hint, Order};
pub use rate::RateLimit;
pub use target::nbd::{ConnectOptions, NbdTarget, Pending, TargetInfo};
pub use target::{OpenOptions, Target};
