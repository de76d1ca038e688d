//! Named dirty bitmaps that survive crashes.
//!
//! Technique (docs/bitmap-format.md): a write that sets a bit that was clear
//! first writes that bit's 64-bit word to the bitmap's sidecar file and waits
//! for an `fdatasync` of it, *before* the data write is issued. Writes into
//! granules that are already dirty (all but the first write to each granule)
//! skip this entirely. Concurrent first writes share one `fdatasync` (group
//! commit). So after kill -9 or power loss the file holds every bit of every
//! write that may have reached the disk: the bitmap is exact or, for writes
//! that were marked but never made it, over-approximate, and never
//! "inconsistent".

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::bitmap::DirtyBitmap;
use crate::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"FLEECEBM";
const VERSION: u32 = 1;
/// Header size; the bit array starts here.
pub const HEADER: u64 = 4096;
const FLAG_ENABLED: u32 = 1;

/// Shares one `fdatasync` among concurrent callers.
#[derive(Default)]
struct GroupSync {
    /// (requested generation, completed generation, a sync is running)
    state: Mutex<(u64, u64, bool)>,
    done: Condvar,
}

impl GroupSync {
    /// Returns once a sync that started after this call has completed.
    fn sync(&self, file: &File) -> io::Result<()> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let mine = g.0;
        loop {
            if g.1 >= mine {
                return Ok(());
            }
            if !g.2 {
                g.2 = true;
                let target = g.0;
                drop(g);
                let r = file.sync_data();
                g = self.state.lock().unwrap_or_else(|p| p.into_inner());
                g.2 = false;
                if r.is_ok() {
                    g.1 = g.1.max(target);
                }
                self.done.notify_all();
                r?;
            } else {
                g = self.done.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

struct Sidecar {
    file: File,
    path: PathBuf,
    sync: GroupSync,
}

/// A dirty bitmap with a name, an enabled flag, and (if persistent) a
/// sidecar file kept crash-safe as described in the module docs.
pub struct NamedBitmap {
    name: String,
    bits: DirtyBitmap,
    enabled: AtomicBool,
    sidecar: Option<Sidecar>,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

impl NamedBitmap {
    /// A new empty bitmap; with `path`, persisted there (the file must not exist).
    pub fn create(
        name: &str,
        size: u64,
        granularity: u64,
        enabled: bool,
        path: Option<&Path>,
    ) -> Result<Self> {
        let bits = DirtyBitmap::new(size, granularity);
        let sidecar = match path {
            None => None,
            Some(p) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(p)
                    .map_err(|e| io_err("cannot create bitmap file", p, e))?;
                file.set_len(HEADER + bits.bits().div_ceil(64) * 8)
                    .map_err(|e| io_err("cannot size bitmap file", p, e))?;
                Some(Sidecar {
                    file,
                    path: p.to_path_buf(),
                    sync: GroupSync::default(),
                })
            }
        };
        let b = NamedBitmap {
            name: name.to_string(),
            bits,
            enabled: AtomicBool::new(enabled),
            sidecar,
        };
        b.write_header()?;
        if let Some(s) = &b.sidecar {
            sync_dir(&s.path);
        }
        Ok(b)
    }

    /// Loads a persistent bitmap written by [`create`](Self::create) for a
    /// disk of `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("cannot open bitmap file", path, e))?;
        let mut h = [0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| io_err("cannot read bitmap header", path, e))?;
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Invalid,
                format!("bitmap file {}: {why}", path.display()),
            )
        };
        if &h[..8] != MAGIC {
            return Err(bad("not a fleece bitmap (bad magic)"));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let flags = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
        let granularity = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
        let disk_size = u64::from_le_bytes(h[24..32].try_into().unwrap_or_default());
        let name_len = u16::from_le_bytes(h[32..34].try_into().unwrap_or_default()) as usize;
        if name_len > 1024 || !granularity.is_power_of_two() || granularity < 512 {
            return Err(bad("corrupt header"));
        }
        if disk_size != size {
            return Err(bad(&format!(
                "made for a disk of {disk_size} bytes, but the disk has {size}"
            )));
        }
        let name = std::str::from_utf8(&h[34..34 + name_len]).map_err(|_| bad("name is not UTF-8"))?;
        let bits = DirtyBitmap::new(size, granularity);
        let words = bits.bits().div_ceil(64);
        // Read the bit array in 1 MiB pieces, skipping holes.
        let mut buf = vec![0u8; 1 << 20];
        let mut w = 0u64;
        while w < words {
            let off = HEADER + w * 8;
            // SAFETY: plain lseek on a descriptor we own.
            let data = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                break; // no more data
            }
            let data = (data as u64).max(off);
            w = (data - HEADER) / 8;
            let n = ((words - w) * 8).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], HEADER + w * 8)
                .map_err(|e| io_err("cannot read bitmap", path, e))?;
            for (i, c) in buf[..n].chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(c.try_into().unwrap_or_default());
                if v != 0 {
                    bits.set_word(w + i as u64, v);
                }
            }
            w += (n / 8) as u64;
        }
        Ok(NamedBitmap {
            name: name.to_string(),
            bits,
            enabled: AtomicBool::new(flags & FLAG_ENABLED != 0),
            sidecar: Some(Sidecar {
                file,
                path: path.to_path_buf(),
                sync: GroupSync::default(),
            }),
        })
    }

    fn write_header(&self) -> Result<()> {
        let Some(s) = &self.sidecar else { return Ok(()) };
        let mut h = vec![0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.is_enabled() { FLAG_ENABLED } else { 0 };
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.bits.granularity().to_le_bytes());
        h[24..32].copy_from_slice(&self.bits.size().to_le_bytes());
        h[32..34].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        h[34..34 + self.name.len()].copy_from_slice(self.name.as_bytes());
        s.file
            .write_all_at(&h, 0)
            .map_err(|e| io_err("cannot write bitmap header", &s.path, e))?;
        s.sync
            .sync(&s.file)
            .map_err(|e| io_err("cannot sync bitmap", &s.path, e))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bits.
    pub fn bits(&self) -> &DirtyBitmap {
        &self.bits
    }

    /// Whether writes are being recorded.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Whether it is kept in a sidecar file.
    pub fn is_persistent(&self) -> bool {
        self.sidecar.is_some()
    }

    /// Sidecar path, if persistent.
    pub fn path(&self) -> Option<&Path> {
        self.sidecar.as_ref().map(|s| s.path.as_path())
    }

    /// True if recording a change to the range needs no work.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        !self.is_enabled() || self.bits.all_set(offset, len)
    }

    /// Records that the range is about to change; returns once that is
    /// durable. Call before issuing the data write.
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.set_durably(offset, len)
    }

    /// Marks the range dirty (whether or not recording), durably.
    pub fn set_durably(&self, offset: u64, len: u64) -> Result<()> {
        let mut err = None;
        let changed = self.bits.set_then(offset, len, |word, value| {
            if let Some(s) = &self.sidecar {
                if let Err(e) = s.file.write_all_at(&value.to_le_bytes(), HEADER + word * 8) {
                    err.get_or_insert(e);
                }
            }
        });
        if let Some(e) = err {
            return Err(self.persist_error(e));
        }
        match (&self.sidecar, changed) {
            (Some(s), true) => s.sync.sync(&s.file).map_err(|e| self.persist_error(e)),
            _ => Ok(()),
        }
    }

    fn persist_error(&self, e: io::Error) -> Error {
        Error::new(
            ErrorKind::Io,
            format!("cannot record the write in dirty bitmap '{}': {e}", self.name),
        )
    }

    /// Starts or stops recording.
    pub fn set_enabled(&self, on: bool) -> Result<()> {
        self.enabled.store(on, Ordering::Release);
        self.write_header()
    }

    /// Clears every bit (durably).
    pub fn clear(&self) -> Result<()> {
        self.bits.clear();
        let Some(s) = &self.sidecar else { return Ok(()) };
        let len = self.bits.bits().div_ceil(64) * 8;
        // SAFETY: plain syscall on a descriptor we own.
        let r = unsafe {
            libc::fallocate(
                s.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                HEADER as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            let zero = vec![0u8; 1 << 20];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zero.len() as u64) as usize;
                s.file
                    .write_all_at(&zero[..n], HEADER + done)
                    .map_err(|e| io_err("cannot clear bitmap", &s.path, e))?;
                done += n as u64;
            }
        }
        s.sync
            .sync(&s.file)
            .map_err(|e| io_err("cannot sync bitmap", &s.path, e))
    }

    /// Adds every bit of `other` (same granularity), durably.
    pub fn merge(&self, other: &DirtyBitmap) -> Result<()> {
        if other.granularity() != self.bits.granularity() || other.size() != self.bits.size() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "cannot merge a bitmap of granularity {} into '{}' of granularity {}",
                    other.granularity(),
                    self.name,
                    self.bits.granularity()
                ),
            ));
        }
        let mut err = None;
        let changed = self.bits.merge_then(other, |word, value| {
            if let Some(s) = &self.sidecar {
                if let Err(e) = s.file.write_all_at(&value.to_le_bytes(), HEADER + word * 8) {
                    err.get_or_insert(e);
                }
            }
        });
        if let Some(e) = err {
            return Err(self.persist_error(e));
        }
        match (&self.sidecar, changed) {
            (Some(s), true) => s.sync.sync(&s.file).map_err(|e| self.persist_error(e)),
            _ => Ok(()),
        }
    }

    /// Deletes the sidecar file.
    pub fn remove_file(&self) -> Result<()> {
        if let Some(s) = &self.sidecar {
            std::fs::remove_file(&s.path).map_err(|e| io_err("cannot remove bitmap file", &s.path, e))?;
            sync_dir(&s.path);
        }
        Ok(())
    }
}

/// Makes a file's creation or removal durable.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_survive_a_reopen_with_their_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b0");
        let b = NamedBitmap::create("b0", 1 << 30, 65536, true, Some(&p)).unwrap();
        b.mark(65536 * 3, 10).unwrap();
        b.mark((1 << 30) - 1, 1).unwrap();
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 30).unwrap();
        assert_eq!(b.name(), "b0");
        assert!(b.is_enabled());
        assert_eq!(b.bits().dirty_bytes(), 2 * 65536);
        assert!(b.bits().any(65536 * 3, 1));
        b.set_enabled(false).unwrap();
        b.mark(0, 1).unwrap();
        b.clear().unwrap();
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 30).unwrap();
        assert!(!b.is_enabled());
        assert_eq!(b.bits().dirty_bytes(), 0);
        assert!(NamedBitmap::open(&p, 1 << 20).is_err());
    }
}
