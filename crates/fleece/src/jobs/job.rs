//! A job's state: its parts (one per disk), what they hold while it runs,
//! its counters and how the API shows it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fleece_backup::target::Target;
use fleece_backup::{Control, CopyStats, DiskCopy, Order};
use fleece_block::NamedBitmap;

use super::types::{JobDiskInfo, JobInfo};
use crate::registry::{Disk, SnapshotEntry};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BitmapMode {
    OnSuccess,
    Never,
    Always,
}

impl BitmapMode {
    pub(super) fn name(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    Completed,
    Failed,
    Cancelled,
}

/// One disk of a job. What holds resources (the disk and its image, the
/// target's connections or image lock, the snapshot and its store, the
/// bitmaps) is let go when the job ends; the counters stay for the listing.
pub(super) struct Part {
    pub(super) disk_name: String,
    pub(super) spec: String,
    /// `DISK@NAME` and `NAME` of the snapshot pushed.
    pub(super) snapshot_id: String,
    pub(super) snapshot_name: String,
    pub(super) running: Mutex<Option<Running>>,
    /// Counters and store use when the job ended.
    pub(super) last: Mutex<Option<(CopyStats, u64)>>,
    /// The job made the snapshot (and deletes it).
    pub(super) owned: bool,
    pub(super) copy: Mutex<Option<Arc<DiskCopy>>>,
    pub(super) cluster: u64,
}

/// What a part holds while its job runs.
#[derive(Clone)]
pub(super) struct Running {
    pub(super) disk: Arc<Disk>,
    pub(super) target: Arc<dyn Target>,
    pub(super) entry: Arc<SnapshotEntry>,
    /// The job's bitmap on this disk, and its successor.
    pub(super) bitmap: Option<(Arc<NamedBitmap>, Arc<NamedBitmap>)>,
}

impl Part {
    /// What it holds, while the job runs.
    pub(super) fn held(&self) -> Option<Running> {
        lock(&self.running).clone()
    }

    pub(super) fn target(&self) -> Option<Arc<dyn Target>> {
        lock(&self.running).as_ref().map(|r| r.target.clone())
    }

    pub(super) fn entry(&self) -> Option<Arc<SnapshotEntry>> {
        lock(&self.running).as_ref().map(|r| r.entry.clone())
    }

    /// Counters now, or as they were at the end.
    pub(super) fn stats(&self) -> (CopyStats, u64) {
        if let Some(l) = &*lock(&self.last) {
            return l.clone();
        }
        let s = lock(&self.copy).as_ref().map(|c| c.stats()).unwrap_or_default();
        let used = self.entry().map_or(0, |e| e.snap.stats().used_bytes);
        (s, used)
    }

    /// Lets go of the target, the snapshot and the copy, keeping counters.
    pub(super) fn release(&self) {
        let last = self.stats();
        *lock(&self.last) = Some(last);
        *lock(&self.copy) = None;
        *lock(&self.running) = None;
    }
}

pub(super) struct Status {
    pub(super) end: Option<End>,
    pub(super) error: Option<String>,
    pub(super) finished: Option<u64>,
    /// (when, bytes done) of the last rate sample, and the rate.
    pub(super) sample: (Instant, u64),
    pub(super) rate: u64,
}

/// A backup job.
pub struct Job {
    pub(super) name: String,
    pub(super) sync: &'static str,
    pub(super) bitmap: Option<String>,
    pub(super) mode: BitmapMode,
    pub(super) order: Order,
    pub(super) verify: bool,
    pub(super) started: u64,
    /// When it started, and (set once) how long it ran.
    pub(super) clock: Instant,
    pub(super) ran: Mutex<Option<std::time::Duration>>,
    pub(super) parts: Vec<Part>,
    pub(super) ctl: Arc<Control>,
    pub(super) status: Mutex<Status>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Job {
    pub(super) fn done_total(&self) -> (u64, u64) {
        self.parts.iter().fold((0, 0), |(d, t), p| {
            let s = p.stats().0;
            (d + s.done_bytes, t + s.total_bytes)
        })
    }

    pub(super) fn state(&self) -> &'static str {
        let st = lock(&self.status);
        match st.end {
            Some(End::Completed) => "completed",
            Some(End::Failed) => "failed",
            Some(End::Cancelled) => "cancelled",
            None => {
                let c = self.ctl.status();
                if c.paused {
                    "paused"
                } else if c.retrying.is_some() {
                    "retrying"
                } else {
                    "running"
                }
            }
        }
    }

    /// True once it ended.
    pub fn finished(&self) -> bool {
        lock(&self.status).end.is_some()
    }

    /// How the API shows it.
    pub fn info(&self) -> JobInfo {
        let (done, total) = self.done_total();
        let state = self.state().to_string();
        let st = lock(&self.status);
        let c = self.ctl.status();
        let rate = if st.end.is_some() { 0 } else { st.rate };
        JobInfo {
            name: self.name.clone(),
            state,
            sync: self.sync.to_string(),
            bitmap: self.bitmap.clone(),
            bitmap_mode: self.mode.name().to_string(),
            order: match self.order {
                Order::Hinted => "hinted",
                Order::Offset => "offset",
            }
            .to_string(),
            verify: self.verify,
            disks: self
                .parts
                .iter()
                .map(|p| {
                    let (s, used) = p.stats();
                    JobDiskInfo {
                        disk: p.disk_name.clone(),
                        target: p.spec.clone(),
                        snapshot: p.snapshot_id.clone(),
                        cluster_size: p.cluster,
                        phase: if s.phase.is_empty() { "planning" } else { s.phase }.to_string(),
                        total_bytes: s.total_bytes,
                        done_bytes: s.done_bytes,
                        copied_clusters: s.copied_clusters,
                        zeroed_clusters: s.zeroed_clusters,
                        skipped_clusters: s.skipped_clusters,
                        store_used_bytes: used,
                    }
                })
                .collect(),
            total_bytes: total,
            done_bytes: done,
            percent: if total == 0 {
                if st.end == Some(End::Completed) {
                    100.0
                } else {
                    0.0
                }
            } else {
                (done as f64 * 1000.0 / total as f64).round() / 10.0
            },
            rate,
            eta_secs: (rate > 0).then(|| total.saturating_sub(done) / rate),
            speed: self.ctl.rate.rate(),
            error: st.error.clone().or(c.pause_reason),
            retrying: c.retrying,
            started: self.started,
            elapsed_secs: ((*lock(&self.ran))
                .unwrap_or_else(|| self.clock.elapsed())
                .as_secs_f64()
                * 1000.0)
                .round()
                / 1000.0,
            finished: st.finished,
        }
    }
}
