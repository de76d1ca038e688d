//! [`Qcow2Store`]: a device store over a qcow2 image fleece makes for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::device::DeviceStore;
use super::Store;
use crate::dev::{BlockDev, IoHints};
use crate::image::{self, CreateOptions, Format, ImageOptions};
use crate::qcow2::{MAX_CLUSTER, MIN_CLUSTER};
use crate::{Error, ErrorKind, Result};

/// A [`DeviceStore`] over a new qcow2 image of the disk's size: saved
/// clusters take space in it, forgotten ones are discarded from it. Its
/// cluster is the snapshot's, rounded up to a valid qcow2 cluster size
/// (512 B to 2 MiB). The image is removed when the store is dropped.
pub struct Qcow2Store {
    store: DeviceStore,
    path: PathBuf,
}

impl Qcow2Store {
    /// Creates the qcow2 image at `path` (which must not exist) for a disk
    /// of `size` bytes and clusters of `cluster` bytes.
    pub fn create(path: &Path, size: u64, cluster: u64) -> Result<Self> {
        let qcluster = cluster.clamp(MIN_CLUSTER, MAX_CLUSTER).next_power_of_two();
        let opts = CreateOptions {
            format: Format::Qcow2,
            size: Some(size),
            cluster_size: Some(qcluster),
            backing: None,
        };
        image::create(path, &opts).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) || path.exists() {
                Error::new(
                    ErrorKind::Invalid,
                    format!("store file {} already exists; pick another path", path.display()),
                )
            } else {
                e
            }
        })?;
        let made = image::open(
            path,
            &ImageOptions {
                read_only: false,
                format: Some(Format::Qcow2),
            },
        )
        .and_then(|img| {
            let dev: Arc<dyn BlockDev> = img.device().clone();
            DeviceStore::new(vec![dev], (qcluster).max(4096))
        });
        match made {
            Ok(store) => Ok(Qcow2Store {
                store,
                path: path.to_path_buf(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }
}

impl Drop for Qcow2Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Store for Qcow2Store {
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
        ("qcow2", Some(self.path.clone()))
    }
    fn hints(&self) -> IoHints {
        self.store.hints()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::IoFlags;
    use crate::raw::RawFile;

    #[test]
    fn a_qcow2_store_saves_loads_forgets_and_goes_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.qcow2");
        let c = 65536u64;
        let s = Qcow2Store::create(&p, 64 * c, c).unwrap();
        assert_eq!(s.granularity(), c);
        assert!(
            Qcow2Store::create(&p, 64 * c, c).is_err(),
            "never over an existing file"
        );
        let src = RawFile::create(&dir.path().join("src"), 64 * c).unwrap();
        src.write_at(&vec![4u8; 2 * c as usize], 3 * c, IoFlags::NONE)
            .unwrap();
        s.save(1, c, &vec![7u8; c as usize]).unwrap();
        match s.save_from(3, c, &src, 3 * c, 2 * c) {
            None => {
                let mut b = vec![0u8; 2 * c as usize];
                src.read_at(&mut b, 3 * c, IoFlags::NONE).unwrap();
                s.save(3, c, &b).unwrap();
            }
            Some(r) => r.unwrap(),
        }
        let mut b = vec![0u8; 100];
        s.load(1, c, 50, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        s.load(4, c, 0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 4));
        s.forget(1, c);
        s.load(1, c, 0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(s.describe(), ("qcow2", Some(p.clone())));
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-U", p.to_str().unwrap()])
            .output()
            .unwrap();
        // In use and not flushed: leaks (3) may show, corruption (2) not.
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        drop(s);
        assert!(!p.exists());
        // A snapshot cluster past 2 MiB uses 2 MiB qcow2 clusters, and one
        // below 512 B 512-byte ones.
        let big = Qcow2Store::create(&p, 64 << 20, 8 << 20).unwrap();
        assert_eq!(big.granularity(), 2 << 20);
        drop(big);
        assert_eq!(Qcow2Store::create(&p, 1 << 20, 1).unwrap().granularity(), 512);
    }
}
