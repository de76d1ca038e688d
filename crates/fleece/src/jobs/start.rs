//! Starting a job: its options checked, its targets opened, its snapshot
//! and successor bitmaps made at one instant, its thread started.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleece_backup::target::{self, OpenOptions, Target};
use fleece_backup::{Control, CopyOptions, ErrorKind as BackupKind, OnSourceError, OnTargetError, Order};
use fleece_block::{DirtyBitmap, NamedBitmap};
use serde_json::json;

use super::job::{lock, now_secs, BitmapMode, Job, Part, Running, Status};
use super::{
    Jobs, StartBackup, DEFAULT_CHUNK, DEFAULT_RETRY_SECS, MAX_CLUSTER, MIN_CLUSTER, SUCCESSOR_PREFIX,
};
use crate::bitmaps::{new_bitmap, DEFAULT_GRANULARITY};
use crate::error::{Error, Kind, Result};
use crate::registry::{check_name, Disk, SnapshotEntry};
use crate::snapshots::CreateSnapshot;
use crate::txn::Action;
use crate::units::{human, Size};

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
        // 0: the default of each target's kind, settled per disk.
        let workers = req.workers.unwrap_or(0);
        if req.workers.is_some() && !(1..=256).contains(&workers) {
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
        let _starting = lock(&self.starting);
        // One running job per bitmap and disk: two would each settle it to
        // their own successor (QEMU refuses a busy bitmap too).
        if let Some(name) = &req.bitmap {
            for j in self
                .list()
                .iter()
                .filter(|j| !j.finished() && j.bitmap.as_deref() == Some(name))
            {
                if let Some(p) = j
                    .parts
                    .iter()
                    .find(|p| disks.iter().any(|d| d.name == p.disk_name))
                {
                    return Err(Error::new(
                        Kind::Busy,
                        format!(
                            "dirty bitmap '{name}' of disk '{}' is in use by backup job '{}': wait for it, or cancel it",
                            p.disk_name, j.name
                        ),
                    ));
                }
            }
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
                disk_name: disk.name.clone(),
                spec: spec.clone(),
                snapshot_id: entry.export.name.clone(),
                snapshot_name: entry.name.clone(),
                running: Mutex::new(Some(Running {
                    disk,
                    target,
                    entry,
                    bitmap,
                })),
                last: Mutex::new(None),
                owned,
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
            clock: Instant::now(),
            ran: Mutex::new(None),
            parts,
            ctl: Control::new(plan.speed),
            status: Mutex::new(Status {
                end: None,
                error: None,
                finished: None,
                sample: (Instant::now(), 0),
                rate: 0,
            }),
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
            json!({ "job": job.name, "disks": job.parts.iter().map(|p| p.disk_name.clone()).collect::<Vec<_>>() }),
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
            if let Some(Running {
                disk,
                bitmap: Some((_, s)),
                ..
            }) = p.held()
            {
                disk.live.remove_bitmap(s.name());
            }
            if p.owned {
                let _ = self.snapshots.delete(&p.disk_name, &p.snapshot_name, true);
            }
        }
    }
}
