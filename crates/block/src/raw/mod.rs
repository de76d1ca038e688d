//! A raw image file: the bottom of every stack, and the parts of file
//! stores.
//!
//! This file holds the file and what fleece does to it as an image
//! (create, open, resize, lock, notice truncation); the device (reads,
//! writes, zeroes, kernel copies) is in `device`, and block status by
//! `SEEK_DATA` / `SEEK_HOLE` in `status`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::lock::{self, Acquired, LockMode};
use crate::{Error, ErrorKind, Result};

mod device;
mod status;
#[cfg(test)]
mod tests;

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
    /// The file system's block size: writes of whole blocks need no
    /// read-modify-write (the preferred I/O size).
    blksize: u32,
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
        Ok(RawFile::wrap(
            file,
            path.to_path_buf(),
            meta.len(),
            read_only,
            &meta,
        ))
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
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
        Ok(RawFile::wrap(file, path, size, false, &meta))
    }

    fn wrap(file: File, path: PathBuf, size: u64, read_only: bool, meta: &std::fs::Metadata) -> Self {
        RawFile {
            file,
            path,
            size: AtomicU64::new(size),
            read_only,
            nowait: AtomicBool::new(true),
            in_memory: false,
            // Stores never save part of a block (seed 002), and NBD wants
            // a power of two of at least 512.
            blksize: (meta.blksize().clamp(512, 1 << 30) as u32).next_power_of_two(),
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

    /// Bytes the file takes on its file system.
    pub fn allocated(&self) -> Result<u64> {
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", self.path.display()), e))?;
        Ok(m.blocks() * 512)
    }

    /// The open file, for format drivers that read or write it through
    /// descriptors of their own (`try_clone`).
    pub(crate) fn std_file(&self) -> &File {
        &self.file
    }

    /// Path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the open file (not of whatever is at its path
    /// now).
    pub fn id(&self) -> Result<(u64, u64)> {
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", self.path.display()), e))?;
        Ok((m.dev(), m.ino()))
    }

    /// Size of the device.
    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The file's current length, which another program may have changed
    /// under us (the device's size is
    /// [`BlockDev::size`](crate::BlockDev::size)). A length short of the
    /// device's is remembered, so that writes past the file's end are
    /// refused from then on.
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
}
