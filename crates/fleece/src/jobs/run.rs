//! A job's thread: the copies, then bitmaps and snapshots settled; and the
//! monitor that keeps its rate and sends its events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleece_backup::{CopyOptions, DiskCopy, ErrorKind as BackupKind, OnTargetError};
use serde_json::json;

use super::job::{lock, now_secs, BitmapMode, End, Job};
use super::{settle, Jobs, DEFAULT_LOCAL_WORKERS, DEFAULT_WORKERS};
use crate::error::Kind;

impl Jobs {
    /// The job's thread: plan and run every copy, then settle bitmaps and
    /// snapshots.
    pub(super) fn run(&self, job: &Arc<Job>, opts: CopyOptions, policy: Option<OnTargetError>) {
        let results: Vec<fleece_backup::Result<()>> = std::thread::scope(|s| {
            // Dropped when the copies end: the monitor stops at once.
            let (ended, ends) = std::sync::mpsc::channel::<()>();
            let monitor = s.spawn(move || self.monitor(job, &ends));
            let handles: Vec<_> = job
                .parts
                .iter()
                .map(|p| {
                    let mut o = opts.clone();
                    let (Some(target), Some(entry)) = (p.target(), p.entry()) else {
                        return s.spawn(|| {
                            Err(fleece_backup::Error::new(
                                BackupKind::Io,
                                "the job lost its target",
                            ))
                        });
                    };
                    if o.workers == 0 {
                        o.workers = if target.retries_by_default() {
                            DEFAULT_WORKERS
                        } else {
                            DEFAULT_LOCAL_WORKERS
                        };
                    }
                    o.on_target_error = policy.unwrap_or(if target.retries_by_default() {
                        OnTargetError::Retry
                    } else {
                        OnTargetError::Report
                    });
                    s.spawn(move || {
                        let copy = DiskCopy::new(entry.snap.clone(), target, o)?;
                        *lock(&p.copy) = Some(copy.clone());
                        let r = copy.run(&job.ctl);
                        if r.is_err() {
                            job.ctl.fail_group();
                        }
                        r
                    })
                })
                .collect();
            let results = handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(fleece_backup::Error::new(
                            BackupKind::Io,
                            "a copy thread panicked",
                        ))
                    })
                })
                .collect();
            drop(ended);
            let _ = monitor.join();
            results
        });
        let cancelled = job.ctl.status().cancelled;
        // The error that ended the group: the first one not caused by the
        // group stopping.
        let error = results
            .iter()
            .zip(&job.parts)
            .filter_map(|(r, p)| r.as_ref().err().map(|e| (e, p)))
            .find(|(e, _)| e.kind() != BackupKind::Cancelled)
            .map(|(e, p)| format!("disk '{}' to {}: {e}", p.disk_name, p.spec));
        let ok = results.iter().all(|r| r.is_ok());
        let mut end = if ok {
            End::Completed
        } else if cancelled && error.is_none() {
            End::Cancelled
        } else {
            End::Failed
        };
        let mut error = error;
        if let Err(e) = settle::bitmaps(job, ok) {
            error = Some(match error {
                Some(prev) => format!("{prev}; {e}"),
                None => e.message,
            });
            end = End::Failed;
        }
        for p in &job.parts {
            if p.owned {
                if let Err(e) = self.snapshots.delete(&p.disk_name, &p.snapshot_name, true) {
                    if e.kind != Kind::NotFound {
                        tracing::warn!(job = %job.name, error = %e, "cannot delete the job's snapshot");
                    }
                }
            }
            // A partial backup the job made goes, so it is not mistaken
            // for one; except with `always`, whose bitmap dropped what the
            // target holds: the next incremental backup goes onto it.
            if end != End::Completed && job.mode != BitmapMode::Always {
                if let Some(t) = p.target() {
                    t.abandon();
                }
            }
            // Connections close, image locks go, the store is freed.
            p.release();
        }
        {
            let mut st = lock(&job.status);
            st.end = Some(end);
            st.error = error.clone();
            st.finished = Some(now_secs());
            *lock(&job.ran) = Some(job.clock.elapsed());
        }
        let (done, total) = job.done_total();
        match end {
            End::Completed => self.events.emit(
                "job_completed",
                json!({ "job": job.name, "done_bytes": done, "total_bytes": total }),
            ),
            End::Cancelled => self
                .events
                .emit("job_cancelled", json!({ "job": job.name, "done_bytes": done })),
            End::Failed => self.events.emit(
                "job_failed",
                json!({ "job": job.name, "error": error, "done_bytes": done }),
            ),
        }
    }

    /// Once a second while the job runs: the rate, a progress event, and
    /// events for pauses and retries.
    fn monitor(&self, job: &Job, ends: &std::sync::mpsc::Receiver<()>) {
        let mut last_state = "running";
        let mut last_emit = Instant::now();
        let mut last_done = u64::MAX;
        loop {
            if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                ends.recv_timeout(Duration::from_millis(200))
            {
                return;
            }
            let (done, total) = job.done_total();
            {
                let mut st = lock(&job.status);
                let el = st.sample.0.elapsed();
                if el >= Duration::from_secs(1) {
                    let inst = (done.saturating_sub(st.sample.1)) as f64 / el.as_secs_f64();
                    // Smoothed over a few seconds.
                    st.rate = if st.rate == 0 {
                        inst as u64
                    } else {
                        (st.rate as f64 * 0.6 + inst * 0.4) as u64
                    };
                    st.sample = (Instant::now(), done);
                }
            }
            let state = job.state();
            if state != last_state {
                match state {
                    "retrying" => self.events.emit(
                        "job_retrying",
                        json!({ "job": job.name, "reason": job.ctl.status().retrying }),
                    ),
                    "paused" => {
                        if let Some(why) = job.ctl.status().pause_reason {
                            self.events
                                .emit("job_paused", json!({ "job": job.name, "reason": why }));
                        }
                    }
                    _ => {}
                }
                last_state = state;
            }
            if last_emit.elapsed() >= Duration::from_secs(1) && done != last_done {
                last_emit = Instant::now();
                last_done = done;
                self.events.emit(
                    "job_progress",
                    json!({ "job": job.name, "done_bytes": done, "total_bytes": total, "rate": lock(&job.status).rate }),
                );
            }
        }
    }
}
