//! A raw image file: the bottom of every stack.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::dev::{check_range, BlockDev, Capabilities, Extent, Mapping, ZeroFlags};
use crate::lock::{self, Acquired, LockMode};
use crate::{Error, ErrorKind, Result};

/// Largest zero buffer written at once when the file system cannot zero a
/// range by itself.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image file accessed with positioned I/O, so many threads share one
/// descriptor without locks.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    /// Size of the device; changes only in [`resize`](Self::resize), while
    /// the caller keeps I/O away.
    size: AtomicU64,
    read_only: bool,
    /// Cleared once `RWF_NOWAIT` reads turn out unsupported here.
    nowait: AtomicBool,
    /// The file lives in memory (tmpfs), so a read never waits for a disk.
    in_memory: bool,
    /// A range known to be all data, so block status need not ask again:
    /// `SEEK_HOLE` walks the page cache to the next hole, which in a dense
    /// tmpfs image is the end of the file, on every call.
    dense: Mutex<DenseRun>,
    /// Set once the file was found shorter than the device: a flood of
    /// failing reads logs it once, and writes past the file's end check
    /// it (see [`extends_a_truncated_file`](Self::extends_a_truncated_file)).
    truncation_logged: AtomicBool,
    /// Set once an `fdatasync` failed. The kernel may have dropped the
    /// pages it could not write, and a later sync that succeeds would not
    /// bring them back, so every later flush fails too (QEMU does the same).
    sync_failed: AtomicBool,
    /// The image locks held, if any.
    locked: Mutex<Option<LockMode>>,
    /// Set once we warned that the file system has no OFD locks.
    lock_warned: AtomicBool,
}

/// `[start, end)` is data as of generation `gen`; any `fallocate` (the only
/// way we make holes) starts a new generation and forgets the run. Writes
/// only turn holes into data, so they never make the run wrong.
#[derive(Debug, Default)]
struct DenseRun {
    gen: u64,
    start: u64,
    end: u64,
}

impl RawFile {
    /// Opens an existing image; its size is the file's size.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(RawFile::wrap(file, path.to_path_buf(), meta.len(), read_only))
    }

    /// Creates (or truncates) a sparse file of `size` bytes and opens it.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        RawFile::sized(file, path.to_path_buf(), size)
    }

    /// Creates a sparse file of `size` bytes that must not exist yet (a
    /// file already there is never truncated); if it cannot be sized, it
    /// is removed again.
    pub fn create_new(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        RawFile::sized(file, path.to_path_buf(), size).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Creates a sparse file of `size` bytes without a name in directory
    /// `dir` (`O_TMPFILE`): it takes space there, and vanishes when closed,
    /// even if the process dies. `label` names it in messages.
    pub fn create_unnamed(dir: &Path, size: u64, label: PathBuf) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(dir)
            .map_err(|e| Error::io(format!("cannot create an unnamed file in {}", dir.display()), e))?;
        RawFile::sized(file, label, size)
    }

    /// Sizes a new, writable file and wraps it.
    fn sized(file: File, path: PathBuf, size: u64) -> Result<Self> {
        file.set_len(size)
            .map_err(|e| Error::io(format!("cannot size {}", path.display()), e))?;
        Ok(RawFile::wrap(file, path, size, false))
    }

    fn wrap(file: File, path: PathBuf, size: u64, read_only: bool) -> Self {
        RawFile {
            file,
            path,
            size: AtomicU64::new(size),
            read_only,
            nowait: AtomicBool::new(true),
            in_memory: false,
            dense: Mutex::default(),
            truncation_logged: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            locked: Mutex::new(None),
            lock_warned: AtomicBool::new(false),
        }
        .detect_memory()
    }

    fn detect_memory(mut self) -> Self {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        // SAFETY: fstatfs fills the zeroed struct we pass; nothing else.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(self.file.as_raw_fd(), &mut st) } == 0 {
            let t = st.f_type as i64;
            self.in_memory = t == TMPFS_MAGIC || t == RAMFS_MAGIC;
        }
        self
    }

    /// Copies `len` bytes from `src` at `src_off` to this file at `dst_off`
    /// with `copy_file_range`: no trip through user memory, and a reflink
    /// where the file system can share blocks. `None` if the kernel cannot
    /// do it for these files (the caller copies through a buffer).
    pub fn copy_from(&self, src: &RawFile, src_off: u64, dst_off: u64, len: u64) -> Option<Result<()>> {
        if self.read_only
            || check_range(self.len(), dst_off, len).is_err()
            || check_range(src.len(), src_off, len).is_err()
        {
            return None;
        }
        let mut done = 0u64;
        while done < len {
            let mut si = (src_off + done) as libc::loff_t;
            let mut di = (dst_off + done) as libc::loff_t;
            // SAFETY: both descriptors are ours; the offsets are locals.
            let r = unsafe {
                libc::copy_file_range(
                    src.file.as_raw_fd(),
                    &mut si,
                    self.file.as_raw_fd(),
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

    /// Bytes the file takes on its file system.
    pub fn allocated(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", self.path.display()), e))?;
        Ok(m.blocks() * 512)
    }

    /// Path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the device.
    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The file's current length, which another program may have changed
    /// under us (the device's size is [`BlockDev::size`]). A length short
    /// of the device's is remembered, so that writes past the file's end
    /// are refused from then on.
    pub fn file_len(&self) -> Result<u64> {
        let len = self
            .file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(format!("cannot stat {}", self.path.display()), e))?;
        if len < self.len() {
            self.truncation_logged.store(true, Ordering::Relaxed);
        }
        Ok(len)
    }

    /// Changes the size of the file and of the device. The caller makes
    /// sure no I/O is in flight (it freezes the disk). A size the file
    /// system refuses is an [`ErrorKind::Invalid`] error and changes
    /// nothing; once the file has its new length the device has it too,
    /// even if the sync after it fails (an I/O error, which every later
    /// flush reports as well).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.writable()?;
        if let Err(e) = self.file.set_len(new_size) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("cannot resize {} to {new_size} bytes: {e}", self.path.display()),
            ));
        }
        self.size.store(new_size, Ordering::Release);
        {
            let mut dense = self.dense.lock().unwrap_or_else(|p| p.into_inner());
            *dense = DenseRun {
                gen: dense.gen + 1,
                ..DenseRun::default()
            };
        }
        self.truncation_logged.store(false, Ordering::Relaxed);
        self.datasync()
    }

    /// True (after logging it) if a write at `offset` would extend a file
    /// that another program truncated: the gap between its end and the
    /// write would read as zeroes, silently, where the disk had data. Costs
    /// an `fstat` only once a truncation was seen.
    fn extends_a_truncated_file(&self, offset: u64) -> Result<()> {
        if !self.truncation_logged.load(Ordering::Relaxed) {
            return Ok(());
        }
        let len = self.file_len()?;
        if len >= self.len() {
            // Put back (or resized) by someone: writes are fine again.
            self.truncation_logged.store(false, Ordering::Relaxed);
            return Ok(());
        }
        if offset > len {
            return Err(self.truncated("write", offset, len));
        }
        Ok(())
    }

    /// Locks the image the way QEMU does (see [`LockMode`]), so that QEMU
    /// processes cannot write or resize it while fleece serves it, and
    /// fails with [`ErrorKind::Locked`] if one of them (or another fleece)
    /// already uses it in a conflicting way. On a file system without open
    /// file description locks it warns once and goes on, as QEMU does.
    pub fn lock(&self, mode: LockMode) -> Result<()> {
        let mut held = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        match lock::acquire(&self.file, &self.path, mode, *held)? {
            Acquired::Locked => *held = Some(mode),
            Acquired::Unsupported(e) => {
                *held = None;
                if !self.lock_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        image = %self.path.display(),
                        error = %e,
                        "the file system does not support open file description locks: \
                         QEMU processes will not see that fleece uses this image"
                    );
                }
            }
        }
        Ok(())
    }

    /// Releases the image locks, so that another program may take the
    /// image at once, even while something still holds this `RawFile`.
    pub fn unlock(&self) {
        let mut held = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        lock::release_all(&self.file);
        *held = None;
    }

    /// The error for an image that ends before the device does, logged
    /// once per file: it was truncated by someone else, and what is gone
    /// must not read as zeroes or look like holes.
    fn truncated(&self, what: &str, offset: u64, file_len: u64) -> Error {
        let msg = format!(
            "{what} at {offset}: image {} ends at {file_len} bytes, before the disk's end ({} bytes): \
             was it truncated by another program?",
            self.path.display(),
            self.len()
        );
        if !self.truncation_logged.swap(true, Ordering::Relaxed) {
            tracing::error!("{msg}");
        }
        Error::with_source(ErrorKind::Io, msg, io::Error::from_raw_os_error(libc::EIO))
    }

    /// Fails if the file now ends before `end`: asked only where the
    /// kernel said there is no data up to the end of the file, which a
    /// truncated image would otherwise pass off as a hole.
    fn check_length(&self, what: &str, offset: u64, end: u64) -> Result<()> {
        let file_len = self.file_len()?;
        if file_len < end {
            return Err(self.truncated(what, offset, file_len));
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "device is read-only"));
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        let res = if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
        let mut dense = self.dense.lock().unwrap_or_else(|p| p.into_inner());
        *dense = DenseRun {
            gen: dense.gen + 1,
            ..DenseRun::default()
        };
        res
    }

    fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }

    fn write_zero_buffers(&self, offset: u64, length: u64) -> Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(length as usize)];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset + done)
                .map_err(|e| Error::io("write zeroes", e))?;
            done += n as u64;
        }
        Ok(())
    }

    fn datasync(&self) -> Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(Error::with_source(
                ErrorKind::Io,
                format!(
                    "flush of {}: an earlier flush failed, so writes made before it may be lost; \
                     check the image and restart serving it",
                    self.path.display()
                ),
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.file.sync_data().map_err(|e| {
            if !self.sync_failed.swap(true, Ordering::AcqRel) {
                tracing::error!(
                    image = %self.path.display(),
                    error = %e,
                    "flush failed: writes since the last good flush may be lost; every later flush of \
                     this image fails too"
                );
            }
            Error::io(format!("flush of {}", self.path.display()), e)
        })
    }

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
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.len(), offset, buf.len() as u64)?;
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

    fn is_in_memory(&self) -> bool {
        self.in_memory
    }

    fn as_raw_file(&self) -> Option<&RawFile> {
        Some(self)
    }

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        if check_range(self.len(), offset, buf.len() as u64).is_err() {
            return None;
        }
        if self.in_memory {
            return Some(self.read_at(buf, offset));
        }
        if !self.nowait.load(Ordering::Relaxed) {
            return None;
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
            return Some(Ok(()));
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.nowait.store(false, Ordering::Relaxed);
        }
        // Would block, short (partly cached or past EOF), or failed: the
        // blocking path handles all of these properly.
        None
    }

    fn try_write_at(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        // Buffered writes only copy into the page cache.
        Some(self.write_at(buf, offset, false))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.writable()?;
        check_range(self.len(), offset, buf.len() as u64)?;
        self.extends_a_truncated_file(offset)?;
        if fua {
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
        if fua {
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
            if flags.fast_only {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    "this file system cannot zero a range faster than writing it",
                ));
            }
            self.extends_a_truncated_file(offset)?;
            self.write_zero_buffers(offset, length)?;
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

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
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
            push(&mut out, known_end.min(end) - pos, Mapping::Data);
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
                    push(&mut out, end - pos, Mapping::Data);
                    break;
                }
            };
            if data > pos {
                push(&mut out, data - pos, Mapping::Hole);
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
            push(&mut out, hole - pos, Mapping::Data);
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

fn push(out: &mut Vec<Extent>, length: u64, mapping: Mapping) {
    if let Some(last) = out.last_mut() {
        if last.mapping == mapping {
            last.length += length;
            return;
        }
    }
    out.push(Extent { length, mapping });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(size: u64) -> (tempfile::TempDir, RawFile) {
        let dir = tempfile::tempdir().unwrap();
        let f = RawFile::create(&dir.path().join("a.raw"), size).unwrap();
        (dir, f)
    }

    #[test]
    fn written_data_reads_back_and_holes_read_as_zeroes() {
        let (_d, f) = tmp(1 << 20);
        f.write_at(&[7u8; 4096], 8192, false).unwrap();
        let mut buf = vec![1u8; 16384];
        f.read_at(&mut buf, 0).unwrap();
        assert!(buf[..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..12288].iter().all(|&b| b == 7));
    }

    #[test]
    fn block_status_reports_holes_and_data_of_a_sparse_file() {
        let (_d, f) = tmp(1 << 20);
        f.write_at(&[7u8; 65536], 262144, false).unwrap();
        let ext = f.block_status(0, 1 << 20).unwrap();
        let total: u64 = ext.iter().map(|e| e.length).sum();
        assert_eq!(total, 1 << 20);
        assert_eq!(ext[0].mapping, Mapping::Hole);
        assert!(ext.iter().any(|e| e.mapping == Mapping::Data));
    }

    #[test]
    fn block_status_sees_a_new_hole_after_remembering_a_dense_run() {
        let (_d, f) = tmp(1 << 20);
        f.write_at(&vec![5u8; 1 << 20], 0, false).unwrap();
        for _ in 0..2 {
            let ext = f.block_status(4096, (1 << 20) - 4096).unwrap();
            assert_eq!(ext.len(), 1, "{ext:?}");
            assert_eq!(ext[0].mapping, Mapping::Data);
        }
        f.trim(512 << 10, 64 << 10).unwrap();
        let ext = f.block_status(4096, (1 << 20) - 4096).unwrap();
        assert!(
            ext.iter().any(|e| e.mapping == Mapping::Hole),
            "the punched range must show as a hole: {ext:?}"
        );
        let ext = f.block_status(0, 4096).unwrap();
        assert_eq!(ext[0].mapping, Mapping::Data);
        let total: u64 = f.block_status(0, 1 << 20).unwrap().iter().map(|e| e.length).sum();
        assert_eq!(total, 1 << 20);
    }

    #[test]
    fn next_data_finds_the_first_data_or_none_in_a_hole() {
        let (_d, f) = tmp(1 << 20);
        f.write_at(&[7u8; 4096], 512 << 10, false).unwrap();
        assert_eq!(f.next_data(0, 1 << 20).unwrap(), Some(512 << 10));
        assert_eq!(f.next_data(0, 256 << 10).unwrap(), None);
        assert_eq!(
            f.next_data((512 << 10) + 100, 1 << 20).unwrap(),
            Some((512 << 10) + 100)
        );
        assert_eq!(f.next_data(600 << 10, 1 << 20).unwrap(), None);
    }

    #[test]
    fn trim_and_write_zeroes_read_as_zeroes() {
        let (_d, f) = tmp(1 << 20);
        f.write_at(&[9u8; 131072], 0, false).unwrap();
        f.trim(0, 65536).unwrap();
        f.write_zeroes(65536, 1000, ZeroFlags::default()).unwrap();
        let mut buf = vec![1u8; 131072];
        f.read_at(&mut buf, 0).unwrap();
        assert!(buf[..66536].iter().all(|&b| b == 0));
        assert!(buf[66536..].iter().all(|&b| b == 9));
    }

    #[test]
    fn a_truncated_image_fails_reads_and_never_looks_like_holes() {
        let (d, f) = tmp(1 << 20);
        f.write_at(&[7u8; 4096], 0, false).unwrap();
        // Someone else truncates the image under us.
        let other = OpenOptions::new()
            .write(true)
            .open(d.path().join("a.raw"))
            .unwrap();
        other.set_len(256 << 10).unwrap();
        assert_eq!(f.file_len().unwrap(), 256 << 10);
        let mut buf = vec![0u8; 8192];
        f.read_at(&mut buf, 0).unwrap();
        let e = f.read_at(&mut buf, (256 << 10) - 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(
            e.to_string().contains("ends at 262144 bytes") && e.to_string().contains("truncated"),
            "{e}"
        );
        // Later reads still fail (the log is latched, not the error).
        assert!(f.read_at(&mut buf, 512 << 10).is_err());
        assert!(f.try_read_at(&mut buf, 512 << 10).is_none_or(|r| r.is_err()));
        // What lies inside the file still answers; past its end fails.
        assert_eq!(f.next_data(4096, 256 << 10).unwrap(), None);
        assert_eq!(f.next_data(4096, 1 << 20).unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(f.next_data(300 << 10, 1 << 20).unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(f.block_status(0, 1 << 20).unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(f.block_status(400 << 10, 4096).unwrap_err().kind(), ErrorKind::Io);
        let ext = f.block_status(0, 256 << 10).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 256 << 10);
        // The default next_data (through block status) fails as well.
        struct ByStatus<'a>(&'a RawFile);
        impl BlockDev for ByStatus<'_> {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn capabilities(&self) -> Capabilities {
                self.0.capabilities()
            }
            fn read_at(&self, b: &mut [u8], o: u64) -> Result<()> {
                self.0.read_at(b, o)
            }
            fn write_at(&self, b: &[u8], o: u64, fua: bool) -> Result<()> {
                self.0.write_at(b, o, fua)
            }
            fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> Result<()> {
                self.0.write_zeroes(o, l, f)
            }
            fn trim(&self, o: u64, l: u64) -> Result<()> {
                self.0.trim(o, l)
            }
            fn flush(&self) -> Result<()> {
                self.0.flush()
            }
            fn cache(&self, o: u64, l: u64) -> Result<()> {
                self.0.cache(o, l)
            }
            fn block_status(&self, o: u64, l: u64) -> Result<Vec<Extent>> {
                self.0.block_status(o, l)
            }
        }
        assert!(ByStatus(&f).next_data(4096, 1 << 20).is_err());
    }

    #[test]
    fn a_copy_from_a_truncated_source_is_not_silently_short() {
        let dir = tempfile::tempdir().unwrap();
        let src = RawFile::create(&dir.path().join("src"), 1 << 20).unwrap();
        let dst = RawFile::create(&dir.path().join("dst"), 1 << 20).unwrap();
        src.write_at(&[3u8; 65536], 0, false).unwrap();
        OpenOptions::new()
            .write(true)
            .open(dir.path().join("src"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        match dst.copy_from(&src, 0, 0, 65536) {
            None => {
                let mut buf = vec![0u8; 65536];
                assert!(src.read_at(&mut buf, 0).is_err(), "the fallback must fail");
            }
            Some(r) => assert!(r.is_err(), "a short copy cannot succeed"),
        }
    }

    #[test]
    fn resize_changes_the_device_and_the_file() {
        let (_d, f) = tmp(1 << 20);
        f.write_at(&vec![5u8; 1 << 20], 0, false).unwrap();
        // Remember a dense run that the shrink makes wrong.
        assert_eq!(f.block_status(0, 1 << 20).unwrap().len(), 1);
        f.resize(512 << 10).unwrap();
        assert_eq!(f.size(), 512 << 10);
        assert_eq!(f.file_len().unwrap(), 512 << 10);
        assert_eq!(
            f.block_status(0, 512 << 10)
                .unwrap()
                .iter()
                .map(|e| e.length)
                .sum::<u64>(),
            512 << 10
        );
        let mut buf = [0u8; 1];
        assert_eq!(
            f.read_at(&mut buf, 512 << 10).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        f.resize(2 << 20).unwrap();
        let ext = f.block_status(0, 2 << 20).unwrap();
        assert_eq!(ext.last().unwrap().mapping, Mapping::Hole, "{ext:?}");
        f.read_at(&mut buf, (2 << 20) - 1).unwrap();
        assert_eq!(buf[0], 0);
        let ro = RawFile::open(f.path(), true).unwrap();
        assert_eq!(ro.resize(1 << 20).unwrap_err().kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn a_second_open_cannot_lock_an_image_in_use() {
        let (_d, a) = tmp(1 << 20);
        let b = RawFile::open(a.path(), false).unwrap();
        a.lock(LockMode::ReadWrite).unwrap();
        if a.locked.lock().unwrap().is_none() {
            eprintln!("no OFD locks on this file system; skipping");
            return;
        }
        let e = b.lock(LockMode::ReadWrite).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(e.to_string().contains("in use by another program"), "{e}");
        assert!(e.to_string().contains(a.path().to_str().unwrap()), "{e}");
        // Nor read-only: a reader refuses to share "write", which a holds.
        let e = b.lock(LockMode::ReadOnly).unwrap_err();
        assert!(e.to_string().contains("\"write\""), "{e}");
        // The failed attempts left nothing behind: after unlock, b gets it.
        a.unlock();
        b.lock(LockMode::ReadWrite).unwrap();
        assert_eq!(a.lock(LockMode::ReadWrite).unwrap_err().kind(), ErrorKind::Locked);
        // Closing releases the locks too.
        drop(b);
        a.lock(LockMode::ReadWrite).unwrap();
        // Read-only users share with each other, and lock again after a
        // downgrade.
        a.lock(LockMode::ReadOnly).unwrap();
        let c = RawFile::open(a.path(), true).unwrap();
        c.lock(LockMode::ReadOnly).unwrap();
        assert_eq!(a.lock(LockMode::ReadWrite).unwrap_err().kind(), ErrorKind::Locked);
        c.unlock();
        a.lock(LockMode::ReadWrite).unwrap();
    }

    #[test]
    fn ranges_past_the_end_are_refused_without_overflow() {
        let (_d, f) = tmp(4096);
        let mut buf = [0u8; 2];
        assert_eq!(
            f.read_at(&mut buf, 4095).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(f.trim(u64::MAX, 2).unwrap_err().kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn a_write_past_the_end_of_a_truncated_file_fails_instead_of_leaving_a_gap_of_zeroes() {
        let (d, f) = tmp(1 << 20);
        f.write_at(&[7u8; 4096], 0, false).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join("a.raw"))
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        assert_eq!(f.file_len().unwrap(), 64 << 10);
        let e = f.write_at(&[1u8; 4096], 512 << 10, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(f.file_len().unwrap(), 64 << 10, "the file did not grow");
        // Within what is left, writes go on.
        f.write_at(&[2u8; 4096], 4096, false).unwrap();
        // Put back to its size by someone: writes anywhere work again.
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join("a.raw"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        f.write_at(&[3u8; 4096], 512 << 10, false).unwrap();
    }

    #[test]
    fn create_new_never_truncates_a_file_that_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"keep").unwrap();
        assert!(RawFile::create_new(&p, 1 << 20).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    }

    #[test]
    fn a_resize_the_file_system_refuses_is_invalid_and_changes_nothing() {
        let (_d, f) = tmp(1 << 20);
        let e = f.resize(u64::MAX).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert_eq!(f.size(), 1 << 20);
        assert_eq!(f.file_len().unwrap(), 1 << 20);
    }
}
