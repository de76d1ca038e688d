//! [`DeviceStore`]: saved clusters laid out on devices.

use std::path::PathBuf;
use std::sync::Arc;

use super::Store;
use crate::dev::{BlockDev, IoFlags, IoHints};
use crate::ext::{chunks, max_transfer, read_split, write_split};
use crate::{Error, ErrorKind, Result};

/// Saved clusters on devices: cluster `i` at offset `i * cluster`, so a
/// sparse device only takes space for saved clusters. With several devices
/// (parts), stripes of `stripe` bytes of that address space go round-robin
/// over them, so copies to different stripes do not meet in one device's
/// locks. Each part is at least as large as the disk.
///
/// The parts are asked for their capabilities and hints once, here, as an
/// nbdkit filter asks the layer below once per connection: a store's load
/// in a view read that runs inline must not cost a call per part.
pub struct DeviceStore {
    parts: Vec<Arc<dyn BlockDev>>,
    stripe: u64,
    /// The largest preferred I/O size of the parts.
    granularity: u64,
    /// The smallest maximum transfer of the parts.
    max_io: u64,
    in_memory: bool,
    /// The smallest part's size.
    size: u64,
}

/// Refuses a stripe that is not a power of two of at least 4 KiB.
pub(super) fn check_stripe(stripe: u64) -> Result<()> {
    if !stripe.is_power_of_two() || stripe < 4096 {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("store stripe {stripe} is not a power of two of at least 4096"),
        ));
    }
    Ok(())
}

impl DeviceStore {
    /// A store over `parts` (writable, at least one), striped by `stripe`
    /// bytes (a power of two of at least 4 KiB; raised to the granularity,
    /// so that no cluster is split below it).
    pub fn new(parts: Vec<Arc<dyn BlockDev>>, stripe: u64) -> Result<Self> {
        check_stripe(stripe)?;
        if parts.is_empty() {
            return Err(Error::new(
                ErrorKind::Invalid,
                "a store needs at least one device",
            ));
        }
        let caps: Vec<_> = parts.iter().map(|p| p.capabilities()).collect();
        if caps.iter().any(|c| c.read_only) {
            return Err(Error::new(ErrorKind::Invalid, "a store device is read-only"));
        }
        let granularity = caps
            .iter()
            .map(|c| u64::from(c.preferred_io))
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(DeviceStore {
            stripe: stripe.max(granularity),
            granularity,
            max_io: caps.iter().map(max_transfer).min().unwrap_or(u64::MAX),
            in_memory: parts.iter().all(|p| p.hints().in_memory),
            size: parts.iter().map(|p| p.size()).min().unwrap_or(0),
            parts,
        })
    }

    /// The devices, in stripe order.
    pub fn parts(&self) -> &[Arc<dyn BlockDev>] {
        &self.parts
    }

    fn part(&self, offset: u64) -> &dyn BlockDev {
        &*self.parts[((offset / self.stripe) % self.parts.len() as u64) as usize]
    }

    /// Splits `[offset, offset + len)` at stripe boundaries.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        chunks(offset, len, self.stripe)
    }
}

impl Store for DeviceStore {
    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()> {
        let base = index * cluster;
        for (at, n) in self.pieces(base, data.len() as u64) {
            let d = &data[(at - base) as usize..(at - base + n) as usize];
            write_split(self.part(at), d, at, IoFlags::NONE, self.max_io)?;
        }
        Ok(())
    }

    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = index * cluster + offset;
        for (at, n) in self.pieces(base, buf.len() as u64) {
            let b = &mut buf[(at - base) as usize..(at - base + n) as usize];
            read_split(self.part(at), b, at, IoFlags::NONE, self.max_io)?;
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
            match src.copy_to(offset + (at - base), self.part(at), at, n) {
                Some(Ok(())) => {}
                // Declined: the caller copies the whole run through a
                // buffer (pieces already copied are rewritten with the same
                // bytes; the clusters are still COPYING).
                None => return None,
                Some(Err(e)) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    fn forget(&self, index: u64, cluster: u64) {
        let base = index * cluster;
        let len = cluster.min(self.size.saturating_sub(base));
        for (at, n) in self.pieces(base, len) {
            let _ = self.part(at).trim(at, n);
        }
    }

    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        ("device", None)
    }

    fn hints(&self) -> IoHints {
        IoHints {
            in_memory: self.in_memory,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::Capabilities;
    use crate::mapping::Extent;
    use crate::raw::RawFile;
    use crate::ZeroFlags;

    /// A raw file seen only as a device: no descriptor to copy into, a
    /// maximum transfer of 8 KiB, 16 KiB blocks.
    struct Plain(RawFile);

    impl BlockDev for Plain {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                max_transfer: Some(8192),
                preferred_io: 16384,
                ..self.0.capabilities()
            }
        }
        fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
            assert!(buf.len() <= 8192, "{} bytes in one read", buf.len());
            self.0.read_at(buf, offset, flags)
        }
        fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
            assert!(buf.len() <= 8192, "{} bytes in one write", buf.len());
            self.0.write_at(buf, offset, flags)
        }
        fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
            self.0.write_zeroes(offset, length, flags)
        }
        fn trim(&self, offset: u64, length: u64) -> Result<()> {
            self.0.trim(offset, length)
        }
        fn flush(&self) -> Result<()> {
            self.0.flush()
        }
        fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
            self.0.block_status(offset, length)
        }
    }

    #[test]
    fn any_device_holds_clusters_split_by_its_limits_and_declines_kernel_copies() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let parts: Vec<Arc<dyn BlockDev>> = (0..3)
            .map(|i| {
                let f = RawFile::create(&dir.path().join(format!("p{i}")), size).unwrap();
                Arc::new(Plain(f)) as Arc<dyn BlockDev>
            })
            .collect();
        let s = DeviceStore::new(parts, 4096).unwrap();
        assert_eq!(s.granularity(), 16384);
        assert_eq!(s.stripe, 16384, "stripes never split a block");
        let c = 16384u64;
        let data: Vec<u8> = (0..5 * c).map(|i| (i % 253) as u8).collect();
        s.save(2, c, &data).unwrap();
        let mut back = vec![0u8; 5 * c as usize];
        s.load(2, c, 0, &mut back).unwrap();
        assert!(back == data);
        let mut part = vec![0u8; 100];
        s.load(3, c, c - 50, &mut part).unwrap();
        assert_eq!(&part[..], &data[(2 * c - 50) as usize..][..100]);
        // Every part holds some of it.
        assert!(s.parts().iter().all(|p| p.next_data(0, size).unwrap().is_some()));
        // No descriptor to copy into: the caller copies through a buffer.
        let src = RawFile::create(&dir.path().join("src"), size).unwrap();
        assert!(s.save_from(0, c, &src, 0, c).is_none());
        s.forget(3, c);
        s.load(3, c, 0, &mut part).unwrap();
        assert!(part.iter().all(|&b| b == 0));
        assert!(!s.hints().in_memory || s.parts().iter().all(|p| p.hints().in_memory));
    }

    #[test]
    fn a_store_needs_writable_devices_and_a_sane_stripe() {
        let dir = tempfile::tempdir().unwrap();
        let f = RawFile::create(&dir.path().join("p"), 1 << 20).unwrap();
        let ro: Arc<dyn BlockDev> = Arc::new(RawFile::open(&dir.path().join("p"), true).unwrap());
        let rw: Arc<dyn BlockDev> = Arc::new(f);
        assert!(DeviceStore::new(vec![ro], 4096).is_err());
        assert!(DeviceStore::new(vec![], 4096).is_err());
        assert!(DeviceStore::new(vec![rw.clone()], 1000).is_err());
        assert!(DeviceStore::new(vec![rw], 4096).is_ok());
    }
}
