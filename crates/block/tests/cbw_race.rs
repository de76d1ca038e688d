//! Deterministic reproductions of the copy-before-write races (seeds 000,
//! 001, 003) and of the engine's failure, discard, scope, instant and
//! multi-snapshot rules, driven through injected hooks.
//!
//! The live disk is a [`HookDev`] (a `RawFile` whose reads, writes and block
//! status can be trapped at a chosen offset until the test releases them),
//! and the store is a [`HookStore`] (a real store whose saves and loads can
//! be trapped, made to fail, and counted); both come from
//! `fleece_block::testing`. The cases (`cbw_race/cases.rs`) run twice: in
//! `ram` over a `RamStore` that spills into a file store, in `devices` over
//! a `DeviceStore` striped over devices that are not files (raw files seen
//! through `HookDev`, which lends no descriptor), so copies go through a
//! buffer as into any qcow2 or remote device; some cases also run over a
//! `FileStore`. The only use
//! of time is `recv_timeout(NOT_YET)` to assert that something is *still
//! blocked*; every positive wait is on an event, with a generous deadline so
//! a broken engine fails the test instead of hanging it.

use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use fleece_block::image;
use fleece_block::testing::{HookDev, HookStore};
use fleece_block::{
    BlockDev, Capabilities, DeviceStore, DirtyBitmap, ErrorKind, Extent, FileStore, Format, ImageOptions,
    IoFlags, LiveDisk, Mapping, OnCbwError, RamStore, RawFile, Result, Snapshot, SnapshotEvent,
    SnapshotOptions, SnapshotView, Store, Subscription, ZeroFlags,
};

/// Cluster size of every snapshot here.
const CL: u64 = 4096;
/// Clusters of the disk.
const NCL: u64 = 16;
const SIZE: u64 = CL * NCL;
/// Clusters `0..DATA_CLUSTERS` hold a pattern at start; the rest are holes.
const DATA_CLUSTERS: u64 = 12;
/// How long something must stay blocked to count as "blocked".
const NOT_YET: Duration = Duration::from_millis(200);
/// Deadline for anything that must happen; only reached if the engine is broken.
const LONG: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Fixture.
// ---------------------------------------------------------------------------

/// Byte of the initial image at `pos`: varies within and across clusters,
/// never zero in the data clusters.
fn pattern(pos: u64) -> u8 {
    if pos / CL >= DATA_CLUSTERS {
        0
    } else {
        ((pos / CL) * 37 + (pos % 251) + 1) as u8 | 1
    }
}

/// What the live disk is.
#[derive(Clone, Copy, Debug)]
enum DiskKind {
    /// A raw file.
    Raw,
    /// A qcow2 image with `CL`-byte clusters (imago through the image
    /// factory).
    Qcow2,
}

/// A fixture's disk and store.
#[derive(Clone, Copy, Debug)]
struct Kind {
    disk: DiskKind,
    store: StoreKind,
}

/// Which store `Fx::store` makes.
#[derive(Clone, Copy, Debug)]
enum StoreKind {
    /// A RAM store with a small budget, spilling into a file store.
    Ram,
    /// A device store over three devices that are not files.
    Devices,
}

struct Fx {
    kind: StoreKind,
    dir: tempfile::TempDir,
    dev: Arc<HookDev<Arc<dyn BlockDev>>>,
    live: Arc<LiveDisk>,
    img0: Vec<u8>,
    stores: Mutex<Vec<Arc<HookStore>>>,
    next: AtomicU64,
}

impl Fx {
    fn new(kind: Kind) -> Fx {
        Self::with_size(kind, SIZE)
    }

    fn with_size(kind: Kind, size: u64) -> Fx {
        // A qcow2 disk takes no-wait writes only in memory (cases write
        // inline to saved clusters).
        let dir = match kind.disk {
            DiskKind::Qcow2 if std::path::Path::new("/dev/shm").is_dir() => {
                tempfile::tempdir_in("/dev/shm").unwrap()
            }
            _ => tempfile::tempdir().unwrap(),
        };
        let file: Arc<dyn BlockDev> = match kind.disk {
            DiskKind::Raw => Arc::new(RawFile::create(&dir.path().join("live.raw"), size).unwrap()),
            DiskKind::Qcow2 => {
                let p = dir.path().join("live.qcow2");
                let create = image::CreateOptions {
                    format: Format::Qcow2,
                    size: Some(size),
                    cluster_size: Some(CL),
                    backing: None,
                };
                image::create(&p, &create).unwrap();
                image::open(&p, &ImageOptions::default())
                    .unwrap()
                    .device()
                    .clone()
            }
        };
        let kind = kind.store;
        let img0: Vec<u8> = (0..size).map(pattern).collect();
        let data_end = (DATA_CLUSTERS * CL).min(size);
        file.write_at(&img0[..data_end as usize], 0, IoFlags::NONE)
            .unwrap();
        let dev = Arc::new(HookDev::new(file));
        let base: Arc<dyn BlockDev> = dev.clone();
        Fx {
            kind,
            dir,
            dev,
            live: Arc::new(LiveDisk::new(base)),
            img0,
            stores: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        }
    }

    fn path(&self, what: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("{what}{n}"))
    }

    /// A hooked store of the fixture's kind. Both keep clusters at exactly
    /// `CL` (granularity 1, or the parts' 4 KiB blocks) and use their
    /// second tier: the RAM store has a budget of three clusters, the device
    /// store stripes by two clusters over three devices.
    fn store(&self) -> Arc<HookStore> {
        let size = self.dev.size();
        let inner: Box<dyn Store> = match self.kind {
            StoreKind::Ram => Box::new(RamStore::new(3 * CL, self.path("spill"), size)),
            StoreKind::Devices => {
                let parts = (0..3)
                    .map(|_| {
                        let f: Arc<dyn BlockDev> =
                            Arc::new(RawFile::create(&self.path("part"), size).unwrap());
                        Arc::new(HookDev::new(f)) as Arc<dyn BlockDev>
                    })
                    .collect();
                Box::new(DeviceStore::new(parts, 2 * CL).unwrap())
            }
        };
        let s = HookStore::new(inner);
        lock(&self.stores).push(s.clone());
        s
    }

    /// A hooked FileStore.
    fn file_store(&self) -> Arc<HookStore> {
        let fs = FileStore::create(&self.path("store"), self.dev.size()).unwrap();
        let s = HookStore::new(Box::new(fs));
        lock(&self.stores).push(s.clone());
        s
    }

    /// A snapshot taken the way the daemon does: frozen, attached, thawed.
    fn snapshot(&self, store: &Arc<HookStore>, opts: SnapshotOptions) -> Arc<Snapshot> {
        let guard = self.live.freeze();
        let snap = self.live.snapshot(store.boxed(), opts);
        drop(guard);
        assert_eq!(snap.cluster_size(), CL, "tests assume {CL}-byte clusters");
        snap
    }

    /// The live disk's bytes, read past every hook.
    fn live_bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.dev.inner.read_at(&mut b, offset, IoFlags::NONE).unwrap();
        b
    }

    fn live_image(&self) -> Vec<u8> {
        self.live_bytes(0, self.dev.size())
    }
}

impl Drop for Fx {
    /// Lets every held thread finish, even when an assertion failed.
    fn drop(&mut self) {
        self.dev.read.release();
        self.dev.write.release();
        self.dev.status.release();
        for s in lock(&self.stores).iter() {
            s.set_fail(None);
            s.save.release();
            s.load.release();
            s.forget.release();
        }
    }
}

fn opts() -> SnapshotOptions {
    SnapshotOptions {
        cluster_size: CL,
        ..SnapshotOptions::default()
    }
}

fn read(dev: &dyn BlockDev, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    dev.read_at(&mut b, offset, IoFlags::NONE)?;
    Ok(b)
}

fn r(offset: u64, len: u64) -> std::ops::Range<usize> {
    offset as usize..(offset + len) as usize
}

/// Asserts the view reads as `image` cluster by cluster and as a whole.
fn assert_view_exact(view: &dyn BlockDev, image: &[u8], what: &str) {
    let size = view.size();
    for c in 0..size.div_ceil(CL) {
        let len = CL.min(size - c * CL);
        let got = read(view, c * CL, len).unwrap_or_else(|e| panic!("{what}: cluster {c}: {e}"));
        assert!(
            got == image[r(c * CL, len)],
            "{what}: cluster {c} differs from the instant"
        );
    }
    let all = read(view, 0, size).unwrap_or_else(|e| panic!("{what}: whole read: {e}"));
    assert!(all == image, "{what}: whole read differs from the instant");
}

/// True if a no-wait request was declined (it would have had to wait).
fn would_block(res: Result<()>) -> bool {
    matches!(res, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

fn assert_kind<T: Debug>(res: Result<T>, kind: ErrorKind, what: &str) {
    match res {
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: wrong error: {e}"),
    }
}

/// Runs `f` on its own thread; the receiver gets its result.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Receiver<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Asserts that the operation behind `rx` is still blocked.
fn not_yet<T>(rx: &Receiver<T>, what: &str) {
    match rx.recv_timeout(NOT_YET) {
        Err(RecvTimeoutError::Timeout) => {}
        Ok(_) => panic!("{what} should still be blocked but completed"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: thread panicked"),
    }
}

/// Waits for the operation behind `rx` to complete.
fn done<T>(rx: &Receiver<T>, what: &str) -> T {
    rx.recv_timeout(LONG)
        .unwrap_or_else(|e| panic!("{what} did not complete: {e:?}"))
}

/// A short description of a read's result, for panics.
fn brief(res: &Result<Vec<u8>>) -> String {
    match res {
        Ok(b) => format!("Ok({} bytes, first {:?})", b.len(), &b[..b.len().min(8)]),
        Err(e) => format!("Err({:?}: {e})", e.kind()),
    }
}

fn spawn_read(view: &Arc<SnapshotView>, offset: u64, len: u64) -> Receiver<Result<Vec<u8>>> {
    let v = view.clone();
    spawn(move || read(&*v, offset, len))
}

fn spawn_write(live: &Arc<LiveDisk>, data: Vec<u8>, offset: u64) -> Receiver<Result<()>> {
    let l = live.clone();
    spawn(move || l.write_at(&data, offset, IoFlags::NONE))
}

/// Waits until `cond` holds; for state settled by a background copy thread.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + LONG;
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// The cases over a RAM store that spills into a file store.
mod ram {
    use super::*;
    const STORE: Kind = Kind {
        disk: DiskKind::Raw,
        store: StoreKind::Ram,
    };
    include!("cbw_race/cases.rs");
}

/// The cases over a device store on devices that are not files.
mod devices {
    use super::*;
    const STORE: Kind = Kind {
        disk: DiskKind::Raw,
        store: StoreKind::Devices,
    };
    include!("cbw_race/cases.rs");
}

/// The cases with a qcow2 image as the live disk, over a device store (so
/// every copy reads through the qcow2 device into a buffer).
mod qcow2 {
    use super::*;
    const STORE: Kind = Kind {
        disk: DiskKind::Qcow2,
        store: StoreKind::Devices,
    };
    include!("cbw_race/cases.rs");
}
