// The race cases, included once per store kind by `cbw_race.rs` (each
// instance sees its `STORE`). No inner attributes or `//!` here: the
// file is read by `include!`.

// ---------------------------------------------------------------------------
// a. The seed race: a view read from the live disk vs a live write.
// ---------------------------------------------------------------------------

/// Seeds 000/001: the reader has decided cluster C is on the live disk and is
/// inside that read when a live write to C arrives. The copy may go ahead
/// (rule 2) but the write must wait for the read (rule 3); the read returns
/// the old data, and afterwards the view serves C from the store.
#[test]
fn seed_race_live_write_waits_for_a_view_read_in_flight_on_the_live_disk() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 5;
    let (roff, rlen) = (c * CL + 100, 1000);
    fx.dev.read.arm(1, move |o, l| o == roff && l == rlen);
    let reader = spawn_read(&view, roff, rlen);
    fx.dev.read.wait_caught(1);

    let (woff, new) = (c * CL + 50, vec![0xEE; 2000]);
    let writer = spawn_write(&fx.live, new.clone(), woff);
    // Rule 2: the copy of C reaches the store although the read is in flight.
    store.wait_saved(1);
    assert_eq!(store.saved(), vec![c]);
    // Rule 3: the write itself may not change C under the reader.
    not_yet(&writer, "live write to a cluster being read from the live disk");
    assert!(
        fx.live_bytes(c * CL, CL) == fx.img0[r(c * CL, CL)],
        "live disk changed under the reader"
    );

    fx.dev.read.release();
    let got = done(&reader, "view read");
    assert!(
        got.as_ref().is_ok_and(|b| *b == fx.img0[r(roff, rlen)]),
        "the paused view read must return the data of the instant, got {}",
        brief(&got)
    );
    done(&writer, "live write").expect("live write");

    // The view now reads C from the store, still the old data.
    let loads = store.loads();
    let again = read(&*view, c * CL, CL).unwrap();
    assert!(
        again == fx.img0[r(c * CL, CL)],
        "view read of saved cluster is not the instant"
    );
    assert!(
        store.loads() > loads,
        "a saved cluster must be read from the store"
    );
    // The live disk has the new data.
    let mut expect = fx.img0.clone();
    expect[r(woff, 2000)].copy_from_slice(&new);
    assert!(fx.live_image() == expect, "live disk lacks the write");
    assert_view_exact(&*view, &fx.img0, "after the race");
    assert_eq!(store.saved(), vec![c], "exactly one copy");
}

/// The blocking is the minimum: a write to another cluster, and a write to a
/// cluster next to the one being read, go ahead while the read is held.
#[test]
fn a_view_read_in_flight_blocks_only_writes_to_its_own_clusters() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap));
    // The read covers clusters 3..=5 partially at both ends.
    let (roff, rlen) = (3 * CL + 10, 2 * CL + 20);
    fx.dev.read.arm(1, move |o, l| o == roff && l == rlen);
    let reader = spawn_read(&view, roff, rlen);
    fx.dev.read.wait_caught(1);

    for other in [0, 2, 6, 9, 13] {
        let w = spawn_write(&fx.live, vec![0xA0 + other as u8; 300], other * CL + 7);
        done(&w, &format!("write to cluster {other}, not under the read")).unwrap();
    }
    let w5 = spawn_write(&fx.live, vec![0x55; 10], 5 * CL + 4000);
    not_yet(&w5, "write to the last cluster of the read");
    let w3 = spawn_write(&fx.live, vec![0x33; 10], 3 * CL);
    not_yet(&w3, "write to the first cluster of the read");
    // A write spanning out of the read into it waits too, and does not half-land.
    let w6 = spawn_write(&fx.live, vec![0x66; 200], 6 * CL - 100);
    not_yet(&w6, "write straddling clusters 5 and 6");
    assert!(fx.live_bytes(3 * CL, 3 * CL) == fx.img0[r(3 * CL, 3 * CL)]);

    fx.dev.read.release();
    let got = done(&reader, "view read");
    assert!(
        got.as_ref().is_ok_and(|b| *b == fx.img0[r(roff, rlen)]),
        "read got {}",
        brief(&got)
    );
    for (w, what) in [(w5, "w5"), (w3, "w3"), (w6, "w6")] {
        done(&w, what).unwrap();
    }
    assert_view_exact(&*view, &fx.img0, "after");
}

/// Two view reads of the same cluster in flight: the write waits for both.
#[test]
fn live_write_waits_for_every_view_read_in_flight_of_the_cluster() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let view = Arc::new(SnapshotView(fx.snapshot(&store, opts())));
    let c = 7;
    fx.dev.read.arm(2, move |o, l| o / CL == c && l < CL);
    let r1 = spawn_read(&view, c * CL, 512);
    let r2 = spawn_read(&view, c * CL + 1024, 512);
    fx.dev.read.wait_caught(2);

    let w = spawn_write(&fx.live, vec![0xBB; CL as usize], c * CL);
    not_yet(&w, "write with two readers in flight");
    fx.dev.read.release_one();
    not_yet(&w, "write with one reader still in flight");
    fx.dev.read.release_one();
    done(&w, "write after both readers").unwrap();
    // Both reads return the instant: they were on the live disk before the write.
    for (rx, off) in [(r1, c * CL), (r2, c * CL + 1024)] {
        let got = done(&rx, "read");
        assert!(
            got.as_ref().is_ok_and(|b| *b == fx.img0[r(off, 512)]),
            "read at {off}: {}",
            brief(&got)
        );
    }
    assert_view_exact(&*view, &fx.img0, "after");
    assert!(fx.live_bytes(c * CL, CL).iter().all(|&b| b == 0xBB));
}

/// Write-zeroes (with and without unmap) and trim are changes like writes:
/// each waits for a view read of its cluster in flight.
#[test]
fn write_zeroes_and_trim_wait_for_a_view_read_in_flight_too() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let view = Arc::new(SnapshotView(fx.snapshot(&store, opts())));
    let kinds: [(u64, &str); 3] = [(2, "write_zeroes"), (4, "write_zeroes(may_unmap)"), (8, "trim")];
    for (c, kind) in kinds {
        fx.dev.read.arm(1, move |o, l| o == c * CL + 1 && l == CL - 2);
        let reader = spawn_read(&view, c * CL + 1, CL - 2);
        fx.dev.read.wait_caught(1);
        let live = fx.live.clone();
        let op = spawn(move || match kind {
            "write_zeroes" => live.write_zeroes(c * CL, CL, ZeroFlags::default()),
            "trim" => live.trim(c * CL, CL),
            _ => live.write_zeroes(
                c * CL,
                CL,
                ZeroFlags {
                    may_unmap: true,
                    ..ZeroFlags::default()
                },
            ),
        });
        not_yet(&op, kind);
        fx.dev.read.release();
        let got = done(&reader, "view read");
        assert!(
            got.as_ref().is_ok_and(|b| *b == fx.img0[r(c * CL + 1, CL - 2)]),
            "{kind}: read got {}",
            brief(&got)
        );
        done(&op, kind).unwrap();
        assert!(
            fx.live_bytes(c * CL, CL).iter().all(|&b| b == 0),
            "{kind} did not zero"
        );
    }
    assert_eq!(store.saved(), vec![2, 4, 8]);
    assert_view_exact(&*view, &fx.img0, "after zeroes and trims");
}

// ---------------------------------------------------------------------------
// b. View reads never wait for store writes.
// ---------------------------------------------------------------------------

/// A copy of C is held inside the store's save. View reads of C (served from
/// the live disk, which still has the old data), of other clusters, and
/// block status all complete meanwhile.
#[test]
fn view_reads_never_wait_for_a_store_write_in_flight() {
    for file_store in [false, true] {
        let fx = Fx::new(STORE);
        let store = if file_store { fx.file_store() } else { fx.store() };
        let snap = fx.snapshot(&store, opts());
        let view = Arc::new(SnapshotView(snap.clone()));
        let c = 6;
        store.save.arm(1, move |i, _| i == c);
        let new = vec![0xC6; 100];
        let writer = spawn_write(&fx.live, new.clone(), c * CL + 300);
        store.save.wait_caught(1);

        for (off, len, what) in [
            (c * CL, CL, "the cluster being copied"),
            (c * CL + 300, 100, "the bytes being written"),
            ((c - 1) * CL + 5, 3 * CL - 10, "a range around it"),
            (2 * CL, CL, "another cluster"),
            (0, SIZE, "the whole disk"),
        ] {
            let rx = spawn_read(&view, off, len);
            let got = done(&rx, &format!("view read of {what} during a store write"));
            assert!(
                got.as_ref().is_ok_and(|b| *b == fx.img0[r(off, len)]),
                "view read of {what}: {}",
                brief(&got)
            );
        }
        let v = view.clone();
        let bs = spawn(move || v.block_status(c * CL, CL));
        let ext = done(&bs, "block status during a store write").unwrap();
        assert!(ext.iter().all(|e| e.mapping == Mapping::Data), "{ext:?}");
        // A second write to the cluster waits for the copy in flight too
        // (it may not overtake the copy, whose read of C may still be due).
        let second = spawn_write(&fx.live, vec![0xD6; 100], c * CL + 3000);
        not_yet(&writer, "write whose copy is held");
        not_yet(&second, "second write to a cluster whose copy is in flight");
        assert!(
            fx.live_bytes(c * CL, CL) == fx.img0[r(c * CL, CL)],
            "live changed before its copy was saved"
        );
        let rx = spawn_read(&view, c * CL, CL);
        let got = done(&rx, "view read of the copying cluster");
        assert!(
            got.as_ref().is_ok_and(|b| *b == fx.img0[r(c * CL, CL)]),
            "{}",
            brief(&got)
        );

        store.save.release();
        done(&writer, "write").unwrap();
        done(&second, "second write").unwrap();
        assert_view_exact(&*view, &fx.img0, "after the copy");
        assert_eq!(store.saved(), vec![c]);
        assert_eq!(snap.stats().copied_clusters, 1);
        assert_eq!(snap.stats().used_bytes, CL);
    }
}

/// Rule 2 on its own: with a view read of C held on the live disk, the copy
/// of C (live read + store save) runs to completion.
#[test]
fn store_writes_never_wait_for_view_reads() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap.clone()));
    // Hold reads of clusters 1..=4 (one run from the live disk).
    fx.dev.read.arm(1, move |o, l| o == CL && l == 4 * CL);
    let reader = spawn_read(&view, CL, 4 * CL);
    fx.dev.read.wait_caught(1);
    // One write over clusters 0..=5: one copy run of all six.
    let writer = spawn_write(&fx.live, vec![0x11; 6 * CL as usize], 0);
    store.wait_saved(6);
    eventually("copied_clusters reaches 6", || snap.stats().copied_clusters == 6);
    not_yet(&writer, "write over clusters with a read in flight");
    fx.dev.read.release();
    let got = done(&reader, "read");
    assert!(
        got.as_ref().is_ok_and(|b| *b == fx.img0[r(CL, 4 * CL)]),
        "read got {}",
        brief(&got)
    );
    done(&writer, "write").unwrap();
    assert_view_exact(&*view, &fx.img0, "after");
}

// ---------------------------------------------------------------------------
// c. A saved cluster is copied once.
// ---------------------------------------------------------------------------

#[test]
fn a_saved_cluster_is_never_copied_again() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = SnapshotView(snap.clone());
    let live = &fx.live;

    // Before any copy the inline path refuses (a copy is needed).
    assert!(
        would_block(live.write_at(&[1; 10], 3 * CL, IoFlags::NO_WAIT)),
        "inline write to an unsaved cluster"
    );
    live.write_at(&[1; 10], 3 * CL + 5, IoFlags::NONE).unwrap();
    assert_eq!(store.saved(), vec![3]);
    live.write_at(&[2; 100], 3 * CL + 1000, IoFlags::NONE).unwrap();
    live.write_zeroes(3 * CL, 512, ZeroFlags::default()).unwrap();
    live.trim(3 * CL + 2048, 1024).unwrap();
    live.write_at(&[3; CL as usize], 3 * CL, IoFlags::FUA).unwrap();
    assert_eq!(store.saved(), vec![3], "changes to a saved cluster copied again");
    // The inline path now accepts a write to the saved cluster.
    match live.write_at(&[4; 64], 3 * CL + 64, IoFlags::NO_WAIT) {
        Ok(()) => {}
        other => panic!("inline write to a saved, quiet cluster: {other:?}"),
    }
    // A write spanning 2..=4 copies only 2 and 4.
    live.write_at(&[5; 2 * CL as usize], 2 * CL + 100, IoFlags::NONE)
        .unwrap();
    let mut saved = store.saved();
    saved.sort();
    assert_eq!(saved, vec![2, 3, 4]);
    live.write_at(&[6; 3 * CL as usize], 2 * CL, IoFlags::NONE)
        .unwrap();
    assert_eq!(store.saved().len(), 3);
    assert_eq!(snap.stats().copied_clusters, 3);
    assert_eq!(snap.stats().used_bytes, 3 * CL);
    assert_view_exact(&view, &fx.img0, "after repeated writes");
}

// ---------------------------------------------------------------------------
// d. Failure policies.
// ---------------------------------------------------------------------------

/// The events a snapshot reported, recorded while this lives.
struct Events {
    list: Arc<Mutex<Vec<SnapshotEvent>>>,
    _sub: Subscription,
}

impl std::ops::Deref for Events {
    type Target = Mutex<Vec<SnapshotEvent>>;
    fn deref(&self) -> &Self::Target {
        &self.list
    }
}

fn events(snap: &Snapshot) -> Events {
    let list = Arc::new(Mutex::new(Vec::new()));
    let l = list.clone();
    let sub = snap.subscribe(move |x| lock(&l).push(x.clone()));
    Events { list, _sub: sub }
}

fn broken_events(ev: &Mutex<Vec<SnapshotEvent>>) -> usize {
    lock(ev)
        .iter()
        .filter(|e| matches!(e, SnapshotEvent::Broken(_)))
        .count()
}

#[test]
fn store_eio_with_break_guest_write_fails_the_write_and_keeps_the_view_exact() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let ev = events(&snap);
    let view = SnapshotView(snap.clone());
    store.set_fail(Some(ErrorKind::Io));

    assert_kind(
        fx.live.write_at(&[0xEE; 100], 4 * CL + 10, IoFlags::NONE),
        ErrorKind::Io,
        "write",
    );
    assert_kind(
        fx.live.write_zeroes(5 * CL, CL, ZeroFlags::default()),
        ErrorKind::Io,
        "write_zeroes",
    );
    assert_kind(fx.live.trim(6 * CL, 2 * CL), ErrorKind::Io, "trim");
    assert!(
        fx.live_image() == fx.img0,
        "a failed guest write changed the live disk"
    );
    assert!(!snap.is_broken());
    assert_eq!(snap.stats().broken, None);
    assert_eq!(
        snap.stats().used_bytes,
        0,
        "space reserved for failed copies not returned"
    );
    assert_eq!(snap.stats().copied_clusters, 0);
    assert_eq!(broken_events(&ev), 0);
    assert_view_exact(&view, &fx.img0, "after failed copies");

    // The store recovers: the same writes now copy and land.
    store.set_fail(None);
    fx.live
        .write_at(&[0xEE; 100], 4 * CL + 10, IoFlags::NONE)
        .unwrap();
    fx.live.trim(6 * CL, 2 * CL).unwrap();
    let mut saved = store.saved();
    saved.sort();
    assert_eq!(saved, vec![4, 6, 7]);
    assert_view_exact(&view, &fx.img0, "after the retry");
    assert!(fx.live_bytes(4 * CL + 10, 100).iter().all(|&b| b == 0xEE));
}

#[test]
fn store_eio_with_break_snapshot_lets_writes_through_and_breaks_the_view() {
    let fx = Fx::new(STORE);
    let bad = fx.store();
    let good = fx.store();
    let snap = fx.snapshot(
        &bad,
        SnapshotOptions {
            on_cbw_error: OnCbwError::BreakSnapshot,
            ..opts()
        },
    );
    // Another snapshot of the same disk, whose store works, is unaffected.
    let other = fx.snapshot(&good, opts());
    let ev = events(&snap);
    let view = SnapshotView(snap.clone());
    bad.set_fail(Some(ErrorKind::Io));

    fx.live
        .write_at(&[0xEE; 100], 4 * CL + 10, IoFlags::NONE)
        .unwrap();
    assert!(snap.is_broken());
    assert!(snap.stats().broken.is_some());
    assert_eq!(broken_events(&ev), 1);
    assert!(
        fx.live_bytes(4 * CL + 10, 100).iter().all(|&b| b == 0xEE),
        "write did not land"
    );
    assert_kind(
        read(&view, 0, CL),
        ErrorKind::Broken,
        "view read of an untouched cluster",
    );
    assert_kind(
        read(&view, 4 * CL, CL),
        ErrorKind::Broken,
        "view read of the written cluster",
    );
    assert_kind(view.block_status(0, SIZE), ErrorKind::Broken, "view block status");
    // Later writes go on without copies into the broken snapshot.
    fx.live.write_at(&[0xEF; 100], 9 * CL, IoFlags::NONE).unwrap();
    assert!(bad.saved().is_empty());
    assert_eq!(broken_events(&ev), 1, "broken reported once");
    let mut saved = good.saved();
    saved.sort();
    assert_eq!(saved, vec![4, 9]);
    assert_view_exact(&SnapshotView(other), &fx.img0, "the other snapshot");
}

#[test]
fn store_limit_with_break_guest_write_fails_with_store_full() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            store_limit: Some(2 * CL),
            ..opts()
        },
    );
    let ev = events(&snap);
    let view = SnapshotView(snap.clone());
    fx.live.write_at(&[1; 10], 0, IoFlags::NONE).unwrap();
    fx.live.write_at(&[1; 10], CL, IoFlags::NONE).unwrap();
    assert_eq!(snap.stats().used_bytes, 2 * CL);
    assert_kind(
        fx.live.write_at(&[1; 10], 2 * CL, IoFlags::NONE),
        ErrorKind::StoreFull,
        "write past the limit",
    );
    // One write needing two copies when one is free fails as a whole.
    assert_kind(
        fx.live.write_at(&[1; 10], 3 * CL - 5, IoFlags::NONE),
        ErrorKind::StoreFull,
        "write spanning two unsaved clusters",
    );
    assert!(
        fx.live_bytes(2 * CL, 2 * CL) == fx.img0[r(2 * CL, 2 * CL)],
        "failed writes changed the disk"
    );
    assert!(!snap.is_broken());
    assert_eq!(store.saved(), vec![0, 1]);
    assert_eq!(snap.stats().used_bytes, 2 * CL);
    assert!(
        lock(&ev)
            .iter()
            .any(|e| matches!(e, SnapshotEvent::StoreUsage { percent: 95, .. })),
        "no usage alert at 100%: {:?}",
        lock(&ev)
    );
    let mut expect = fx.img0.clone();
    assert_view_exact(&view, &expect, "at the limit");

    // Discarding a saved cluster frees room for the next copy.
    view.trim(0, CL).unwrap();
    assert_eq!(snap.stats().used_bytes, CL);
    fx.live.write_at(&[1; 10], 2 * CL, IoFlags::NONE).unwrap();
    assert_eq!(snap.stats().used_bytes, 2 * CL);
    assert_kind(read(&view, 0, CL), ErrorKind::AccessDenied, "discarded cluster");
    expect[r(0, CL)].fill(0);
    assert_view_exact_from(&view, &fx.img0, 1, "after discard and copy");
}

#[test]
fn holes_at_the_instant_are_kept_without_store_space() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            store_limit: Some(CL),
            ..opts()
        },
    );
    let view = SnapshotView(snap.clone());
    // Clusters DATA_CLUSTERS.. are holes: writing all of them takes no room.
    for c in DATA_CLUSTERS..NCL {
        fx.live.write_at(&[0xAB; 100], c * CL + 7, IoFlags::NONE).unwrap();
    }
    // A write that spans the last data cluster and the first hole copies
    // only the data cluster, which exactly fills the store.
    fx.live
        .write_at(&[0xAC; 64], DATA_CLUSTERS * CL - 32, IoFlags::NONE)
        .unwrap();
    assert_eq!(snap.stats().used_bytes, CL);
    assert_eq!(snap.stats().hole_clusters, NCL - DATA_CLUSTERS);
    assert_eq!(store.saved(), vec![DATA_CLUSTERS - 1]);
    assert_kind(
        fx.live.write_at(&[1; 10], 0, IoFlags::NONE),
        ErrorKind::StoreFull,
        "a data cluster past the limit",
    );
    assert_view_exact(&view, &fx.img0, "holes read as zeroes");
    let ext = view
        .block_status(DATA_CLUSTERS * CL, SIZE - DATA_CLUSTERS * CL)
        .unwrap();
    assert_eq!(ext.len(), 1, "{ext:?}");
    assert_eq!(ext[0].mapping, Mapping::Hole, "{ext:?}");
    // Discarding a hole cluster frees nothing and makes it unreadable.
    view.trim((NCL - 1) * CL, CL).unwrap();
    assert_eq!(snap.stats().used_bytes, CL);
    assert_kind(
        read(&view, (NCL - 1) * CL, CL),
        ErrorKind::AccessDenied,
        "discarded hole",
    );
}

/// Like [`assert_view_exact`] but from cluster `first` on.
fn assert_view_exact_from(view: &dyn BlockDev, image: &[u8], first: u64, what: &str) {
    let size = view.size();
    for c in first..size.div_ceil(CL) {
        let len = CL.min(size - c * CL);
        let got = read(view, c * CL, len).unwrap_or_else(|e| panic!("{what}: cluster {c}: {e}"));
        assert!(
            got == image[r(c * CL, len)],
            "{what}: cluster {c} differs from the instant"
        );
    }
}

#[test]
fn store_limit_with_break_snapshot_breaks_the_snapshot_not_the_write() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            store_limit: Some(2 * CL),
            on_cbw_error: OnCbwError::BreakSnapshot,
            ..opts()
        },
    );
    let ev = events(&snap);
    let view = SnapshotView(snap.clone());
    fx.live.write_at(&[1; 10], 0, IoFlags::NONE).unwrap();
    fx.live.write_at(&[1; 10], CL, IoFlags::NONE).unwrap();
    assert!(!snap.is_broken());
    fx.live.write_at(&[2; 10], 2 * CL, IoFlags::NONE).unwrap();
    assert!(snap.is_broken());
    assert_eq!(broken_events(&ev), 1);
    assert!(fx.live_bytes(2 * CL, 10).iter().all(|&b| b == 2));
    assert_kind(read(&view, 0, CL), ErrorKind::Broken, "read of a saved cluster");
    assert_kind(
        read(&view, 5 * CL, CL),
        ErrorKind::Broken,
        "read of an untouched cluster",
    );
    assert_kind(view.block_status(0, CL), ErrorKind::Broken, "block status");
}

#[test]
fn cbw_timeout_with_break_guest_write_fails_the_write_with_timed_out() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            cbw_timeout: Some(Duration::from_millis(100)),
            ..opts()
        },
    );
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 3;
    store.save.arm(1, move |i, _| i == c);
    let w = spawn_write(&fx.live, vec![0xEE; 100], c * CL);
    assert_kind(
        done(&w, "write with a held copy"),
        ErrorKind::TimedOut,
        "write with a held copy",
    );
    store.save.wait_caught(1);
    assert!(store.save.held() == 1);
    assert!(
        fx.live_bytes(c * CL, CL) == fx.img0[r(c * CL, CL)],
        "timed-out write changed the disk"
    );
    // A second write to the cluster waits for the same copy and times out too.
    let w2 = spawn_write(&fx.live, vec![0xEF; 100], c * CL + 200);
    assert_kind(
        done(&w2, "second write"),
        ErrorKind::TimedOut,
        "second write to the copying cluster",
    );
    // Other clusters are unaffected; the view is exact throughout.
    fx.live.write_at(&[0xF0; 100], 9 * CL, IoFlags::NONE).unwrap();
    assert!(!snap.is_broken());
    assert_view_exact(&*view, &fx.img0, "with a copy held");

    // The held copy finishes on its own and settles the cluster.
    store.save.release();
    eventually("the held copy settles", || snap.stats().copied_clusters == 2);
    fx.live.write_at(&[0xEE; 100], c * CL, IoFlags::NONE).unwrap();
    let mut saved = store.saved();
    saved.sort();
    assert_eq!(saved, vec![c, 9], "retry after the copy settled copied again");
    assert_view_exact(&*view, &fx.img0, "after the retry");
    assert!(fx.live_bytes(c * CL, 100).iter().all(|&b| b == 0xEE));
}

#[test]
fn cbw_timeout_with_break_snapshot_breaks_the_snapshot_and_the_write_succeeds() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            cbw_timeout: Some(Duration::from_millis(100)),
            on_cbw_error: OnCbwError::BreakSnapshot,
            ..opts()
        },
    );
    let ev = events(&snap);
    let view = SnapshotView(snap.clone());
    let c = 3;
    store.save.arm(1, move |i, _| i == c);
    let w = spawn_write(&fx.live, vec![0xEE; 100], c * CL);
    done(&w, "write with a held copy").expect("break-snapshot must let the write through");
    assert!(snap.is_broken());
    assert_eq!(broken_events(&ev), 1);
    assert!(fx.live_bytes(c * CL, 100).iter().all(|&b| b == 0xEE));
    assert_kind(read(&view, 0, CL), ErrorKind::Broken, "view read after a timeout");
    store.save.release();
    eventually("the held copy settles", || snap.stats().copied_clusters == 1);
    assert_kind(
        read(&view, c * CL, CL),
        ErrorKind::Broken,
        "view read after the copy settled",
    );
}

/// A view read in flight on the live disk when the snapshot breaks (the
/// write it was holding back then goes ahead) must fail, not return the new
/// data.
#[test]
fn a_view_read_in_flight_when_the_snapshot_breaks_fails_with_broken() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            on_cbw_error: OnCbwError::BreakSnapshot,
            ..opts()
        },
    );
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 2;
    fx.dev.read.arm(1, move |o, l| o == c * CL && l == CL);
    let reader = spawn_read(&view, c * CL, CL);
    fx.dev.read.wait_caught(1);
    store.set_fail(Some(ErrorKind::Io));
    let w = spawn_write(&fx.live, vec![0xEE; CL as usize], c * CL);
    done(&w, "write that breaks the snapshot").unwrap();
    assert!(snap.is_broken());
    assert!(fx.live_bytes(c * CL, CL).iter().all(|&b| b == 0xEE));
    fx.dev.read.release();
    let got = done(&reader, "read");
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::Broken),
        "a read that may have seen new data must fail with Broken, got {}",
        brief(&got)
    );
}

/// The same for block status: one in flight on the live disk when the
/// snapshot breaks, and a live trim then punches the cluster, must not
/// report a hole for data that existed at the instant.
#[test]
fn a_view_block_status_in_flight_when_the_snapshot_breaks_never_reports_a_hole_for_data() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            on_cbw_error: OnCbwError::BreakSnapshot,
            ..opts()
        },
    );
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 2;
    assert!(fx.img0[r(c * CL, CL)].iter().any(|&b| b != 0));
    fx.dev.status.arm(1, move |o, _| o == c * CL);
    let v = view.clone();
    let bs = spawn(move || v.block_status(c * CL, CL));
    fx.dev.status.wait_caught(1);
    store.set_fail(Some(ErrorKind::Io));
    let live = fx.live.clone();
    let t = spawn(move || live.trim(c * CL, CL));
    // Give the trim the chance to break the snapshot and punch the cluster
    // while the status is held. (An engine that holds its lock across the
    // live disk's block status keeps the trim out entirely, which is fine:
    // then this waits NOT_YET for nothing, and the status is simply right.)
    let early = match t.recv_timeout(NOT_YET) {
        Ok(res) => {
            res.expect("trim under break-snapshot");
            assert!(snap.is_broken());
            assert!(
                fx.live_bytes(c * CL, CL).iter().all(|&b| b == 0),
                "trim did not punch"
            );
            true
        }
        Err(RecvTimeoutError::Timeout) => false,
        Err(RecvTimeoutError::Disconnected) => panic!("trim thread panicked"),
    };
    fx.dev.status.release();
    if !early {
        done(&t, "trim that breaks the snapshot").unwrap();
    }
    match done(&bs, "block status") {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Broken, "{e}"),
        Ok(ext) => assert!(
            ext.iter().all(|e| e.mapping == Mapping::Data),
            "view block status reported {ext:?} for cluster {c}, which held data at the instant \
             (the snapshot broke while the status was in flight and a live trim punched the \
             cluster; expected Err(Broken) as view reads give, or Data)"
        ),
    }
}

// ---------------------------------------------------------------------------
// e. Discard and read-once.
// ---------------------------------------------------------------------------

#[test]
fn discard_frees_the_saved_copy_and_later_writes_copy_nothing() {
    for file_store in [false, true] {
        let fx = Fx::new(STORE);
        let store = if file_store { fx.file_store() } else { fx.store() };
        let snap = fx.snapshot(&store, opts());
        let view = SnapshotView(snap.clone());
        fx.live.write_at(&[1; 100], 2 * CL, IoFlags::NONE).unwrap();
        fx.live.write_at(&[1; 100], 3 * CL, IoFlags::NONE).unwrap();
        assert_eq!(snap.stats().used_bytes, 2 * CL);

        // A saved cluster and an untouched one are discarded.
        view.trim(2 * CL, CL).unwrap();
        snap.discard(5 * CL, CL);
        assert_eq!(snap.stats().used_bytes, CL, "discard did not free the saved copy");
        assert_eq!(snap.stats().discarded_clusters, 2);
        assert_eq!(store.forgets(), vec![2]);
        // Writes to discarded clusters copy nothing.
        fx.live.write_at(&[2; 100], 2 * CL + 500, IoFlags::NONE).unwrap();
        fx.live.write_at(&[2; 100], 5 * CL, IoFlags::NONE).unwrap();
        fx.live.trim(5 * CL, CL).unwrap();
        assert_eq!(store.saved(), vec![2, 3]);
        // Reads touching them fail; the rest is exact.
        for (off, len) in [
            (2 * CL, CL),
            (2 * CL + 100, 1),
            (CL, 2 * CL),
            (5 * CL - 1, 2),
            (0, SIZE),
        ] {
            assert_kind(
                read(&view, off, len),
                ErrorKind::AccessDenied,
                &format!("read {off}+{len}"),
            );
        }
        for c in [0, 1, 3, 4, 6, 7, 11, 12, 15] {
            assert!(
                read(&view, c * CL, CL).unwrap() == fx.img0[r(c * CL, CL)],
                "cluster {c}"
            );
        }
        // Discarding again changes nothing.
        view.trim(2 * CL, CL).unwrap();
        assert_eq!(snap.stats().discarded_clusters, 2);
        assert_eq!(snap.stats().used_bytes, CL);
        // Block status of discarded clusters is never a hole: they are
        // unavailable, and only they.
        let ext = view.block_status(2 * CL, CL).unwrap();
        assert_eq!(ext, vec![Extent::new(CL, Mapping::Unavailable)]);
        let ext = view.block_status(CL, 5 * CL).unwrap();
        let unavailable: Vec<u64> = runs(&ext, CL, CL)
            .into_iter()
            .filter(|&(_, m)| m == Mapping::Unavailable)
            .map(|(c, _)| c)
            .collect();
        assert_eq!(unavailable, vec![2, 5], "{ext:?}");
    }
}

/// Only whole clusters are discarded; the partial last cluster of the disk
/// counts when the range reaches the end.
#[test]
fn discard_drops_only_whole_clusters_and_the_tail_at_the_end_of_the_disk() {
    let size = SIZE + 1000; // 17 clusters, the last one 1000 bytes
    let fx = Fx::with_size(STORE, size);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = SnapshotView(snap.clone());
    view.trim(CL + 1, CL).unwrap(); // inside 1..=2, neither whole
    view.trim(4 * CL, CL - 1).unwrap(); // all of 4 but one byte
    view.trim(NCL * CL + 1, 999).unwrap(); // part of the tail
    assert_eq!(snap.stats().discarded_clusters, 0);
    assert_view_exact(&view, &fx.img0, "after partial discards");
    view.trim(6 * CL - 1, 2 * CL + 2).unwrap(); // 6 whole, partial 5 and 8... 7 whole
    view.trim(NCL * CL, 1000).unwrap(); // the whole tail
    assert_eq!(snap.stats().discarded_clusters, 3);
    for c in [6, 7, NCL] {
        assert_kind(
            read(&view, c * CL, 1),
            ErrorKind::AccessDenied,
            &format!("cluster {c}"),
        );
    }
    for c in [5, 8, NCL - 1] {
        assert!(
            read(&view, c * CL, CL).unwrap() == fx.img0[r(c * CL, CL)],
            "cluster {c}"
        );
    }
    // The tail cluster is not copied on a later write.
    fx.live.write_at(&[9; 1000], NCL * CL, IoFlags::NONE).unwrap();
    assert!(store.saved().is_empty());
    assert_kind(view.trim(size, 1), ErrorKind::OutOfRange, "trim past the end");
}

#[test]
fn read_once_discards_the_whole_clusters_each_read_returned() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            read_once: true,
            ..opts()
        },
    );
    let view = SnapshotView(snap.clone());
    fx.live.write_at(&[1; 10], 2 * CL, IoFlags::NONE).unwrap();
    assert_eq!(snap.stats().used_bytes, CL);

    // Clusters 1..=2 whole (2 from the store).
    assert!(read(&view, CL, 2 * CL).unwrap() == fx.img0[r(CL, 2 * CL)]);
    assert_kind(read(&view, CL, 2 * CL), ErrorKind::AccessDenied, "second read");
    assert_kind(
        read(&view, 2 * CL + 7, 1),
        ErrorKind::AccessDenied,
        "byte of a read cluster",
    );
    assert_eq!(snap.stats().used_bytes, 0, "read-once did not free the store");
    assert_eq!(store.forgets(), vec![2]);
    // A partial read discards nothing.
    assert!(read(&view, 5 * CL + 10, 100).unwrap() == fx.img0[r(5 * CL + 10, 100)]);
    assert!(read(&view, 5 * CL + 10, 100).unwrap() == fx.img0[r(5 * CL + 10, 100)]);
    // A read partial in 6 and whole in 7 discards only 7.
    assert!(read(&view, 6 * CL + 1, 2 * CL - 1).unwrap() == fx.img0[r(6 * CL + 1, 2 * CL - 1)]);
    assert!(read(&view, 6 * CL, CL).unwrap() == fx.img0[r(6 * CL, CL)]);
    assert_kind(read(&view, 7 * CL, 1), ErrorKind::AccessDenied, "cluster 7");
    assert_kind(
        read(&view, 6 * CL, 1),
        ErrorKind::AccessDenied,
        "cluster 6 after its whole read",
    );
    // Later writes to read clusters copy nothing.
    fx.live.write_at(&[3; 100], CL, IoFlags::NONE).unwrap();
    fx.live.write_at(&[3; 100], 7 * CL, IoFlags::NONE).unwrap();
    assert_eq!(store.saved(), vec![2]);
    // A failed read discards nothing.
    assert_kind(
        read(&view, 7 * CL, 2 * CL),
        ErrorKind::AccessDenied,
        "read into 7",
    );
    assert!(read(&view, 8 * CL, CL).unwrap() == fx.img0[r(8 * CL, CL)]);
}

/// A discard while a view read of the cluster is in flight on the live disk
/// does not let a live write overtake that read (and no copy is made).
#[test]
fn discard_while_a_view_read_is_in_flight_still_holds_the_write_back() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 4;
    fx.dev.read.arm(1, move |o, l| o == c * CL && l == CL);
    let reader = spawn_read(&view, c * CL, CL);
    fx.dev.read.wait_caught(1);
    let v = view.clone();
    let t = spawn(move || v.trim(c * CL, CL));
    done(&t, "discard during a read").unwrap();
    let w = spawn_write(&fx.live, vec![0xEE; CL as usize], c * CL);
    not_yet(&w, "write to a discarded cluster with a read still in flight");
    fx.dev.read.release();
    let got = done(&reader, "read");
    assert!(
        got.as_ref().is_ok_and(|b| *b == fx.img0[r(c * CL, CL)]),
        "read in flight got {}",
        brief(&got)
    );
    done(&w, "write").unwrap();
    assert!(store.saved().is_empty(), "a discarded cluster was copied");
    assert_kind(read(&*view, c * CL, CL), ErrorKind::AccessDenied, "later read");
}

/// A discard while the cluster's copy is in flight: the copy is dropped when
/// it settles, the space comes back, and no later write copies it again.
#[test]
fn discard_while_a_copy_is_in_flight_drops_the_copy_when_it_settles() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 4;
    store.save.arm(1, move |i, _| i == c);
    let w = spawn_write(&fx.live, vec![0xEE; 10], c * CL);
    store.save.wait_caught(1);
    view.trim(c * CL, CL).unwrap();
    assert_kind(
        read(&*view, c * CL, CL),
        ErrorKind::AccessDenied,
        "read of a discarded copying cluster",
    );
    store.save.release();
    done(&w, "write").unwrap();
    assert_eq!(snap.stats().used_bytes, 0, "the dropped copy still counts");
    assert_eq!(
        snap.stats().copied_clusters,
        0,
        "a dropped copy is not a copied cluster"
    );
    assert_eq!(store.forgets(), vec![c]);
    fx.live.write_at(&[0xEF; 10], c * CL, IoFlags::NONE).unwrap();
    assert_eq!(store.saved(), vec![c]);
    assert_kind(read(&*view, c * CL, CL), ErrorKind::AccessDenied, "read after");
}

/// With read-once, two reads of one saved cluster overlap: the first is
/// inside the store load when the second completes and discards the
/// cluster. The first must return the data of the instant (it began before
/// the discard) or fail with AccessDenied -- never other bytes.
#[test]
fn a_store_read_overlapping_a_discard_never_returns_wrong_data() {
    let mut wrong = Vec::new();
    for file_store in [false, true] {
        let fx = Fx::new(STORE);
        let store = if file_store { fx.file_store() } else { fx.store() };
        let snap = fx.snapshot(
            &store,
            SnapshotOptions {
                read_once: true,
                ..opts()
            },
        );
        let view = Arc::new(SnapshotView(snap.clone()));
        let c = 3;
        fx.live
            .write_at(&[0xEE; CL as usize], c * CL, IoFlags::NONE)
            .unwrap();
        store.load.arm(1, move |i, _| i == c);
        let r1 = spawn_read(&view, c * CL, CL);
        store.load.wait_caught(1);
        let r2 = spawn_read(&view, c * CL, CL);
        let got2 = done(&r2, "second read");
        assert!(
            got2.as_ref().is_ok_and(|b| *b == fx.img0[r(c * CL, CL)]),
            "second read: {}",
            brief(&got2)
        );
        assert_eq!(store.forgets(), vec![c], "the second read discarded the cluster");
        store.load.release();
        let got1 = done(&r1, "first read");
        let ok = match &got1 {
            Ok(b) => *b == fx.img0[r(c * CL, CL)],
            Err(e) => e.kind() == ErrorKind::AccessDenied,
        };
        if !ok {
            wrong.push(format!(
                "{} store: a view read that classified cluster {c} as saved, then loaded it after a \
                 concurrent discard freed it, returned {} instead of the instant's data or AccessDenied",
                if file_store { "file" } else { "ram" },
                brief(&got1)
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The discard itself has a window: it frees the store slot
/// (`Store::forget`) and only then marks the cluster `NOT_NEEDED`. A view
/// read that classified the cluster as saved and loads it inside that window
/// gets the freed slot's bytes; its re-check after the load must not miss a
/// discard that is still in progress.
#[test]
fn a_store_read_during_a_discard_in_progress_never_returns_wrong_data() {
    let mut wrong = Vec::new();
    for file_store in [false, true] {
        let fx = Fx::new(STORE);
        let store = if file_store { fx.file_store() } else { fx.store() };
        let snap = fx.snapshot(&store, opts());
        let view = Arc::new(SnapshotView(snap.clone()));
        let c = 3;
        fx.live
            .write_at(&[0xEE; CL as usize], c * CL, IoFlags::NONE)
            .unwrap();
        // The reader has classified C as saved and is about to load it.
        store.load.arm(1, move |i, _| i == c);
        let r1 = spawn_read(&view, c * CL, CL);
        store.load.wait_caught(1);
        // A discard of C frees its slot and is held before it marks C.
        store.forget.arm(1, move |i, _| i == c);
        let v = view.clone();
        let d = spawn(move || v.trim(c * CL, CL));
        store.forget.wait_caught(1);
        // The reader now loads from the freed slot and re-checks.
        store.load.release();
        let early = match r1.recv_timeout(NOT_YET) {
            Ok(res) => Some(res),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("reader panicked"),
        };
        store.forget.release();
        done(&d, "discard").unwrap();
        let got = early.unwrap_or_else(|| done(&r1, "read"));
        let ok = match &got {
            Ok(b) => *b == fx.img0[r(c * CL, CL)],
            Err(e) => e.kind() == ErrorKind::AccessDenied,
        };
        if !ok {
            wrong.push(format!(
                "{} store: a view read of saved cluster {c} that loaded it after a concurrent \
                 discard had freed the slot but before the discard marked the cluster NOT_NEEDED \
                 returned {} instead of the instant's data or AccessDenied",
                if file_store { "file" } else { "ram" },
                brief(&got)
            ));
        }
        assert_kind(
            read(&*view, c * CL, CL),
            ErrorKind::AccessDenied,
            "read after the discard",
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// ---------------------------------------------------------------------------
// f. Scope.
// ---------------------------------------------------------------------------

#[test]
fn scope_limits_copies_and_reads_to_the_clusters_of_the_bitmap() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let bitmap = DirtyBitmap::new(SIZE, 512);
    bitmap.set(2 * CL, 2 * CL); // clusters 2, 3
    bitmap.set(7 * CL + 1024, 1); // one granule inside cluster 7
    bitmap.set(13 * CL, 1); // a hole cluster
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            scope: Some(bitmap),
            ..opts()
        },
    );
    let view = SnapshotView(snap.clone());
    let inside = [2u64, 3, 7, 13];
    for c in 0..NCL {
        if !inside.contains(&c) {
            assert_kind(
                read(&view, c * CL, CL),
                ErrorKind::AccessDenied,
                &format!("cluster {c} outside"),
            );
        }
    }
    for c in 0..NCL {
        fx.live
            .write_at(&[0xE0 + c as u8; 300], c * CL + 1000, IoFlags::NONE)
            .unwrap();
    }
    fx.live.write_zeroes(0, SIZE, ZeroFlags::default()).unwrap();
    let mut saved = store.saved();
    saved.sort();
    // Cluster 13 was a hole at the instant: kept as one, with no store slot.
    assert_eq!(saved, vec![2, 3, 7], "copies outside the scope, or of a hole");
    assert_eq!(snap.stats().copied_clusters, 4);
    assert_eq!(snap.stats().hole_clusters, 1);
    for c in 0..NCL {
        let got = read(&view, c * CL, CL);
        if inside.contains(&c) {
            assert!(got.unwrap() == fx.img0[r(c * CL, CL)], "cluster {c} inside");
        } else {
            assert_kind(got, ErrorKind::AccessDenied, &format!("cluster {c} outside"));
        }
    }
    assert!(read(&view, 2 * CL + 5, 2 * CL - 10).unwrap() == fx.img0[r(2 * CL + 5, 2 * CL - 10)]);
    assert_kind(
        read(&view, 3 * CL + 5, CL),
        ErrorKind::AccessDenied,
        "read from 3 into 4",
    );
    assert_kind(read(&view, 0, SIZE), ErrorKind::AccessDenied, "whole read");
    let ext = view.block_status(13 * CL, CL).unwrap();
    assert!(!ext.is_empty() && ext.iter().map(|e| e.length).sum::<u64>() <= CL);
    // Block status calls exactly the clusters outside the scope unavailable.
    let ext = view.block_status(0, SIZE).unwrap();
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), SIZE);
    for (c, m) in runs(&ext, 0, CL) {
        assert_eq!(
            m == Mapping::Unavailable,
            !inside.contains(&c),
            "cluster {c}: {m:?} in {ext:?}"
        );
    }
}

/// The mapping of each cluster that block status `ext` from `offset`
/// covers; a cluster that is unavailable in part must be so as a whole.
fn runs(ext: &[Extent], offset: u64, cl: u64) -> Vec<(u64, Mapping)> {
    let mut spans = Vec::new();
    let mut pos = offset;
    for e in ext {
        spans.push((pos, pos + e.length, e.mapping));
        pos += e.length;
    }
    (offset / cl..pos.div_ceil(cl))
        .map(|c| {
            let (lo, hi) = (c * cl, (c + 1) * cl);
            let here: Vec<Mapping> = spans
                .iter()
                .filter(|s| s.0 < hi && s.1 > lo)
                .map(|s| s.2)
                .collect();
            if here.contains(&Mapping::Unavailable) {
                assert_eq!(here.len(), 1, "cluster {c} partly unavailable: {ext:?}");
            }
            (c, here[0])
        })
        .collect()
}

// ---------------------------------------------------------------------------
// g. The instant is atomic with respect to writes.
// ---------------------------------------------------------------------------

/// A write held inside its base write when a freeze starts: the freeze waits
/// for it, so it lands wholly before the instant.
#[test]
fn freeze_waits_for_a_write_in_flight_which_lands_before_the_instant() {
    let fx = Fx::new(STORE);
    // An earlier snapshot, so the write also runs copy-before-write.
    let s0 = fx.store();
    let snap0 = fx.snapshot(&s0, opts());
    let (off, len) = (3 * CL + 100, 2 * CL);
    fx.dev.write.arm(1, move |o, _| o == off);
    let w = spawn_write(&fx.live, vec![0xEE; len as usize], off);
    fx.dev.write.wait_caught(1);
    let s1 = fx.store();
    let live = fx.live.clone();
    let dev = fx.dev.clone();
    let store1 = s1.boxed();
    let freezer = spawn(move || {
        let g = live.freeze();
        let mut img = vec![0u8; dev.size() as usize];
        dev.inner.read_at(&mut img, 0, IoFlags::NONE).unwrap();
        let snap = live.snapshot(store1, opts());
        drop(g);
        (snap, img)
    });
    not_yet(&freezer, "freeze with a write in flight");
    fx.dev.write.release();
    done(&w, "write").unwrap();
    let (snap1, img1) = done(&freezer, "freeze");
    let mut expect = fx.img0.clone();
    expect[r(off, len)].fill(0xEE);
    assert!(
        img1 == expect,
        "the image at the instant does not hold the whole write"
    );
    let view1 = SnapshotView(snap1);
    // Later writes do not show through either snapshot.
    fx.live
        .write_at(&vec![0x77; SIZE as usize], 0, IoFlags::NONE)
        .unwrap();
    assert_view_exact(&view1, &expect, "snapshot after the write");
    assert_view_exact(&SnapshotView(snap0), &fx.img0, "snapshot before the write");
}

/// A write arriving while the disk is frozen waits, and lands wholly after
/// the instant.
#[test]
fn a_write_arriving_while_frozen_lands_after_the_instant() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let guard = fx.live.freeze();
    let w = spawn_write(&fx.live, vec![0xEE; 3 * CL as usize], 2 * CL + 1);
    not_yet(&w, "write while frozen");
    let l = fx.live.clone();
    let zero = spawn(move || l.write_zeroes(8 * CL, CL, ZeroFlags::default()));
    not_yet(&zero, "write-zeroes while frozen");
    assert!(
        would_block(fx.live.write_at(&[1; 10], 0, IoFlags::NO_WAIT)),
        "inline write while frozen"
    );
    let snap = fx.live.snapshot(store.boxed(), opts());
    drop(guard);
    done(&w, "write").unwrap();
    done(&zero, "write-zeroes").unwrap();
    assert_view_exact(&SnapshotView(snap), &fx.img0, "view");
    let mut saved = store.saved();
    saved.sort();
    assert_eq!(saved, vec![2, 3, 4, 5, 8]);
}

// ---------------------------------------------------------------------------
// h. Several snapshots of one disk.
// ---------------------------------------------------------------------------

#[test]
fn several_snapshots_are_each_exact_and_detaching_one_keeps_the_others() {
    let fx = Fx::new(STORE);
    let mut image = fx.img0.clone();
    let write = |image: &mut Vec<u8>, off: u64, len: u64, b: u8| {
        fx.live
            .write_at(&vec![b; len as usize], off, IoFlags::NONE)
            .unwrap();
        image[r(off, len)].fill(b);
    };
    let st1 = fx.store();
    let s1 = fx.snapshot(&st1, opts());
    let img1 = image.clone();
    write(&mut image, CL + 10, 3 * CL, 0xA1);
    let st2 = fx.file_store();
    let s2 = fx.snapshot(&st2, opts());
    let img2 = image.clone();
    write(&mut image, 2 * CL, 2 * CL, 0xA2);
    write(&mut image, 10 * CL - 5, 10, 0xA3);
    let st3 = fx.store();
    let s3 = fx.snapshot(&st3, opts());
    let img3 = image.clone();
    write(&mut image, 0, 5 * CL, 0xA4);
    fx.live.trim(12 * CL, 4 * CL).unwrap();
    image[r(12 * CL, 4 * CL)].fill(0);
    assert_eq!(fx.live.snapshot_count(), 3);
    let (v1, v2, v3) = (
        SnapshotView(s1.clone()),
        SnapshotView(s2.clone()),
        SnapshotView(s3.clone()),
    );
    assert_view_exact(&v1, &img1, "s1");
    assert_view_exact(&v2, &img2, "s2");
    assert_view_exact(&v3, &img3, "s3");
    assert!(fx.live_image() == image);

    // A view read of s1 held on the live disk blocks a write to that cluster
    // but not reads of the other snapshots.
    let c = 7;
    let v1a = Arc::new(SnapshotView(s1.clone()));
    fx.dev.read.arm(1, move |o, l| o == c * CL + 1 && l == 10);
    let reader = spawn_read(&v1a, c * CL + 1, 10);
    fx.dev.read.wait_caught(1);
    let w = spawn_write(&fx.live, vec![0xA5; 10], c * CL);
    not_yet(&w, "write under a read of s1");
    assert_view_exact(&v2, &img2, "s2 while s1 is read");
    assert_view_exact(&v3, &img3, "s3 while s1 is read");
    fx.dev.read.release();
    assert!(done(&reader, "read").unwrap() == img1[r(c * CL + 1, 10)]);
    done(&w, "write").unwrap();
    image[r(c * CL, 10)].fill(0xA5);

    fx.live.detach(&s2);
    assert_eq!(fx.live.snapshot_count(), 2);
    let saved2 = st2.saved().len();
    write(&mut image, 0, SIZE, 0xA6);
    assert_eq!(st2.saved().len(), saved2, "a detached snapshot still gets copies");
    assert_view_exact(&v1, &img1, "s1 after detach");
    assert_view_exact(&v3, &img3, "s3 after detach");
    drop((v2, s2));
    assert!(fx.live_image() == image);
}

// ---------------------------------------------------------------------------
// k. Block status pins clusters like a read.
// ---------------------------------------------------------------------------

/// A view block status held on the live disk for cluster C (data at the
/// instant): a live trim of C waits for it, and the status says data.
#[test]
fn view_block_status_in_flight_holds_back_a_live_trim_of_its_clusters() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 2;
    fx.dev.status.arm(1, move |o, _| o == c * CL);
    let v = view.clone();
    let bs = spawn(move || v.block_status(c * CL, 2 * CL));
    fx.dev.status.wait_caught(1);
    let live = fx.live.clone();
    let t = spawn(move || live.trim(c * CL, CL));
    not_yet(&t, "trim under a block status");
    let live = fx.live.clone();
    let z = spawn(move || {
        live.write_zeroes(
            c * CL + CL,
            CL,
            ZeroFlags {
                may_unmap: true,
                ..ZeroFlags::default()
            },
        )
    });
    not_yet(&z, "write-zeroes under a block status");
    fx.dev.status.release();
    let ext = done(&bs, "block status").unwrap();
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 2 * CL);
    assert!(
        ext.iter().all(|e| e.mapping == Mapping::Data),
        "status reported {ext:?} for data"
    );
    done(&t, "trim").unwrap();
    done(&z, "write-zeroes").unwrap();
    let ext = view.block_status(0, SIZE).unwrap();
    let mut pos = 0;
    for e in &ext {
        if e.mapping != Mapping::Data {
            assert!(
                fx.img0[r(pos, e.length)].iter().all(|&b| b == 0),
                "{e:?} at {pos} over data"
            );
        }
        pos += e.length;
    }
    assert_eq!(pos, SIZE);
    assert_view_exact(&*view, &fx.img0, "after");
}

/// Block status must not cost more blocking than a read: with a view block
/// status in flight on the live disk for cluster C, view reads (of any
/// cluster: rule 1) and live writes to other clusters, copies included
/// (rules 2 and 3), go ahead; only a change to C waits.
#[test]
fn a_view_block_status_in_flight_blocks_only_changes_to_its_own_clusters() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 2;
    fx.dev.status.arm(1, move |o, _| o == c * CL);
    let v = view.clone();
    let bs = spawn(move || v.block_status(c * CL, CL));
    fx.dev.status.wait_caught(1);

    // Start all three at once and give them one deadline together.
    let reads: Vec<_> = [(6 * CL, CL, "another cluster"), (c * CL, CL, "the same cluster")]
        .into_iter()
        .map(|(off, len, what)| (off, len, what, spawn_read(&view, off, len)))
        .collect();
    let w = spawn_write(&fx.live, vec![0xE9; 100], 9 * CL);
    let deadline = Instant::now() + LONG;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut blocked = Vec::new();
    for (off, len, what, rx) in &reads {
        match rx.recv_timeout(left()) {
            Ok(got) => assert!(
                got.as_ref().is_ok_and(|b| *b == fx.img0[r(*off, *len)]),
                "view read of {what}: {}",
                brief(&got)
            ),
            Err(_) => blocked.push(format!("a view read of {what}")),
        }
    }
    match w.recv_timeout(left()) {
        Ok(res) => res.unwrap(),
        Err(_) => blocked.push("a live write (with its copy) to another cluster".into()),
    }
    let own = spawn_write(&fx.live, vec![0xE2; 100], c * CL);
    not_yet(&own, "live write to the cluster whose status is in flight");
    fx.dev.status.release();
    let ext = done(&bs, "block status").unwrap();
    assert!(ext.iter().all(|e| e.mapping == Mapping::Data), "{ext:?}");
    done(&own, "write").unwrap();
    assert!(
        blocked.is_empty(),
        "while a view block status of cluster {c} was held inside the live disk's block status, \
         these did not complete: {}",
        blocked.join("; ")
    );
    assert_view_exact(&*view, &fx.img0, "after");
    assert!(fx.dev.reads() > 0);
}

// ---------------------------------------------------------------------------
// l. Pins are released on every way out of a read.
// ---------------------------------------------------------------------------

/// A live disk whose reads and block status panic while `panic` is set, the
/// way a buggy device would.
struct Panicky {
    inner: RawFile,
    panic: AtomicBool,
}

impl Panicky {
    fn check(&self) {
        if self.panic.load(Ordering::SeqCst) {
            panic!("injected device panic");
        }
    }
}

impl BlockDev for Panicky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        self.check();
        self.inner.read_at(buf, offset, flags)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        self.inner.write_at(buf, offset, flags)
    }
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, length, flags)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.inner.trim(offset, length)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.inner.cache(offset, length)
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.check();
        self.inner.block_status(offset, length)
    }
}

/// A view read (or block status) whose live disk panics mid-call pinned
/// the clusters it was reading; the pins must go with the panic, or every
/// later live write to those clusters would wait for ever.
#[test]
fn a_view_read_that_panics_does_not_leave_live_writes_to_its_clusters_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let file = RawFile::create(&dir.path().join("live.raw"), SIZE).unwrap();
    let img0: Vec<u8> = (0..SIZE).map(pattern).collect();
    file.write_at(&img0[..(DATA_CLUSTERS * CL) as usize], 0, IoFlags::NONE)
        .unwrap();
    let dev = Arc::new(Panicky {
        inner: file,
        panic: AtomicBool::new(false),
    });
    let live = Arc::new(LiveDisk::new(dev.clone()));
    let store = RamStore::new(SIZE, dir.path().join("spill"), SIZE);
    let guard = live.freeze();
    let snap = live.snapshot(Box::new(store), opts());
    drop(guard);
    let view = SnapshotView(snap.clone());

    dev.panic.store(true, Ordering::SeqCst);
    let (c, d) = (3, 7);
    let read = panic::catch_unwind(AssertUnwindSafe(|| read(&view, c * CL, 2 * CL)));
    assert!(read.is_err(), "the device did not panic");
    let status = panic::catch_unwind(AssertUnwindSafe(|| view.block_status(d * CL, CL)));
    assert!(status.is_err(), "the device did not panic");
    dev.panic.store(false, Ordering::SeqCst);

    for (what, x) in [("read", c), ("read", c + 1), ("block status", d)] {
        let w = spawn_write(&live, vec![0xEE; CL as usize], x * CL);
        done(&w, &format!("live write to cluster {x} after a panicked {what}"))
            .unwrap_or_else(|e| panic!("live write to cluster {x}: {e}"));
    }
    assert_view_exact(&view, &img0, "after panicked reads");
}

// ---------------------------------------------------------------------------
// m. Events reach every subscriber, outside the snapshot's lock.
// ---------------------------------------------------------------------------

#[test]
fn every_subscriber_hears_saves_and_discards_until_it_unsubscribes() {
    use SnapshotEvent::{Discarded, Saved};
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = SnapshotView(snap.clone());
    let a = events(&snap);
    let b = events(&snap);
    let c = snap.subscribe(|_| {});

    // Data clusters 2 and 3 in one copy, then a hole at the instant.
    fx.live.write_at(&[1; 10], 3 * CL - 5, IoFlags::NONE).unwrap();
    fx.live.write_at(&[1; 10], 13 * CL, IoFlags::NONE).unwrap();
    // Discards report only clusters not discarded before.
    view.trim(5 * CL, 2 * CL).unwrap();
    view.trim(2 * CL, 4 * CL).unwrap();
    let both = vec![
        Saved { first: 2, count: 2 },
        Saved { first: 13, count: 1 },
        Discarded { first: 5, count: 2 },
        Discarded { first: 2, count: 3 },
    ];
    assert_eq!(*lock(&a), both);
    assert_eq!(*lock(&b), both);

    drop(b);
    c.unsubscribe();
    fx.live.write_at(&[1; 10], 8 * CL, IoFlags::NONE).unwrap();
    let mut after = both.clone();
    after.push(Saved { first: 8, count: 1 });
    assert_eq!(*lock(&a), after, "the remaining subscriber");
}

/// A subscriber may call back into the snapshot: events are delivered after
/// its lock is released.
#[test]
fn subscribers_are_called_without_the_snapshots_lock() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            on_cbw_error: OnCbwError::BreakSnapshot,
            store_limit: Some(2 * CL),
            ..opts()
        },
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (weak, s) = (Arc::downgrade(&snap), seen.clone());
    let _sub = snap.subscribe(move |ev| {
        let stats = weak.upgrade().map(|snap| snap.stats());
        lock(&s).push((ev.clone(), stats));
    });
    let w = spawn_write(&fx.live, vec![1; 10], 0);
    done(&w, "write whose copy reports Saved").unwrap();
    let w = spawn_write(&fx.live, vec![1; 10], CL);
    done(&w, "write whose copy reports Saved and StoreUsage").unwrap();
    let w = spawn_write(&fx.live, vec![1; 10], 2 * CL);
    done(&w, "write that breaks the snapshot").unwrap();
    let seen = lock(&seen);
    use SnapshotEvent::{Broken, Saved, StoreUsage};
    assert!(
        matches!(
            &seen[..],
            [
                (Saved { first: 0, count: 1 }, Some(_)),
                (Saved { first: 1, count: 1 }, Some(_)),
                (StoreUsage { percent: 80, .. }, Some(_)),
                (StoreUsage { percent: 95, .. }, Some(_)),
                (Broken(_), Some(stats)),
            ] if stats.broken.is_some()
        ),
        "{seen:?}"
    );
}

// ---------------------------------------------------------------------------
// n. Timed copies share a few copier threads.
// ---------------------------------------------------------------------------

/// Copies with a timeout run on at most four copier threads per disk. When
/// stuck copies hold them all, another timed copy cannot even start: it
/// times out at its deadline, is taken back (it never runs, its cluster is
/// not copied), and once the copiers are free the same write copies and
/// lands.
#[test]
fn a_timed_copy_that_finds_every_copier_stuck_times_out_and_never_runs() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(
        &store,
        SnapshotOptions {
            cbw_timeout: Some(Duration::from_millis(100)),
            ..opts()
        },
    );
    let view = SnapshotView(snap.clone());
    store.save.arm(4, |i, _| i < 4);
    let stuck: Vec<_> = (0..4)
        .map(|c| spawn_write(&fx.live, vec![0xEE; 100], c * CL))
        .collect();
    for (c, w) in stuck.iter().enumerate() {
        assert_kind(
            done(w, "write with a stuck copy"),
            ErrorKind::TimedOut,
            &format!("cluster {c}"),
        );
    }
    store.save.wait_caught(4);
    assert_eq!(store.save.held(), 4);

    let c = 5;
    let w = spawn_write(&fx.live, vec![0xEF; 100], c * CL);
    assert_kind(
        done(&w, "write whose copy cannot start"),
        ErrorKind::TimedOut,
        "write whose copy cannot start",
    );
    assert!(
        fx.live_bytes(c * CL, CL) == fx.img0[r(c * CL, CL)],
        "timed-out write changed the disk"
    );
    assert_view_exact(&view, &fx.img0, "with every copier stuck");

    store.save.release();
    eventually("the stuck copies settle", || snap.stats().copied_clusters == 4);
    let mut saved = store.saved();
    saved.sort();
    assert_eq!(saved, vec![0, 1, 2, 3], "the copy taken back ran anyway");
    fx.live.write_at(&[0xEF; 100], c * CL, IoFlags::NONE).unwrap();
    assert!(store.saved().contains(&c));
    assert_view_exact(&view, &fx.img0, "after the copiers came free");
    assert!(fx.live_bytes(c * CL, 100).iter().all(|&b| b == 0xEF));
}

// ---------------------------------------------------------------------------
// Deleting a snapshot under a reader.
// ---------------------------------------------------------------------------

/// Once a snapshot is detached (deleted), live writes no longer copy for it
/// or wait for its readers: a view read in flight when that happens must
/// fail rather than return data written after the instant, and so must
/// every later read and block status.
#[test]
fn a_view_read_in_flight_when_its_snapshot_is_detached_fails_instead_of_returning_new_data() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap.clone()));
    let c = 4;
    let (roff, rlen) = (c * CL, CL);
    fx.dev.read.arm(1, move |o, l| o == roff && l == rlen);
    let reader = spawn_read(&view, roff, rlen);
    fx.dev.read.wait_caught(1);

    fx.live.detach(&snap);
    // Detached: the write neither copies nor waits for the reader.
    let writer = spawn_write(&fx.live, vec![0xEE; CL as usize], roff);
    done(&writer, "live write after detach").expect("live write");
    assert!(store.saved().is_empty(), "a detached snapshot copies nothing");

    fx.dev.read.release();
    let got = done(&reader, "view read");
    assert!(
        got.is_err(),
        "a read of a deleted snapshot returned data: {}",
        brief(&got)
    );
    assert!(read(&*view, 0, CL).is_err(), "a later read must fail too");
    assert!(view.block_status(0, CL).is_err());
}

/// A store that panics while saving (a bug) must not leave the clusters
/// in flight: the write that needed the copy fails, and once the store
/// works again a write to the same cluster copies and goes through,
/// without waiting for the copy that never finished.
#[test]
fn a_store_that_panics_mid_copy_leaves_no_cluster_stuck_in_flight() {
    let fx = Fx::new(STORE);
    let store = fx.store();
    let snap = fx.snapshot(&store, opts());
    let view = Arc::new(SnapshotView(snap));
    let c = 3;
    store.set_panic(true);
    let first = spawn_write(&fx.live, vec![0xEE; 4096], c * CL);
    let res = match first.recv_timeout(Duration::from_secs(10)) {
        Ok(r) => r,
        // The panic unwound through the writer: that is a failed write too.
        Err(RecvTimeoutError::Disconnected) => Err(fleece_block::Error::new(ErrorKind::Io, "writer panicked")),
        Err(RecvTimeoutError::Timeout) => panic!("the write hung"),
    };
    assert!(res.is_err(), "the write whose copy panicked must fail");
    store.set_panic(false);
    let again = spawn_write(&fx.live, vec![0xEF; 4096], c * CL);
    done(&again, "write after the store recovered").expect("write");
    assert_view_exact(&*view, &fx.img0, "after a panicked copy");
}
