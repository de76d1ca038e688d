//! Block layer of fleece: small devices behind one trait.
//!
//! - The seam: [`BlockDev`] (`dev`), the small core every device
//!   implements: size, capabilities, hints, reads and writes with
//!   [`IoFlags`] (FUA, no-wait), zeroes, trim, flush, block status;
//!   [`BlockDevExt`] (`ext`), what every device gets from it: requests
//!   split by the maximum transfer, zero fill; [`Mapping`] and [`Extent`]
//!   (`mapping`), what block status answers.
//! - Devices: [`RawFile`] (`raw/`), the image file; [`LiveDisk`], a filter
//!   that runs copy-before-write for every [`Snapshot`] and marks dirty
//!   bitmaps; [`SnapshotView`], a snapshot as a read-only device (`cbw/`).
//! - [`image`]: `image::open` turns a path into an [`Image`]: its device
//!   (raw today; where a new format goes is said there) and the image
//!   file's management (locks, length, resize).
//! - Stores (`store/`): where copy-before-write keeps old data, adapters
//!   over devices: [`DeviceStore`], [`FileStore`], [`RamStore`].
//! - Dirty bitmaps (`bitmap/`): [`DirtyBitmap`], [`NamedBitmap`] and its
//!   crash-safe sidecar file.
//! - `testing` (feature `testing`): hooks that hold any device's or store's
//!   calls, for race tests.
//!
//! ```
//! use std::sync::Arc;
//! use fleece_block::{image, BlockDev, ImageOptions, IoFlags, LiveDisk, RamStore, RawFile};
//! use fleece_block::{SnapshotOptions, SnapshotView};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.raw");
//! RawFile::create(&path, 1 << 20)?;
//! let img = image::open(&path, &ImageOptions::default())?;
//! let live = LiveDisk::new(img.device().clone());
//! live.write_at(&[1; 4096], 0, IoFlags::NONE)?;
//!
//! let store = RamStore::new(1 << 20, dir.path().join("spill"), img.size());
//! let snap = {
//!     let _frozen = live.freeze();
//!     live.snapshot(Box::new(store), SnapshotOptions::default())
//! };
//! live.write_at(&[2; 4096], 0, IoFlags::FUA)?;
//!
//! let mut old = [0u8; 4096];
//! SnapshotView(snap).read_at(&mut old, 0, IoFlags::NONE)?;
//! assert_eq!(old, [1; 4096]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
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
mod qcow2;
mod raw;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use bitmap::{DirtyBitmap, NamedBitmap};
pub use buf::{AlignedBuf, BUF_ALIGN};
pub use cbw::{
    ClusterState, LiveDisk, OnCbwError, Snapshot, SnapshotEvent, SnapshotOptions, SnapshotStats,
    SnapshotView, Subscription,
};
pub use dev::{check_range, next_data_by_status, BlockDev, Capabilities, IoFlags, IoHints, ZeroFlags};
pub use error::{Error, ErrorKind, Result};
pub use ext::BlockDevExt;
pub use image::{Format, Image, ImageOptions};
pub use lock::LockMode;
pub use mapping::{Extent, Mapping};
pub use qcow2::Qcow2Dev;
pub use raw::RawFile;
pub use store::{DeviceStore, FileStore, Qcow2Store, RamStore, Store};
