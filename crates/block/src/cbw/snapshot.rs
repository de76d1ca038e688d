//! The [`Snapshot`] type: its options, counters and the state it shares
//! with the copy engine, view reads and block status.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::events::{SnapshotEvent, Subscribers, Subscription};
use super::pool::Copiers;
use super::state::States;
use super::wait::{WaitSlots, Waiting};
use crate::bitmap::DirtyBitmap;
use crate::dev::BlockDev;
use crate::ext::max_transfer;
use crate::store::Store;
use crate::{Error, ErrorKind, Result};

/// What happens when saving old data fails (I/O error, full store, timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCbwError {
    /// The user's write fails; the snapshot stays exact (QEMU's default).
    BreakGuestWrite,
    /// The snapshot breaks for good; user writes go on without copies.
    BreakSnapshot,
}

/// Where one cluster's contents as of the instant are now: what a push job
/// (and the `fleece:copy-order` hint) orders its copy by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// Only on the live disk: copying it out now (and then discarding it)
    /// spares the copy-before-write a later write would pay.
    Unsaved,
    /// A copy-before-write of it is in flight.
    Saving,
    /// Saved, in a store that keeps it in memory.
    SavedInMemory,
    /// Saved, in a store on disk.
    Saved,
    /// A hole (or zeroes) at the instant.
    Zero,
    /// Discarded, or outside the snapshot's bitmap: not readable.
    Unavailable,
}

/// How a snapshot behaves.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// Copy unit in bytes; rounded up to the store's granularity.
    pub cluster_size: u64,
    /// Failure policy.
    pub on_cbw_error: OnCbwError,
    /// A copy slower than this counts as failed.
    pub cbw_timeout: Option<Duration>,
    /// Each view read discards the whole clusters it returned.
    pub read_once: bool,
    /// Most bytes the store may hold.
    pub store_limit: Option<u64>,
    /// Only clusters dirty in this (frozen) bitmap are copied or readable.
    pub scope: Option<DirtyBitmap>,
    /// Names the snapshot in log lines (the daemon uses `DISK@NAME`).
    pub label: String,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            cluster_size: 64 << 10,
            on_cbw_error: OnCbwError::BreakGuestWrite,
            cbw_timeout: None,
            read_once: false,
            store_limit: None,
            scope: None,
            label: String::new(),
        }
    }
}

/// Counters for status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Clusters whose contents at the instant are saved so far.
    pub copied_clusters: u64,
    /// Of those, clusters that were holes (or zeroes) at the instant, kept
    /// as such without taking store space.
    pub hole_clusters: u64,
    /// Clusters discarded from the view.
    pub discarded_clusters: u64,
    /// Bytes the store holds.
    pub used_bytes: u64,
    /// Why the snapshot broke, if it did.
    pub broken: Option<String>,
}

/// What the snapshot's lock guards.
pub(super) struct Inner {
    /// Live-disk view reads in flight, per cluster.
    pub(super) readers: HashMap<u64, u32>,
    pub(super) broken: Option<String>,
    /// Deleted: detached from its disk, nothing can be read any more.
    pub(super) retired: bool,
    /// Highest usage alert sent (0, 80, 95).
    pub(super) alerted: u8,
    /// Writers waiting on each slot of `Snapshot::changed`.
    pub(super) waiting: Waiting,
}

/// The state of one disk at one instant.
pub struct Snapshot {
    pub(super) base: Arc<dyn BlockDev>,
    /// The base's maximum transfer, asked once: reads split by it.
    pub(super) base_max: u64,
    pub(super) size: u64,
    pub(super) cluster: u64,
    pub(super) store: Box<dyn Store>,
    /// Read without the lock (the write fast path); changed only under it.
    pub(super) states: States,
    pub(super) inner: Mutex<Inner>,
    pub(super) changed: WaitSlots,
    pub(super) opts: SnapshotOptions,
    /// `Inner::broken` for the write fast path, which takes no lock.
    pub(super) broken: AtomicBool,
    /// Store bytes held, or reserved by copies in flight.
    pub(super) used: AtomicU64,
    pub(super) copied: AtomicU64,
    pub(super) holes: AtomicU64,
    pub(super) discarded: AtomicU64,
    pub(super) events: Arc<Subscribers>,
    /// Where copies with a timeout run: the live disk's copier threads.
    pub(super) copiers: Arc<Copiers>,
}

impl Snapshot {
    pub(super) fn new(
        base: Arc<dyn BlockDev>,
        store: Box<dyn Store>,
        opts: SnapshotOptions,
        copiers: Arc<Copiers>,
    ) -> Self {
        let size = base.size();
        let base_max = max_transfer(&base.capabilities());
        let g = store.granularity().max(1);
        let cluster = opts.cluster_size.max(g).div_ceil(g) * g;
        let clusters = size.div_ceil(cluster).max(1);
        Snapshot {
            base,
            base_max,
            size,
            cluster,
            store,
            states: States::new(clusters),
            inner: Mutex::new(Inner {
                readers: HashMap::new(),
                broken: None,
                retired: false,
                alerted: 0,
                waiting: Waiting::new(),
            }),
            changed: WaitSlots::new(),
            opts,
            broken: AtomicBool::new(false),
            used: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            holes: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            events: Subscribers::new(),
            copiers,
        }
    }

    /// Cluster size actually used (after rounding to the store).
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Size of the disk at the instant.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The options it was made with.
    pub fn options(&self) -> &SnapshotOptions {
        &self.opts
    }

    /// Store kind and path.
    pub fn store_description(&self) -> (&'static str, Option<PathBuf>) {
        self.store.describe()
    }

    /// Calls `f` with every later event of this snapshot until the returned
    /// [`Subscription`] is dropped. Several subscribers may listen at once.
    ///
    /// `f` runs on the thread whose I/O caused the event (a live write, a
    /// copy, a view read or discard), after the snapshot's lock is released,
    /// so it holds up only that I/O; it must still be quick and must not
    /// panic. Events from different threads may arrive out of order.
    pub fn subscribe(&self, f: impl Fn(&SnapshotEvent) + Send + Sync + 'static) -> Subscription {
        self.events.add(Arc::new(f))
    }

    /// Current counters.
    pub fn stats(&self) -> SnapshotStats {
        SnapshotStats {
            copied_clusters: self.copied.load(Ordering::Relaxed),
            hole_clusters: self.holes.load(Ordering::Relaxed),
            discarded_clusters: self.discarded.load(Ordering::Relaxed),
            used_bytes: self.used.load(Ordering::Relaxed),
            broken: self.lock().broken.clone(),
        }
    }

    /// Number of clusters.
    pub fn cluster_count(&self) -> u64 {
        self.size.div_ceil(self.cluster)
    }

    /// Where cluster `c`'s contents as of the instant are now. Without a
    /// lock: the answer may be stale by the time it is used (an unsaved
    /// cluster may get saved), never wrong about the instant's contents.
    pub fn cluster_state(&self, c: u64) -> ClusterState {
        use super::state::{COPYING, MASK, NOT_COPIED, NOT_NEEDED, SAVED, ZEROED};
        match self.states.get(c) & MASK {
            SAVED if self.store.holds_in_memory(c) => ClusterState::SavedInMemory,
            SAVED => ClusterState::Saved,
            ZEROED => ClusterState::Zero,
            NOT_NEEDED => ClusterState::Unavailable,
            NOT_COPIED | COPYING if !self.in_scope(c) => ClusterState::Unavailable,
            COPYING => ClusterState::Saving,
            _ => ClusterState::Unsaved,
        }
    }

    /// True when the store holds 80% of its limit or more: saved clusters
    /// should then be copied out (and freed) first.
    pub fn store_pressed(&self) -> bool {
        self.opts
            .store_limit
            .is_some_and(|l| self.used.load(Ordering::Relaxed).saturating_mul(5) >= l.saturating_mul(4))
    }

    /// True once a copy failure broke it (break-snapshot policy).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until cluster `c` may have changed (or the deadline passes).
    pub(super) fn wait<'a>(
        &self,
        g: MutexGuard<'a, Inner>,
        c: u64,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, Inner>, bool) {
        self.changed.wait(g, |i: &mut Inner| &mut i.waiting, c, deadline)
    }

    /// Wakes writers waiting on clusters `[c, end)`. Call with the lock held.
    pub(super) fn wake(&self, g: &Inner, c: u64, end: u64) {
        self.changed.wake(&g.waiting, c, end);
    }

    /// Wakes every waiter (a break, a discard). Call with the lock held.
    pub(super) fn wake_all(&self, g: &Inner) {
        self.changed.wake_all(&g.waiting);
    }

    pub(super) fn in_scope(&self, c: u64) -> bool {
        match &self.opts.scope {
            None => true,
            Some(b) => b.any(c * self.cluster, self.cluster_len(c)),
        }
    }

    pub(super) fn cluster_len(&self, c: u64) -> u64 {
        self.cluster.min(self.size - c * self.cluster)
    }

    /// First and last cluster of a non-empty range.
    pub(super) fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.cluster, (offset + len - 1) / self.cluster)
    }

    pub(super) fn check_readable(&self) -> Result<()> {
        let g = self.lock();
        if g.retired {
            return Err(Error::new(ErrorKind::Broken, "this snapshot was deleted"));
        }
        match &g.broken {
            Some(why) => Err(Error::new(
                ErrorKind::Broken,
                format!("snapshot is broken: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// Ends the snapshot before it is detached from its disk: from now on
    /// writes copy nothing for it, so every view read fails, also one in
    /// flight (it checks again when done), rather than return data that
    /// may have been written after the instant. No event: it is deleted,
    /// not broken.
    pub(super) fn retire(&self) {
        let mut g = self.lock();
        g.retired = true;
        // The write fast path reads this: nothing to copy any more.
        self.broken.store(true, Ordering::Release);
        self.wake_all(&g);
        drop(g);
    }
}
