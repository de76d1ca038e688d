//! What a snapshot tells its subscribers, and the subscriber list.
//!
//! Events are delivered on the thread that caused them (a live write, a
//! copier, a view read or discard), after the snapshot's lock is released,
//! so a subscriber never holds up other threads' I/O; but it does hold up
//! the one I/O that caused the event, so it must be quick (count, send on a
//! channel, wake a task) and must not panic.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};

/// Something a snapshot reports to its subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotEvent {
    /// Clusters `first..first + count` are now kept as of the instant (as
    /// data in the store, or as holes); later live writes to them copy
    /// nothing.
    Saved {
        /// First cluster.
        first: u64,
        /// Clusters.
        count: u64,
    },
    /// Clusters `first..first + count` were discarded from the view (and
    /// their saved copies freed); reading them fails from now on.
    Discarded {
        /// First cluster.
        first: u64,
        /// Clusters.
        count: u64,
    },
    /// It broke, with why.
    Broken(String),
    /// Store usage crossed `percent` (80 or 95) of the limit.
    StoreUsage {
        /// Threshold crossed.
        percent: u8,
        /// Bytes held.
        used: u64,
        /// The limit.
        limit: u64,
    },
}

type Callback = dyn Fn(&SnapshotEvent) + Send + Sync;
/// Subscribers with their ids, in the order they subscribed.
type List = Vec<(u64, Arc<Callback>)>;

/// A snapshot's subscribers.
pub(super) struct Subscribers {
    /// Replaced whole on change, so that delivering takes the lock only to
    /// clone the `Arc`, and a callback may unsubscribe (or subscribe).
    list: RwLock<Arc<List>>,
    /// False while the list is empty: the copy path checks this first and
    /// does not even gather what it would report.
    any: AtomicBool,
    next: AtomicU64,
}

impl Subscribers {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Subscribers {
            list: RwLock::new(Arc::new(Vec::new())),
            any: AtomicBool::new(false),
            next: AtomicU64::new(0),
        })
    }

    /// True if anyone listens; events need not be made otherwise.
    pub(super) fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    pub(super) fn add(self: &Arc<Self>, f: Arc<Callback>) -> Subscription {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.change(|v| v.push((id, f)));
        Subscription {
            subs: Arc::downgrade(self),
            id,
        }
    }

    fn change(&self, f: impl FnOnce(&mut List)) {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let mut v = (**list).clone();
        f(&mut v);
        self.any.store(!v.is_empty(), Ordering::Release);
        *list = Arc::new(v);
    }

    /// Calls every subscriber. Never call with the snapshot's lock held.
    pub(super) fn emit(&self, ev: &SnapshotEvent) {
        if !self.any() {
            return;
        }
        let list = self.list.read().unwrap_or_else(|p| p.into_inner()).clone();
        for (_, f) in list.iter() {
            f(ev);
        }
    }

    /// Reports runs of clusters gathered by a [`Runs`].
    pub(super) fn emit_runs(&self, runs: &Runs, ev: fn(u64, u64) -> SnapshotEvent) {
        for &(first, count) in &runs.0 {
            self.emit(&ev(first, count));
        }
    }
}

/// Clusters gathered under the lock, to be reported as runs once it is
/// released. Allocates only when a cluster is added.
#[derive(Default)]
pub(super) struct Runs(Vec<(u64, u64)>);

impl Runs {
    /// Adds cluster `c`, which comes after every cluster added so far.
    pub(super) fn add(&mut self, c: u64) {
        match self.0.last_mut() {
            Some((first, count)) if *first + *count == c => *count += 1,
            _ => self.0.push((c, 1)),
        }
    }
}

/// A subscription to a snapshot's events; dropping it (or
/// [`unsubscribe`](Subscription::unsubscribe)) ends it.
///
/// It does not keep the snapshot alive. An event already being delivered
/// when it ends may still reach the subscriber.
#[must_use = "dropping a Subscription unsubscribes at once"]
pub struct Subscription {
    subs: Weak<Subscribers>,
    id: u64,
}

impl Subscription {
    /// Ends the subscription (the same as dropping it).
    pub fn unsubscribe(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(subs) = self.subs.upgrade() {
            subs.change(|v| v.retain(|(id, _)| *id != self.id));
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").field("id", &self.id).finish()
    }
}
