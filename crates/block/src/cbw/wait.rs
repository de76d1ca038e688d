//! Wait slots: where live writes wait for a copy or a view read of their
//! clusters to end.
//!
//! A snapshot's waiters spread over [`WAIT_SLOTS`] condition variables by
//! cluster, so a settled copy or a finished view read wakes only writers
//! that wait on clusters of the same slot, not all of them. The count of
//! waiters per slot lives under the snapshot's lock, next to the states it
//! guards.

use std::sync::{Condvar, MutexGuard};
use std::time::Instant;

/// Condition variables per snapshot.
const WAIT_SLOTS: usize = 64;

fn slot(c: u64) -> usize {
    (c % WAIT_SLOTS as u64) as usize
}

/// Writers waiting on each slot, so that nobody pays a futex call to wake a
/// slot with no one in it. Kept under the snapshot's lock.
pub(super) struct Waiting([u32; WAIT_SLOTS]);

impl Waiting {
    pub(super) fn new() -> Self {
        Waiting([0; WAIT_SLOTS])
    }
}

/// The condition variables.
pub(super) struct WaitSlots(Box<[Condvar]>);

impl WaitSlots {
    pub(super) fn new() -> Self {
        WaitSlots((0..WAIT_SLOTS).map(|_| Condvar::new()).collect())
    }

    /// Waits until cluster `c` may have changed (or the deadline passes);
    /// `waiting` finds the counts inside the locked data. Returns the guard
    /// and whether the deadline passed.
    pub(super) fn wait<'a, T>(
        &self,
        mut g: MutexGuard<'a, T>,
        waiting: impl Fn(&mut T) -> &mut Waiting,
        c: u64,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, T>, bool) {
        let slot = slot(c);
        let cv = &self.0[slot];
        waiting(&mut g).0[slot] += 1;
        let (mut g, timed_out) = match deadline {
            None => (cv.wait(g).unwrap_or_else(|p| p.into_inner()), false),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    (g, true)
                } else {
                    let (g, r) = cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner());
                    (g, r.timed_out() && Instant::now() >= d)
                }
            }
        };
        waiting(&mut g).0[slot] -= 1;
        (g, timed_out)
    }

    /// Wakes writers waiting on clusters `[c, end)`. Call with the lock held.
    pub(super) fn wake(&self, w: &Waiting, c: u64, end: u64) {
        let n = (end - c).min(WAIT_SLOTS as u64);
        for x in c..c + n {
            let slot = slot(x);
            if w.0[slot] > 0 {
                self.0[slot].notify_all();
            }
        }
    }

    /// Wakes every waiter (a break, a discard). Call with the lock held.
    pub(super) fn wake_all(&self, w: &Waiting) {
        for (slot, cv) in self.0.iter().enumerate() {
            if w.0[slot] > 0 {
                cv.notify_all();
            }
        }
    }
}
