//! NamedBitmap against injected write and sync failures, reopens and resizes.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::super::sidecar::{Faults, HEADER};
use super::NamedBitmap;
use crate::{DirtyBitmap, ErrorKind};

const G: u64 = 65536;

fn faults(b: &NamedBitmap) -> &Faults {
    &b.sidecar.as_ref().unwrap().faults
}

fn new_bitmap(dir: &tempfile::TempDir, size: u64) -> (PathBuf, NamedBitmap) {
    let p = dir.path().join("b0");
    let b = NamedBitmap::create("b0", size, G, true, Some(&p)).unwrap();
    (p, b)
}

#[test]
fn bits_survive_a_reopen_with_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    b.mark(G * 3, 10).unwrap();
    b.mark((1 << 30) - 1, 1).unwrap();
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 30).unwrap();
    assert_eq!(b.name(), "b0");
    assert!(b.is_enabled());
    assert!(b.is_consistent());
    assert_eq!(b.inconsistent_reason(), None);
    assert_eq!(b.bits().dirty_bytes(), 2 * G);
    assert!(b.bits().any(G * 3, 1));
    b.set_enabled(false).unwrap();
    b.mark(0, 1).unwrap();
    b.clear().unwrap();
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 30).unwrap();
    assert!(!b.is_enabled());
    assert!(b.is_consistent());
    assert_eq!(b.bits().dirty_bytes(), 0);
}

#[test]
fn bad_headers_are_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 20);
    drop(b);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0xff; 4], 12).unwrap();
    let e = NamedBitmap::open(&p, 1 << 20).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let msg = e.to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("remove"),
        "{msg}"
    );
    f.write_all_at(b"NOTABMAP", 0).unwrap();
    assert!(NamedBitmap::open(&p, 1 << 20)
        .err()
        .unwrap()
        .to_string()
        .contains("magic"));
    f.set_len(100).unwrap();
    assert_eq!(
        NamedBitmap::open(&p, 1 << 20).err().unwrap().kind(),
        ErrorKind::Invalid
    );
}

#[test]
fn a_failed_word_write_sets_nothing_and_a_later_mark_retries() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
    let e = b.mark(G * 5, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StoreFull, "{e}");
    assert!(!b.bits().any(G * 5, 1));
    assert!(!b.covers(G * 5, 1));
    assert!(b.is_consistent(), "a failed pwrite leaves the bitmap exact");
    assert!(b.mark(G * 5, 1).is_err());
    faults(&b).write.store(0, Ordering::Relaxed);
    b.mark(G * 5, 1).unwrap();
    assert!(b.covers(G * 5, 1));
    drop(b);
    assert!(NamedBitmap::open(&p, 1 << 30).unwrap().bits().any(G * 5, 1));
}

#[test]
fn a_clear_that_cannot_sync_leaves_an_inconsistent_bitmap_inconsistent_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    b.mark_inconsistent("a test said so");
    faults(&b).sync.store(libc::EIO, Ordering::Relaxed);
    assert!(b.clear().is_err());
    assert!(!b.is_consistent());
    faults(&b).sync.store(0, Ordering::Relaxed);
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 30).unwrap();
    assert!(
        !b.is_consistent(),
        "a failed clear must not make the header say exact"
    );
}

#[test]
fn a_huge_grow_makes_the_bitmap_inconsistent_instead_of_marking_every_granule() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    b.mark(0, 1).unwrap();
    // 512 TiB more at 64 KiB granules is 2^33 granules: far past the bound.
    b.resize(1 << 49).unwrap();
    assert!(!b.is_consistent());
    assert!(b.inconsistent_reason().unwrap().contains("grew"));
    assert!(b.bits().any(0, 1));
    assert!(!b.bits().any(1 << 40, 1), "nothing marked in the grown range");
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 49).unwrap();
    assert!(!b.is_consistent());
    // A small grow is marked, and keeps it consistent.
    b.clear().unwrap();
    b.resize((1 << 49) + 10 * G).unwrap();
    assert!(b.is_consistent());
    assert!(b.bits().any((1 << 49) + 5 * G, 1));
}

#[test]
fn remove_file_leaves_a_file_that_took_the_name_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, b"someone else's").unwrap();
    b.remove_file().unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
}

#[test]
fn a_failed_sync_makes_it_inconsistent_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    b.mark(0, 1).unwrap();
    faults(&b).sync.store(libc::EIO, Ordering::Relaxed);
    let e = b.mark(G * 7, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(!b.bits().any(G * 7, 1), "not known durable, so not set");
    assert!(!b.is_consistent());
    assert!(b.inconsistent_reason().unwrap().contains("synced"));
    faults(&b).sync.store(0, Ordering::Relaxed);
    // Writes go on, and nothing is written for them.
    faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
    assert!(b.covers(G * 9, 1));
    b.mark(G * 9, 1).unwrap();
    assert!(!b.bits().any(G * 9, 1));
    faults(&b).write.store(0, Ordering::Relaxed);
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 30).unwrap();
    assert!(!b.is_consistent());
    assert_eq!(
        b.inconsistent_reason().as_deref(),
        Some("marked inconsistent in its sidecar file")
    );
    b.clear().unwrap();
    assert!(b.is_consistent());
    b.mark(G * 9, 1).unwrap();
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 30).unwrap();
    assert!(b.is_consistent());
    assert_eq!(b.bits().dirty_bytes(), G);
}
#[test]
fn set_enabled_and_merge_change_nothing_when_the_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
    assert!(b.set_enabled(false).is_err());
    assert!(b.is_enabled());
    let other = DirtyBitmap::new(1 << 30, G);
    other.set(G * 100, G * 3);
    assert_eq!(b.merge(&other).unwrap_err().kind(), ErrorKind::StoreFull);
    assert_eq!(b.bits().dirty_bytes(), 0);
    assert!(b.is_consistent());
    faults(&b).write.store(0, Ordering::Relaxed);
    faults(&b).sync.store(libc::EIO, Ordering::Relaxed);
    assert!(b.merge(&other).is_err());
    assert_eq!(b.bits().dirty_bytes(), 0);
    assert!(!b.is_consistent());
    faults(&b).sync.store(0, Ordering::Relaxed);
    b.clear().unwrap();
    b.merge(&other).unwrap();
    assert_eq!(b.bits().dirty_bytes(), 3 * G);
    assert!(b.merge(&DirtyBitmap::new(1 << 20, G)).is_err());
    drop(b);
    assert_eq!(
        NamedBitmap::open(&p, 1 << 30).unwrap().bits().dirty_bytes(),
        3 * G
    );
}

#[test]
fn resize_keeps_bits_inside_and_marks_what_grew_on_disk_too() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 100 * G);
    b.mark(0, 1).unwrap();
    b.mark(90 * G, 1).unwrap();
    b.resize(80 * G).unwrap();
    assert_eq!(b.bits().dirty_bytes(), G);
    b.resize(300 * G + 5).unwrap();
    assert!(b.is_consistent());
    assert_eq!(b.bits().dirty_bytes(), G + 221 * G);
    drop(b);
    let b = NamedBitmap::open(&p, 300 * G + 5).unwrap();
    assert!(b.is_consistent(), "{:?}", b.inconsistent_reason());
    assert_eq!(
        b.bits().extents(0, 300 * G + 5),
        vec![(G, true), (79 * G, false), (220 * G + 5, true)]
    );
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        HEADER + (301u64).div_ceil(64) * 8
    );
    b.resize(10 * G).unwrap();
    drop(b);
    assert_eq!(NamedBitmap::open(&p, 10 * G).unwrap().bits().dirty_bytes(), G);
}

#[test]
fn a_failed_resize_leaves_memory_resized_and_the_bitmap_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, b) = new_bitmap(&dir, 100 * G);
    faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
    assert!(b.resize(200 * G).is_err());
    assert_eq!(b.bits().size(), 200 * G);
    assert!(!b.is_consistent());
}

#[test]
fn a_size_mismatch_on_open_keeps_the_bits_and_makes_it_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    b.mark(G, 1).unwrap();
    b.mark((1 << 29) + G, 1).unwrap();
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 29).unwrap();
    assert!(!b.is_consistent());
    let why = b.inconsistent_reason().unwrap();
    assert!(why.contains("1073741824") && why.contains("536870912"), "{why}");
    assert_eq!(b.bits().size(), 1 << 29);
    assert_eq!(b.bits().dirty_bytes(), G);
    // The file now describes the new size, and still says inconsistent.
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 29).unwrap();
    assert_eq!(
        b.inconsistent_reason().as_deref(),
        Some("marked inconsistent in its sidecar file")
    );
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        HEADER + ((1u64 << 29) / G).div_ceil(64) * 8
    );
    b.clear().unwrap();
    drop(b);
    assert!(NamedBitmap::open(&p, 1 << 29).unwrap().is_consistent());
}

#[test]
fn transient_bitmaps_mark_and_clear_in_memory() {
    let b = NamedBitmap::create("t", 1 << 20, G, true, None).unwrap();
    b.mark(0, 1).unwrap();
    assert!(b.covers(0, G));
    b.mark_inconsistent("test");
    assert_eq!(b.inconsistent_reason().as_deref(), Some("test"));
    b.mark(5 * G, 1).unwrap();
    assert!(!b.bits().any(5 * G, 1));
    b.clear().unwrap();
    assert!(b.is_consistent());
    b.resize(2 << 20).unwrap();
    assert!(b.bits().any(1 << 20, 1));
}

#[test]
fn concurrent_marks_share_syncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let b = &b;
            sc.spawn(move || {
                for i in 0..64u64 {
                    b.mark((i * 4 + t) * G, 1).unwrap();
                }
            });
        }
    });
    assert_eq!(b.bits().dirty_bytes(), 256 * G);
    drop(b);
    assert_eq!(
        NamedBitmap::open(&p, 1 << 30).unwrap().bits().dirty_bytes(),
        256 * G
    );
}

#[test]
fn clear_bits_drops_only_the_masked_bits_durably_and_keeps_later_marks() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = new_bitmap(&dir, 1 << 30);
    for g in [0, 1, 5, 64, 65, 700] {
        b.mark(g * G, 1).unwrap();
    }
    let mask = DirtyBitmap::new(1 << 30, G);
    for g in [1, 64, 700, 900] {
        mask.set(g * G, 1);
    }
    b.clear_bits(&mask).unwrap();
    let set = |b: &NamedBitmap| (0..1000).filter(|g| b.bits().any(g * G, 1)).collect::<Vec<u64>>();
    assert_eq!(set(&b), vec![0, 5, 65]);
    // A cleared granule is marked again by the next write to it, on disk too.
    b.mark(64 * G, 1).unwrap();
    assert!(b.is_consistent());
    drop(b);
    let b = NamedBitmap::open(&p, 1 << 30).unwrap();
    assert_eq!(set(&b), vec![0, 5, 64, 65]);
    assert!(b.is_consistent());
    let other = DirtyBitmap::new(1 << 20, G);
    assert_eq!(b.clear_bits(&other).err().unwrap().kind(), ErrorKind::Invalid);
}
