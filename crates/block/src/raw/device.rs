//! A raw file as a device: positioned reads and writes on one shared
//! descriptor, `RWF_NOWAIT` page-cache reads for no-wait requests, zeroes
//! and trims by `fallocate`, and `copy_file_range` to another file.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;

use super::RawFile;
use crate::dev::{check_range, BlockDev, Capabilities, IoFlags, IoHints, ZeroFlags};
use crate::ext::BlockDevExt;
use crate::mapping::Extent;
use crate::{Error, Result};

impl RawFile {
    /// A no-wait read: served only from the page cache (or tmpfs), else
    /// `WouldBlock`.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.in_memory {
            return self.read_at(buf, offset, IoFlags::NONE);
        }
        if !self.nowait.load(Ordering::Relaxed) {
            return Err(Error::would_block());
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec points at `buf`, which outlives the call.
        let r = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if r >= 0 && r as usize == buf.len() {
            return Ok(());
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.nowait.store(false, Ordering::Relaxed);
        }
        // Would block, short (partly cached or past EOF), or failed: the
        // blocking path handles all of these properly.
        Err(Error::would_block())
    }
}

impl BlockDev for RawFile {
    fn size(&self) -> u64 {
        self.len()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            trim: true,
            fast_zero: true,
            fua: true,
            min_io: 1,
            preferred_io: self.blksize,
            max_transfer: None,
            allocation_depth: false,
        }
    }

    fn hints(&self) -> IoHints {
        IoHints {
            in_memory: self.in_memory,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        check_range(self.len(), offset, buf.len() as u64)?;
        if flags.no_wait {
            return self.read_cached(buf, offset);
        }
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            // The file shrank under us. Zeroes would be wrong data, served
            // as if it were right.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let file_len = self.file_len()?;
                Err(self.truncated("read", offset, file_len))
            }
            Err(e) => Err(Error::io("read", e)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        // A buffered write only copies into the page cache; a sync waits
        // for the disk.
        if flags.no_wait && flags.fua {
            return Err(Error::would_block());
        }
        self.writable()?;
        check_range(self.len(), offset, buf.len() as u64)?;
        self.extends_a_truncated_file(offset)?;
        if flags.fua {
            let iov = libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: the iovec points at `buf`, which outlives the call.
            let r = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    offset as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if r >= 0 && r as usize == buf.len() && !self.sync_failed.load(Ordering::Acquire) {
                return Ok(());
            }
            // Short write, no RWF_DSYNC here, or a failed sync to report:
            // finish the plain way.
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io("write", e))?;
        if flags.fua {
            self.datasync()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(self.len(), offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let done = if flags.may_unmap {
            self.punch_hole(offset, length).is_ok()
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            )
            .is_ok()
        };
        if !done {
            // Each write checks that it does not extend a truncated file.
            return self.fill_zeroes(offset, length, flags);
        }
        if flags.fua {
            self.datasync()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.writable()?;
        check_range(self.len(), offset, length)?;
        if length == 0 {
            return Ok(());
        }
        match self.punch_hole(offset, length) {
            Ok(()) => Ok(()),
            // Trim is advisory: a file system without hole punching keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(Error::io("trim", e)),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.datasync()
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.map_range(offset, length)
    }

    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        check_range(self.len(), offset, length)?;
        // SAFETY: plain syscall on a descriptor we own. The hint's result
        // does not matter: a failed prefetch costs nothing but speed.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                length as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
        Ok(())
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        self.find_data(offset, end)
    }

    /// With `copy_file_range` when `dst` is a file too (it has a
    /// [`data_fd`](BlockDev::data_fd)): no trip through user memory, and a
    /// reflink where the file system can share blocks.
    fn copy_to(&self, offset: u64, dst: &dyn BlockDev, dst_offset: u64, len: u64) -> Option<Result<()>> {
        let dst_fd = dst.data_fd()?;
        if dst.capabilities().read_only
            || check_range(dst.size(), dst_offset, len).is_err()
            || check_range(self.len(), offset, len).is_err()
        {
            return None;
        }
        let mut done = 0u64;
        while done < len {
            let mut si = (offset + done) as libc::loff_t;
            let mut di = (dst_offset + done) as libc::loff_t;
            // SAFETY: both descriptors are open for the call (`dst` lends
            // its own); the offsets are locals.
            let r = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut si,
                    dst_fd.as_raw_fd(),
                    &mut di,
                    (len - done) as usize,
                    0,
                )
            };
            if r > 0 {
                done += r as u64;
                continue;
            }
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Past the end of the source (truncated under us?): the
                // caller reads through a buffer instead, which fails
                // properly, and rewrites the whole run if it copies.
                _ if r == 0 => None,
                Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                    if done == 0 =>
                {
                    None
                }
                Some(libc::EINTR) => continue,
                _ => Some(Err(Error::io("copy to store", e))),
            };
        }
        Some(Ok(()))
    }

    fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
}
