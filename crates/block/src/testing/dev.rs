//! [`HookDev`]: a device whose reads, changes and block status can be held.

use std::sync::atomic::{AtomicU64, Ordering};

use super::trap::Trap;
use crate::dev::{BlockDev, Capabilities, IoFlags, ZeroFlags};
use crate::mapping::Extent;
use crate::raw::RawFile;
use crate::{Error, Result};

/// A device whose reads, changes (write, write-zeroes, trim) and block
/// status first pass through a [`Trap`]. It wraps any device, an
/// `Arc<dyn BlockDev>` too.
///
/// Its reads refuse [`no_wait`](IoFlags::no_wait) and it leaves
/// [`hints`](BlockDev::hints) at "not in memory", so every read it gets
/// goes through a worker-thread path and can be trapped. It keeps the
/// default [`next_data`](BlockDev::next_data), through block status, so
/// the status trap sees copy-before-write's probes. It passes on
/// [`copy_to`](BlockDev::copy_to), so copies from it may go file to file
/// past the read trap, but exposes no [`data_fd`](BlockDev::data_fd), so
/// nothing writes into it past the write trap.
pub struct HookDev<D = RawFile> {
    /// The device underneath; use it to look past the hooks.
    pub inner: D,
    /// Holds `read_at`.
    pub read: Trap,
    /// Holds `write_at` (no-wait writes too), `write_zeroes` and `trim`.
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
    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        if flags.no_wait {
            return Err(Error::would_block());
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.read.hit(offset, buf.len() as u64);
        self.inner.read_at(buf, offset, flags)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        self.write.hit(offset, buf.len() as u64);
        self.inner.write_at(buf, offset, flags)
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
    fn copy_to(&self, offset: u64, dst: &dyn BlockDev, dst_offset: u64, len: u64) -> Option<Result<()>> {
        self.inner.copy_to(offset, dst, dst_offset, len)
    }
}
