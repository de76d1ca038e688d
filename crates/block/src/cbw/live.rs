//! [`LiveDisk`]: the device users write, with copy-before-write for every
//! attached snapshot and marking of every recording dirty bitmap.

use std::sync::{Arc, RwLock, RwLockWriteGuard};

use super::pool::Copiers;
use super::snapshot::{Snapshot, SnapshotOptions};
use crate::bitmap::NamedBitmap;
use crate::dev::{check_range, BlockDev, Capabilities, IoFlags, IoHints, ZeroFlags};
use crate::mapping::Extent;
use crate::store::Store;
use crate::{Error, ErrorKind, Result};

/// A disk that its users write, with copy-before-write for every snapshot
/// attached to it.
pub struct LiveDisk {
    base: Arc<dyn BlockDev>,
    /// Writes hold it shared; taking a snapshot holds it exclusively, so a
    /// write in flight at the instant lands wholly before or after it.
    gate: RwLock<()>,
    snapshots: RwLock<Arc<Vec<Arc<Snapshot>>>>,
    /// Dirty bitmaps every change is recorded in.
    bitmaps: RwLock<Arc<Vec<Arc<NamedBitmap>>>>,
    /// Copier threads for its snapshots' timed copies, per disk so that a
    /// stuck store of one disk cannot hold up copies of another.
    copiers: Arc<Copiers>,
}

impl LiveDisk {
    /// Wraps the device users write.
    pub fn new(base: Arc<dyn BlockDev>) -> Self {
        LiveDisk {
            base,
            gate: RwLock::new(()),
            snapshots: RwLock::new(Arc::new(Vec::new())),
            bitmaps: RwLock::new(Arc::new(Vec::new())),
            copiers: Arc::new(Copiers::new()),
        }
    }

    /// The dirty bitmaps, in the order added.
    pub fn bitmaps(&self) -> Arc<Vec<Arc<NamedBitmap>>> {
        self.bitmaps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A dirty bitmap by name.
    pub fn bitmap(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        self.bitmaps().iter().find(|b| b.name() == name).cloned()
    }

    /// Starts recording changes in `b`. Call with the disk frozen, so that
    /// no write in flight misses it.
    pub fn add_bitmap(&self, b: Arc<NamedBitmap>) {
        let mut list = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let mut v = (**list).clone();
        v.push(b);
        *list = Arc::new(v);
    }

    /// Stops recording in the named bitmap and returns it.
    pub fn remove_bitmap(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        let mut list = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let found = list.iter().find(|b| b.name() == name).cloned()?;
        let v: Vec<_> = list.iter().filter(|b| b.name() != name).cloned().collect();
        *list = Arc::new(v);
        Some(found)
    }

    /// Blocks new writes and waits for those in flight; the instant of a
    /// snapshot is while this guard is held. Freeze several disks in a fixed
    /// order (by name) for one instant across them.
    pub fn freeze(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a snapshot at this instant. Call with the disk frozen.
    pub fn snapshot(&self, store: Box<dyn Store>, opts: SnapshotOptions) -> Arc<Snapshot> {
        let snap = Arc::new(Snapshot::new(
            self.base.clone(),
            store,
            opts,
            self.copiers.clone(),
        ));
        let mut list = self.snapshots.write().unwrap_or_else(|p| p.into_inner());
        let mut v = (**list).clone();
        v.push(snap.clone());
        *list = Arc::new(v);
        snap
    }

    /// Stops copy-before-write for a snapshot, retiring it first: its view
    /// fails every read from then on (a read in flight included), since
    /// later writes no longer keep its old data. Writes already in flight
    /// may still copy into it; that is harmless.
    pub fn detach(&self, snap: &Arc<Snapshot>) {
        // First: once detached, writes no longer copy for it or wait for its
        // readers, so its view must not serve another byte.
        snap.retire();
        let mut list = self.snapshots.write().unwrap_or_else(|p| p.into_inner());
        let v: Vec<_> = list.iter().filter(|s| !Arc::ptr_eq(s, snap)).cloned().collect();
        *list = Arc::new(v);
    }

    /// Number of attached snapshots.
    pub fn snapshot_count(&self) -> usize {
        self.snapshots.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn attached(&self) -> Arc<Vec<Arc<Snapshot>>> {
        self.snapshots.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn check_end(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.base.size(), offset, len)
            .map_err(|_| Error::new(ErrorKind::BeyondEnd, "write beyond the end of the disk"))
    }

    /// Runs `f` (a change to the range) after every snapshot saved what it
    /// needs, holding the gate shared throughout.
    fn changing<T>(&self, offset: u64, len: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_end(offset, len)?;
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if len > 0 {
            // Bits first: durable before the data can reach the disk.
            for b in self.bitmaps().iter() {
                b.mark(offset, len)?;
            }
            for s in self.attached().iter() {
                s.before_write(offset, len)?;
            }
        }
        f()
    }

    /// A write that must not wait: only if the gate is open, every bitmap
    /// bit is already set (a new one means an `fdatasync`), and no snapshot
    /// needs a copy, or every copy is a memory copy.
    fn write_now(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        if flags.fua {
            return Err(Error::would_block());
        }
        let len = buf.len() as u64;
        let Ok(_gate) = self.gate.try_read() else {
            return Err(Error::would_block());
        };
        if !self.bitmaps().iter().all(|b| b.covers(offset, len)) {
            return Err(Error::would_block());
        }
        let snaps = self.attached();
        if !snaps.iter().all(|s| s.write_is_free(offset, len)) {
            // With the disk and every store in memory a copy is a memory
            // copy, and running it here saves a hand-off to the pool in the
            // copy phase of a fresh snapshot, where the write latency tail is.
            // A wait here is for another thread's copy or view read of the
            // same cluster, which do not need this one.
            if !self.base.hints().in_memory || !snaps.iter().all(|s| s.copies_in_memory()) {
                return Err(Error::would_block());
            }
            // Only here: the plain path leaves the range to the device, and
            // a call less per request.
            self.check_end(offset, len)?;
            for s in snaps.iter() {
                s.before_write(offset, len)?;
            }
        }
        self.base.write_at(buf, offset, flags)
    }
}

/// A filter: writes, zeroes and trims first mark the bitmaps and copy what
/// the snapshots need; everything else is the device underneath. It has no
/// [`data_fd`](BlockDev::data_fd): writing the file would skip both.
impl BlockDev for LiveDisk {
    fn size(&self) -> u64 {
        self.base.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.base.capabilities()
    }
    fn hints(&self) -> IoHints {
        self.base.hints()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        self.base.read_at(buf, offset, flags)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        if flags.no_wait {
            return self.write_now(buf, offset, flags);
        }
        self.changing(offset, buf.len() as u64, || {
            self.base.write_at(buf, offset, flags)
        })
    }
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        self.changing(offset, length, || self.base.write_zeroes(offset, length, flags))
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.changing(offset, length, || self.base.trim(offset, length))
    }
    fn flush(&self) -> Result<()> {
        self.base.flush()
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.base.block_status(offset, length)
    }
    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.base.cache(offset, length)
    }
    fn next_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        self.base.next_data(offset, end)
    }
    fn copy_to(&self, offset: u64, dst: &dyn BlockDev, dst_offset: u64, len: u64) -> Option<Result<()>> {
        self.base.copy_to(offset, dst, dst_offset, len)
    }
}
