//! [`FileStore`]: a device store over files fleece makes for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::device::{check_stripe, DeviceStore};
use super::Store;
use crate::dev::{BlockDev, IoHints};
use crate::raw::RawFile;
use crate::{Error, ErrorKind, Result};

/// Bytes per stripe by default. Clusters are powers of two, so one of up
/// to 1 MiB lies in one file; larger ones are split over several, like any
/// run.
const STRIPE: u64 = 1 << 20;
/// Files per store, the named one included.
const PARTS: usize = 8;

/// A [`DeviceStore`] over sparse raw files of the disk's size: the named
/// file and, where the file system can make them, unnamed siblings in its
/// directory (`O_TMPFILE`), each holding every eighth stripe. The named
/// file is removed when the store is dropped; the unnamed ones vanish with
/// their descriptors, even if the process dies.
///
/// Why several files: a buffered write takes the file's inode lock, so all
/// copies into one file run one at a time, and on tmpfs a waiter spins on
/// the lock while the holder copies. Writes to different files run in
/// parallel. Being raw files, the parts lend their descriptors, so copies
/// from a raw disk are kernel copies.
pub struct FileStore {
    store: DeviceStore,
    /// The same files as the store's parts, for what only files have.
    files: Vec<Arc<RawFile>>,
    path: PathBuf,
}

impl FileStore {
    /// Creates a sparse store file able to hold `size` bytes of clusters.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        FileStore::create_striped(path, size, STRIPE)
    }

    /// [`create`](Self::create) with stripes of `stripe` bytes (a power of
    /// two of at least 4 KiB; tests use small ones to cross stripes often).
    pub fn create_striped(path: &Path, size: u64, stripe: u64) -> Result<Self> {
        check_stripe(stripe)?;
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
        let mut files = vec![Arc::new(file)];
        if size > stripe {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            for i in 1..PARTS {
                let label = PathBuf::from(format!("{} (part {i})", path.display()));
                match RawFile::create_unnamed(dir, size, label) {
                    Ok(f) => files.push(Arc::new(f)),
                    // No O_TMPFILE here: one file it is.
                    Err(_) => break,
                }
            }
        }
        let parts = files.iter().map(|f| f.clone() as Arc<dyn BlockDev>).collect();
        let store = DeviceStore::new(parts, stripe).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })?;
        Ok(FileStore {
            store,
            files,
            path: path.to_path_buf(),
        })
    }

    /// Bytes the store's files take on their file system.
    pub fn allocated(&self) -> Result<u64> {
        self.files.iter().map(|f| f.allocated()).sum()
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Store for FileStore {
    fn granularity(&self) -> u64 {
        self.store.granularity()
    }
    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()> {
        self.store.save(index, cluster, data)
    }
    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.store.load(index, cluster, offset, buf)
    }
    fn save_from(
        &self,
        index: u64,
        cluster: u64,
        src: &dyn BlockDev,
        offset: u64,
        len: u64,
    ) -> Option<Result<()>> {
        self.store.save_from(index, cluster, src, offset, len)
    }
    fn forget(&self, index: u64, cluster: u64) {
        self.store.forget(index, cluster)
    }
    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        ("file", Some(self.path.clone()))
    }
    fn hints(&self) -> IoHints {
        self.store.hints()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::IoFlags;

    #[test]
    fn file_store_spreads_stripes_over_parts_and_reads_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * STRIPE * PARTS as u64;
        let s = FileStore::create(&dir.path().join("store"), size).unwrap();
        assert!(s.files.len() > 1, "O_TMPFILE works on the test's file system");
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
        let used: Vec<u64> = s.files.iter().map(|f| f.allocated().unwrap()).collect();
        assert!(used.iter().filter(|&&b| b > 0).count() >= 4, "{used:?}");
        // Forgetting a cluster frees it in the part that holds it.
        let idx = STRIPE / c; // first cluster of the second stripe
        let holder = &s.files[1];
        let before = holder.allocated().unwrap();
        s.forget(idx, c);
        let after = holder.allocated().unwrap();
        assert!(after < before, "{before} -> {after}");
        s.load(idx, c, 0, &mut part).unwrap();
        assert!(part.iter().all(|&b| b == 0));

        // A cluster larger than a stripe spreads over several parts, and
        // forgetting it frees all of them.
        let big = 4 * STRIPE;
        let before = s.allocated().unwrap();
        s.save(5, big, &vec![9u8; big as usize]).unwrap();
        assert!(s.allocated().unwrap() >= before + big);
        s.forget(5, big);
        // (Extent-tree blocks may stay: allow a little.)
        let total = s.allocated().unwrap();
        assert!(total <= before + (64 << 10), "{total} vs {before}");
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
    fn file_store_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store");
        let s = FileStore::create(&p, 1 << 20).unwrap();
        s.save(3, 65536, &[5u8; 65536]).unwrap();
        assert!(FileStore::create(&p, 1 << 20).is_err());
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn a_bad_stripe_makes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store");
        assert!(FileStore::create_striped(&p, 1 << 20, 3000).is_err());
        assert!(!p.exists());
    }
}
