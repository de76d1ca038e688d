//! A raw image file: the bottom of every stack.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::dev::{check_range, BlockDev, Capabilities, Extent, Mapping, ZeroFlags};
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
    size: u64,
    read_only: bool,
    /// Cleared once `RWF_NOWAIT` reads turn out unsupported here.
    nowait: AtomicBool,
    /// The file lives in memory (tmpfs), so a read never waits for a disk.
    in_memory: bool,
    /// A range known to be all data, so block status need not ask again:
    /// `SEEK_HOLE` walks the page cache to the next hole, which in a dense
    /// tmpfs image is the end of the file, on every call.
    dense: Mutex<DenseRun>,
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
            size,
            read_only,
            nowait: AtomicBool::new(true),
            in_memory: false,
            dense: Mutex::default(),
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
            || check_range(self.size, dst_off, len).is_err()
            || check_range(src.size, src_off, len).is_err()
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
                _ if r == 0 => None, // past EOF of the source: let the caller handle it
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
        self.file.sync_data().map_err(|e| Error::io("flush", e))
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
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            trim: true,
            fast_zero: true,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            // The file shrank under us: what is gone reads as zeroes, as a
            // sparse tail would.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let mut done = 0;
                while done < buf.len() {
                    match self.file.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io("read", e)),
                    }
                }
                buf[done..].fill(0);
                Ok(())
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
        if check_range(self.size, offset, buf.len() as u64).is_err() {
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
        check_range(self.size, offset, buf.len() as u64)?;
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
            if r >= 0 && r as usize == buf.len() {
                return Ok(());
            }
            // Short write or no RWF_DSYNC here: finish the plain way.
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
        check_range(self.size, offset, length)?;
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
            self.write_zero_buffers(offset, length)?;
        }
        if flags.fua {
            self.datasync()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.writable()?;
        check_range(self.size, offset, length)?;
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
        check_range(self.size, offset, length)?;
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
        check_range(self.size, offset, end.saturating_sub(offset))?;
        if offset >= end {
            return Ok(None);
        }
        // One SEEK_DATA, never SEEK_HOLE: on tmpfs both run under the inode
        // lock that writes take too, and SEEK_HOLE in dense data walks to
        // the end of the file.
        match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(d)) if d < end => Ok(Some(d)),
            Ok(_) => Ok(None),
            // No SEEK_DATA here: assume data.
            Err(_) => Ok(Some(offset)),
        }
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(self.size, offset, length)?;
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
                Ok(d) => d.unwrap_or(self.size).min(end),
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
            let hole_at = self
                .seek(pos, libc::SEEK_HOLE)
                .map_err(|e| Error::io("block status", e))?
                .unwrap_or(self.size);
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
    fn ranges_past_the_end_are_refused_without_overflow() {
        let (_d, f) = tmp(4096);
        let mut buf = [0u8; 2];
        assert_eq!(
            f.read_at(&mut buf, 4095).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(f.trim(u64::MAX, 2).unwrap_err().kind(), ErrorKind::OutOfRange);
    }
}
