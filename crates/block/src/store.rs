//! Where copy-before-write puts old cluster contents.
//!
//! A store keeps whole clusters by index. It does no accounting of its own:
//! the snapshot decides what to save and counts what it holds.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::dev::{BlockDev, IoFlags, IoHints};
use crate::raw::RawFile;
use crate::{Error, ErrorKind, Result};

/// Storage for saved clusters.
pub trait Store: Send + Sync {
    /// Smallest unit the store can hold without read-modify-write; cluster
    /// sizes are rounded up to a multiple of it.
    fn granularity(&self) -> u64;
    /// Saves `data` (one or more whole clusters) as cluster `index` onward.
    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()>;
    /// Reads `buf.len()` bytes starting `offset` bytes into cluster `index`.
    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Forgets cluster `index`, freeing its space.
    fn forget(&self, index: u64, cluster: u64);
    /// Kind and location, for status output.
    fn describe(&self) -> (&'static str, Option<PathBuf>);
    /// Saves `len` bytes of clusters from `offset` of `src` as cluster
    /// `index` onward, if this store can without a buffer (a kernel copy);
    /// `None`: use [`save`](Self::save).
    fn save_from(
        &self,
        _index: u64,
        _cluster: u64,
        _src: &dyn BlockDev,
        _offset: u64,
        _len: u64,
    ) -> Option<Result<()>> {
        None
    }
    /// What the store is like: `in_memory` if loads never wait for a disk.
    fn hints(&self) -> IoHints {
        IoHints::default()
    }
}

/// Sparse files with cluster `i` at offset `i * cluster`, so they only take
/// space for saved clusters: the named file and, where the file system can
/// make them, unnamed siblings in its directory, each holding every
/// `SHARDS`-th stripe of `STRIPE` bytes. Removed when dropped.
///
/// Why several files: a buffered write takes the file's inode lock, so all
/// copies into one file run one at a time, and on tmpfs a waiter spins on
/// the lock while the holder copies. Writes to different files run in
/// parallel.
pub struct FileStore {
    shards: Vec<RawFile>,
    granularity: u64,
    stripe: u64,
}

/// Bytes per stripe by default. Clusters are powers of two, so one of up
/// to 1 MiB lies in one file; larger ones are split over several, like any
/// run.
const STRIPE: u64 = 1 << 20;
const SHARDS: usize = 8;

/// Room a RAM store keeps before it stops calling itself in memory: one
/// run of copies (64 clusters) of clusters up to 1 MiB. With larger
/// clusters a run may still reach the spill file from a reader thread.
const SPILL_MARGIN: u64 = 64 << 20;

impl FileStore {
    /// Creates a sparse store file able to hold `size` bytes of clusters.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        FileStore::create_striped(path, size, STRIPE)
    }

    /// [`create`](Self::create) with stripes of `stripe` bytes (a power of
    /// two of at least 4 KiB; tests use small ones to cross stripes often).
    pub fn create_striped(path: &Path, size: u64, stripe: u64) -> Result<Self> {
        if !stripe.is_power_of_two() || stripe < 4096 {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("store stripe {stripe} is not a power of two of at least 4096"),
            ));
        }
        // create_new: a file already there (a user's, or another store's)
        // is never truncated, even if it appears after a check.
        let file = RawFile::create_new(path, size).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                Error::new(
                    ErrorKind::Invalid,
                    format!("store file {} already exists; pick another path", path.display()),
                )
            } else {
                e
            }
        })?;
        let granularity = std::fs::metadata(path)
            .map(|m| m.blksize())
            .unwrap_or(4096)
            .max(512);
        let mut shards = vec![file];
        if size > stripe {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            for i in 1..SHARDS {
                let label = PathBuf::from(format!("{} (part {i})", path.display()));
                match RawFile::create_unnamed(dir, size, label) {
                    Ok(f) => shards.push(f),
                    // No O_TMPFILE here: one file it is.
                    Err(_) => break,
                }
            }
        }
        Ok(FileStore {
            shards,
            granularity,
            stripe,
        })
    }

    fn shard(&self, offset: u64) -> &RawFile {
        &self.shards[((offset / self.stripe) % self.shards.len() as u64) as usize]
    }

    /// Splits `[offset, offset + len)` at stripe boundaries.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let stripe = self.stripe;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let n = (stripe - at % stripe).min(end - at);
            let p = (at, n);
            at += n;
            Some(p)
        })
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.shards[0].path());
    }
}

impl Store for FileStore {
    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()> {
        let base = index * cluster;
        for (at, n) in self.pieces(base, data.len() as u64) {
            let d = &data[(at - base) as usize..(at - base + n) as usize];
            self.shard(at).write_at(d, at, IoFlags::NONE)?;
        }
        Ok(())
    }

    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = index * cluster + offset;
        for (at, n) in self.pieces(base, buf.len() as u64) {
            let b = &mut buf[(at - base) as usize..(at - base + n) as usize];
            self.shard(at).read_at(b, at, IoFlags::NONE)?;
        }
        Ok(())
    }

    fn save_from(
        &self,
        index: u64,
        cluster: u64,
        src: &dyn BlockDev,
        offset: u64,
        len: u64,
    ) -> Option<Result<()>> {
        let base = index * cluster;
        for (at, n) in self.pieces(base, len) {
            match src.copy_to(offset + (at - base), self.shard(at), at, n) {
                Some(Ok(())) => {}
                // The kernel declined: the caller copies the whole run
                // through a buffer (pieces already copied are rewritten
                // with the same bytes; the clusters are still COPYING).
                None => return None,
                Some(Err(e)) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    fn forget(&self, index: u64, cluster: u64) {
        let base = index * cluster;
        let len = cluster.min(self.shards[0].size().saturating_sub(base));
        for (at, n) in self.pieces(base, len) {
            let _ = self.shard(at).trim(at, n);
        }
    }

    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        ("file", Some(self.shards[0].path().to_path_buf()))
    }

    fn hints(&self) -> IoHints {
        IoHints {
            in_memory: self.shards.iter().all(|f| f.hints().in_memory),
        }
    }
}

/// Clusters in memory up to a budget, then in a spill file created on first
/// need. Memory is the fast tier: a write's copy then costs a memcpy.
pub struct RamStore {
    mem: Mutex<HashMap<u64, Box<[u8]>>>,
    budget: u64,
    used: Mutex<u64>,
    spill_path: PathBuf,
    spill_size: u64,
    spill: OnceLock<Result<FileStore>>,
}

impl RamStore {
    /// A store keeping up to `budget` bytes in memory; beyond that, clusters
    /// go to a sparse file at `spill_path` sized for `size` bytes.
    pub fn new(budget: u64, spill_path: PathBuf, size: u64) -> Self {
        RamStore {
            mem: Mutex::new(HashMap::new()),
            budget,
            used: Mutex::new(0),
            spill_path,
            spill_size: size,
            spill: OnceLock::new(),
        }
    }

    fn spill(&self) -> Result<&FileStore> {
        match self
            .spill
            .get_or_init(|| FileStore::create(&self.spill_path, self.spill_size))
        {
            Ok(s) => Ok(s),
            Err(e) => Err(Error::new(e.kind(), format!("spill file: {e}"))),
        }
    }
}

impl Store for RamStore {
    fn granularity(&self) -> u64 {
        1
    }

    fn hints(&self) -> IoHints {
        let in_memory = match self.spill.get() {
            Some(Ok(s)) => s.hints().in_memory,
            Some(Err(_)) => true,
            // Before the first spill: in memory while there is room. Near
            // the budget a copy may create and write the spill file, which
            // must not happen on a thread that promises not to block.
            None => {
                let used = *self.used.lock().unwrap_or_else(|p| p.into_inner());
                self.budget >= self.spill_size || used + SPILL_MARGIN <= self.budget
            }
        };
        IoHints { in_memory }
    }

    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()> {
        let mut to_spill: Vec<(u64, &[u8])> = Vec::new();
        {
            let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
            let mut mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
            for (i, chunk) in data.chunks(cluster as usize).enumerate() {
                let idx = index + i as u64;
                if *used + chunk.len() as u64 <= self.budget {
                    *used += chunk.len() as u64;
                    mem.insert(idx, chunk.into());
                } else {
                    to_spill.push((idx, chunk));
                }
            }
        }
        for (idx, chunk) in to_spill {
            self.spill()?.save(idx, cluster, chunk)?;
        }
        Ok(())
    }

    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        {
            let mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = mem.get(&index) {
                let o = offset as usize;
                buf.copy_from_slice(&c[o..o + buf.len()]);
                return Ok(());
            }
        }
        self.spill()?.load(index, cluster, offset, buf)
    }

    fn forget(&self, index: u64, cluster: u64) {
        let removed = self.mem.lock().unwrap_or_else(|p| p.into_inner()).remove(&index);
        match removed {
            Some(c) => *self.used.lock().unwrap_or_else(|p| p.into_inner()) -= c.len() as u64,
            None => {
                if let Some(Ok(s)) = self.spill.get() {
                    s.forget(index, cluster);
                }
            }
        }
    }

    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        (
            "ram",
            self.spill
                .get()
                .and_then(|s| s.as_ref().ok())
                .map(|_| self.spill_path.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_store_spills_past_its_budget_and_reads_both_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let s = RamStore::new(4096, dir.path().join("spill"), 1 << 20);
        s.save(0, 4096, &[1u8; 8192]).unwrap();
        let mut b = [0u8; 100];
        s.load(0, 4096, 10, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        s.load(1, 4096, 0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        assert!(dir.path().join("spill").exists());
        s.forget(0, 4096);
        s.save(5, 4096, &[2u8; 4096]).unwrap();
        s.load(5, 4096, 0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 2));
    }

    #[test]
    fn file_store_spreads_stripes_over_parts_and_reads_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * STRIPE * SHARDS as u64;
        let s = FileStore::create(&dir.path().join("store"), size).unwrap();
        assert!(s.shards.len() > 1, "O_TMPFILE works on the test's file system");
        let src_path = dir.path().join("src");
        let src = RawFile::create(&src_path, size).unwrap();
        let pattern: Vec<u8> = (0..3 * STRIPE).map(|i| (i * 7 % 251) as u8).collect();
        // A run that starts mid-stripe and spans four stripes, through the
        // kernel copy, and one through a buffer.
        let c = 16384u64;
        src.write_at(&pattern, 5 * c, IoFlags::NONE).unwrap();
        assert!(s.save_from(5, c, &src, 5 * c, 3 * STRIPE).unwrap().is_ok());
        s.save(
            2 * STRIPE / c * 3,
            c,
            &pattern[..STRIPE as usize + 2 * c as usize],
        )
        .unwrap();
        let mut back = vec![0u8; 3 * STRIPE as usize];
        s.load(5, c, 0, &mut back).unwrap();
        assert!(back == pattern, "kernel-copied run reads back");
        let mut part = vec![0u8; 100];
        s.load(5, c, STRIPE - 5 * c - 50, &mut part).unwrap();
        assert_eq!(&part[..], &pattern[(STRIPE - 5 * c - 50) as usize..][..100]);
        let mut back2 = vec![0u8; STRIPE as usize + 2 * c as usize];
        s.load(2 * STRIPE / c * 3, c, 0, &mut back2).unwrap();
        assert!(back2[..] == pattern[..back2.len()], "buffer-saved run reads back");
        // Every part took some of the data: the stripes are spread.
        let used: Vec<u64> = s.shards.iter().map(|f| f.allocated().unwrap()).collect();
        assert!(used.iter().filter(|&&b| b > 0).count() >= 4, "{used:?}");
        // Forgetting a cluster frees it in the part that holds it.
        let idx = STRIPE / c; // first cluster of the second stripe
        let before = s.shard(idx * c).allocated().unwrap();
        s.forget(idx, c);
        let after = s.shard(idx * c).allocated().unwrap();
        assert!(after < before, "{before} -> {after}");
        s.load(idx, c, 0, &mut part).unwrap();
        assert!(part.iter().all(|&b| b == 0));

        // A cluster larger than a stripe spreads over several parts, and
        // forgetting it frees all of them.
        let big = 4 * STRIPE;
        let total = |s: &FileStore| -> u64 { s.shards.iter().map(|f| f.allocated().unwrap()).sum() };
        let before = total(&s);
        s.save(5, big, &vec![9u8; big as usize]).unwrap();
        assert!(total(&s) >= before + big);
        s.forget(5, big);
        // (Extent-tree blocks may stay: allow a little.)
        assert!(total(&s) <= before + (64 << 10), "{} vs {before}", total(&s));
    }

    #[test]
    fn file_store_parts_have_no_names_and_go_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store");
        let s = FileStore::create(&p, 64 * STRIPE).unwrap();
        s.save(0, 65536, &[1u8; 4 << 20]).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the named file is visible");
        drop(s);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn ram_store_is_in_memory_only_while_it_has_room_or_spills_to_memory() {
        let dir = tempfile::tempdir().unwrap();
        // Budget past the disk's size: it can never spill.
        let whole = RamStore::new(1 << 20, dir.path().join("spill0"), 1 << 20);
        assert!(whole.hints().in_memory);
        let big = RamStore::new(1 << 30, dir.path().join("spill"), 4 << 30);
        assert!(big.hints().in_memory);
        // Near its budget a copy may create the spill file on disk.
        let small = RamStore::new(8192, dir.path().join("spill2"), 1 << 20);
        assert!(!small.hints().in_memory);
        small.save(0, 4096, &[1u8; 16384]).unwrap();
        assert_eq!(small.hints().in_memory, small.spill().unwrap().hints().in_memory);
    }

    #[test]
    fn file_store_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store");
        let s = FileStore::create(&p, 1 << 20).unwrap();
        s.save(3, 65536, &[5u8; 65536]).unwrap();
        assert!(FileStore::create(&p, 1 << 20).is_err());
        drop(s);
        assert!(!p.exists());
    }
}
