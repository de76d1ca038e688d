//! [`HookDev`]: a device whose reads, changes and block status can be held.

use std::sync::atomic::{AtomicU64, Ordering};

use super::trap::Trap;
use crate::dev::{BlockDev, Capabilities, Extent, ZeroFlags};
use crate::raw::RawFile;
use crate::Result;

/// A device whose reads, changes (write, write-zeroes, trim) and block
/// status first pass through a [`Trap`].
///
/// It does not pass on [`try_read_at`](BlockDev::try_read_at) or
/// [`is_in_memory`](BlockDev::is_in_memory), so every call it gets goes
/// through a worker-thread path and can be trapped. It does pass on
/// [`as_raw_file`](BlockDev::as_raw_file), so copies may go file to file
/// past the read trap.
pub struct HookDev<D = RawFile> {
    /// The device underneath; use it to look past the hooks.
    pub inner: D,
    /// Holds `read_at`.
    pub read: Trap,
    /// Holds `write_at`, `try_write_at`, `write_zeroes` and `trim`.
    pub write: Trap,
    /// Holds `block_status`.
    pub status: Trap,
    reads: AtomicU64,
}

impl<D: BlockDev> HookDev<D> {
    /// Wraps `inner` with every trap disarmed.
    pub fn new(inner: D) -> Self {
        HookDev {
            inner,
            read: Trap::default(),
            write: Trap::default(),
            status: Trap::default(),
            reads: AtomicU64::new(0),
        }
    }

    /// `read_at` calls so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
}

impl<D: BlockDev> BlockDev for HookDev<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn as_raw_file(&self) -> Option<&RawFile> {
        self.inner.as_raw_file()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.read.hit(offset, buf.len() as u64);
        self.inner.read_at(buf, offset)
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        self.write.hit(offset, buf.len() as u64);
        self.inner.try_write_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.write.hit(offset, buf.len() as u64);
        self.inner.write_at(buf, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        self.write.hit(offset, length);
        self.inner.write_zeroes(offset, length, flags)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.write.hit(offset, length);
        self.inner.trim(offset, length)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.inner.cache(offset, length)
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.status.hit(offset, length);
        self.inner.block_status(offset, length)
    }
}
