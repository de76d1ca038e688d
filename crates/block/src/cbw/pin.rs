//! [`ReadPin`]: holds back live writes to clusters that a view reads from
//! the live disk.
//!
//! While pinned, a cluster's `READERS` bit is set and the write that would
//! change it waits (rule 3). The pin is a guard so that it is released on
//! every way out of a read, a panic of the device included: a pin left
//! behind would hang every later write to its clusters.

use super::snapshot::{Inner, Snapshot};
use super::state::READERS;

/// Clusters `[first, end)` pinned by one view read or block status.
pub(super) struct ReadPin<'a> {
    snap: &'a Snapshot,
    first: u64,
    end: u64,
}

impl<'a> ReadPin<'a> {
    /// Pins clusters `[first, end)`. `g` is the snapshot's locked state: the
    /// caller has just seen them unsaved, and they stay so until it lets go
    /// of the lock, so no write can be changing them.
    pub(super) fn new(snap: &'a Snapshot, g: &mut Inner, first: u64, end: u64) -> Self {
        for x in first..end {
            *g.readers.entry(x).or_insert(0) += 1;
            let s = snap.states.get(x);
            snap.states.set(x, s | READERS);
        }
        ReadPin { snap, first, end }
    }

    /// The first pinned cluster.
    pub(super) fn first(&self) -> u64 {
        self.first
    }

    /// One past the last pinned cluster.
    pub(super) fn end(&self) -> u64 {
        self.end
    }
}

impl Drop for ReadPin<'_> {
    fn drop(&mut self) {
        let snap = self.snap;
        let mut g = snap.lock();
        for x in self.first..self.end {
            if let Some(n) = g.readers.get_mut(&x) {
                *n -= 1;
                if *n == 0 {
                    g.readers.remove(&x);
                    let s = snap.states.get(x);
                    snap.states.set(x, s & !READERS);
                    snap.wake(&g, x, x + 1);
                }
            }
        }
    }
}
