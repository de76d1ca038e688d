//! Push-backup jobs: take a snapshot of one or more disks at one instant,
//! copy each view to its target with `fleece-backup`'s engine, keep the
//! disks' dirty bitmaps right whatever happens, and delete the snapshot.
//!
//! **Bitmaps** (QEMU's semantics, iotest 257). An incremental job copies
//! what its bitmap `B` held at the instant. `B` keeps recording throughout,
//! and the job adds a transient *successor* bitmap `S` (named
//! `.backup-JOB`, hidden) that records the writes after the instant. At the
//! end, with the disk frozen for a moment:
//!
//! - `on-success`: success: `B := S` (its old bits go); failure: `B`
//!   keeps its old bits plus the writes since (it recorded them);
//! - `never`: `B` is only read;
//! - `always`: like `on-success` on success; on failure `B` drops the bits
//!   of what the target acknowledged (unless written again since).
//!
//! `B := S` is done as "add `S`, then clear the bits of `B` not in `S`",
//! each step durable: a crash at any point leaves `B` a superset of `S`,
//! which over-approximates but never misses a write. A crash (kill -9)
//! during a job leaves `B` with its old bits plus everything since, which
//! is what a failure keeps; the next incremental backup is then exact. A
//! full job with `--bitmap` that does not exist yet creates it at the
//! instant with every bit set (so a failed first backup makes the next one
//! copy everything) and leaves it holding the writes since the instant.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleece_backup::target::{self, OpenOptions, Target};
use fleece_backup::{
    Control, CopyOptions, CopyStats, DiskCopy, ErrorKind as BackupKind, OnSourceError, OnTargetError, Order,
};
use fleece_block::{DirtyBitmap, NamedBitmap};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bitmaps::{new_bitmap, DEFAULT_GRANULARITY};
use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::registry::{check_name, Disk, Registry, SnapshotEntry};
use crate::snapshots::{CreateSnapshot, Snapshots};
use crate::txn::{Action, Txn};
use crate::units::{human, Size};

/// Smallest copy unit (seed 002: never less than 64 KiB).
const MIN_CLUSTER: u64 = 64 << 10;
/// Largest copy unit (a snapshot's limit).
const MAX_CLUSTER: u64 = 64 << 20;
/// Default bytes per write request.
const DEFAULT_CHUNK: u64 = 1 << 20;
/// Default requests in flight per disk.
const DEFAULT_WORKERS: usize = 8;
/// How long `retry` keeps trying by default: a target that comes back
/// after minutes (a reboot) is still caught.
const DEFAULT_RETRY_SECS: f64 = 600.0;
/// Prefix of the hidden successor bitmaps.
pub const SUCCESSOR_PREFIX: &str = ".backup-";

/// Body of `POST /v1/jobs` (and what `fleece backup start` sends).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backup request object {\"disks\": [...], \"targets\": [...], ...}"
)]
pub struct StartBackup {
    /// Disks backed up at one instant (or empty with `snapshots`).
    #[serde(default)]
    pub disks: Vec<String>,
    /// Existing snapshots `DISK@NAME` to push instead (left in place).
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// One target per disk (or snapshot), in order.
    pub targets: Vec<String>,
    /// Job name (default: generated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `full` (default) or `incremental`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<String>,
    /// Dirty bitmap: what an incremental job copies; kept up to date.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// `on-success` (default), `never` or `always`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<String>,
    /// Smallest copy unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_cluster_size: Option<Size>,
    /// The snapshot's store (`file:PATH`, `qcow2:PATH`, `ram:SIZE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Most bytes the store may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_limit: Option<Size>,
    /// `break-guest-write` (default) or `break-snapshot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_cbw_error: Option<String>,
    /// Copy-before-write timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cbw_timeout_secs: Option<f64>,
    /// `hinted` (default) or `offset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// Requests in flight per disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Bytes per write request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<Size>,
    /// Bytes per second, all disks together (0 or absent: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<Size>,
    /// `report`, `stop` or `retry` (default: retry for NBD targets, else report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_target_error: Option<String>,
    /// `report` (default) or `stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_source_error: Option<String>,
    /// How long `retry` tries, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_for_secs: Option<f64>,
    /// Read the target back and compare.
    #[serde(default)]
    pub verify: bool,
}

/// Body of `POST /v1/jobs/{name}/speed`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetSpeed {
    /// Bytes per second; 0: no limit.
    pub speed: Size,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInfo {
    /// Name.
    pub name: String,
    /// `running`, `paused`, `retrying`, `completed`, `failed`, `cancelled`.
    pub state: String,
    /// `full` or `incremental`.
    pub sync: String,
    /// Bitmap, if any.
    pub bitmap: Option<String>,
    /// `on-success`, `never` or `always`.
    pub bitmap_mode: String,
    /// `hinted` or `offset`.
    pub order: String,
    /// Verify after the copy.
    pub verify: bool,
    /// One entry per disk.
    pub disks: Vec<JobDiskInfo>,
    /// Bytes to write, all disks.
    pub total_bytes: u64,
    /// Bytes the targets acknowledged.
    pub done_bytes: u64,
    /// `done_bytes` of `total_bytes`, 0 to 100.
    pub percent: f64,
    /// Bytes per second lately.
    pub rate: u64,
    /// Seconds to go at that rate.
    pub eta_secs: Option<u64>,
    /// Speed limit in bytes per second (0: none).
    pub speed: u64,
    /// Why it failed, or was paused by a failure.
    pub error: Option<String>,
    /// Retrying: why.
    pub retrying: Option<String>,
    /// Seconds since the epoch at the start.
    pub started: u64,
    /// Seconds since the epoch at the end.
    pub finished: Option<u64>,
}

/// One disk of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDiskInfo {
    /// Disk.
    pub disk: String,
    /// Target as given.
    pub target: String,
    /// Snapshot pushed (`DISK@NAME`).
    pub snapshot: String,
    /// Copy unit.
    pub cluster_size: u64,
    /// What the copy is doing: planning, copying, flushing, verifying, done.
    pub phase: String,
    /// Bytes to write.
    pub total_bytes: u64,
    /// Bytes acknowledged.
    pub done_bytes: u64,
    /// Clusters of data copied.
    pub copied_clusters: u64,
    /// Clusters written as zeroes.
    pub zeroed_clusters: u64,
    /// Clusters not written (zeroes on an empty target; unchanged).
    pub skipped_clusters: u64,
    /// Bytes the snapshot's store holds now.
    pub store_used_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BitmapMode {
    OnSuccess,
    Never,
    Always,
}

impl BitmapMode {
    fn name(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Completed,
    Failed,
    Cancelled,
}

/// One disk of a job. What holds resources (the target's connections or
/// image lock, the snapshot and its store) is let go when the job ends;
/// the counters stay for the listing.
struct Part {
    disk: Arc<Disk>,
    spec: String,
    /// `DISK@NAME` and `NAME` of the snapshot pushed.
    snapshot_id: String,
    snapshot_name: String,
    running: Mutex<Option<Running>>,
    /// Counters and store use when the job ended.
    last: Mutex<Option<(CopyStats, u64)>>,
    /// The job made the snapshot (and deletes it).
    owned: bool,
    /// The job's bitmap on this disk, and its successor.
    bitmap: Option<(Arc<NamedBitmap>, Arc<NamedBitmap>)>,
    copy: Mutex<Option<Arc<DiskCopy>>>,
    cluster: u64,
}

/// What a part holds while its job runs.
struct Running {
    target: Arc<dyn Target>,
    entry: Arc<SnapshotEntry>,
}

impl Part {
    fn target(&self) -> Option<Arc<dyn Target>> {
        lock(&self.running).as_ref().map(|r| r.target.clone())
    }

    fn entry(&self) -> Option<Arc<SnapshotEntry>> {
        lock(&self.running).as_ref().map(|r| r.entry.clone())
    }

    /// Counters now, or as they were at the end.
    fn stats(&self) -> (CopyStats, u64) {
        if let Some(l) = &*lock(&self.last) {
            return l.clone();
        }
        let s = lock(&self.copy).as_ref().map(|c| c.stats()).unwrap_or_default();
        let used = self.entry().map_or(0, |e| e.snap.stats().used_bytes);
        (s, used)
    }

    /// Lets go of the target, the snapshot and the copy, keeping counters.
    fn release(&self) {
        let last = self.stats();
        *lock(&self.last) = Some(last);
        *lock(&self.copy) = None;
        *lock(&self.running) = None;
    }
}

struct Status {
    end: Option<End>,
    error: Option<String>,
    finished: Option<u64>,
    /// (when, bytes done) of the last rate sample, and the rate.
    sample: (Instant, u64),
    rate: u64,
}

/// A backup job.
pub struct Job {
    name: String,
    sync: &'static str,
    bitmap: Option<String>,
    mode: BitmapMode,
    order: Order,
    verify: bool,
    started: u64,
    parts: Vec<Part>,
    ctl: Arc<Control>,
    status: Mutex<Status>,
    /// Tells the monitor the copies ended.
    copies_ended: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Job {
    fn done_total(&self) -> (u64, u64) {
        self.parts.iter().fold((0, 0), |(d, t), p| {
            let s = p.stats().0;
            (d + s.done_bytes, t + s.total_bytes)
        })
    }

    fn state(&self) -> &'static str {
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
                        disk: p.disk.name.clone(),
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
            finished: st.finished,
        }
    }
}

/// The job service.
pub struct Jobs {
    registry: Arc<Registry>,
    txn: Arc<Txn>,
    snapshots: Arc<Snapshots>,
    events: Events,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    seq: AtomicU64,
}

fn parse_mode(s: Option<&str>) -> Result<BitmapMode> {
    match s {
        None | Some("on-success") => Ok(BitmapMode::OnSuccess),
        Some("never") => Ok(BitmapMode::Never),
        Some("always") => Ok(BitmapMode::Always),
        Some(o) => Err(Error::invalid(format!(
            "bitmap mode '{o}' must be on-success, never or always"
        ))),
    }
}

fn parse_secs(what: &str, v: Option<f64>, default: f64) -> Result<Duration> {
    let v = v.unwrap_or(default);
    if !v.is_finite() || !(0.0..=86400.0 * 7.0).contains(&v) {
        return Err(Error::invalid(format!(
            "{what} {v} must be from 0 to 604800 seconds"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

fn backup_err(e: fleece_backup::Error) -> Error {
    let kind = match e.kind() {
        BackupKind::InvalidTarget | BackupKind::Invalid | BackupKind::Unsupported => Kind::InvalidArgument,
        BackupKind::Connect | BackupKind::Handshake | BackupKind::Disconnected => Kind::Unavailable,
        _ => Kind::Internal,
    };
    Error::new(kind, e.to_string())
}

/// The checked options of a start request.
struct Plan {
    name: String,
    sync: &'static str,
    mode: BitmapMode,
    order: Order,
    copy: CopyOptions,
    on_target_error: Option<OnTargetError>,
    speed: u64,
}

impl Jobs {
    /// Jobs over `registry`, taking snapshots through `txn`.
    pub fn new(registry: Arc<Registry>, txn: Arc<Txn>, snapshots: Arc<Snapshots>, events: Events) -> Self {
        Jobs {
            registry,
            txn,
            snapshots,
            events,
            jobs: Mutex::new(BTreeMap::new()),
            threads: Mutex::new(Vec::new()),
            seq: AtomicU64::new(1),
        }
    }

    /// Every job, running or finished.
    pub fn list(&self) -> Vec<Arc<Job>> {
        lock(&self.jobs).values().cloned().collect()
    }

    /// One job by name.
    pub fn get(&self, name: &str) -> Result<Arc<Job>> {
        lock(&self.jobs)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("backup job '{name}' does not exist")))
    }

    fn running(&self, name: &str) -> Result<Arc<Job>> {
        let j = self.get(name)?;
        if j.finished() {
            return Err(Error::new(
                Kind::Busy,
                format!("backup job '{name}' has ended ({})", j.state()),
            ));
        }
        Ok(j)
    }

    /// Pauses a running job between requests.
    pub fn pause(&self, name: &str) -> Result<Arc<Job>> {
        let j = self.running(name)?;
        j.ctl.pause(None);
        self.events.emit("job_paused", json!({ "job": name }));
        Ok(j)
    }

    /// Resumes a paused job (also one a `stop` policy paused).
    pub fn resume(&self, name: &str) -> Result<Arc<Job>> {
        let j = self.running(name)?;
        j.ctl.resume();
        self.events.emit("job_resumed", json!({ "job": name }));
        Ok(j)
    }

    /// Cancels a running job; it ends as cancelled (bitmaps as on a failure).
    pub fn cancel(&self, name: &str) -> Result<Arc<Job>> {
        let j = self.running(name)?;
        j.ctl.cancel();
        Ok(j)
    }

    /// Changes a job's speed limit (0: none).
    pub fn set_speed(&self, name: &str, speed: u64) -> Result<Arc<Job>> {
        let j = self.running(name)?;
        j.ctl.rate.set(speed);
        Ok(j)
    }

    /// Forgets a finished job.
    pub fn dismiss(&self, name: &str) -> Result<()> {
        let mut jobs = lock(&self.jobs);
        let j = jobs
            .get(name)
            .ok_or_else(|| Error::not_found(format!("backup job '{name}' does not exist")))?;
        if !j.finished() {
            return Err(Error::new(
                Kind::Busy,
                format!("backup job '{name}' is still running: cancel it first"),
            ));
        }
        jobs.remove(name);
        Ok(())
    }

    /// Cancels every running job and waits for them to end (daemon stop).
    pub fn shutdown(&self, wait: Duration) {
        for j in self.list() {
            if !j.finished() {
                j.ctl.cancel();
            }
        }
        let deadline = Instant::now() + wait;
        let threads: Vec<_> = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }

    fn plan(&self, req: &StartBackup) -> Result<Plan> {
        let name = match &req.name {
            Some(n) => {
                check_name("job", n)?;
                n.clone()
            }
            None => loop {
                let n = format!("backup-{}", self.seq.fetch_add(1, Ordering::Relaxed));
                if !lock(&self.jobs).contains_key(&n) {
                    break n;
                }
            },
        };
        if lock(&self.jobs).contains_key(&name) {
            return Err(Error::new(
                Kind::Exists,
                format!("backup job '{name}' exists (dismiss it first, or pick another --name)"),
            ));
        }
        let sync = match req.sync.as_deref() {
            None | Some("full") => "full",
            Some("incremental") => "incremental",
            Some(o) => return Err(Error::invalid(format!("sync '{o}' must be full or incremental"))),
        };
        if sync == "incremental" && req.bitmap.is_none() {
            return Err(Error::invalid(
                "an incremental backup needs --bitmap NAME: the bitmap says what changed",
            ));
        }
        if req.bitmap_mode.is_some() && req.bitmap.is_none() {
            return Err(Error::invalid("--bitmap-mode needs --bitmap"));
        }
        let mode = parse_mode(req.bitmap_mode.as_deref())?;
        let order = match req.order.as_deref() {
            None | Some("hinted") => Order::Hinted,
            Some("offset") => Order::Offset,
            Some(o) => return Err(Error::invalid(format!("order '{o}' must be hinted or offset"))),
        };
        let workers = req.workers.unwrap_or(DEFAULT_WORKERS);
        if !(1..=256).contains(&workers) {
            return Err(Error::invalid(format!("workers {workers} must be from 1 to 256")));
        }
        let chunk = req.chunk_size.map_or(DEFAULT_CHUNK, Size::bytes);
        if !(4096..=(32 << 20)).contains(&chunk) {
            return Err(Error::invalid(format!(
                "chunk size {} must be from 4 KiB to 32 MiB",
                human(chunk)
            )));
        }
        let on_target_error = match req.on_target_error.as_deref() {
            None => None,
            Some("report") => Some(OnTargetError::Report),
            Some("stop") => Some(OnTargetError::Stop),
            Some("retry") => Some(OnTargetError::Retry),
            Some(o) => {
                return Err(Error::invalid(format!(
                    "on-target-error '{o}' must be report, stop or retry"
                )))
            }
        };
        let on_source_error = match req.on_source_error.as_deref() {
            None | Some("report") => OnSourceError::Report,
            Some("stop") => OnSourceError::Stop,
            Some(o) => {
                return Err(Error::invalid(format!(
                    "on-source-error '{o}' must be report or stop"
                )))
            }
        };
        let retry_for = parse_secs("retry-for", req.retry_for_secs, DEFAULT_RETRY_SECS)?;
        Ok(Plan {
            name,
            sync,
            mode,
            order,
            copy: CopyOptions {
                cluster: MIN_CLUSTER,
                chunk,
                workers,
                order,
                discard_source: false,
                verify: req.verify,
                on_target_error: OnTargetError::Report,
                on_source_error,
                retry_for,
            },
            on_target_error,
            speed: req.speed.map_or(0, Size::bytes),
        })
    }

    /// Starts a job: checks everything, opens the targets, takes the
    /// snapshot at one instant (with the successor bitmaps), and copies in
    /// the background.
    pub fn start(self: &Arc<Self>, req: StartBackup) -> Result<Arc<Job>> {
        let plan = self.plan(&req)?;
        let existing = !req.snapshots.is_empty();
        if existing && !req.disks.is_empty() {
            return Err(Error::invalid(
                "give either disks or --snapshot DISK@NAME, not both",
            ));
        }
        if existing && req.bitmap.is_some() {
            return Err(Error::invalid(
                "--bitmap does not go with --snapshot: an existing snapshot's own bitmap scope says what it holds",
            ));
        }
        if existing
            && (req.store.is_some()
                || req.store_limit.is_some()
                || req.on_cbw_error.is_some()
                || req.cbw_timeout_secs.is_some())
        {
            return Err(Error::invalid(
                "store and copy-before-write options do not go with --snapshot: the snapshot exists already",
            ));
        }
        let mut disks: Vec<Arc<Disk>> = Vec::new();
        let mut entries: Vec<Arc<SnapshotEntry>> = Vec::new();
        if existing {
            for id in &req.snapshots {
                let e = self.registry.snapshot(id)?;
                disks.push(self.registry.disk(&e.disk)?);
                entries.push(e);
            }
        } else {
            if req.disks.is_empty() {
                return Err(Error::invalid("name at least one disk to back up"));
            }
            for d in &req.disks {
                disks.push(self.registry.disk(d)?);
            }
        }
        let mut seen: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        seen.sort();
        seen.dedup();
        if seen.len() != disks.len() {
            return Err(Error::invalid("a disk is listed twice"));
        }
        if req.targets.len() != disks.len() {
            return Err(Error::invalid(format!(
                "{} disk(s) and {} target(s): give one --target per disk, in order",
                disks.len(),
                req.targets.len()
            )));
        }
        for t in &req.targets {
            self.check_target_path(t)?;
        }
        let mut dup = req.targets.clone();
        dup.sort();
        dup.dedup();
        if dup.len() != req.targets.len() {
            return Err(Error::invalid("two disks cannot be backed up to the same target"));
        }

        // Targets are opened (connected, created) before the instant.
        let mut targets: Vec<Arc<dyn Target>> = Vec::new();
        let abandon = |targets: &[Arc<dyn Target>]| {
            for t in targets {
                t.abandon();
            }
        };
        for (d, spec) in disks.iter().zip(&req.targets) {
            match target::open(spec, d.image.size(), &OpenOptions::default()) {
                Ok(t) => targets.push(Arc::from(t)),
                Err(e) => {
                    abandon(&targets);
                    let e = backup_err(e);
                    return Err(Error::new(
                        e.kind,
                        format!("target '{spec}' of disk '{}': {}", d.name, e.message),
                    ));
                }
            }
        }
        let result = self.start_with(plan, &req, disks, entries, targets.clone());
        if result.is_err() {
            abandon(&targets);
        }
        result
    }

    /// Refuses a file target that is a served image or a bitmap sidecar.
    fn check_target_path(&self, spec: &str) -> Result<()> {
        let Some(path) = spec.strip_prefix("file:").or_else(|| {
            spec.strip_prefix("qcow2:")
                .map(|p| p.split(',').next().unwrap_or(p))
        }) else {
            return Ok(());
        };
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = std::fs::metadata(path) else {
            return Ok(());
        };
        if self.registry.disk_by_id((m.dev(), m.ino())).is_some()
            || crate::bitmaps::is_sidecar(Path::new(path))
        {
            return Err(Error::invalid(format!(
                "target {path} is an image fleece serves (or one of its bitmaps): back up to another file"
            )));
        }
        Ok(())
    }

    fn start_with(
        self: &Arc<Self>,
        plan: Plan,
        req: &StartBackup,
        disks: Vec<Arc<Disk>>,
        mut entries: Vec<Arc<SnapshotEntry>>,
        targets: Vec<Arc<dyn Target>>,
    ) -> Result<Arc<Job>> {
        // The copy unit: at least 64 KiB and whole target clusters.
        let wanted = targets
            .iter()
            .map(|t| t.cluster_size())
            .chain([MIN_CLUSTER, req.min_cluster_size.map_or(0, Size::bytes)])
            .max()
            .unwrap_or(MIN_CLUSTER);
        let cluster = wanted.checked_next_power_of_two().unwrap_or(u64::MAX);
        if cluster > MAX_CLUSTER {
            return Err(Error::invalid(format!(
                "cluster size {} is more than {}",
                human(cluster),
                human(MAX_CLUSTER)
            )));
        }
        let owned = entries.is_empty();
        let successors: Vec<Option<(Arc<NamedBitmap>, Arc<NamedBitmap>)>>;
        if owned {
            let _change = self.registry.change();
            // Bitmaps: checked, and those a first full backup needs made,
            // before the instant.
            let mut made: Vec<Option<Arc<NamedBitmap>>> = Vec::new();
            let cleanup = |made: &[Option<Arc<NamedBitmap>>]| {
                for b in made.iter().flatten() {
                    let _ = b.remove_file();
                }
            };
            if let Some(name) = &req.bitmap {
                for d in &disks {
                    match d.live.bitmap(name) {
                        Some(b) => {
                            if plan.mode != BitmapMode::Never && !b.is_enabled() {
                                cleanup(&made);
                                return Err(Error::invalid(format!(
                                    "dirty bitmap '{name}' of disk '{}' is not recording: enable it, or use --bitmap-mode never",
                                    d.name
                                )));
                            }
                            made.push(None);
                        }
                        None if plan.sync == "full" => {
                            if let Err(e) = check_name("bitmap", name) {
                                cleanup(&made);
                                return Err(e);
                            }
                            let b = match new_bitmap(d, name, DEFAULT_GRANULARITY, true, true) {
                                Ok(b) => Arc::new(b),
                                Err(e) => {
                                    cleanup(&made);
                                    return Err(e);
                                }
                            };
                            // Every bit set: until this backup succeeds, the
                            // next incremental one copies everything.
                            let all = DirtyBitmap::new(d.image.size(), DEFAULT_GRANULARITY);
                            all.set(0, d.image.size());
                            made.push(Some(b.clone()));
                            if let Err(e) = b.merge(&all) {
                                cleanup(&made);
                                return Err(Error::new(Kind::Internal, e.to_string()));
                            }
                        }
                        None => {
                            cleanup(&made);
                            return Err(Error::not_found(format!(
                                "dirty bitmap '{name}' does not exist on disk '{}' (a full backup with --bitmap creates it)",
                                d.name
                            )));
                        }
                    }
                }
            }
            let snap_req = CreateSnapshot {
                disks: disks.iter().map(|d| d.name.clone()).collect(),
                name: plan.name.clone(),
                cluster_size: Some(Size(cluster)),
                store: req.store.clone(),
                store_limit: req.store_limit,
                bitmap: (plan.sync == "incremental").then(|| req.bitmap.clone()).flatten(),
                read_once: false,
                on_cbw_error: req.on_cbw_error.clone(),
                cbw_timeout_secs: req.cbw_timeout_secs,
                rotate: None,
            };
            drop(_change);
            // Successors: in memory, recording from the instant.
            let succ_name = format!("{SUCCESSOR_PREFIX}{}", plan.name);
            let mut pairs: Vec<Option<(Arc<NamedBitmap>, Arc<NamedBitmap>)>> = Vec::new();
            if let Some(name) = &req.bitmap {
                for (d, m) in disks.iter().zip(&made) {
                    let Some(b) = m.clone().or_else(|| d.live.bitmap(name)) else {
                        pairs.push(None);
                        continue;
                    };
                    let g = b.bits().granularity();
                    match NamedBitmap::create(&succ_name, d.image.size(), g, true, None) {
                        Ok(s) => pairs.push(Some((b, Arc::new(s)))),
                        Err(e) => {
                            cleanup(&made);
                            return Err(Error::new(Kind::Internal, e.to_string()));
                        }
                    }
                }
            } else {
                pairs = disks.iter().map(|_| None).collect();
            }
            let mode = plan.mode;
            let res = self
                .txn
                .apply_with(vec![Action::SnapshotCreate(Box::new(snap_req))], |_| {
                    // At the instant: a new bitmap starts recording, and
                    // each successor records what comes after.
                    for ((d, m), pair) in disks.iter().zip(&made).zip(&pairs) {
                        if let Some(b) = m {
                            d.live.add_bitmap(b.clone());
                        }
                        if let (Some((_, s)), true) = (pair, mode != BitmapMode::Never) {
                            d.live.add_bitmap(s.clone());
                        }
                    }
                });
            let attached = pairs;
            match res {
                Ok(mut made_snaps) => {
                    entries = made_snaps.pop().unwrap_or_default();
                    successors = attached;
                }
                Err(e) => {
                    cleanup(&made);
                    return Err(e);
                }
            }
            if entries.len() != disks.len() {
                // Registration failed part way (logged): undo.
                for e in &entries {
                    let _ = self.snapshots.delete(&e.disk, &e.name, true);
                }
                for (d, s) in disks.iter().zip(&successors) {
                    if let Some((_, s)) = s {
                        d.live.remove_bitmap(s.name());
                    }
                }
                return Err(Error::new(
                    Kind::Internal,
                    "the job's snapshot could not be registered",
                ));
            }
        } else {
            successors = disks.iter().map(|_| None).collect();
            for e in &entries {
                if !cluster.is_multiple_of(e.snap.cluster_size()) {
                    return Err(Error::invalid(format!(
                        "snapshot '{}' has {} clusters, the target needs {}: take the snapshot with --cluster-size {}",
                        e.export.name,
                        human(e.snap.cluster_size()),
                        human(cluster),
                        human(cluster)
                    )));
                }
            }
        }
        let parts: Vec<Part> = disks
            .into_iter()
            .zip(entries)
            .zip(targets)
            .zip(successors)
            .zip(&req.targets)
            .map(|((((disk, entry), target), bitmap), spec)| Part {
                disk,
                spec: spec.clone(),
                snapshot_id: entry.export.name.clone(),
                snapshot_name: entry.name.clone(),
                running: Mutex::new(Some(Running { target, entry })),
                last: Mutex::new(None),
                owned,
                bitmap,
                copy: Mutex::new(None),
                cluster,
            })
            .collect();
        let job = Arc::new(Job {
            name: plan.name.clone(),
            sync: plan.sync,
            bitmap: req.bitmap.clone(),
            mode: plan.mode,
            order: plan.order,
            verify: req.verify,
            started: now_secs(),
            parts,
            ctl: Control::new(plan.speed),
            status: Mutex::new(Status {
                end: None,
                error: None,
                finished: None,
                sample: (Instant::now(), 0),
                rate: 0,
            }),
            copies_ended: std::sync::atomic::AtomicBool::new(false),
        });
        {
            let mut jobs = lock(&self.jobs);
            if jobs.contains_key(&job.name) {
                drop(jobs);
                self.undo(&job);
                return Err(Error::new(
                    Kind::Exists,
                    format!("backup job '{}' exists", job.name),
                ));
            }
            jobs.insert(job.name.clone(), job.clone());
        }
        self.events.emit(
            "job_started",
            json!({ "job": job.name, "disks": job.parts.iter().map(|p| p.disk.name.clone()).collect::<Vec<_>>() }),
        );
        let (me, j) = (self.clone(), job.clone());
        let opts = CopyOptions {
            cluster,
            discard_source: owned && !req.verify,
            ..plan.copy
        };
        let policy = plan.on_target_error;
        let thread = std::thread::Builder::new()
            .name(format!("job-{}", job.name))
            .spawn(move || me.run(&j, opts, policy))
            .map_err(|e| Error::new(Kind::Internal, format!("cannot start the job's thread: {e}")))?;
        lock(&self.threads).push(thread);
        Ok(job)
    }

    /// Takes back what a job that never ran made: its snapshot, successors.
    fn undo(&self, job: &Job) {
        for p in &job.parts {
            if let Some((_, s)) = &p.bitmap {
                p.disk.live.remove_bitmap(s.name());
            }
            if p.owned {
                let _ = self.snapshots.delete(&p.disk.name, &p.snapshot_name, true);
            }
        }
    }

    /// The job's thread: plan and run every copy, then settle bitmaps and
    /// snapshots.
    fn run(&self, job: &Arc<Job>, opts: CopyOptions, policy: Option<OnTargetError>) {
        let results: Vec<fleece_backup::Result<()>> = std::thread::scope(|s| {
            let monitor = s.spawn(|| self.monitor(job));
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
            job.copies_ended.store(true, Ordering::Release);
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
            .map(|(e, p)| format!("disk '{}' to {}: {e}", p.disk.name, p.spec));
        let ok = results.iter().all(|r| r.is_ok());
        let mut end = if ok {
            End::Completed
        } else if cancelled && error.is_none() {
            End::Cancelled
        } else {
            End::Failed
        };
        let mut error = error;
        if let Err(e) = self.settle_bitmaps(job, ok) {
            error = Some(match error {
                Some(prev) => format!("{prev}; {e}"),
                None => e.message,
            });
            end = End::Failed;
        }
        for p in &job.parts {
            if p.owned {
                if let Err(e) = self.snapshots.delete(&p.disk.name, &p.snapshot_name, true) {
                    if e.kind != Kind::NotFound {
                        tracing::warn!(job = %job.name, error = %e, "cannot delete the job's snapshot");
                    }
                }
            }
            if end != End::Completed {
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

    /// Settles each disk's bitmap at the end (module docs), with the disk
    /// frozen so no write slips between the successor and the bitmap.
    fn settle_bitmaps(&self, job: &Job, ok: bool) -> Result<()> {
        let mut first_err = None;
        for p in &job.parts {
            let Some((b, s)) = &p.bitmap else { continue };
            let _frozen = p.disk.live.freeze();
            let r = (|| -> fleece_block::Result<()> {
                match (job.mode, ok) {
                    (BitmapMode::Never, _) => Ok(()),
                    (BitmapMode::OnSuccess, false) => b.merge(s.bits()),
                    (_, true) => {
                        b.merge(s.bits())?;
                        b.clear_bits(&minus(b.bits(), s.bits()))
                    }
                    (BitmapMode::Always, false) => {
                        b.merge(s.bits())?;
                        let copied = lock(&p.copy)
                            .as_ref()
                            .map(|c| granules_within(&c.acknowledged(), b.bits()))
                            .unwrap_or_else(|| DirtyBitmap::new(b.bits().size(), b.bits().granularity()));
                        b.clear_bits(&minus(&copied, s.bits()))
                    }
                }
            })();
            p.disk.live.remove_bitmap(s.name());
            if let Err(e) = r {
                tracing::error!(job = %job.name, bitmap = b.name(), error = %e, "cannot update the bitmap after the backup");
                first_err.get_or_insert(Error::new(
                    Kind::Internal,
                    format!("bitmap '{}' of disk '{}': {e}", b.name(), p.disk.name),
                ));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Once a second while the job runs: the rate, a progress event, and
    /// events for pauses and retries.
    fn monitor(&self, job: &Job) {
        let mut last_state = "running";
        let mut last_emit = Instant::now();
        let mut last_done = u64::MAX;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            if job.copies_ended.load(Ordering::Acquire) {
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

/// `a` without the bits of `b` (same granularity and size).
fn minus(a: &DirtyBitmap, b: &DirtyBitmap) -> DirtyBitmap {
    let out = DirtyBitmap::new(a.size(), a.granularity());
    for w in 0..a.bits().div_ceil(64) {
        let v = a.word(w) & !b.word(w);
        if v != 0 {
            out.set_word(w, v);
        }
    }
    out
}

/// The granules of `like`'s shape that lie wholly inside `ranges`.
fn granules_within(ranges: &[(u64, u64)], like: &DirtyBitmap) -> DirtyBitmap {
    let g = like.granularity();
    let size = like.size();
    let out = DirtyBitmap::new(size, g);
    for &(off, len) in ranges {
        let end = off + len;
        let first = off.div_ceil(g);
        // The last granule counts if the range reaches the end of the disk.
        let last = if end >= size { size.div_ceil(g) } else { end / g };
        if last > first {
            out.set(first * g, ((last - first) * g).min(size - first * g));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granules_within_keeps_only_whole_granules_and_the_tail() {
        let like = DirtyBitmap::new(10 * 4096 + 100, 4096);
        let g = granules_within(&[(0, 8192), (4096 * 3 + 1, 8192), (4096 * 9, 4096 + 100)], &like);
        let set: Vec<u64> = (0..11).filter(|i| g.any(i * 4096, 1)).collect();
        assert_eq!(set, vec![0, 1, 4, 9, 10]);
        let m = minus(&g, &{
            let b = DirtyBitmap::new(10 * 4096 + 100, 4096);
            b.set(4096, 1);
            b
        });
        let set: Vec<u64> = (0..11).filter(|i| m.any(i * 4096, 1)).collect();
        assert_eq!(set, vec![0, 4, 9, 10]);
    }
}
