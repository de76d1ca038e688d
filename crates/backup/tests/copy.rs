//! The copy engine on real files: a live disk (a raw image), a snapshot of
//! it with a store, and file targets, some wrapped to fail, corrupt or
//! record what they are asked.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleece_backup::target::file::FileTarget;
use fleece_backup::{Control, CopyOptions, DiskCopy, Error, ErrorKind, OnTargetError, Order, Target};
use fleece_block::{
    BlockDev, DirtyBitmap, IoFlags, IoHints, LiveDisk, RamStore, RawFile, Snapshot, SnapshotOptions, Store,
};

const C: u64 = 64 << 10;
const SIZE: u64 = 64 * C;

struct Disk {
    dir: tempfile::TempDir,
    live: Arc<LiveDisk>,
}

fn disk() -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let raw = RawFile::create(&path, SIZE).unwrap();
    Disk {
        live: Arc::new(LiveDisk::new(Arc::new(raw))),
        dir,
    }
}

impl Disk {
    fn write(&self, cluster: u64, byte: u8) {
        self.live
            .write_at(&vec![byte; C as usize], cluster * C, IoFlags::NONE)
            .unwrap();
    }
    fn read_all(&self) -> Vec<u8> {
        let mut v = vec![0; SIZE as usize];
        self.live.read_at(&mut v, 0, IoFlags::NONE).unwrap();
        v
    }
    fn snapshot_with(&self, store: Box<dyn Store>, scope: Option<DirtyBitmap>) -> Arc<Snapshot> {
        let _f = self.live.freeze();
        self.live.snapshot(
            store,
            SnapshotOptions {
                cluster_size: C,
                scope,
                ..SnapshotOptions::default()
            },
        )
    }
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot_with(Box::new(self.ram_store()), None)
    }
    fn ram_store(&self) -> RamStore {
        RamStore::new(SIZE, self.dir.path().join("spill"), SIZE)
    }
    fn target_path(&self) -> PathBuf {
        self.dir.path().join("backup.raw")
    }
}

fn opts() -> CopyOptions {
    CopyOptions {
        cluster: C,
        chunk: 4 * C,
        workers: 4,
        ..CopyOptions::default()
    }
}

fn run(
    snap: &Arc<Snapshot>,
    target: Arc<dyn Target>,
    o: CopyOptions,
) -> fleece_backup::Result<Arc<DiskCopy>> {
    let copy = DiskCopy::new(snap.clone(), target, o)?;
    let ctl = Control::new(0);
    copy.run(&ctl).map(|_| copy)
}

fn file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn a_full_copy_is_the_disk_at_the_instant_and_keeps_its_holes() {
    let d = disk();
    for c in [0, 3, 4, 5, 40, 63] {
        d.write(c, c as u8 + 1);
    }
    let snap = d.snapshot();
    let instant = d.read_all();
    // Writes after the instant, some to saved data, some to holes.
    for c in [3, 10, 40, 41] {
        d.write(c, 0xee);
    }
    let target = Arc::new(FileTarget::open(&d.target_path(), SIZE).unwrap());
    assert!(target.known_zero());
    let copy = run(&snap, target, opts()).unwrap();
    assert_eq!(file(&d.target_path()), instant);
    let s = copy.stats();
    assert_eq!(s.copied_clusters, 6);
    assert_eq!(s.skipped_clusters, 58, "holes on a new file are not written");
    assert_eq!(s.done_bytes, s.total_bytes);
    let used = std::fs::metadata(d.target_path()).unwrap().blocks() * 512;
    assert!(used <= 6 * C, "{used} bytes allocated for 6 clusters of data");
}

#[test]
fn writes_racing_the_copy_never_reach_the_target() {
    let d = disk();
    for c in 0..64 {
        if c % 3 != 0 {
            d.write(c, c as u8);
        }
    }
    let snap = d.snapshot();
    let instant = d.read_all();
    let target = Arc::new(FileTarget::open(&d.target_path(), SIZE).unwrap());
    let stop = Arc::new(AtomicU32::new(0));
    let writer = {
        let live = d.live.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while stop.load(Ordering::Relaxed) == 0 {
                let c = (i * 37) % 64;
                live.write_at(&[0xab; 4096], c * C + (i % 16) * 4096, IoFlags::NONE)
                    .unwrap();
                i += 1;
            }
        })
    };
    let o = CopyOptions {
        discard_source: true,
        chunk: C,
        ..opts()
    };
    run(&snap, target, o).unwrap();
    stop.store(1, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(file(&d.target_path()), instant);
}

#[test]
fn pushed_clusters_are_discarded_so_later_writes_copy_nothing() {
    let d = disk();
    for c in 0..8 {
        d.write(c, 1);
    }
    let snap = d.snapshot();
    let target = Arc::new(FileTarget::open(&d.target_path(), SIZE).unwrap());
    run(
        &snap,
        target,
        CopyOptions {
            discard_source: true,
            ..opts()
        },
    )
    .unwrap();
    for c in 0..8 {
        d.write(c, 2);
    }
    let s = snap.stats();
    assert_eq!(s.used_bytes, 0, "nothing saved after the push");
    assert!(s.discarded_clusters >= 8);
}

#[test]
fn an_incremental_copy_writes_only_the_bitmap_and_zeroes_what_became_holes() {
    let d = disk();
    let old = d.target_path();
    // The previous backup: everything 0x11.
    std::fs::write(&old, vec![0x11; SIZE as usize]).unwrap();
    d.write(2, 0x22);
    let scope = DirtyBitmap::new(SIZE, C);
    scope.set(2 * C, 1);
    // Cluster 9 changed to a hole since the last backup (a trim).
    scope.set(9 * C, 1);
    let snap = d.snapshot_with(Box::new(d.ram_store()), Some(scope));
    let target = Arc::new(FileTarget::open(&old, SIZE).unwrap());
    assert!(!target.known_zero());
    let copy = run(&snap, target, opts()).unwrap();
    let got = file(&old);
    for c in 0..64u64 {
        let want = match c {
            2 => 0x22,
            9 => 0,
            _ => 0x11,
        };
        let r = (c * C) as usize..((c + 1) * C) as usize;
        assert!(got[r].iter().all(|&b| b == want), "cluster {c}");
    }
    let s = copy.stats();
    assert_eq!(
        (s.copied_clusters, s.zeroed_clusters, s.skipped_clusters),
        (1, 1, 62)
    );
}

/// A file target that loses its "connection" on chosen writes and counts
/// what it acknowledged per offset.
struct Flaky {
    inner: FileTarget,
    writes: AtomicUsize,
    fail_from: usize,
    fail_count: usize,
    reconnects: AtomicUsize,
    fail_reconnects: usize,
    acked: Mutex<HashMap<u64, u32>>,
    order: Mutex<Vec<u64>>,
}

impl Flaky {
    fn new(path: &Path, fail_from: usize, fail_count: usize, fail_reconnects: usize) -> Flaky {
        Flaky {
            inner: FileTarget::open(path, SIZE).unwrap(),
            writes: AtomicUsize::new(0),
            fail_from,
            fail_count,
            reconnects: AtomicUsize::new(0),
            fail_reconnects,
            acked: Mutex::new(HashMap::new()),
            order: Mutex::new(Vec::new()),
        }
    }
}

impl Target for Flaky {
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn cluster_size(&self) -> u64 {
        4096
    }
    fn known_zero(&self) -> bool {
        true
    }
    fn write(&self, offset: u64, data: &[u8]) -> fleece_backup::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_from && n < self.fail_from + self.fail_count {
            return Err(Error::new(ErrorKind::Disconnected, "connection lost"));
        }
        self.inner.write(offset, data)?;
        *self.acked.lock().unwrap().entry(offset).or_default() += 1;
        self.order.lock().unwrap().push(offset / C);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> fleece_backup::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn flush(&self) -> fleece_backup::Result<()> {
        self.inner.flush()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> fleece_backup::Result<()> {
        self.inner.read(offset, buf)
    }
    fn reconnect(&self) -> fleece_backup::Result<()> {
        let n = self.reconnects.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_reconnects {
            return Err(Error::new(ErrorKind::Connect, "connection refused"));
        }
        Ok(())
    }
}

#[test]
fn a_lost_target_is_reconnected_and_nothing_acknowledged_is_sent_twice() {
    let d = disk();
    for c in 0..64 {
        d.write(c, c as u8 + 1);
    }
    let snap = d.snapshot();
    let instant = d.read_all();
    let t = Arc::new(Flaky::new(&d.target_path(), 5, 6, 2));
    let o = CopyOptions {
        chunk: C,
        on_target_error: OnTargetError::Retry,
        retry_for: Duration::from_secs(60),
        ..opts()
    };
    run(&snap, t.clone(), o).unwrap();
    assert_eq!(file(&d.target_path()), instant);
    let acked = t.acked.lock().unwrap();
    assert_eq!(acked.len(), 64);
    assert!(
        acked.values().all(|&n| n == 1),
        "a cluster was sent twice: {acked:?}"
    );
    assert!(
        t.reconnects.load(Ordering::SeqCst) >= 3,
        "two failed reconnects, then one that worked"
    );
}

#[test]
fn retry_gives_up_after_retry_for_and_report_fails_at_once() {
    let d = disk();
    d.write(0, 1);
    let snap = d.snapshot();
    let t = Arc::new(Flaky::new(&d.target_path(), 0, usize::MAX / 2, usize::MAX));
    let o = CopyOptions {
        on_target_error: OnTargetError::Retry,
        retry_for: Duration::from_millis(300),
        ..opts()
    };
    let e = run(&snap, t, o).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Disconnected);
    assert!(
        e.to_string().contains("did not come back") || e.to_string().contains("gave up"),
        "{e}"
    );

    let t = Arc::new(Flaky::new(&d.dir.path().join("b2"), 0, 1, 0));
    let e = run(&snap, t.clone(), opts()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Disconnected);
    assert_eq!(t.reconnects.load(Ordering::SeqCst), 0);
}

#[test]
fn stop_pauses_the_job_until_it_is_resumed() {
    let d = disk();
    for c in 0..16 {
        d.write(c, 7);
    }
    let snap = d.snapshot();
    let instant = d.read_all();
    let t = Arc::new(Flaky::new(&d.target_path(), 3, 1, 0));
    let copy = DiskCopy::new(
        snap.clone(),
        t.clone(),
        CopyOptions {
            chunk: C,
            workers: 1,
            on_target_error: OnTargetError::Stop,
            ..opts()
        },
    )
    .unwrap();
    let ctl = Control::new(0);
    std::thread::scope(|s| {
        let h = s.spawn(|| copy.run(&ctl));
        // Wait for the pause the failure causes.
        while !ctl.status().paused {
            std::thread::yield_now();
        }
        let st = ctl.status();
        assert!(st.pause_reason.unwrap().contains("connection lost"));
        assert!(!h.is_finished());
        ctl.resume();
        h.join().unwrap().unwrap();
    });
    assert_eq!(file(&d.target_path()), instant);
}

#[test]
fn cancel_ends_the_copy_as_cancelled() {
    let d = disk();
    for c in 0..64 {
        d.write(c, 9);
    }
    let snap = d.snapshot();
    let target = Arc::new(FileTarget::open(&d.target_path(), SIZE).unwrap());
    let copy = DiskCopy::new(snap, target, opts()).unwrap();
    // A slow speed keeps it running until the cancel.
    let ctl = Control::new(C);
    std::thread::scope(|s| {
        let h = s.spawn(|| copy.run(&ctl));
        while copy.stats().done_bytes == 0 {
            std::thread::yield_now();
        }
        ctl.cancel();
        let e = h.join().unwrap().err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Cancelled);
    });
    assert!(copy.stats().done_bytes < SIZE);
}

/// A file target that flips a byte of one cluster.
struct Corrupting(FileTarget, u64);

impl Target for Corrupting {
    fn describe(&self) -> String {
        "corrupting".into()
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn cluster_size(&self) -> u64 {
        4096
    }
    fn known_zero(&self) -> bool {
        true
    }
    fn write(&self, offset: u64, data: &[u8]) -> fleece_backup::Result<()> {
        let mut v = data.to_vec();
        if (offset..offset + v.len() as u64).contains(&self.1) {
            v[(self.1 - offset) as usize] ^= 1;
        }
        self.0.write(offset, &v)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> fleece_backup::Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn flush(&self) -> fleece_backup::Result<()> {
        self.0.flush()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> fleece_backup::Result<()> {
        self.0.read(offset, buf)
    }
}

#[test]
fn verify_finds_a_corrupted_cluster_and_names_its_offset() {
    let d = disk();
    for c in 0..10 {
        d.write(c, 3);
    }
    let snap = d.snapshot();
    let bad = 7 * C + 100;
    let t = Arc::new(Corrupting(FileTarget::open(&d.target_path(), SIZE).unwrap(), bad));
    let e = run(
        &snap,
        t,
        CopyOptions {
            verify: true,
            ..opts()
        },
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Mismatch);
    assert!(e.to_string().contains(&format!("{}", 7 * C)), "{e}");
    assert!(e.to_string().contains("1 cluster"), "{e}");
    // A good target verifies.
    let good = Arc::new(FileTarget::open(&d.dir.path().join("good"), SIZE).unwrap());
    run(
        &snap,
        good,
        CopyOptions {
            verify: true,
            ..opts()
        },
    )
    .unwrap();
}

/// A RAM store that says its clusters are on disk.
struct OnDisk(RamStore);

impl Store for OnDisk {
    fn granularity(&self) -> u64 {
        self.0.granularity()
    }
    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> fleece_block::Result<()> {
        self.0.save(index, cluster, data)
    }
    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> fleece_block::Result<()> {
        self.0.load(index, cluster, offset, buf)
    }
    fn forget(&self, index: u64, cluster: u64) {
        self.0.forget(index, cluster)
    }
    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        ("file", None)
    }
    fn hints(&self) -> IoHints {
        IoHints { in_memory: false }
    }
}

fn order_of(d: &Disk, snap: &Arc<Snapshot>, order: Order, saved_after_plan: &[u64]) -> Vec<u64> {
    let t = Arc::new(Flaky::new(
        &d.dir.path().join(format!("o{order:?}{}", snap.size())),
        usize::MAX,
        0,
        0,
    ));
    let copy = DiskCopy::new(
        snap.clone(),
        t.clone(),
        CopyOptions {
            chunk: C,
            workers: 1,
            order,
            ..opts()
        },
    )
    .unwrap();
    for &c in saved_after_plan {
        d.write(c, 0x55);
    }
    copy.run(&Control::new(0)).unwrap();
    let v = t.order.lock().unwrap().clone();
    v
}

#[test]
fn saved_clusters_in_memory_go_first_on_disk_last_and_offset_order_is_ascending() {
    let d = disk();
    for c in 0..12 {
        d.write(c, 1);
    }
    // RAM store: the clusters live writes saved go first.
    let snap = d.snapshot();
    assert_eq!(
        order_of(&d, &snap, Order::Hinted, &[9, 4]),
        vec![9, 4, 0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    );
    d.live.detach(&snap);

    // A store on disk: unsaved clusters first (each spares a copy), saved last.
    let snap = d.snapshot_with(Box::new(OnDisk(d.ram_store())), None);
    assert_eq!(
        order_of(&d, &snap, Order::Hinted, &[9, 4]),
        vec![0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 4, 9]
    );
    d.live.detach(&snap);

    let snap = d.snapshot();
    assert_eq!(
        order_of(&d, &snap, Order::Offset, &[9, 4]),
        (0..12).collect::<Vec<_>>()
    );
}

#[test]
fn a_target_of_another_size_or_a_cluster_the_target_cannot_take_is_refused() {
    let d = disk();
    let snap = d.snapshot();
    let small = Arc::new(FileTarget::open(&d.dir.path().join("small"), SIZE / 2).unwrap());
    assert_eq!(
        DiskCopy::new(snap.clone(), small, opts()).err().unwrap().kind(),
        ErrorKind::Invalid
    );
    std::fs::write(d.dir.path().join("wrong"), [0u8; 4096]).unwrap();
    let e = FileTarget::open(&d.dir.path().join("wrong"), SIZE).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert!(e.to_string().contains("4096 bytes"), "{e}");
    let t = Arc::new(FileTarget::open(&d.target_path(), SIZE).unwrap());
    let e = DiskCopy::new(
        snap,
        t,
        CopyOptions {
            cluster: 4096,
            ..opts()
        },
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Invalid);
}

#[test]
fn kernel_copies_keep_clusters_that_start_with_zeroes_and_skip_written_zeroes() {
    let d = disk();
    for c in 0..8 {
        d.write(c, 0x40 + c as u8);
    }
    // Data after 4 KiB of zeroes, and a cluster of written zeroes (data to
    // SEEK_DATA, zeroes to a reader).
    d.live.write_at(&[0u8; 4096], 2 * C, IoFlags::NONE).unwrap();
    d.live
        .write_at(&vec![0u8; C as usize], 5 * C, IoFlags::NONE)
        .unwrap();
    let snap = d.snapshot();
    let instant = d.read_all();
    let target = Arc::new(FileTarget::open(&d.target_path(), SIZE).unwrap());
    run(
        &snap,
        target,
        CopyOptions {
            chunk: 8 * C,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(file(&d.target_path()), instant);
    let data: u64 = std::fs::metadata(d.target_path()).unwrap().blocks() * 512;
    assert!(
        data <= 7 * C,
        "{data} bytes allocated: the zero cluster was written"
    );
}
