//! Block layer of fleece: small nodes behind one trait ([`BlockDev`]).
//!
//! A live disk is a [`RawFile`] behind a [`LiveDisk`], which runs
//! copy-before-write for every [`Snapshot`] attached to it; a
//! [`SnapshotView`] serves a snapshot as a read-only device. Stores
//! ([`FileStore`], [`RamStore`]) hold the saved clusters.
#![warn(missing_docs)]

mod bitmap;
mod buf;
mod cbw;
mod dev;
mod error;
mod ext;
pub mod image;
mod lock;
mod mapping;
mod raw;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use bitmap::{DirtyBitmap, NamedBitmap};
pub use buf::{AlignedBuf, BUF_ALIGN};
pub use cbw::{
    LiveDisk, OnCbwError, Snapshot, SnapshotEvent, SnapshotOptions, SnapshotStats, SnapshotView, Subscription,
};
pub use dev::{check_range, next_data_by_status, BlockDev, Capabilities, IoFlags, IoHints, ZeroFlags};
pub use error::{Error, ErrorKind, Result};
pub use ext::BlockDevExt;
pub use image::{Image, ImageOptions};
pub use lock::LockMode;
pub use mapping::{Extent, Mapping};
pub use raw::RawFile;
pub use store::{DeviceStore, FileStore, RamStore, Store};
