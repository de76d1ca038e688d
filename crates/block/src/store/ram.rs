//! [`RamStore`]: saved clusters in memory, spilling into a file store.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use super::file::FileStore;
use super::Store;
use crate::dev::IoHints;
use crate::{Error, Result};

/// Room a RAM store keeps before it stops calling itself in memory: one
/// run of copies (64 clusters) of clusters up to 1 MiB. With larger
/// clusters a run may still reach the spill file from a reader thread.
const SPILL_MARGIN: u64 = 64 << 20;

/// Clusters in memory up to a budget, then in a spill file created on first
/// need (a [`FileStore`], a device store). Memory is the fast tier: a write's copy then costs a memcpy.
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

    fn holds_in_memory(&self, index: u64) -> bool {
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&index)
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
}
