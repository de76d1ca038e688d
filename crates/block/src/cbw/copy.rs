//! The copy engine: what a live write does before it may change a cluster.
//!
//! [`Snapshot::before_write`] makes every cluster the write touches saved
//! (or not needed) and waits until no view read of it from the live disk is
//! in flight. Copies run in runs of up to [`MAX_RUN`] clusters; the store
//! limit is reserved before a copy so that concurrent copies respect it; a
//! failure follows the snapshot's [`OnCbwError`] policy. Copies with a
//! timeout run on the live disk's copier threads (`pool`).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use super::events::{Runs, SnapshotEvent};
use super::snapshot::{Inner, OnCbwError, Snapshot};
use super::state::{quiet, COPYING, MASK, NOT_COPIED, NOT_NEEDED, READERS, SAVED, ZEROED};
use crate::dev::IoFlags;
use crate::ext::read_split;
use crate::{Error, ErrorKind, Result};

/// Most clusters copied in one store write.
const MAX_RUN: u64 = 64;

impl Snapshot {
    /// True if copies never wait for a disk or a timer: the store is in
    /// memory and there is no copy timeout (timed copies run on a copier
    /// thread).
    pub(super) fn copies_in_memory(&self) -> bool {
        self.store.hints().in_memory && self.opts.cbw_timeout.is_none()
    }

    /// True if a live write to the range needs nothing from this snapshot.
    pub(super) fn write_is_free(&self, offset: u64, len: u64) -> bool {
        if len == 0 || self.is_broken() || offset >= self.size {
            return true;
        }
        let (first, last) = self.clusters(offset, len.min(self.size - offset));
        (first..=last).all(|c| quiet(self.states.get(c)))
    }

    /// Latches the snapshot broken (once) and lets every waiting writer go.
    fn break_with(&self, why: String) {
        let mut g = self.lock();
        if g.broken.is_some() {
            return;
        }
        tracing::error!(snapshot = %self.opts.label, reason = %why, "snapshot broken");
        g.broken = Some(why.clone());
        self.broken.store(true, Ordering::Release);
        self.wake_all(&g);
        drop(g);
        self.events.emit(&SnapshotEvent::Broken(why));
    }

    fn fail(&self, err: Error) -> Result<()> {
        match self.opts.on_cbw_error {
            OnCbwError::BreakGuestWrite => Err(err),
            OnCbwError::BreakSnapshot => {
                self.break_with(format!("copy-before-write failed: {err}"));
                Ok(())
            }
        }
    }

    /// Saves the clusters that a live write to `[offset, offset+len)` is
    /// about to change, and returns once the write may go ahead.
    pub(super) fn before_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        if self.write_is_free(offset, len) {
            return Ok(());
        }
        let len = len.min(self.size - offset);
        let (first, last) = self.clusters(offset, len);
        let deadline = self.opts.cbw_timeout.map(|t| Instant::now() + t);
        let mut g = self.lock();
        let mut c = first;
        while c <= last {
            // Broken or deleted: nothing to save for it any more.
            if g.broken.is_some() || g.retired {
                return Ok(());
            }
            let s = self.states.get(c);
            match s & MASK {
                NOT_COPIED if !self.in_scope(c) => self.states.set_base(c, NOT_NEEDED),
                NOT_COPIED => {
                    let mut end = c + 1;
                    while end <= last
                        && end - c < MAX_RUN
                        && self.states.get(end) & MASK == NOT_COPIED
                        && self.in_scope(end)
                    {
                        end += 1;
                    }
                    for x in c..end {
                        self.states.set_base(x, COPYING);
                    }
                    drop(g);
                    let res = self.copy(c, end, deadline);
                    if let Err(e) = res {
                        return self.fail(e);
                    }
                    g = self.lock();
                }
                COPYING => {
                    let (ng, timed_out) = self.wait(g, c, deadline);
                    g = ng;
                    if timed_out {
                        drop(g);
                        return self.fail(Error::new(ErrorKind::TimedOut, "copy-before-write timed out"));
                    }
                }
                _ if s & READERS != 0 => g = self.wait(g, c, None).0,
                _ => c += 1,
            }
        }
        Ok(())
    }

    /// Copies clusters `[c, end)` (already marked COPYING) from the live
    /// disk to the store. With a timeout the copy runs on a copier thread
    /// so the writer can give up on it; a copy that started then still
    /// finishes and settles the cluster states itself, and one that never
    /// started (every copier busy) is taken back and the clusters go back to
    /// not copied.
    fn copy(self: &Arc<Self>, c: u64, end: u64, deadline: Option<Instant>) -> Result<()> {
        let Some(deadline) = deadline else {
            return self.copy_and_settle(c, end);
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let me = self.clone();
        let job = Box::new(move || {
            let _ = tx.send(me.copy_and_settle(c, end));
        });
        let ticket = match self.copiers.submit(job) {
            Ok(t) => t,
            Err(e) => {
                self.settle(c, end, 0, None);
                return Err(Error::io("cannot start a copier thread", e));
            }
        };
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => r,
            Err(e) => {
                if e == RecvTimeoutError::Timeout && self.copiers.cancel(ticket) {
                    self.settle(c, end, 0, None);
                }
                Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "copy-before-write took longer than {:?}",
                        self.opts.cbw_timeout.unwrap_or_default()
                    ),
                ))
            }
        }
    }

    /// Which clusters of `[c, end)` read as zeroes on the live disk (holes,
    /// or zero extents). Only called while they are `COPYING`, so no write
    /// can change them meanwhile. If the disk cannot tell, none.
    fn zero_clusters(&self, c: u64, end: u64) -> Vec<bool> {
        let mut zero = vec![false; (end - c) as usize];
        let hi = (end * self.cluster).min(self.size);
        let mut x = c;
        while x < end {
            let lo = x * self.cluster;
            let data = match self.base.next_data(lo, hi) {
                Ok(d) => d.unwrap_or(hi),
                Err(_) => return zero,
            };
            // Clusters wholly before the data are zeroes; the one holding it is not.
            while x < end && x * self.cluster + self.cluster_len(x) <= data {
                zero[(x - c) as usize] = true;
                x += 1;
            }
            x += 1;
        }
        zero
    }

    /// Saves clusters `[c, end)` (already marked `COPYING`): holes are only
    /// marked, data goes to the store within its limit.
    fn copy_and_settle(&self, c: u64, end: u64) -> Result<()> {
        let zero = self.zero_clusters(c, end);
        let bytes: u64 = (c..end)
            .filter(|&x| !zero[(x - c) as usize])
            .map(|x| self.cluster_len(x))
            .sum();
        // Reserve before copying so that concurrent copies respect the limit.
        let reserved = match self.opts.store_limit {
            None => {
                self.used.fetch_add(bytes, Ordering::Relaxed);
                true
            }
            Some(limit) => self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    (u + bytes <= limit).then_some(u + bytes)
                })
                .is_ok(),
        };
        if !reserved {
            self.settle(c, end, 0, None);
            let limit = self.opts.store_limit.unwrap_or_default();
            return Err(Error::new(
                ErrorKind::StoreFull,
                format!("snapshot store limit of {limit} bytes reached"),
            ));
        }
        // A panic in a device or store (a bug) must still settle the
        // clusters: left COPYING, every later write to them would wait for
        // a copy that never ends.
        let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut res = Ok(());
            let mut a = c;
            while a < end && res.is_ok() {
                if zero[(a - c) as usize] {
                    a += 1;
                    continue;
                }
                let mut b = a + 1;
                while b < end && !zero[(b - c) as usize] {
                    b += 1;
                }
                let run: u64 = (a..b).map(|x| self.cluster_len(x)).sum();
                res = self.save_run(a, run);
                a = b;
            }
            res
        }));
        let res = saved.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Io,
                "copy-before-write failed inside the server (a panic while saving)",
            ))
        });
        self.settle(c, end, bytes, res.is_ok().then_some(&zero[..]));
        res
    }

    fn save_run(&self, c: u64, bytes: u64) -> Result<()> {
        let at = c * self.cluster;
        // Device to device: the store may have the kernel copy (or share)
        // the data itself; if it declines, even part way, the whole run
        // goes through a buffer.
        match self.store.save_from(c, self.cluster, &*self.base, at, bytes) {
            Some(r) => r,
            None => {
                let mut buf = vec![0u8; bytes as usize];
                read_split(&*self.base, &mut buf, at, IoFlags::NONE, self.base_max)
                    .and_then(|_| self.store.save(c, self.cluster, &buf))
            }
        }
    }

    /// Marks clusters `[c, end)` saved, as data or as holes per `done` (or
    /// back to not copied when `done` is None: the copy failed), returns the
    /// `reserved` store bytes that are not used, and wakes waiters. A
    /// cluster discarded while its copy was in flight stays not needed, and
    /// its fresh copy is dropped.
    fn settle(&self, c: u64, end: u64, reserved: u64, done: Option<&[bool]>) {
        let report = done.is_some() && self.events.any();
        let mut saved = Runs::default();
        let mut g = self.lock();
        let mut freed = if done.is_some() { 0 } else { reserved };
        // Only clusters that end up saved count as copied: one discarded
        // while its copy ran is not needed and holds nothing.
        let (mut copied, mut holes) = (0, 0);
        for x in c..end {
            let s = self.states.get(x);
            let zero = done.is_some_and(|z| z[(x - c) as usize]);
            if s & MASK == COPYING {
                let to = match done {
                    None => NOT_COPIED,
                    Some(_) if zero => ZEROED,
                    Some(_) => SAVED,
                };
                self.states.set_base(x, to);
                if done.is_some() {
                    copied += 1;
                    holes += zero as u64;
                }
                if report {
                    saved.add(x);
                }
            } else if done.is_some() && !zero {
                self.store.forget(x, self.cluster);
                freed += self.cluster_len(x);
            }
        }
        self.copied.fetch_add(copied, Ordering::Relaxed);
        self.holes.fetch_add(holes, Ordering::Relaxed);
        self.used.fetch_sub(freed, Ordering::Relaxed);
        self.wake(&g, c, end);
        let alerts = self.alert_usage(&mut g);
        drop(g);
        self.events
            .emit_runs(&saved, |first, count| SnapshotEvent::Saved { first, count });
        for ev in alerts.iter().flatten() {
            self.events.emit(ev);
        }
    }

    /// The store usage alerts due now: each threshold once, both if one
    /// copy crossed both.
    fn alert_usage(&self, g: &mut Inner) -> [Option<SnapshotEvent>; 2] {
        let mut alerts = [None, None];
        let Some(limit) = self.opts.store_limit.filter(|&l| l > 0) else {
            return alerts;
        };
        let used = self.used.load(Ordering::Relaxed);
        let pct = used.saturating_mul(100) / limit;
        for (alert, threshold) in alerts.iter_mut().zip([80u8, 95]) {
            if pct >= threshold as u64 && g.alerted < threshold {
                g.alerted = threshold;
                *alert = Some(SnapshotEvent::StoreUsage {
                    percent: threshold,
                    used,
                    limit,
                });
            }
        }
        alerts
    }
}
