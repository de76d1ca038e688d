//! Model-based tests of copy-before-write: random sequences of live writes,
//! zeroes and trims, view reads and discards, and snapshots taken and
//! deleted, checked against a shadow model of the live disk and of every
//! snapshot's instant.

use std::collections::BTreeSet;
use std::sync::Arc;

use fleece_block::*;
use proptest::prelude::*;

const CLUSTER: u64 = 4096;
const SIZE: u64 = 16 * CLUSTER;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Trim { off: u64, len: u64 },
    Read { snap: usize, off: u64, len: u64 },
    Discard { snap: usize, off: u64, len: u64 },
    Status { snap: usize },
    Take { ram: bool },
    Delete { snap: usize },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(3 * CLUSTER + 100)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range().prop_map(|(off, len)| Op::Trim { off, len }),
        3 => (0..3usize, range()).prop_map(|(snap, (off, len))| Op::Read { snap, off, len }),
        1 => (0..3usize, range()).prop_map(|(snap, (off, len))| Op::Discard { snap, off, len }),
        1 => (0..3usize).prop_map(|snap| Op::Status { snap }),
        1 => any::<bool>().prop_map(|ram| Op::Take { ram }),
        1 => (0..3usize).prop_map(|snap| Op::Delete { snap }),
    ]
}

struct ShadowSnap {
    snap: Arc<Snapshot>,
    bytes: Vec<u8>,
    discarded: BTreeSet<u64>,
}

/// The clusters wholly inside a discard, as the engine aligns it.
fn discarded_clusters(off: u64, len: u64) -> Vec<u64> {
    let end = (off + len).min(SIZE);
    let first = off.div_ceil(CLUSTER);
    let last = if end == SIZE {
        SIZE.div_ceil(CLUSTER)
    } else {
        end / CLUSTER
    };
    (first..last).collect()
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let base = Arc::new(RawFile::create(&dir.path().join("disk.raw"), SIZE).unwrap());
    let live = LiveDisk::new(base);
    let mut shadow = vec![0u8; SIZE as usize];
    let mut snaps: Vec<ShadowSnap> = Vec::new();
    let mut n = 0;
    for op in ops {
        match op {
            Op::Write { off, len, byte } => {
                live.write_at(&vec![byte; len as usize], off, false).unwrap();
                shadow[off as usize..(off + len) as usize].fill(byte);
            }
            Op::Zero { off, len, unmap } => {
                live.write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_unmap: unmap,
                        ..Default::default()
                    },
                )
                .unwrap();
                shadow[off as usize..(off + len) as usize].fill(0);
            }
            Op::Trim { off, len } => {
                live.trim(off, len).unwrap();
                shadow[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { snap, off, len } => {
                let Some(s) = snaps.get(snap) else { continue };
                let mut buf = vec![0u8; len as usize];
                let res = SnapshotView(s.snap.clone()).read_at(&mut buf, off);
                let touched = (off / CLUSTER..=(off + len - 1) / CLUSTER).any(|c| s.discarded.contains(&c));
                if touched {
                    assert_eq!(res.unwrap_err().kind(), ErrorKind::AccessDenied);
                } else {
                    res.unwrap();
                    assert!(
                        buf == s.bytes[off as usize..(off + len) as usize],
                        "view read {off}+{len} differs"
                    );
                }
            }
            Op::Discard { snap, off, len } => {
                let Some(s) = snaps.get_mut(snap) else { continue };
                SnapshotView(s.snap.clone()).trim(off, len).unwrap();
                s.discarded.extend(discarded_clusters(off, len));
            }
            Op::Status { snap } => {
                let Some(s) = snaps.get(snap) else { continue };
                let mut pos = 0u64;
                while pos < SIZE {
                    let ext = SnapshotView(s.snap.clone())
                        .block_status(pos, SIZE - pos)
                        .unwrap();
                    assert!(!ext.is_empty());
                    for e in ext {
                        if e.mapping != Mapping::Data {
                            let r = &s.bytes[pos as usize..(pos + e.length) as usize];
                            assert!(
                                r.iter().all(|&b| b == 0),
                                "view reports zeroes over data at {pos}"
                            );
                        }
                        pos += e.length;
                    }
                }
            }
            Op::Take { ram } => {
                if snaps.len() >= 3 {
                    continue;
                }
                n += 1;
                let store: Box<dyn Store> = if ram {
                    Box::new(RamStore::new(
                        4 * CLUSTER,
                        dir.path().join(format!("spill{n}")),
                        SIZE,
                    ))
                } else {
                    Box::new(FileStore::create(&dir.path().join(format!("store{n}")), SIZE).unwrap())
                };
                let g = live.freeze();
                let snap = live.snapshot(
                    store,
                    SnapshotOptions {
                        cluster_size: CLUSTER,
                        ..Default::default()
                    },
                );
                drop(g);
                snaps.push(ShadowSnap {
                    snap,
                    bytes: shadow.clone(),
                    discarded: BTreeSet::new(),
                });
            }
            Op::Delete { snap } => {
                if snap < snaps.len() {
                    let s = snaps.remove(snap);
                    live.detach(&s.snap);
                }
            }
        }
        let mut now = vec![0u8; SIZE as usize];
        live.read_at(&mut now, 0).unwrap();
        assert!(now == shadow, "live disk differs from the model");
    }
    // Every surviving snapshot still reads as its instant, where not discarded.
    for s in &snaps {
        for c in 0..SIZE / CLUSTER {
            if s.discarded.contains(&c) {
                continue;
            }
            let mut buf = vec![0u8; CLUSTER as usize];
            s.snap.read_at(&mut buf, c * CLUSTER).unwrap();
            assert!(buf == s.bytes[(c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn views_match_the_model_under_any_sequence(ops in prop::collection::vec(op(), 1..40)) {
        // Start with one snapshot so every sequence exercises copy-before-write.
        let mut all = vec![Op::Write { off: 0, len: SIZE, byte: 0x5a }, Op::Take { ram: false }];
        all.extend(ops);
        run(all);
    }
}

#[test]
fn concurrent_writers_never_leak_into_a_view_read() {
    let dir = tempfile::tempdir().unwrap();
    const BIG: u64 = 256 * CLUSTER;
    let base = Arc::new(RawFile::create(&dir.path().join("disk.raw"), BIG).unwrap());
    let live = Arc::new(LiveDisk::new(base));
    let instant: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    live.write_at(&instant, 0, false).unwrap();
    let g = live.freeze();
    let snap = live.snapshot(
        Box::new(FileStore::create(&dir.path().join("store"), BIG).unwrap()),
        SnapshotOptions {
            cluster_size: 16 * 1024,
            ..Default::default()
        },
    );
    drop(g);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let live = live.clone();
            s.spawn(move || {
                let mut x = t + 1;
                for i in 0..2000u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % (BIG - 9000);
                    match i % 7 {
                        0 => live.trim(off, 9000).unwrap(),
                        1 => live.write_zeroes(off, 5000, ZeroFlags::default()).unwrap(),
                        _ => live.write_at(&[(t + 200) as u8; 3000], off, false).unwrap(),
                    }
                }
            });
        }
        for r in 0..2u64 {
            let snap = snap.clone();
            let instant = &instant;
            s.spawn(move || {
                let mut x = r + 100;
                for _ in 0..3000 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % (BIG - 70000);
                    let len = 1 + (x >> 50) % 70000;
                    let mut buf = vec![0u8; len as usize];
                    snap.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf == instant[off as usize..(off + len) as usize],
                        "view read {off}+{len} leaked new data"
                    );
                }
            });
        }
    });
    let mut all = vec![0u8; BIG as usize];
    snap.read_at(&mut all, 0).unwrap();
    assert!(all == instant);
}
