//! [`Trap`]: holds matching calls until the test lets them go.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a wait for something that must happen may take before the test
/// fails; only reached if the code under test is broken.
pub(super) const DEADLINE: Duration = Duration::from_secs(5);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Pred = Box<dyn Fn(u64, u64) -> bool + Send>;

#[derive(Default)]
struct TrapState {
    pred: Option<Pred>,
    /// Matching calls still to catch.
    left: usize,
    /// Calls caught since armed.
    caught: usize,
    /// Calls held right now.
    held: usize,
    /// Held calls that may go (one each).
    tokens: usize,
    /// Everything goes.
    open: bool,
}

/// Catches up to `n` calls matching a predicate on (offset, length) and holds
/// each until [`release_one`](Trap::release_one) or [`release`](Trap::release).
///
/// A new trap catches nothing.
#[derive(Default)]
pub struct Trap {
    st: Mutex<TrapState>,
    cv: Condvar,
}

impl Trap {
    /// Catches the next `n` calls for which `pred(offset, length)` holds.
    ///
    /// # Panics
    ///
    /// If the trap still holds calls from an earlier arming.
    pub fn arm(&self, n: usize, pred: impl Fn(u64, u64) -> bool + Send + 'static) {
        let mut s = lock(&self.st);
        assert_eq!(s.held, 0, "re-arming a trap that still holds calls");
        *s = TrapState {
            pred: Some(Box::new(pred)),
            left: n,
            ..TrapState::default()
        };
    }

    /// Called by the hooked operation before it does anything; returns at
    /// once unless the call is to be caught.
    pub fn hit(&self, offset: u64, len: u64) {
        let mut s = lock(&self.st);
        if s.open || s.left == 0 || !s.pred.as_ref().is_some_and(|p| p(offset, len)) {
            return;
        }
        s.left -= 1;
        s.caught += 1;
        s.held += 1;
        self.cv.notify_all();
        while !s.open && s.tokens == 0 {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if !s.open {
            s.tokens -= 1;
        }
        s.held -= 1;
        self.cv.notify_all();
    }

    /// Waits until `n` calls have been caught since armed.
    ///
    /// # Panics
    ///
    /// If they do not arrive within a few seconds.
    pub fn wait_caught(&self, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        let mut s = lock(&self.st);
        while s.caught < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "trap: only {} of {n} expected calls arrived",
                s.caught
            );
            s = self.cv.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Calls held right now.
    pub fn held(&self) -> usize {
        lock(&self.st).held
    }

    /// Lets one held call go and waits until it has left the trap.
    ///
    /// # Panics
    ///
    /// If nothing is held, or the call does not leave within a few seconds.
    pub fn release_one(&self) {
        let deadline = Instant::now() + DEADLINE;
        let mut s = lock(&self.st);
        let before = s.held;
        assert!(before > 0, "release_one with nothing held");
        s.tokens += 1;
        self.cv.notify_all();
        while s.held >= before {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "trap: released call did not leave");
            s = self.cv.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Lets everything go, now and later (until re-armed).
    pub fn release(&self) {
        let mut s = lock(&self.st);
        s.open = true;
        s.pred = None;
        self.cv.notify_all();
    }
}
