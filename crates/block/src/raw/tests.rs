//! The raw file against sparse files, truncation by someone else, resizes
//! and QEMU-style locks.

use std::fs::OpenOptions;

use super::*;
use crate::dev::{BlockDev, Capabilities, IoFlags, ZeroFlags};
use crate::mapping::{Extent, Mapping};

fn tmp(size: u64) -> (tempfile::TempDir, RawFile) {
    let dir = tempfile::tempdir().unwrap();
    let f = RawFile::create(&dir.path().join("a.raw"), size).unwrap();
    (dir, f)
}

#[test]
fn written_data_reads_back_and_holes_read_as_zeroes() {
    let (_d, f) = tmp(1 << 20);
    f.write_at(&[7u8; 4096], 8192, IoFlags::NONE).unwrap();
    let mut buf = vec![1u8; 16384];
    f.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    assert!(buf[..8192].iter().all(|&b| b == 0));
    assert!(buf[8192..12288].iter().all(|&b| b == 7));
}

#[test]
fn block_status_reports_holes_and_data_of_a_sparse_file() {
    let (_d, f) = tmp(1 << 20);
    f.write_at(&[7u8; 65536], 262144, IoFlags::NONE).unwrap();
    let ext = f.block_status(0, 1 << 20).unwrap();
    let total: u64 = ext.iter().map(|e| e.length).sum();
    assert_eq!(total, 1 << 20);
    assert_eq!(ext[0].mapping, Mapping::Hole);
    assert!(ext.iter().any(|e| e.mapping == Mapping::Data));
}

#[test]
fn block_status_sees_a_new_hole_after_remembering_a_dense_run() {
    let (_d, f) = tmp(1 << 20);
    f.write_at(&vec![5u8; 1 << 20], 0, IoFlags::NONE).unwrap();
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
    f.write_at(&[7u8; 4096], 512 << 10, IoFlags::NONE).unwrap();
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
    f.write_at(&[9u8; 131072], 0, IoFlags::NONE).unwrap();
    f.trim(0, 65536).unwrap();
    f.write_zeroes(65536, 1000, ZeroFlags::default()).unwrap();
    let mut buf = vec![1u8; 131072];
    f.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    assert!(buf[..66536].iter().all(|&b| b == 0));
    assert!(buf[66536..].iter().all(|&b| b == 9));
}

#[test]
fn a_truncated_image_fails_reads_and_never_looks_like_holes() {
    let (d, f) = tmp(1 << 20);
    f.write_at(&[7u8; 4096], 0, IoFlags::NONE).unwrap();
    // Someone else truncates the image under us.
    let other = OpenOptions::new()
        .write(true)
        .open(d.path().join("a.raw"))
        .unwrap();
    other.set_len(256 << 10).unwrap();
    assert_eq!(f.file_len().unwrap(), 256 << 10);
    let mut buf = vec![0u8; 8192];
    f.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    let e = f
        .read_at(&mut buf, (256 << 10) - 4096, IoFlags::NONE)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        e.to_string().contains("ends at 262144 bytes") && e.to_string().contains("truncated"),
        "{e}"
    );
    // Later reads still fail (the log is latched, not the error).
    assert!(f.read_at(&mut buf, 512 << 10, IoFlags::NONE).is_err());
    assert!(f.read_at(&mut buf, 512 << 10, IoFlags::NO_WAIT).is_err());
    // What lies inside the file still answers; past its end fails.
    assert_eq!(f.next_data(4096, 256 << 10).unwrap(), None);
    assert_eq!(f.next_data(4096, 1 << 20).unwrap_err().kind(), ErrorKind::Io);
    assert_eq!(f.next_data(300 << 10, 1 << 20).unwrap_err().kind(), ErrorKind::Io);
    assert_eq!(f.block_status(0, 1 << 20).unwrap_err().kind(), ErrorKind::Io);
    assert_eq!(f.block_status(400 << 10, 4096).unwrap_err().kind(), ErrorKind::Io);
    let ext = f.block_status(0, 256 << 10).unwrap();
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 256 << 10);
    // The default next_data (through block status) fails as well.
    struct ByStatus<'a>(&'a RawFile);
    impl BlockDev for ByStatus<'_> {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        fn read_at(&self, b: &mut [u8], o: u64, f: IoFlags) -> Result<()> {
            self.0.read_at(b, o, f)
        }
        fn write_at(&self, b: &[u8], o: u64, f: IoFlags) -> Result<()> {
            self.0.write_at(b, o, f)
        }
        fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> Result<()> {
            self.0.write_zeroes(o, l, f)
        }
        fn trim(&self, o: u64, l: u64) -> Result<()> {
            self.0.trim(o, l)
        }
        fn flush(&self) -> Result<()> {
            self.0.flush()
        }
        fn cache(&self, o: u64, l: u64) -> Result<()> {
            self.0.cache(o, l)
        }
        fn block_status(&self, o: u64, l: u64) -> Result<Vec<Extent>> {
            self.0.block_status(o, l)
        }
    }
    assert!(ByStatus(&f).next_data(4096, 1 << 20).is_err());
}

#[test]
fn a_copy_from_a_truncated_source_is_not_silently_short() {
    let dir = tempfile::tempdir().unwrap();
    let src = RawFile::create(&dir.path().join("src"), 1 << 20).unwrap();
    let dst = RawFile::create(&dir.path().join("dst"), 1 << 20).unwrap();
    src.write_at(&[3u8; 65536], 0, IoFlags::NONE).unwrap();
    OpenOptions::new()
        .write(true)
        .open(dir.path().join("src"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    match src.copy_to(0, &dst, 0, 65536) {
        None => {
            let mut buf = vec![0u8; 65536];
            assert!(
                src.read_at(&mut buf, 0, IoFlags::NONE).is_err(),
                "the fallback must fail"
            );
        }
        Some(r) => assert!(r.is_err(), "a short copy cannot succeed"),
    }
}

#[test]
fn resize_changes_the_device_and_the_file() {
    let (_d, f) = tmp(1 << 20);
    f.write_at(&vec![5u8; 1 << 20], 0, IoFlags::NONE).unwrap();
    // Remember a dense run that the shrink makes wrong.
    assert_eq!(f.block_status(0, 1 << 20).unwrap().len(), 1);
    f.resize(512 << 10).unwrap();
    assert_eq!(f.size(), 512 << 10);
    assert_eq!(f.file_len().unwrap(), 512 << 10);
    assert_eq!(
        f.block_status(0, 512 << 10)
            .unwrap()
            .iter()
            .map(|e| e.length)
            .sum::<u64>(),
        512 << 10
    );
    let mut buf = [0u8; 1];
    assert_eq!(
        f.read_at(&mut buf, 512 << 10, IoFlags::NONE).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    f.resize(2 << 20).unwrap();
    let ext = f.block_status(0, 2 << 20).unwrap();
    assert_eq!(ext.last().unwrap().mapping, Mapping::Hole, "{ext:?}");
    f.read_at(&mut buf, (2 << 20) - 1, IoFlags::NONE).unwrap();
    assert_eq!(buf[0], 0);
    let ro = RawFile::open(f.path(), true).unwrap();
    assert_eq!(ro.resize(1 << 20).unwrap_err().kind(), ErrorKind::ReadOnly);
}

#[test]
fn a_second_open_cannot_lock_an_image_in_use() {
    let (_d, a) = tmp(1 << 20);
    let b = RawFile::open(a.path(), false).unwrap();
    a.lock(LockMode::ReadWrite).unwrap();
    if a.locked.lock().unwrap().is_none() {
        eprintln!("no OFD locks on this file system; skipping");
        return;
    }
    let e = b.lock(LockMode::ReadWrite).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked);
    assert!(e.to_string().contains("in use by another program"), "{e}");
    assert!(e.to_string().contains(a.path().to_str().unwrap()), "{e}");
    // Nor read-only: a reader refuses to share "write", which a holds.
    let e = b.lock(LockMode::ReadOnly).unwrap_err();
    assert!(e.to_string().contains("\"write\""), "{e}");
    // The failed attempts left nothing behind: after unlock, b gets it.
    a.unlock();
    b.lock(LockMode::ReadWrite).unwrap();
    assert_eq!(a.lock(LockMode::ReadWrite).unwrap_err().kind(), ErrorKind::Locked);
    // Closing releases the locks too.
    drop(b);
    a.lock(LockMode::ReadWrite).unwrap();
    // Read-only users share with each other, and lock again after a
    // downgrade.
    a.lock(LockMode::ReadOnly).unwrap();
    let c = RawFile::open(a.path(), true).unwrap();
    c.lock(LockMode::ReadOnly).unwrap();
    assert_eq!(a.lock(LockMode::ReadWrite).unwrap_err().kind(), ErrorKind::Locked);
    c.unlock();
    a.lock(LockMode::ReadWrite).unwrap();
}

#[test]
fn ranges_past_the_end_are_refused_without_overflow() {
    let (_d, f) = tmp(4096);
    let mut buf = [0u8; 2];
    assert_eq!(
        f.read_at(&mut buf, 4095, IoFlags::NONE).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(f.trim(u64::MAX, 2).unwrap_err().kind(), ErrorKind::OutOfRange);
}

#[test]
fn a_write_past_the_end_of_a_truncated_file_fails_instead_of_leaving_a_gap_of_zeroes() {
    let (d, f) = tmp(1 << 20);
    f.write_at(&[7u8; 4096], 0, IoFlags::NONE).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join("a.raw"))
        .unwrap()
        .set_len(64 << 10)
        .unwrap();
    assert_eq!(f.file_len().unwrap(), 64 << 10);
    let e = f.write_at(&[1u8; 4096], 512 << 10, IoFlags::NONE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(f.file_len().unwrap(), 64 << 10, "the file did not grow");
    // Within what is left, writes go on.
    f.write_at(&[2u8; 4096], 4096, IoFlags::NONE).unwrap();
    // Put back to its size by someone: writes anywhere work again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join("a.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    f.write_at(&[3u8; 4096], 512 << 10, IoFlags::NONE).unwrap();
}

#[test]
fn create_new_never_truncates_a_file_that_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, b"keep").unwrap();
    assert!(RawFile::create_new(&p, 1 << 20).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), b"keep");
}

#[test]
fn a_resize_the_file_system_refuses_is_invalid_and_changes_nothing() {
    let (_d, f) = tmp(1 << 20);
    let e = f.resize(u64::MAX).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert_eq!(f.size(), 1 << 20);
    assert_eq!(f.file_len().unwrap(), 1 << 20);
}

#[test]
fn no_wait_reads_come_from_the_cache_and_no_wait_syncs_are_declined() {
    let (_d, f) = tmp(1 << 20);
    f.write_at(&[6u8; 8192], 4096, IoFlags::NONE).unwrap();
    let mut buf = vec![0u8; 8192];
    match f.read_at(&mut buf, 4096, IoFlags::NO_WAIT) {
        Ok(()) => assert!(buf.iter().all(|&b| b == 6)),
        // A kernel without RWF_NOWAIT for this file system.
        Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
    }
    let fua_now = IoFlags {
        fua: true,
        no_wait: true,
    };
    let e = f.write_at(&[1u8; 512], 0, fua_now).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    let c = f.capabilities();
    assert!(c.preferred_io >= 512 && c.preferred_io.is_power_of_two(), "{c:?}");
}

#[test]
fn a_kernel_copy_needs_a_destination_that_lends_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = RawFile::create(&dir.path().join("src"), 1 << 20).unwrap();
    src.write_at(&[4u8; 65536], 65536, IoFlags::NONE).unwrap();
    let dst = std::sync::Arc::new(RawFile::create(&dir.path().join("dst"), 1 << 20).unwrap());
    // A filter over the file lends nothing: writing the file would skip it.
    let live = crate::LiveDisk::new(dst.clone());
    assert!(src.copy_to(65536, &live, 0, 65536).is_none());
    // Neither does a read-only file, nor a range past either end.
    let ro = RawFile::open(&dir.path().join("dst"), true).unwrap();
    assert!(src.copy_to(65536, &ro, 0, 65536).is_none());
    assert!(src.copy_to(1 << 20, &*dst, 0, 1).is_none());
    assert!(src.copy_to(0, &*dst, 1 << 20, 1).is_none());
    // The file itself does, through an Arc too.
    src.copy_to(65536, &dst, 4096, 65536).unwrap().unwrap();
    let mut back = vec![0u8; 65536];
    dst.read_at(&mut back, 4096, IoFlags::NONE).unwrap();
    assert!(back.iter().all(|&b| b == 4));
}
