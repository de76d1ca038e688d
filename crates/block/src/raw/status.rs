//! Block status of a raw file: `SEEK_DATA` and `SEEK_HOLE`, a remembered
//! dense run, and truncation checks so that data gone from a truncated
//! image never looks like a hole.

use std::io;
use std::os::unix::io::AsRawFd;

use super::RawFile;
use crate::dev::check_range;
use crate::mapping::{push_extent, Extent, Mapping};
use crate::{Error, Result};

impl RawFile {
    /// `lseek` with SEEK_DATA / SEEK_HOLE; `None` when there is no such
    /// position before the end (ENXIO).
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: plain syscall on a descriptor we own. Moving the shared file
        // position is harmless because all data I/O is positioned.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// [`BlockDev::next_data`](crate::BlockDev::next_data) with one
    /// `SEEK_DATA`.
    pub(super) fn find_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        check_range(self.len(), offset, end.saturating_sub(offset))?;
        if offset >= end {
            return Ok(None);
        }
        // One SEEK_DATA, never SEEK_HOLE: on tmpfs both run under the inode
        // lock that writes take too, and SEEK_HOLE in dense data walks to
        // the end of the file.
        match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(d)) if d < end => Ok(Some(d)),
            Ok(Some(_)) => Ok(None),
            // No data up to the end of the file: a hole only if the file
            // still reaches the end of the range. Copy-before-write saves
            // nothing for a hole, so a truncated image must not pass as one.
            Ok(None) => {
                self.check_length("find data", offset, end)?;
                Ok(None)
            }
            // No SEEK_DATA here: assume data.
            Err(_) => Ok(Some(offset)),
        }
    }

    /// [`BlockDev::block_status`](crate::BlockDev::block_status) by
    /// `SEEK_DATA` and `SEEK_HOLE`, with the dense run remembered.
    pub(super) fn map_range(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(self.len(), offset, length)?;
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let (gen, known) = {
            let d = self.dense.lock().unwrap_or_else(|p| p.into_inner());
            let known = (d.start <= offset && offset < d.end).then_some((d.start, d.end));
            (d.gen, known)
        };
        if let Some((_, known_end)) = known {
            push_extent(&mut out, known_end.min(end) - pos, Mapping::Data);
            pos = known_end.min(end);
        }
        // The data run found here, unclamped, to remember for next time.
        let mut found: Option<(u64, u64)> = None;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.min(end),
                // No data up to the end of the file (see next_data).
                Ok(None) => {
                    self.check_length("block status", offset, end)?;
                    end
                }
                // No SEEK_DATA support: report everything as data.
                Err(_) => {
                    push_extent(&mut out, end - pos, Mapping::Data);
                    break;
                }
            };
            if data > pos {
                push_extent(&mut out, data - pos, Mapping::Hole);
                pos = data;
                continue;
            }
            let hole_at = match self
                .seek(pos, libc::SEEK_HOLE)
                .map_err(|e| Error::io("block status", e))?
            {
                Some(h) => h,
                // pos is past the end of the file: it shrank since SEEK_DATA.
                None => {
                    self.check_length("block status", offset, end)?;
                    self.len()
                }
            };
            found = Some((pos, hole_at));
            let hole = hole_at.min(end).max(pos + 1);
            push_extent(&mut out, hole - pos, Mapping::Data);
            pos = hole;
            // Enough extents for any reply: the client asks again from here.
            if out.len() >= 1024 {
                break;
            }
        }
        if let Some((mut start, run_end)) = found {
            if let Some((known_start, known_end)) = known {
                if known_end == start {
                    start = known_start;
                }
            }
            let mut d = self.dense.lock().unwrap_or_else(|p| p.into_inner());
            if d.gen == gen {
                d.start = start;
                d.end = run_end;
            }
        }
        Ok(out)
    }
}
