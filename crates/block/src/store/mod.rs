//! Where copy-before-write puts old cluster contents.
//!
//! A store keeps whole clusters by index. It does no accounting of its own:
//! the snapshot decides what to save and counts what it holds.
//!
//! Stores are adapters over devices: a [`DeviceStore`] lays clusters out on
//! any [`BlockDev`]s (striped over several), a [`FileStore`] is one over raw
//! files fleece makes, and a [`RamStore`] keeps clusters in memory and
//! spills into a file store. A [`Qcow2Store`] is a device store over a
//! qcow2 image fleece makes; a remote store will be one over its device.

use std::path::PathBuf;

use crate::dev::{BlockDev, IoHints};
use crate::Result;

mod device;
mod file;
mod qcow2;
mod ram;

pub use device::DeviceStore;
pub use file::FileStore;
pub use qcow2::Qcow2Store;
pub use ram::RamStore;

/// Storage for saved clusters.
pub trait Store: Send + Sync {
    /// Smallest unit the store can hold without read-modify-write; cluster
    /// sizes are rounded up to a multiple of it.
    fn granularity(&self) -> u64;
    /// Saves `data` (one or more whole clusters) as cluster `index` onward.
    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()>;
    /// Reads `buf.len()` bytes starting `offset` bytes into cluster `index`.
    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Forgets cluster `index`, freeing its space.
    fn forget(&self, index: u64, cluster: u64);
    /// Kind and location, for status output.
    fn describe(&self) -> (&'static str, Option<PathBuf>);
    /// Saves `len` bytes of clusters from `offset` of `src` as cluster
    /// `index` onward, if this store can without a buffer (a kernel copy);
    /// `None`: use [`save`](Self::save). `None` may come after part of the
    /// data landed; the caller then saves the whole range.
    fn save_from(
        &self,
        _index: u64,
        _cluster: u64,
        _src: &dyn BlockDev,
        _offset: u64,
        _len: u64,
    ) -> Option<Result<()>> {
        None
    }
    /// What the store is like: `in_memory` if loads never wait for a disk.
    fn hints(&self) -> IoHints {
        IoHints::default()
    }
    /// True if cluster `index`, saved, is held in memory (reading it, or
    /// freeing it, touches no disk): what a push job copies first.
    fn holds_in_memory(&self, _index: u64) -> bool {
        self.hints().in_memory
    }
}
