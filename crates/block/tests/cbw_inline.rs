//! Copy-before-write run inline by no-wait writes to a `LiveDisk`, which it does
//! only when the disk and every store are in memory and no copy timeout is
//! set. Images live in /dev/shm so that the disk counts as in memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use fleece_block::{
    BlockDev, ErrorKind, FileStore, IoFlags, LiveDisk, RamStore, RawFile, SnapshotOptions, SnapshotView,
    Store,
};

const CL: u64 = 64 << 10;
const NCL: u64 = 32;
const SIZE: u64 = CL * NCL;

fn pattern(pos: u64) -> u8 {
    ((pos / CL) * 37 + (pos % 251) + 1) as u8
}

struct Fx {
    dir: tempfile::TempDir,
    live: Arc<LiveDisk>,
    img0: Vec<u8>,
}

fn new_fx() -> Fx {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a tmpfs here");
    let file = RawFile::create(&dir.path().join("live.raw"), SIZE).unwrap();
    let img0: Vec<u8> = (0..SIZE).map(pattern).collect();
    file.write_at(&img0, 0, IoFlags::NONE).unwrap();
    assert!(file.hints().in_memory, "/dev/shm should count as memory");
    let base: Arc<dyn BlockDev> = Arc::new(file);
    Fx {
        dir,
        live: Arc::new(LiveDisk::new(base)),
        img0,
    }
}

impl Fx {
    fn snapshot(&self, store: Box<dyn Store>, opts: SnapshotOptions) -> SnapshotView {
        let _frozen = self.live.freeze();
        SnapshotView(self.live.snapshot(store, opts))
    }

    fn ram_store(&self) -> Box<dyn Store> {
        Box::new(RamStore::new(SIZE, self.dir.path().join("spill"), SIZE))
    }
}

/// True if a no-wait request was declined (it would have had to wait).
fn would_block(res: fleece_block::Result<()>) -> bool {
    matches!(res, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

fn view_bytes(view: &SnapshotView, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    view.read_at(&mut buf, offset, IoFlags::NONE).unwrap();
    buf
}

#[test]
fn an_inline_write_saves_the_old_cluster_first() {
    let fx = new_fx();
    let view = fx.snapshot(fx.ram_store(), SnapshotOptions::default());
    let res = fx.live.write_at(&[0xEE; 4096], 3 * CL + 100, IoFlags::NO_WAIT);
    assert!(res.is_ok(), "not run inline: {res:?}");
    assert_eq!(view.0.stats().copied_clusters, 1);
    assert!(view_bytes(&view, 0, SIZE) == fx.img0, "the view changed");
    let mut live = vec![0u8; 4096];
    fx.live.read_at(&mut live, 3 * CL + 100, IoFlags::NONE).unwrap();
    assert!(live.iter().all(|&b| b == 0xEE), "the write did not land");
}

#[test]
fn copies_that_may_wait_on_a_disk_or_a_timer_are_left_to_the_pool() {
    let fx2 = new_fx();
    let opts = SnapshotOptions {
        cbw_timeout: Some(std::time::Duration::from_secs(5)),
        ..SnapshotOptions::default()
    };
    let _view = fx2.snapshot(fx2.ram_store(), opts);
    assert!(would_block(fx2.live.write_at(&[1; 512], 0, IoFlags::NO_WAIT)));

    let fx = new_fx();
    // A store on a real disk (the test's working directory is not tmpfs).
    let on_disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = FileStore::create(&on_disk.path().join("store"), SIZE).unwrap();
    if store.hints().in_memory {
        return; // the target dir is on tmpfs here: nothing to check
    }
    let view = fx.snapshot(Box::new(store), SnapshotOptions::default());
    assert!(would_block(fx.live.write_at(&[1; 512], 0, IoFlags::NO_WAIT)));
    assert_eq!(view.0.stats().copied_clusters, 0);
}

/// Writers that go inline when they can race view readers and a second
/// snapshot taken mid-way; both views must stay exact.
#[test]
fn inline_copies_keep_views_exact_under_concurrent_writes_and_reads() {
    let fx = new_fx();
    let view1 = Arc::new(fx.snapshot(fx.ram_store(), SnapshotOptions::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (view, stop, img0) = (view1.clone(), stop.clone(), fx.img0.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let c = (n * 7 + i) % NCL;
                    let got = view_bytes(&view, c * CL, CL);
                    assert!(
                        got[..] == img0[(c * CL) as usize..((c + 1) * CL) as usize],
                        "cluster {c}"
                    );
                    n += 1;
                }
            })
        })
        .collect();
    let plans: Vec<Vec<(u64, usize, u8)>> = (0..4)
        .map(|_| {
            (0..400)
                .map(|_| {
                    let off = rand() % (SIZE - 8192);
                    let len = 1 + (rand() % 8192) as usize;
                    (off, len, rand() as u8)
                })
                .collect()
        })
        .collect();
    let mut writers = Vec::new();
    for plan in plans {
        let live = fx.live.clone();
        writers.push(thread::spawn(move || {
            let mut inline = 0;
            for (off, len, v) in plan {
                let data = vec![v; len];
                match live.write_at(&data, off, IoFlags::NO_WAIT) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        live.write_at(&data, off, IoFlags::NONE).unwrap()
                    }
                    r => {
                        r.unwrap();
                        inline += 1;
                    }
                }
            }
            inline
        }));
    }
    let inline: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(inline > 1000, "only {inline} of 1600 writes ran inline");
    assert!(view_bytes(&view1, 0, SIZE) == fx.img0, "view 1 changed");
    // A second snapshot of the written disk, then more inline writes.
    let mut now = vec![0u8; SIZE as usize];
    fx.live.read_at(&mut now, 0, IoFlags::NONE).unwrap();
    let view2 = fx.snapshot(fx.ram_store(), SnapshotOptions::default());
    for c in 0..NCL {
        let r = fx.live.write_at(&[0x5A; 1000], c * CL + 10, IoFlags::NO_WAIT);
        assert!(r.is_ok(), "cluster {c}: {r:?}");
    }
    assert!(
        view_bytes(&view1, 0, SIZE) == fx.img0,
        "view 1 changed after the second snapshot"
    );
    assert!(
        view_bytes(&view2, 0, SIZE) == now,
        "view 2 is not the disk at its instant"
    );
}
