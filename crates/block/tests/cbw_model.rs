//! Model-based tests of copy-before-write.
//!
//! Random sequences of live writes, write-zeroes and trims, view reads,
//! discards and block status, and snapshots taken (up to three at once, with
//! different stores, cluster sizes, scopes and read-once) and deleted, are run
//! against a `LiveDisk` over a real sparse `RawFile` and checked after every
//! step against a shadow model: the live bytes, and per snapshot the bytes at
//! its instant plus the clusters it may no longer serve (discarded, or outside
//! its scope). A concurrent variant checks that view reads racing with live
//! writes always return the image at the instant. Stores are RAM (with and
//! without spilling), file stores, and device stores over devices that are
//! not files.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use fleece_block::image::{self, CreateOptions};
use fleece_block::testing::HookDev;
use fleece_block::{
    BlockDev, DeviceStore, DirtyBitmap, ErrorKind, FileStore, Format, ImageOptions, IoFlags, LiveDisk,
    Mapping, RamStore, RawFile, Snapshot, SnapshotOptions, SnapshotView, Store, ZeroFlags,
};
use proptest::prelude::*;

/// Smallest cluster size used; scope bitmaps have this granularity.
const CL: u64 = 4096;
/// 16 clusters of 4 KiB, the last one partial (2 KiB), so the tail rules
/// (discard reaching the end, short last copy) are exercised.
const SIZE: u64 = 15 * CL + 2048;
const GRANULES: u64 = SIZE.div_ceil(CL);
const MAX_SNAPS: usize = 3;
/// Cluster size of the qcow2 live disks: the smallest, so that requests
/// cross many qcow2 clusters and end inside them.
const QCL: u64 = 512;

/// The live disk: a raw file, or with `qcow2` a qcow2 image of `QCL`-byte
/// clusters (through the image factory).
fn live_disk(dir: &Path, size: u64, qcow2: bool) -> Arc<dyn BlockDev> {
    if !qcow2 {
        return Arc::new(RawFile::create(&dir.join("disk.raw"), size).unwrap());
    }
    let p = dir.join("disk.qcow2");
    let opts = CreateOptions {
        format: Format::Qcow2,
        size: Some(size),
        cluster_size: Some(QCL),
        backing: None,
    };
    image::create(&p, &opts).unwrap();
    image::open(&p, &ImageOptions::default())
        .unwrap()
        .device()
        .clone()
}

/// What reads as zeroes after a trim of `[off, off+len)`: all of it on a
/// raw file; on qcow2 only its whole clusters (and the partial last one
/// when the range reaches the end), as in QEMU.
fn trimmed(off: u64, len: u64, size: u64, qcow2: bool) -> std::ops::Range<usize> {
    if !qcow2 {
        return off as usize..(off + len) as usize;
    }
    let end = off + len;
    let lo = off.next_multiple_of(QCL);
    let hi = if end == size { end } else { end / QCL * QCL };
    lo as usize..hi.max(lo) as usize
}

#[derive(Clone, Copy, Debug)]
enum StoreKind {
    /// Memory only.
    Ram,
    /// Memory for two clusters, then the spill file.
    RamSpill,
    File,
    /// A device store over three devices that are not files, so copies go
    /// through a buffer.
    Devices,
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        byte: u8,
    },
    Zeroes {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Read {
        snap: usize,
        off: u64,
        len: u64,
    },
    Discard {
        snap: usize,
        off: u64,
        len: u64,
    },
    Status {
        snap: usize,
        off: u64,
        len: u64,
    },
    Take {
        store: StoreKind,
        clusters: u64,
        read_once: bool,
        scope: Option<u16>,
    },
    Delete {
        snap: usize,
    },
}

/// A range inside the disk, often cluster-aligned, sometimes empty, up to
/// about three clusters long.
fn range() -> impl Strategy<Value = (u64, u64)> {
    let off = prop_oneof![
        2 => (0..=GRANULES).prop_map(|c| (c * CL).min(SIZE)),
        3 => 0..=SIZE,
    ];
    off.prop_flat_map(|off| {
        let max = (SIZE - off).min(3 * CL + 100);
        let len = prop_oneof![
            1 => Just(0u64),
            2 => (0..=max / CL).prop_map(move |n| (n * CL).min(max)),
            5 => 0..=max,
            1 => Just(SIZE - off),
        ];
        (Just(off), len)
    })
}

fn op() -> impl Strategy<Value = Op> {
    let snap = 0..MAX_SNAPS;
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        2 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zeroes { off, len, unmap }),
        2 => range().prop_map(|(off, len)| Op::Trim { off, len }),
        4 => (snap.clone(), range()).prop_map(|(snap, (off, len))| Op::Read { snap, off, len }),
        2 => (snap.clone(), range()).prop_map(|(snap, (off, len))| Op::Discard { snap, off, len }),
        2 => (snap.clone(), range()).prop_map(|(snap, (off, len))| Op::Status { snap, off, len }),
        2 => take(),
        1 => snap.prop_map(|snap| Op::Delete { snap }),
    ]
}

fn take() -> impl Strategy<Value = Op> {
    (
        prop_oneof![
            Just(StoreKind::Ram),
            Just(StoreKind::RamSpill),
            Just(StoreKind::File),
            Just(StoreKind::Devices)
        ],
        1..=2u64,
        prop::bool::weighted(0.2),
        prop::option::weighted(0.25, any::<u16>()),
    )
        .prop_map(|(store, clusters, read_once, scope)| Op::Take {
            store,
            clusters,
            read_once,
            scope,
        })
}

/// What a snapshot must read as.
struct Shadow {
    snap: Arc<Snapshot>,
    view: SnapshotView,
    /// The disk at the instant.
    bytes: Vec<u8>,
    cluster: u64,
    discarded: BTreeSet<u64>,
    /// One bit per 4 KiB granule, or everything.
    scope: Option<u16>,
    read_once: bool,
}

impl Shadow {
    fn clusters(&self) -> u64 {
        SIZE.div_ceil(self.cluster)
    }

    fn span(&self, c: u64) -> (u64, u64) {
        (c * self.cluster, ((c + 1) * self.cluster).min(SIZE))
    }

    /// May the view still serve cluster `c`?
    fn readable(&self, c: u64) -> bool {
        if self.discarded.contains(&c) {
            return false;
        }
        match self.scope {
            None => true,
            Some(bits) => {
                let (lo, hi) = self.span(c);
                (lo / CL..hi.div_ceil(CL)).any(|g| bits & (1 << g) != 0)
            }
        }
    }

    /// Clusters touched by a non-empty range.
    fn touched(&self, off: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        off / self.cluster..=(off + len - 1) / self.cluster
    }

    /// Marks the clusters lying wholly inside the range (the short last
    /// cluster counts when all of it is inside).
    fn discard(&mut self, off: u64, len: u64) {
        let end = off + len;
        for c in 0..self.clusters() {
            let (lo, hi) = self.span(c);
            if off <= lo && hi <= end {
                self.discarded.insert(c);
            }
        }
    }
}

struct Model {
    qcow2: bool,
    dir: tempfile::TempDir,
    live: LiveDisk,
    shadow: Vec<u8>,
    snaps: Vec<Shadow>,
    made: u32,
}

fn new_store(dir: &Path, kind: StoreKind, n: u32) -> Box<dyn Store> {
    match kind {
        StoreKind::Ram => Box::new(RamStore::new(1 << 30, dir.join(format!("spill{n}")), SIZE)),
        StoreKind::RamSpill => Box::new(RamStore::new(2 * CL, dir.join(format!("spill{n}")), SIZE)),
        // 8 KiB stripes: two clusters a file, so copies and reads cross
        // from one part of the store to the next.
        StoreKind::File => {
            Box::new(FileStore::create_striped(&dir.join(format!("store{n}")), SIZE, 2 * CL).unwrap())
        }
        StoreKind::Devices => Box::new(device_store(dir, n, SIZE, 2 * CL)),
    }
}

/// A store striped by `stripe` over three raw files seen through
/// `HookDev` (traps disarmed), which lends no descriptor: the store of a
/// device that is not a file.
fn device_store(dir: &Path, n: u32, size: u64, stripe: u64) -> DeviceStore {
    let parts = (0..3)
        .map(|i| {
            let f: Arc<dyn BlockDev> =
                Arc::new(RawFile::create(&dir.join(format!("dev{n}.{i}")), size).unwrap());
            Arc::new(HookDev::new(f)) as Arc<dyn BlockDev>
        })
        .collect();
    DeviceStore::new(parts, stripe).unwrap()
}

impl Model {
    /// A disk whose clusters are holes (`None`) or data: a per-cluster
    /// pattern that varies within the cluster.
    fn new(initial: &[Option<u8>]) -> Model {
        Model::on(initial, false)
    }

    /// [`new`](Self::new) on a raw file, or a qcow2 image with `qcow2`.
    fn on(initial: &[Option<u8>], qcow2: bool) -> Model {
        let dir = tempfile::tempdir().unwrap();
        let file = live_disk(dir.path(), SIZE, qcow2);
        let mut shadow = vec![0u8; SIZE as usize];
        for (c, fill) in initial.iter().enumerate() {
            let Some(b) = fill else { continue };
            let lo = c as u64 * CL;
            if lo >= SIZE {
                break;
            }
            let hi = (lo + CL).min(SIZE);
            for p in lo..hi {
                shadow[p as usize] = b.wrapping_add((p % 61) as u8) | 1;
            }
            file.write_at(&shadow[lo as usize..hi as usize], lo, IoFlags::NONE)
                .unwrap();
        }
        Model {
            qcow2,
            dir,
            live: LiveDisk::new(file),
            shadow,
            snaps: Vec::new(),
            made: 0,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, byte } => {
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add((i % 7) as u8)).collect();
                self.live.write_at(&data, off, IoFlags::NONE).unwrap();
                self.shadow[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zeroes { off, len, unmap } => {
                let flags = ZeroFlags {
                    may_unmap: unmap,
                    ..ZeroFlags::default()
                };
                self.live.write_zeroes(off, len, flags).unwrap();
                self.shadow[off as usize..(off + len) as usize].fill(0);
            }
            Op::Trim { off, len } => {
                // Raw files read trimmed ranges as zeroes, qcow2 images
                // their whole clusters.
                self.live.trim(off, len).unwrap();
                self.shadow[trimmed(off, len, SIZE, self.qcow2)].fill(0);
            }
            Op::Read { snap, off, len } => {
                if let Some(s) = self.snaps.get_mut(snap) {
                    check_read(s, off, len);
                }
            }
            Op::Discard { snap, off, len } => {
                if let Some(s) = self.snaps.get_mut(snap) {
                    s.view.trim(off, len).unwrap();
                    s.discard(off, len);
                }
            }
            Op::Status { snap, off, len } => {
                if let Some(s) = self.snaps.get(snap) {
                    check_status(s, off, len);
                }
            }
            Op::Take {
                store,
                clusters,
                read_once,
                scope,
            } => {
                if self.snaps.len() >= MAX_SNAPS {
                    return;
                }
                self.made += 1;
                let store = new_store(self.dir.path(), store, self.made);
                let bitmap = scope.map(|bits| {
                    let b = DirtyBitmap::new(SIZE, CL);
                    for g in 0..GRANULES {
                        if bits & (1 << g) != 0 {
                            b.set(g * CL, 1);
                        }
                    }
                    b
                });
                let opts = SnapshotOptions {
                    cluster_size: clusters * CL,
                    read_once,
                    scope: bitmap,
                    ..SnapshotOptions::default()
                };
                let guard = self.live.freeze();
                let snap = self.live.snapshot(store, opts);
                drop(guard);
                let cluster = snap.cluster_size();
                assert_eq!(cluster % CL, 0, "unexpected cluster size {cluster}");
                self.snaps.push(Shadow {
                    view: SnapshotView(snap.clone()),
                    snap,
                    bytes: self.shadow.clone(),
                    cluster,
                    discarded: BTreeSet::new(),
                    scope,
                    read_once,
                });
            }
            Op::Delete { snap } => {
                if snap < self.snaps.len() {
                    let s = self.snaps.remove(snap);
                    self.live.detach(&s.snap);
                }
            }
        }
    }

    /// Everything the model knows, checked without changing any state
    /// (reads are split so that none covers a whole cluster, which keeps
    /// read-once snapshots intact).
    fn check(&self, step: usize) {
        let mut now = vec![0u8; SIZE as usize];
        self.live.read_at(&mut now, 0, IoFlags::NONE).unwrap();
        if now != self.shadow {
            let first = now.iter().zip(&self.shadow).position(|(a, b)| a != b).unwrap();
            panic!("step {step}: live disk differs from the model first at byte {first}");
        }
        for (i, s) in self.snaps.iter().enumerate() {
            assert!(!s.snap.is_broken(), "step {step}: snapshot {i} broke");
            for c in 0..s.clusters() {
                let (lo, hi) = s.span(c);
                let mid = lo + (hi - lo) / 2;
                for (a, b) in [(lo, mid), (mid, hi)] {
                    let mut buf = vec![0u8; (b - a) as usize];
                    let res = s.view.read_at(&mut buf, a, IoFlags::NONE);
                    if s.readable(c) {
                        if let Err(e) = res {
                            panic!("step {step}: snapshot {i} cluster {c} ({a}..{b}): {e}");
                        }
                        assert!(
                            buf == s.bytes[a as usize..b as usize],
                            "step {step}: snapshot {i} cluster {c} ({a}..{b}) differs from the instant"
                        );
                    } else {
                        match res {
                            Err(e) => assert_eq!(e.kind(), ErrorKind::AccessDenied, "step {step}: {e}"),
                            Ok(()) => panic!("step {step}: snapshot {i} served dropped cluster {c}"),
                        }
                    }
                }
            }
            check_status(s, 0, SIZE);
        }
    }
}

/// A view read of `[off, off+len)`: exact, or AccessDenied when it touches
/// a cluster the view no longer serves; read-once then drops what it read.
fn check_read(s: &mut Shadow, off: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    let res = s.view.read_at(&mut buf, off, IoFlags::NONE);
    if len == 0 {
        res.unwrap();
        return;
    }
    if s.touched(off, len).all(|c| s.readable(c)) {
        if let Err(e) = res {
            panic!("view read {off}+{len}: {e}");
        }
        assert!(
            buf == s.bytes[off as usize..(off + len) as usize],
            "view read {off}+{len} differs from the instant"
        );
        if s.read_once {
            s.discard(off, len);
        }
    } else {
        match res {
            Err(e) => assert_eq!(e.kind(), ErrorKind::AccessDenied, "view read {off}+{len}: {e}"),
            Ok(()) => panic!("view read {off}+{len} served a dropped cluster"),
        }
    }
}

/// Block status of the view over `[off, off+len)`, asked again from where
/// each answer ends: no answer is empty or too long, and nothing that held
/// data at the instant is called a hole or zeroes.
fn check_status(s: &Shadow, off: u64, len: u64) {
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let ext = s
            .view
            .block_status(pos, end - pos)
            .unwrap_or_else(|e| panic!("block status {pos}+{}: {e}", end - pos));
        let total: u64 = ext.iter().map(|e| e.length).sum();
        assert!(
            total > 0 && total <= end - pos,
            "block status {pos}+{} covered {total}",
            end - pos
        );
        for e in ext {
            assert!(e.length > 0, "empty extent");
            // Unavailable exactly where the view may no longer serve.
            let (first, last) = (pos / s.cluster, (pos + e.length - 1) / s.cluster);
            for c in first..=last {
                assert_eq!(
                    e.mapping == Mapping::Unavailable,
                    !s.readable(c),
                    "view block status says {:?} for {pos}+{}, which holds cluster {c}",
                    e.mapping,
                    e.length
                );
            }
            if matches!(e.mapping, Mapping::Hole | Mapping::Zero) {
                let bytes = &s.bytes[pos as usize..(pos + e.length) as usize];
                if let Some(i) = bytes.iter().position(|&b| b != 0) {
                    panic!(
                        "view block status says {:?} for {pos}+{} but byte {} held {:#x} at the instant",
                        e.mapping,
                        e.length,
                        pos + i as u64,
                        bytes[i]
                    );
                }
            }
            pos += e.length;
        }
    }
}

fn run(initial: &[Option<u8>], first: &Op, ops: &[Op]) {
    run_on(initial, first, ops, false)
}

fn run_on(initial: &[Option<u8>], first: &Op, ops: &[Op], qcow2: bool) {
    let mut m = Model::on(initial, qcow2);
    // Every sequence starts with a snapshot, so copy-before-write is always on.
    m.apply(first);
    m.check(0);
    for (i, op) in ops.iter().enumerate() {
        m.apply(op);
        m.check(i + 1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn views_match_the_model_under_any_sequence(
        initial in prop::collection::vec(prop::option::weighted(0.7, any::<u8>()), GRANULES as usize),
        first in take(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(&initial, &first, &ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The same over a qcow2 live disk.
    #[test]
    fn views_of_a_qcow2_disk_match_the_model_under_any_sequence(
        initial in prop::collection::vec(prop::option::weighted(0.7, any::<u8>()), GRANULES as usize),
        first in take(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_on(&initial, &first, &ops, true);
    }
}

/// A case found by an earlier model of these tests (see
/// cbw_model.proptest-regressions), kept as a plain test: a one-byte
/// write-zeroes with unmap into cluster 3, then a view read of clusters 4-5.
#[test]
fn regression_one_byte_unmap_then_read_of_the_next_clusters() {
    let mut m = Model::new(&[]);
    m.apply(&Op::Write {
        off: 0,
        len: 16 * CL - 2048,
        byte: 0x5a,
    });
    m.apply(&Op::Take {
        store: StoreKind::File,
        clusters: 1,
        read_once: false,
        scope: None,
    });
    m.apply(&Op::Zeroes {
        off: 13375,
        len: 1,
        unmap: true,
    });
    m.apply(&Op::Read {
        snap: 0,
        off: 17836,
        len: 4424,
    });
    m.check(4);
}

/// Every op kind once, on every store kind, with two cluster sizes, a scope
/// and read-once: a fixed smoke run of the model.
#[test]
fn model_smoke_with_every_option() {
    for (store, clusters, read_once, scope) in [
        (StoreKind::Ram, 1, false, None),
        (StoreKind::RamSpill, 2, false, Some(0b1010_0000_1111_0110u16)),
        (StoreKind::File, 1, true, None),
        (StoreKind::File, 2, true, Some(0xff0f)),
        (StoreKind::Devices, 1, false, Some(0x0ff0)),
        (StoreKind::Devices, 2, true, None),
    ] {
        let first = Op::Take {
            store,
            clusters,
            read_once,
            scope,
        };
        let ops = [
            Op::Write {
                off: 100,
                len: 3 * CL,
                byte: 1,
            },
            Op::Read {
                snap: 0,
                off: 0,
                len: 2 * CL,
            },
            Op::Zeroes {
                off: 5 * CL - 10,
                len: 20,
                unmap: true,
            },
            Op::Trim {
                off: 8 * CL,
                len: 2 * CL,
            },
            Op::Status {
                snap: 0,
                off: 0,
                len: SIZE,
            },
            Op::Discard {
                snap: 0,
                off: 6 * CL,
                len: 2 * CL,
            },
            Op::Take {
                store: StoreKind::Ram,
                clusters: 1,
                read_once: false,
                scope: None,
            },
            Op::Write {
                off: 0,
                len: SIZE,
                byte: 9,
            },
            Op::Read {
                snap: 1,
                off: CL - 1,
                len: 2 * CL,
            },
            Op::Discard {
                snap: 1,
                off: 15 * CL,
                len: 2048,
            },
            Op::Write {
                off: SIZE - 100,
                len: 100,
                byte: 3,
            },
            Op::Delete { snap: 0 },
            Op::Write {
                off: 0,
                len: SIZE,
                byte: 4,
            },
            Op::Read {
                snap: 0,
                off: 0,
                len: SIZE - 2048,
            },
        ];
        for qcow2 in [false, true] {
            run_on(&[Some(7); GRANULES as usize], &first, &ops, qcow2);
        }
    }
}

// ---------------------------------------------------------------------------
// Concurrent variant.
// ---------------------------------------------------------------------------

/// xorshift64*: a fixed-seed generator, so each thread's operations are the
/// same on every run (only their interleaving varies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writers own disjoint regions of the disk (so the final live disk is
/// known) but write, zero and trim across cluster boundaries inside them;
/// readers read and ask block status of random ranges of the first
/// snapshot and, once it exists, of a second one taken mid-run. Every view
/// read must equal the image at its instant, and block status may not call
/// data a hole.
fn concurrent_run(store_kind: StoreKind, cluster: u64, seed: u64) {
    concurrent_run_on(store_kind, cluster, seed, false)
}

/// [`concurrent_run`] on a raw file, or a qcow2 image with `qcow2`.
fn concurrent_run_on(store_kind: StoreKind, cluster: u64, seed: u64, qcow2: bool) {
    const NCL: u64 = 64;
    const DISK: u64 = NCL * CL;
    const WRITERS: u64 = 3;
    const REGION: u64 = DISK / WRITERS / CL * CL;
    const READERS: u64 = 3;
    const ITERS: u64 = 300;

    let dir = tempfile::tempdir().unwrap();
    let file = live_disk(dir.path(), DISK, qcow2);
    let img0: Vec<u8> = (0..DISK)
        .map(|p| {
            if (p / CL) % 5 == 4 {
                0
            } else {
                ((p / CL) * 13 + p % 251) as u8 | 1
            }
        })
        .collect();
    file.write_at(&img0, 0, IoFlags::NONE).unwrap();
    // Clusters 4, 9, 14, ... are holes at the instant.
    for c in (4..NCL).step_by(5) {
        file.trim(c * CL, CL).unwrap();
    }
    let live = Arc::new(LiveDisk::new(file));
    let mk = |n: u32| -> Box<dyn Store> {
        match store_kind {
            StoreKind::File => Box::new(
                FileStore::create_striped(&dir.path().join(format!("store{n}")), DISK, 4 * CL).unwrap(),
            ),
            StoreKind::Ram => Box::new(RamStore::new(1 << 30, dir.path().join(format!("spill{n}")), DISK)),
            StoreKind::RamSpill => {
                Box::new(RamStore::new(8 * CL, dir.path().join(format!("spill{n}")), DISK))
            }
            StoreKind::Devices => Box::new(device_store(dir.path(), n, DISK, 4 * CL)),
        }
    };
    let opts = SnapshotOptions {
        cluster_size: cluster,
        ..SnapshotOptions::default()
    };
    let snap1 = {
        let g = live.freeze();
        let s = live.snapshot(mk(1), opts.clone());
        drop(g);
        s
    };
    let second: Mutex<Option<Second>> = Mutex::new(None);
    let writers_done = AtomicBool::new(false);
    let start = Barrier::new((WRITERS + READERS + 1) as usize);
    let finals: Vec<Vec<u8>> = thread::scope(|sc| {
        let mut handles = Vec::new();
        for t in 0..WRITERS {
            let (live, start) = (&live, &start);
            let img0 = &img0;
            handles.push(sc.spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let base = t * REGION;
                let mut mine = img0[base as usize..(base + REGION) as usize].to_vec();
                start.wait();
                for i in 0..ITERS {
                    let off = rng.below(REGION);
                    let len = 1 + rng.below((REGION - off).min(3 * CL));
                    let o = off as usize..(off + len) as usize;
                    match rng.below(8) {
                        0 => {
                            live.trim(base + off, len).unwrap();
                            let z = trimmed(base + off, len, DISK, qcow2);
                            mine[z.start - base as usize..z.end - base as usize].fill(0);
                        }
                        1 => {
                            let flags = ZeroFlags {
                                may_unmap: i % 2 == 0,
                                ..ZeroFlags::default()
                            };
                            live.write_zeroes(base + off, len, flags).unwrap();
                            mine[o].fill(0);
                        }
                        _ => {
                            let b = (t * 50 + i % 50) as u8 | 0x80;
                            let data = vec![b; len as usize];
                            live.write_at(&data, base + off, IoFlags::NONE).unwrap();
                            mine[o].copy_from_slice(&data);
                        }
                    }
                }
                mine
            }));
        }
        for rd in 0..READERS {
            let (snap1, second, start, done) = (&snap1, &second, &start, &writers_done);
            let img0 = &img0;
            sc.spawn(move || {
                let mut rng = Rng(seed.rotate_left(17) ^ (rd + 101).wrapping_mul(0xD1B5_4A32_D192_ED03));
                start.wait();
                let mut i = 0u64;
                while i < ITERS || !done.load(Ordering::Acquire) && i < 20 * ITERS {
                    i += 1;
                    let two = lock(second).clone();
                    let (snap, image): (&Arc<Snapshot>, &[u8]) = match (&two, rng.below(2)) {
                        (Some((s, img)), 1) => (s, img),
                        _ => (snap1, img0),
                    };
                    let off = rng.below(DISK);
                    let len = 1 + rng.below((DISK - off).min(5 * CL));
                    if rng.below(4) == 0 {
                        let ext = snap.block_status(off, len).unwrap();
                        let mut pos = off;
                        for e in ext {
                            // Nothing is discarded or out of scope here.
                            assert_ne!(e.mapping, Mapping::Unavailable, "at {pos}+{}", e.length);
                            if e.mapping != Mapping::Data {
                                let bytes = &image[pos as usize..(pos + e.length) as usize];
                                assert!(
                                    bytes.iter().all(|&b| b == 0),
                                    "block status called data at {pos}+{} {:?}",
                                    e.length,
                                    e.mapping
                                );
                            }
                            pos += e.length;
                        }
                    } else {
                        let mut buf = vec![0u8; len as usize];
                        snap.read_at(&mut buf, off).unwrap();
                        if buf != image[off as usize..(off + len) as usize] {
                            let k = buf
                                .iter()
                                .zip(&image[off as usize..])
                                .position(|(a, b)| a != b)
                                .unwrap();
                            panic!(
                                "view read {off}+{len} differs from its instant at byte {}: {:#x} vs {:#x}",
                                off + k as u64,
                                buf[k],
                                image[off as usize + k]
                            );
                        }
                    }
                }
            });
        }
        // Take a second snapshot while the writers run; the image at its
        // instant is read while the disk is frozen.
        start.wait();
        thread::yield_now();
        {
            let g = live.freeze();
            let mut img = vec![0u8; DISK as usize];
            live.read_at(&mut img, 0, IoFlags::NONE).unwrap();
            let s = live.snapshot(mk(2), opts.clone());
            drop(g);
            *lock(&second) = Some((s, Arc::new(img)));
        }
        let finals = handles.into_iter().map(|h| h.join().unwrap()).collect();
        writers_done.store(true, Ordering::Release);
        finals
    });
    let mut expect = img0.clone();
    for (t, mine) in finals.iter().enumerate() {
        let base = t as u64 * REGION;
        expect[base as usize..(base + REGION) as usize].copy_from_slice(mine);
    }
    let mut now = vec![0u8; DISK as usize];
    live.read_at(&mut now, 0, IoFlags::NONE).unwrap();
    assert!(now == expect, "live disk differs from what the writers wrote");
    let mut all = vec![0u8; DISK as usize];
    snap1.read_at(&mut all, 0).unwrap();
    assert!(all == img0, "first snapshot differs from its instant");
    let (s2, img2) = lock(&second).take().unwrap();
    s2.read_at(&mut all, 0).unwrap();
    assert!(all == *img2, "second snapshot differs from its instant");
    assert!(!snap1.is_broken() && !s2.is_broken());
}

/// The snapshot taken mid-run and the image at its instant.
type Second = (Arc<Snapshot>, Arc<Vec<u8>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn concurrent_view_reads_always_see_the_instant_file_store() {
    concurrent_run(StoreKind::File, CL, 0x5eed_0001);
}

#[test]
fn concurrent_view_reads_always_see_the_instant_ram_store_with_spill_and_big_clusters() {
    concurrent_run(StoreKind::RamSpill, 4 * CL, 0x5eed_0002);
}

#[test]
fn concurrent_view_reads_always_see_the_instant_ram_store() {
    concurrent_run(StoreKind::Ram, 2 * CL, 0x5eed_0003);
}

#[test]
fn concurrent_view_reads_always_see_the_instant_device_store() {
    concurrent_run(StoreKind::Devices, 2 * CL, 0x5eed_0004);
}

#[test]
fn concurrent_view_reads_of_a_qcow2_disk_always_see_the_instant() {
    concurrent_run_on(StoreKind::Devices, 2 * CL, 0x5eed_0005, true);
    concurrent_run_on(StoreKind::File, CL, 0x5eed_0006, true);
}
