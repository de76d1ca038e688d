//! The one trait every node of the block layer implements.

use crate::{Error, ErrorKind, Result};

/// What a range of a device reads as, for block status and copy skipping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Allocated data that may be anything.
    Data,
    /// Allocated, reads as zeroes.
    Zero,
    /// Not allocated, reads as zeroes.
    Hole,
    /// Not part of this device's data: discarded from a snapshot view or
    /// outside its bitmap; reading it fails.
    Unavailable,
}

/// A run of bytes with one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub length: u64,
    /// What those bytes are.
    pub mapping: Mapping,
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

/// What a device can do, asked once when an export is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, zeroes and trims are refused.
    pub read_only: bool,
    /// Trim deallocates (otherwise it is accepted and ignored).
    pub trim: bool,
    /// Write-zeroes can be done without writing buffers.
    pub fast_zero: bool,
}

/// A byte-addressed block device. All methods take `&self` and may be called
/// from many threads at once; implementations order their own conflicts.
pub trait BlockDev: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What the device supports.
    fn capabilities(&self) -> Capabilities;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Fills `buf` only if that can be done without blocking (data in the
    /// page cache); `None` means "would block, use [`read_at`](Self::read_at)
    /// from a worker thread". Lets the connection reader serve cached reads
    /// inline, without a thread hand-off.
    fn try_read_at(&self, _buf: &mut [u8], _offset: u64) -> Option<Result<()>> {
        None
    }
    /// The raw file underneath, for copies the kernel can do file to file.
    fn as_raw_file(&self) -> Option<&crate::RawFile> {
        None
    }
    /// True if reads never wait for a disk (the data lives in memory).
    fn is_in_memory(&self) -> bool {
        false
    }
    /// Writes `buf` (not FUA) only if that needs no waiting, such as a
    /// copy-before-write or lock; `None` means "use a worker thread".
    fn try_write_at(&self, _buf: &[u8], _offset: u64) -> Option<Result<()>> {
        None
    }
    /// Writes `buf` at `offset`; with `fua` it is durable on return.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
    /// Makes the range read as zeroes.
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()>;
    /// Says the range is no longer needed; it may then read as anything
    /// (our raw files read it as zeroes).
    fn trim(&self, offset: u64, length: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Hints that the range will be read soon.
    fn cache(&self, offset: u64, length: u64) -> Result<()>;
    /// Mapping of the range from `offset`, covering at least one byte and at
    /// most `length` bytes.
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;
    /// The first offset in `[offset, end)` that may hold data (anything not
    /// known to read as zeroes), or None if the whole range reads as zeroes.
    /// Devices with a cheaper probe than a full block status override it.
    fn next_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        let mut pos = offset;
        while pos < end {
            let extents = self.block_status(pos, end - pos)?;
            if extents.is_empty() {
                return Ok(Some(pos));
            }
            for e in extents {
                // Unavailable is not known to read as zeroes either.
                if matches!(e.mapping, Mapping::Data | Mapping::Unavailable) {
                    return Ok(Some(pos));
                }
                pos += e.length;
            }
        }
        Ok(None)
    }
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
