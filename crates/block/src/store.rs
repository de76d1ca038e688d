//! Where copy-before-write puts old cluster contents.
//!
//! A store keeps whole clusters by index. It does no accounting of its own:
//! the snapshot decides what to save and counts what it holds.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::dev::BlockDev;
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
    /// Saves clusters straight from a file, if this store can do that
    /// without a buffer (`None`: use [`save`](Self::save)).
    fn save_from_file(
        &self,
        _index: u64,
        _cluster: u64,
        _src: &RawFile,
        _offset: u64,
        _len: u64,
    ) -> Option<Result<()>> {
        None
    }
    /// True if loads never wait for a disk.
    fn is_in_memory(&self) -> bool {
        false
    }
}

/// A sparse file with cluster `i` at offset `i * cluster`, so it only takes
/// space for saved clusters. Removed when dropped.
pub struct FileStore {
    file: RawFile,
    granularity: u64,
}

impl FileStore {
    /// Creates a sparse store file able to hold `size` bytes of clusters.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        if path.exists() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("store file {} already exists; pick another path", path.display()),
            ));
        }
        let file = RawFile::create(path, size)?;
        let granularity = std::fs::metadata(path)
            .map(|m| m.blksize())
            .unwrap_or(4096)
            .max(512);
        Ok(FileStore { file, granularity })
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.file.path());
    }
}

impl Store for FileStore {
    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()> {
        self.file.write_at(data, index * cluster, false)
    }

    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_at(buf, index * cluster + offset)
    }

    fn save_from_file(
        &self,
        index: u64,
        cluster: u64,
        src: &RawFile,
        offset: u64,
        len: u64,
    ) -> Option<Result<()>> {
        self.file.copy_from(src, offset, index * cluster, len)
    }

    fn forget(&self, index: u64, cluster: u64) {
        let _ = self
            .file
            .trim(index * cluster, cluster.min(self.file.size() - index * cluster));
    }

    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        ("file", Some(self.file.path().to_path_buf()))
    }

    fn is_in_memory(&self) -> bool {
        self.file.is_in_memory()
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

    fn is_in_memory(&self) -> bool {
        match self.spill.get() {
            Some(Ok(s)) => s.is_in_memory(),
            _ => true,
        }
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
