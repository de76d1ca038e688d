//! A job's controls, shared by its copies (one per disk): pause, resume,
//! cancel, the group's failure, the speed limit, and what a status shows.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::rate::RateLimit;

/// Where a job is, as [`Control::status`] tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlStatus {
    /// Paused (by the user, or by a `stop` policy).
    pub paused: bool,
    /// Why it paused, if a failure paused it.
    pub pause_reason: Option<String>,
    /// Cancelled.
    pub cancelled: bool,
    /// Reconnecting or sending again after a target failure: why.
    pub retrying: Option<String>,
}

#[derive(Default)]
pub(crate) struct CtlInner {
    pub(crate) status: ControlStatus,
    /// A copy of the group failed: the others stop.
    pub(crate) failed: bool,
    /// Copies retrying now.
    pub(crate) retrying: usize,
}

/// Pause, resume, cancel and speed of a job, shared by its copies.
pub struct Control {
    inner: Mutex<CtlInner>,
    cv: Condvar,
    /// The speed limit, shared by all the job's copies.
    pub rate: RateLimit,
}

/// Why a worker stops early.
pub(crate) enum Stop {
    Cancelled,
    GroupFailed,
}

impl Control {
    /// A running job limited to `rate` bytes per second (0: none).
    pub fn new(rate: u64) -> Arc<Control> {
        Arc::new(Control {
            inner: Mutex::new(CtlInner::default()),
            cv: Condvar::new(),
            rate: RateLimit::new(rate),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, CtlInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pauses between requests (requests in flight finish).
    pub fn pause(&self, reason: Option<String>) {
        let mut g = self.lock();
        g.status.paused = true;
        if reason.is_some() {
            g.status.pause_reason = reason;
        }
        self.cv.notify_all();
    }

    /// Goes on after a pause.
    pub fn resume(&self) {
        let mut g = self.lock();
        g.status.paused = false;
        g.status.pause_reason = None;
        self.cv.notify_all();
    }

    /// Stops the job; it ends as cancelled.
    pub fn cancel(&self) {
        let mut g = self.lock();
        g.status.cancelled = true;
        self.cv.notify_all();
    }

    /// Ends the other copies of the group: one failed.
    pub fn fail_group(&self) {
        let mut g = self.lock();
        g.failed = true;
        self.cv.notify_all();
    }

    /// Where the job is.
    pub fn status(&self) -> ControlStatus {
        self.lock().status.clone()
    }

    pub(crate) fn stopping(&self) -> bool {
        let g = self.lock();
        g.status.cancelled || g.failed
    }

    pub(crate) fn stop_reason(g: &CtlInner) -> Option<Stop> {
        if g.status.cancelled {
            Some(Stop::Cancelled)
        } else if g.failed {
            Some(Stop::GroupFailed)
        } else {
            None
        }
    }

    /// Waits while paused; says why to stop, if so.
    pub(crate) fn runnable(&self) -> std::result::Result<(), Stop> {
        let mut g = self.lock();
        loop {
            if let Some(s) = Self::stop_reason(&g) {
                return Err(s);
            }
            if !g.status.paused {
                return Ok(());
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Sleeps up to `d`, waking early on cancel or failure; false if so.
    pub(crate) fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.lock();
        loop {
            if Self::stop_reason(&g).is_some() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(crate) fn retrying(&self, why: Option<String>) {
        let mut g = self.lock();
        match why {
            Some(w) => {
                g.retrying += 1;
                g.status.retrying = Some(w);
            }
            None => {
                g.retrying = g.retrying.saturating_sub(1);
                if g.retrying == 0 {
                    g.status.retrying = None;
                }
            }
        }
    }
}
