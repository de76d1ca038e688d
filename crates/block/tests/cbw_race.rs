//! Deterministic reproductions of the fleecing races (seeds 000, 001, 003),
//! with injected pauses instead of sleeps.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use fleece_block::*;

const CLUSTER: u64 = 4096;
const SIZE: u64 = 16 * CLUSTER;
/// Only used to assert that something is still blocked.
const STILL_BLOCKED: Duration = Duration::from_millis(200);

/// A pause point: the next matching call signals `entered` and waits for
/// `release`.
struct Pause {
    entered: Sender<()>,
    release: Mutex<Receiver<()>>,
}

fn pause() -> (Pause, Receiver<()>, Sender<()>) {
    let (etx, erx) = channel();
    let (rtx, rrx) = channel();
    (
        Pause {
            entered: etx,
            release: Mutex::new(rrx),
        },
        erx,
        rtx,
    )
}

impl Pause {
    fn hit(&self) {
        let _ = self.entered.send(());
        let _ = self.release.lock().unwrap().recv();
    }
}

/// An in-memory disk whose next read at a chosen offset can be paused.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    pause_read: Mutex<Option<(u64, Pause)>>,
}

impl MemDisk {
    fn new() -> Arc<Self> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; SIZE as usize]),
            pause_read: Mutex::new(None),
        })
    }
    fn pause_next_read_at(&self, offset: u64) -> (Receiver<()>, Sender<()>) {
        let (p, entered, release) = pause();
        *self.pause_read.lock().unwrap() = Some((offset, p));
        (entered, release)
    }
}

impl BlockDev for MemDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            trim: true,
            fast_zero: true,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(SIZE, offset, buf.len() as u64)?;
        let p = {
            let mut g = self.pause_read.lock().unwrap();
            match g.as_ref() {
                Some((o, _)) if *o == offset => g.take(),
                _ => None,
            }
        };
        if let Some((_, p)) = p {
            // Snapshot of the data at the moment the read "reached" the disk.
            let copy = self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()].to_vec();
            p.hit();
            buf.copy_from_slice(&copy);
            return Ok(());
        }
        buf.copy_from_slice(&self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        check_range(SIZE, offset, buf.len() as u64)?;
        self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, _f: ZeroFlags) -> Result<()> {
        self.write_at(&vec![0; length as usize], offset, false)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.write_zeroes(offset, length, ZeroFlags::default())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn cache(&self, _o: u64, _l: u64) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, _o: u64, length: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            length,
            mapping: Mapping::Data,
        }])
    }
}

/// A store in memory whose saves can be paused or made to fail, and counted.
#[derive(Default)]
struct TestStore {
    clusters: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    saves: Mutex<u64>,
    pause_save: Mutex<Option<Pause>>,
    fail: Mutex<bool>,
}

/// The store handed to a snapshot; the test keeps another handle.
struct Shared(Arc<TestStore>);

impl Store for Shared {
    fn granularity(&self) -> u64 {
        1
    }
    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()> {
        let p = self.0.pause_save.lock().unwrap().take();
        if let Some(p) = p {
            p.hit();
        }
        if *self.0.fail.lock().unwrap() {
            return Err(Error::new(ErrorKind::Io, "injected store I/O error"));
        }
        *self.0.saves.lock().unwrap() += 1;
        for (i, c) in data.chunks(cluster as usize).enumerate() {
            self.0
                .clusters
                .lock()
                .unwrap()
                .insert(index + i as u64, c.to_vec());
        }
        Ok(())
    }
    fn load(&self, index: u64, _cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let g = self.0.clusters.lock().unwrap();
        let c = g.get(&index).expect("load of a cluster never saved");
        buf.copy_from_slice(&c[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn forget(&self, index: u64, _cluster: u64) {
        self.0.clusters.lock().unwrap().remove(&index);
    }
    fn describe(&self) -> (&'static str, Option<std::path::PathBuf>) {
        ("test", None)
    }
}

struct Setup {
    disk: Arc<MemDisk>,
    live: Arc<LiveDisk>,
    snap: Arc<Snapshot>,
    store: Arc<TestStore>,
}

fn setup(opts: SnapshotOptions) -> Setup {
    let disk = MemDisk::new();
    let live = Arc::new(LiveDisk::new(disk.clone()));
    live.write_at(&[0xaa; SIZE as usize], 0, false).unwrap();
    let store = Arc::new(TestStore::default());
    let guard = live.freeze();
    let snap = live.snapshot(
        Box::new(Shared(store.clone())),
        SnapshotOptions {
            cluster_size: CLUSTER,
            ..opts
        },
    );
    drop(guard);
    Setup {
        disk,
        live,
        snap,
        store,
    }
}

fn read_view(snap: &Arc<Snapshot>, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0; len];
    SnapshotView(snap.clone()).read_at(&mut b, off)?;
    Ok(b)
}

#[test]
fn a_live_write_waits_for_a_view_read_in_flight_on_the_live_disk() {
    let s = setup(SnapshotOptions::default());
    let (entered, release) = s.disk.pause_next_read_at(2 * CLUSTER);
    // 1. The view read finds cluster 2 unsaved and goes to the live disk.
    let snap = s.snap.clone();
    let reader = thread::spawn(move || read_view(&snap, 2 * CLUSTER, CLUSTER as usize).unwrap());
    entered.recv().unwrap();
    // 2. A user write to cluster 2 arrives before that read completes.
    let live = s.live.clone();
    let (done_tx, done_rx) = channel();
    let writer = thread::spawn(move || {
        live.write_at(&[0xbb; CLUSTER as usize], 2 * CLUSTER, false)
            .unwrap();
        done_tx.send(()).unwrap();
    });
    // The write copies the old data but must not change the live disk yet.
    assert_eq!(
        done_rx.recv_timeout(STILL_BLOCKED),
        Err(RecvTimeoutError::Timeout),
        "write did not wait"
    );
    assert_eq!(s.disk.data.lock().unwrap()[2 * CLUSTER as usize], 0xaa);
    // 3. The read completes with the data of the instant.
    release.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), vec![0xaa; CLUSTER as usize]);
    done_rx.recv().unwrap();
    writer.join().unwrap();
    assert_eq!(
        read_view(&s.snap, 2 * CLUSTER, CLUSTER as usize).unwrap(),
        vec![0xaa; CLUSTER as usize]
    );
    let mut now = vec![0; CLUSTER as usize];
    s.live.read_at(&mut now, 2 * CLUSTER).unwrap();
    assert_eq!(now, vec![0xbb; CLUSTER as usize]);
}

#[test]
fn view_reads_never_wait_for_a_copy_in_flight() {
    let s = setup(SnapshotOptions::default());
    let (p, entered, release) = pause();
    *s.store.pause_save.lock().unwrap() = Some(p);
    let live = s.live.clone();
    let writer = thread::spawn(move || live.write_at(&[0xcc; 100], 5 * CLUSTER + 7, false).unwrap());
    entered.recv().unwrap(); // the copy of cluster 5 is in flight, paused in the store
                             // Same cluster: read from the live disk, which still has the old data.
    assert_eq!(
        read_view(&s.snap, 5 * CLUSTER, CLUSTER as usize).unwrap(),
        vec![0xaa; CLUSTER as usize]
    );
    // Another cluster, and block status, do not wait either.
    assert_eq!(
        read_view(&s.snap, 0, 4 * CLUSTER as usize).unwrap(),
        vec![0xaa; 4 * CLUSTER as usize]
    );
    assert!(!SnapshotView(s.snap.clone())
        .block_status(0, SIZE)
        .unwrap()
        .is_empty());
    release.send(()).unwrap();
    writer.join().unwrap();
    assert_eq!(
        read_view(&s.snap, 5 * CLUSTER, CLUSTER as usize).unwrap(),
        vec![0xaa; CLUSTER as usize]
    );
}

#[test]
fn later_writes_to_a_saved_cluster_copy_nothing() {
    let s = setup(SnapshotOptions::default());
    for i in 0..10u8 {
        s.live
            .write_at(&[i; 512], 3 * CLUSTER + 512 * (i as u64 % 8), false)
            .unwrap();
    }
    assert_eq!(*s.store.saves.lock().unwrap(), 1);
    // One write over three clusters copies them in one store write.
    s.live
        .write_at(&[1; 3 * CLUSTER as usize], 8 * CLUSTER, false)
        .unwrap();
    assert_eq!(*s.store.saves.lock().unwrap(), 2);
    assert_eq!(s.snap.stats().copied_clusters, 4);
}

#[test]
fn a_failed_copy_fails_the_user_write_under_break_guest_write() {
    let s = setup(SnapshotOptions::default());
    *s.store.fail.lock().unwrap() = true;
    let err = s.live.write_at(&[0xdd; 10], 0, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert_eq!(
        s.disk.data.lock().unwrap()[0],
        0xaa,
        "live disk changed despite the failed copy"
    );
    assert!(!s.snap.is_broken());
    assert_eq!(read_view(&s.snap, 0, 10).unwrap(), vec![0xaa; 10]);
    // Once the store works again, the write goes through and the view stays exact.
    *s.store.fail.lock().unwrap() = false;
    s.live.write_at(&[0xdd; 10], 0, false).unwrap();
    assert_eq!(read_view(&s.snap, 0, 10).unwrap(), vec![0xaa; 10]);
}

#[test]
fn a_failed_copy_breaks_the_snapshot_under_break_snapshot() {
    let s = setup(SnapshotOptions {
        on_cbw_error: OnCbwError::BreakSnapshot,
        ..Default::default()
    });
    *s.store.fail.lock().unwrap() = true;
    s.live.write_at(&[0xdd; 10], 0, false).unwrap();
    assert!(s.snap.is_broken());
    assert_eq!(
        read_view(&s.snap, CLUSTER, 10).unwrap_err().kind(),
        ErrorKind::Broken
    );
    assert_eq!(
        SnapshotView(s.snap.clone())
            .block_status(0, SIZE)
            .unwrap_err()
            .kind(),
        ErrorKind::Broken
    );
    // No more copies are attempted.
    *s.store.fail.lock().unwrap() = false;
    s.live.write_at(&[0xdd; 10], 4 * CLUSTER, false).unwrap();
    assert_eq!(*s.store.saves.lock().unwrap(), 0);
    assert!(s
        .snap
        .stats()
        .broken
        .unwrap()
        .contains("injected store I/O error"));
}

#[test]
fn store_limit_is_a_copy_failure_under_either_policy() {
    let s = setup(SnapshotOptions {
        store_limit: Some(2 * CLUSTER),
        ..Default::default()
    });
    s.live.write_at(&[1; 2 * CLUSTER as usize], 0, false).unwrap();
    let err = s.live.write_at(&[1; 1], 2 * CLUSTER, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StoreFull);
    assert_eq!(s.snap.stats().used_bytes, 2 * CLUSTER);
    let s = setup(SnapshotOptions {
        store_limit: Some(2 * CLUSTER),
        on_cbw_error: OnCbwError::BreakSnapshot,
        ..Default::default()
    });
    s.live.write_at(&[1; 3 * CLUSTER as usize], 0, false).unwrap();
    assert!(s.snap.is_broken());
}

#[test]
fn a_copy_slower_than_the_timeout_counts_as_failed() {
    for policy in [OnCbwError::BreakGuestWrite, OnCbwError::BreakSnapshot] {
        let s = setup(SnapshotOptions {
            cbw_timeout: Some(Duration::from_millis(100)),
            on_cbw_error: policy,
            ..Default::default()
        });
        let (p, entered, release) = pause();
        *s.store.pause_save.lock().unwrap() = Some(p);
        let res = s.live.write_at(&[0xee; 10], 0, false);
        entered.recv().unwrap();
        match policy {
            OnCbwError::BreakGuestWrite => {
                assert_eq!(res.unwrap_err().kind(), ErrorKind::TimedOut);
                assert_eq!(s.disk.data.lock().unwrap()[0], 0xaa);
            }
            OnCbwError::BreakSnapshot => {
                res.unwrap();
                assert!(s.snap.is_broken());
                assert_eq!(s.disk.data.lock().unwrap()[0], 0xee);
            }
        }
        release.send(()).unwrap();
    }
}

#[test]
fn discard_frees_the_copy_stops_future_copies_and_fails_reads() {
    let s = setup(SnapshotOptions::default());
    s.live.write_at(&[1; 2 * CLUSTER as usize], 0, false).unwrap();
    assert_eq!(s.snap.stats().used_bytes, 2 * CLUSTER);
    // Inward alignment: only cluster 0 is wholly inside.
    SnapshotView(s.snap.clone()).trim(0, CLUSTER + 100).unwrap();
    assert_eq!(s.snap.stats().used_bytes, CLUSTER);
    assert_eq!(
        read_view(&s.snap, 10, 10).unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(read_view(&s.snap, CLUSTER, 10).unwrap(), vec![0xaa; 10]);
    SnapshotView(s.snap.clone()).trim(6 * CLUSTER, CLUSTER).unwrap();
    let saves = *s.store.saves.lock().unwrap();
    s.live.write_at(&[2; 10], 6 * CLUSTER, false).unwrap();
    assert_eq!(
        *s.store.saves.lock().unwrap(),
        saves,
        "a discarded cluster was copied"
    );
}

#[test]
fn read_once_discards_the_whole_clusters_a_read_returned() {
    let s = setup(SnapshotOptions {
        read_once: true,
        ..Default::default()
    });
    s.live.write_at(&[1; CLUSTER as usize], 0, false).unwrap();
    assert_eq!(
        read_view(&s.snap, 0, 2 * CLUSTER as usize + 10).unwrap(),
        vec![0xaa; 2 * CLUSTER as usize + 10]
    );
    assert_eq!(s.snap.stats().used_bytes, 0);
    assert_eq!(
        read_view(&s.snap, CLUSTER, 1).unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
    // Cluster 2 was only partly read: still there.
    assert_eq!(read_view(&s.snap, 2 * CLUSTER + 100, 1).unwrap(), vec![0xaa]);
}

#[test]
fn a_bitmap_scope_limits_copies_and_reads() {
    let scope = DirtyBitmap::new(SIZE, 512);
    scope.set(3 * CLUSTER + 5, 1);
    let s = setup(SnapshotOptions {
        scope: Some(scope),
        ..Default::default()
    });
    s.live.write_at(&[3; SIZE as usize], 0, false).unwrap();
    assert_eq!(s.snap.stats().copied_clusters, 1);
    assert_eq!(
        read_view(&s.snap, 3 * CLUSTER, CLUSTER as usize).unwrap(),
        vec![0xaa; CLUSTER as usize]
    );
    assert_eq!(
        read_view(&s.snap, 0, 1).unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
}

#[test]
fn freeze_waits_for_a_write_in_flight_so_it_lands_wholly_before_the_instant() {
    let disk = MemDisk::new();
    let live = Arc::new(LiveDisk::new(disk.clone()));
    let store = Arc::new(TestStore::default());
    // A snapshot whose copy of cluster 0 pauses: the write is in flight.
    let guard = live.freeze();
    let first = live.snapshot(
        Box::new(Shared(store.clone())),
        SnapshotOptions {
            cluster_size: CLUSTER,
            ..Default::default()
        },
    );
    drop(guard);
    let (p, entered, release) = pause();
    *store.pause_save.lock().unwrap() = Some(p);
    let l2 = live.clone();
    let writer = thread::spawn(move || l2.write_at(&[0x77; 2 * CLUSTER as usize], 0, false).unwrap());
    entered.recv().unwrap();
    let (tx, rx) = channel();
    let l3 = live.clone();
    let taker = thread::spawn(move || {
        let g = l3.freeze();
        let s = l3.snapshot(
            Box::new(Shared(Arc::new(TestStore::default()))),
            SnapshotOptions {
                cluster_size: CLUSTER,
                ..Default::default()
            },
        );
        drop(g);
        tx.send(s).unwrap();
    });
    assert!(
        rx.recv_timeout(STILL_BLOCKED).is_err(),
        "the instant was taken during a write"
    );
    release.send(()).unwrap();
    writer.join().unwrap();
    let second = rx.recv().unwrap();
    taker.join().unwrap();
    // The write is wholly after the first instant and wholly before the second.
    assert_eq!(
        read_view(&first, 0, 2 * CLUSTER as usize).unwrap(),
        vec![0; 2 * CLUSTER as usize]
    );
    assert_eq!(
        read_view(&second, 0, 2 * CLUSTER as usize).unwrap(),
        vec![0x77; 2 * CLUSTER as usize]
    );
}

#[test]
fn several_snapshots_stay_exact_and_detaching_one_leaves_the_others() {
    let disk = MemDisk::new();
    let live = Arc::new(LiveDisk::new(disk.clone()));
    let take = |live: &Arc<LiveDisk>| {
        let g = live.freeze();
        let s = live.snapshot(
            Box::new(Shared(Arc::new(TestStore::default()))),
            SnapshotOptions {
                cluster_size: CLUSTER,
                ..Default::default()
            },
        );
        drop(g);
        s
    };
    live.write_at(&[1; SIZE as usize], 0, false).unwrap();
    let a = take(&live);
    live.write_at(&[2; 2 * CLUSTER as usize], CLUSTER, false).unwrap();
    let b = take(&live);
    live.write_at(&[3; SIZE as usize], 0, false).unwrap();
    live.detach(&a);
    live.write_at(&[4; SIZE as usize], 0, false).unwrap();
    let mut want_b = vec![1; SIZE as usize];
    want_b[CLUSTER as usize..3 * CLUSTER as usize].fill(2);
    assert_eq!(read_view(&b, 0, SIZE as usize).unwrap(), want_b);
    assert_eq!(live.snapshot_count(), 1);
}
