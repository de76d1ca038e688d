//! The core trait every device implements: what a format, a filter, a store
//! part or a remote device must provide, and nothing more.
//!
//! Algorithms that work for every device (splitting a request by the
//! maximum transfer, zero fill) are in [`BlockDevExt`](crate::BlockDevExt);
//! what a range reads as is a [`Mapping`](crate::Mapping). Scheduling policy
//! is not a device's business: a device only says what it is
//! ([`IoHints`]) and honours [`IoFlags::no_wait`]; the caller decides where a
//! request runs.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::mapping::Extent;
use crate::{Error, ErrorKind, Result};

/// Flags of a read or a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoFlags {
    /// Durable on return (NBD `FUA`). Reads ignore it.
    pub fua: bool,
    /// Fail with [`ErrorKind::WouldBlock`] instead of waiting for a disk, a
    /// lock, a copy-before-write or a bitmap sync. A connection's socket
    /// thread runs requests with it, and hands those that fail so to a
    /// worker, which runs them without it.
    pub no_wait: bool,
}

impl IoFlags {
    /// A plain request.
    pub const NONE: IoFlags = IoFlags {
        fua: false,
        no_wait: false,
    };
    /// A write that is durable on return.
    pub const FUA: IoFlags = IoFlags {
        fua: true,
        no_wait: false,
    };
    /// A request that must not wait (see [`no_wait`](Self::no_wait)).
    pub const NO_WAIT: IoFlags = IoFlags {
        fua: false,
        no_wait: true,
    };
}

/// How a write-zeroes request may be carried out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (no NBD `NO_HOLE`).
    pub may_unmap: bool,
    /// Fail with `NotSupported` rather than write zero buffers (NBD `FAST_ZERO`).
    pub fast_only: bool,
    /// Durable before returning (NBD `FUA`).
    pub fua: bool,
}

/// What a device can do. Callers ask once, when they start using it (an
/// export, a store), and rely on the answer; it never changes.
///
/// Build one with `..Capabilities::default()` so that new fields get their
/// cautious defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, zeroes and trims are refused.
    pub read_only: bool,
    /// Trim deallocates (otherwise it is accepted and ignored).
    pub trim: bool,
    /// Write-zeroes can be done without writing buffers (it may still
    /// fail with `NotSupported` for a range the device cannot zero so).
    pub fast_zero: bool,
    /// Writes with [`IoFlags::fua`] are durable on return (natively, or,
    /// as qcow2 does, by a flush of the device after the write), so an
    /// export offers FUA.
    pub fua: bool,
    /// Offsets and lengths of requests are multiples of this (a power of
    /// two; 1 for byte-addressed devices).
    pub min_io: u32,
    /// Requests that are multiples of this need no read-modify-write (a
    /// power of two); stores round their clusters up to it.
    pub preferred_io: u32,
    /// Most bytes one read or write may carry; `None` for no limit. Zeroes
    /// and trims are not bound by it. [`BlockDevExt`](crate::BlockDevExt)
    /// splits longer requests.
    pub max_transfer: Option<u32>,
    /// Block status tells where in a backing chain each range is
    /// allocated ([`Extent::depth`](crate::Extent::depth)), so an export
    /// may offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
}

impl Default for Capabilities {
    /// A writable byte-addressed device that supports nothing optional.
    fn default() -> Self {
        Capabilities {
            read_only: false,
            trim: false,
            fast_zero: false,
            fua: false,
            min_io: 1,
            preferred_io: 4096,
            max_transfer: None,
            allocation_depth: false,
        }
    }
}

/// What a device is like, for callers that decide where a request runs.
/// Room for more (a device that is slow to seek, one that is remote).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoHints {
    /// Reads never wait for a disk: the data lives in memory (tmpfs).
    pub in_memory: bool,
}

/// A byte-addressed block device. All methods take `&self` and may be called
/// from many threads at once; implementations order their own conflicts.
///
/// A wrapper (a filter) forwards every method it does not change, the
/// defaulted ones included: a default answers for the wrapper, not for what
/// it wraps.
pub trait BlockDev: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// What the device supports.
    fn capabilities(&self) -> Capabilities;

    /// What the device is like. Unlike capabilities this may change (a
    /// store that starts spilling to disk), so callers ask when they decide.
    fn hints(&self) -> IoHints {
        IoHints::default()
    }

    /// Fills `buf` from `offset`. With [`IoFlags::no_wait`] it fails with
    /// [`ErrorKind::WouldBlock`] unless it can be done without waiting (the
    /// data is in memory).
    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()>;

    /// Writes `buf` at `offset`. With [`IoFlags::fua`] it is durable on
    /// return; with [`IoFlags::no_wait`] it fails with
    /// [`ErrorKind::WouldBlock`] unless it can be done without waiting.
    fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()>;

    /// Makes the range read as zeroes; with `fast_only`, fails with
    /// `NotSupported` rather than write zero buffers. A device without a
    /// faster way writes them with
    /// [`BlockDevExt::fill_zeroes`](crate::BlockDevExt::fill_zeroes).
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()>;

    /// Says the range is no longer needed; it may then read as anything
    /// (raw files read it as zeroes).
    fn trim(&self, offset: u64, length: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Mapping of the range from `offset`, covering at least one byte and at
    /// most `length` bytes.
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;

    /// Hints that the range will be read soon.
    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        check_range(self.size(), offset, length)
    }

    /// The first offset in `[offset, end)` that may hold data (anything not
    /// known to read as zeroes), or `None` if the whole range reads as
    /// zeroes.
    ///
    /// A core method with a default (block status, see
    /// [`next_data_by_status`]) rather than an
    /// extension: copy-before-write asks it of an `Arc<dyn BlockDev>` for
    /// every run it copies, and only a trait method reaches a device's own
    /// cheaper answer through that pointer (a raw file's is one
    /// `SEEK_DATA`, where block status also walks to the next hole).
    fn next_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        next_data_by_status(self, offset, end)
    }

    /// Copies `len` bytes from `offset` of this device to `dst_offset` of
    /// `dst` without a trip through user memory, if this device can; `None`
    /// if it cannot (the caller copies through a buffer). `None` may also
    /// come after part of the range was copied; the caller then copies the
    /// whole range again.
    fn copy_to(&self, _offset: u64, _dst: &dyn BlockDev, _dst_offset: u64, _len: u64) -> Option<Result<()>> {
        None
    }

    /// The descriptor of a file that holds this device's bytes at the same
    /// offsets, so that writing the file is writing the device: a raw file,
    /// which lets [`copy_to`](Self::copy_to) of another raw file copy in the
    /// kernel. A device that does anything on writes (copy-before-write,
    /// bitmaps, traps) must not expose one.
    fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// A shared device is a device: stores and tests hold parts as
/// `Arc<dyn BlockDev>` and wrap them again.
impl<T: BlockDev + ?Sized> BlockDev for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn hints(&self) -> IoHints {
        (**self).hints()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        (**self).read_at(buf, offset, flags)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        (**self).write_at(buf, offset, flags)
    }
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        (**self).write_zeroes(offset, length, flags)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        (**self).trim(offset, length)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        (**self).block_status(offset, length)
    }
    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        (**self).cache(offset, length)
    }
    fn next_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        (**self).next_data(offset, end)
    }
    fn copy_to(&self, offset: u64, dst: &dyn BlockDev, dst_offset: u64, len: u64) -> Option<Result<()>> {
        (**self).copy_to(offset, dst, dst_offset, len)
    }
    fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).data_fd()
    }
}

/// [`BlockDev::next_data`] through block status, for devices without a
/// cheaper probe: the first offset of `[offset, end)` not known to read as
/// zeroes, or `None`.
pub fn next_data_by_status<D: BlockDev + ?Sized>(dev: &D, offset: u64, end: u64) -> Result<Option<u64>> {
    let mut pos = offset;
    while pos < end {
        let extents = dev.block_status(pos, end - pos)?;
        if extents.is_empty() {
            return Ok(Some(pos));
        }
        for e in extents {
            // Unknown and Unavailable are not known to read as zeroes either.
            if !e.mapping.reads_as_zeroes() {
                return Ok(Some(pos));
            }
            pos += e.length;
        }
    }
    Ok(None)
}

/// Checks that `[offset, offset+length)` lies inside a device of `size` bytes,
/// without overflowing.
pub fn check_range(size: u64, offset: u64, length: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            format!("range {offset}+{length} is beyond the end of the device ({size} bytes)"),
        )),
    }
}
