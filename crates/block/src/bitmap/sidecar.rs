//! The sidecar file of a persistent bitmap (docs/bitmap-format.md): a
//! 4 KiB header, then the bit array as little-endian 64-bit words; and the
//! open file with what keeps its words crash-safe.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
#[cfg(test)]
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock};

use super::dirty::DirtyBitmap;
use super::sync::GroupSync;

const MAGIC: &[u8; 8] = b"FLEECEBM";
const VERSION: u32 = 1;
/// Header size; the bit array starts here.
pub(super) const HEADER: u64 = 4096;
const FLAG_ENABLED: u32 = 1;
const FLAG_INCONSISTENT: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_ENABLED | FLAG_INCONSISTENT;
/// Longest name a header holds.
pub(super) const MAX_NAME: usize = 1024;

/// What a header says.
pub(super) struct Header {
    pub(super) name: String,
    pub(super) granularity: u64,
    /// Size of the disk the bits are for.
    pub(super) disk_size: u64,
    pub(super) enabled: bool,
    pub(super) inconsistent: bool,
}

impl Header {
    /// The header block for a bitmap of these properties.
    pub(super) fn encode(
        name: &str,
        granularity: u64,
        disk_size: u64,
        enabled: bool,
        inconsistent: bool,
    ) -> Vec<u8> {
        let mut h = vec![0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let mut flags = 0;
        if enabled {
            flags |= FLAG_ENABLED;
        }
        if inconsistent {
            flags |= FLAG_INCONSISTENT;
        }
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&granularity.to_le_bytes());
        h[24..32].copy_from_slice(&disk_size.to_le_bytes());
        h[32..34].copy_from_slice(&(name.len() as u16).to_le_bytes());
        h[34..34 + name.len()].copy_from_slice(name.as_bytes());
        h
    }

    /// Reads a header block; the error says what is wrong with it.
    pub(super) fn decode(h: &[u8; HEADER as usize]) -> Result<Header, String> {
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if &h[..8] != MAGIC {
            return Err("not a fleece bitmap (bad magic)".into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let flags = u32_at(12);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let granularity = u64_at(16);
        let disk_size = u64_at(24);
        let name_len = u16::from_le_bytes([h[32], h[33]]) as usize;
        if name_len > MAX_NAME || !granularity.is_power_of_two() || granularity < 512 {
            return Err("corrupt header".into());
        }
        let name = std::str::from_utf8(&h[34..34 + name_len]).map_err(|_| "name is not UTF-8".to_string())?;
        Ok(Header {
            name: name.to_string(),
            granularity,
            disk_size,
            enabled: flags & FLAG_ENABLED != 0,
            inconsistent: flags & FLAG_INCONSISTENT != 0,
        })
    }
}

/// Errors to return instead of doing I/O, so tests can reach the failure
/// paths (ENOSPC, a failed fsync) without a full or failing disk.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Faults {
    pub(super) write: std::sync::atomic::AtomicI32,
    pub(super) sync: std::sync::atomic::AtomicI32,
}

#[cfg(test)]
pub(super) fn injected(errno: &std::sync::atomic::AtomicI32) -> io::Result<()> {
    match errno.load(Ordering::Relaxed) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

pub(super) struct Sidecar {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) sync: GroupSync,
    /// Every word as written to the file, durable or not. Marks OR into
    /// these (under their lock, around the `pwrite`), never into `bits`, so a
    /// file word never goes back on a bit another thread wrote; it only
    /// shrinks on clear and resize.
    pub(super) staged: DirtyBitmap,
    /// Marks and merges hold it shared, clear and resize exclusively: a word
    /// written before a clear must not be taken for durable after it.
    ops: RwLock<()>,
    /// Serializes header writes, each built from the state in memory.
    pub(super) header: Mutex<()>,
    /// The sync failure count when the bitmap was last made consistent; a
    /// different count means a sync failed since, and the bitmap is (or is
    /// about to be marked) inconsistent.
    pub(super) clean_epoch: AtomicU64,
    #[cfg(test)]
    pub(super) faults: Faults,
}

impl Sidecar {
    pub(super) fn new(file: File, path: PathBuf, staged: DirtyBitmap) -> Self {
        Sidecar {
            file,
            path,
            sync: GroupSync::default(),
            staged,
            ops: RwLock::new(()),
            header: Mutex::new(()),
            clean_epoch: AtomicU64::new(0),
            #[cfg(test)]
            faults: Faults::default(),
        }
    }

    pub(super) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        injected(&self.faults.write)?;
        self.file.write_all_at(buf, offset)
    }

    pub(super) fn write_word(&self, word: u64, value: u64) -> io::Result<()> {
        self.write_at(&value.to_le_bytes(), HEADER + word * 8)
    }

    pub(super) fn datasync(&self) -> io::Result<()> {
        #[cfg(test)]
        injected(&self.faults.sync)?;
        self.file.sync_data()
    }

    /// Group-commit sync; fails if any sync failed since `epoch`.
    pub(super) fn sync(&self, epoch: u64) -> io::Result<()> {
        self.sync.sync(|| self.datasync(), epoch)
    }

    pub(super) fn ops_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.ops.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn ops_exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.ops.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the file's length for a bit array of `words` words.
    pub(super) fn size_for(&self, words: u64) -> io::Result<()> {
        #[cfg(test)]
        injected(&self.faults.write)?;
        self.file.set_len(HEADER + words * 8)
    }
}

/// Reads the first `words` words of a bit array, calling `found` for each
/// non-zero one; holes (never-set regions of a sparse file) are skipped.
pub(super) fn read_words(file: &File, words: u64, mut found: impl FnMut(u64, u64)) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut w = 0u64;
    while w < words {
        let off = HEADER + w * 8;
        // SAFETY: plain lseek on a descriptor we own; all other I/O is positioned.
        let data = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after this
            }
            // No SEEK_DATA here: read everything.
        } else {
            w = (data as u64).max(off).saturating_sub(HEADER) / 8;
        }
        if w >= words {
            break;
        }
        let n = ((words - w) * 8).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], HEADER + w * 8)?;
        for (i, c) in buf[..n].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = u64::from_le_bytes(b);
            if v != 0 {
                found(w + i as u64, v);
            }
        }
        w += (n / 8) as u64;
    }
    Ok(())
}

/// Makes a file's creation or removal durable.
pub(super) fn sync_dir(path: &Path) {
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
