//! The copy engine of a push job: copies one snapshot view to one target
//! with several workers, in the order of [`crate::order`], under a speed
//! limit, and survives a target that goes away.
//!
//! A job of several disks runs one [`DiskCopy`] per disk under one shared
//! [`Control`] (pause, resume, cancel, speed). The daemon owns the
//! snapshot and the bitmaps; this module only copies, and says exactly
//! which clusters the target acknowledged ([`DiskCopy::acknowledged`]).
//!
//! **What is sent again.** A task (a run of clusters) counts as done only
//! when the target acknowledged all of it. A task that failed goes back to
//! the plan and is sent again after the target is back; a task that was
//! acknowledged is never sent again. With `retry`, a lost connection is
//! replaced (with backoff, for up to `retry_for`), and the snapshot, with
//! its store, stays in place meanwhile: live writes go on as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fleece_block::{AlignedBuf, BlockDev, IoFlags, Mapping, Snapshot, SnapshotEvent, Subscription};

use crate::control::Control;
use crate::error::{Error, ErrorKind, Result};
use crate::order::{Bits, Order, Plan, Task};
use crate::target::Target;

/// What to do when the target fails a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTargetError {
    /// The job fails.
    Report,
    /// The job pauses until resumed; the failed work goes again then.
    Stop,
    /// Reconnect (after a lost connection) or send again (after an error
    /// reply), with backoff, for up to `retry_for`; then fail.
    Retry,
}

/// What to do when reading the snapshot fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSourceError {
    /// The job fails.
    Report,
    /// The job pauses until resumed.
    Stop,
}

/// How one copy runs.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// The job's cluster: the unit of order, discards and progress; a
    /// multiple of the snapshot's cluster and of the target's.
    pub cluster: u64,
    /// Most bytes per write request (rounded to whole clusters).
    pub chunk: u64,
    /// Requests in flight.
    pub workers: usize,
    /// Copy order.
    pub order: Order,
    /// Discard what was pushed from the view, so live writes stop copying
    /// it (only for a snapshot the job owns).
    pub discard_source: bool,
    /// After the copy, read the target back and compare.
    pub verify: bool,
    /// Target failure policy.
    pub on_target_error: OnTargetError,
    /// Source failure policy.
    pub on_source_error: OnSourceError,
    /// How long `retry` keeps trying.
    pub retry_for: Duration,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            cluster: 64 << 10,
            chunk: 1 << 20,
            workers: 8,
            order: Order::Hinted,
            discard_source: false,
            verify: false,
            on_target_error: OnTargetError::Report,
            on_source_error: OnSourceError::Report,
            retry_for: Duration::from_secs(600),
        }
    }
}

/// Counters of one copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes the copy writes in all (data, and zeroes it must write).
    pub total_bytes: u64,
    /// Of those, acknowledged by the target.
    pub done_bytes: u64,
    /// Clusters of data copied.
    pub copied_clusters: u64,
    /// Clusters written as zeroes.
    pub zeroed_clusters: u64,
    /// Clusters not written: zeroes on a target that reads as zeroes, or
    /// outside the snapshot's bitmap (unchanged since the last backup).
    pub skipped_clusters: u64,
    /// What the copy is doing: planning, copying, flushing, verifying, done.
    pub phase: &'static str,
}

/// State of a target failure being ridden out.
#[derive(Default)]
struct Trouble {
    /// When the first failure of the current run of failures came.
    since: Option<Instant>,
    /// Failures in a row (for the backoff).
    count: u32,
    /// Bumped by each reconnect: a failure on an older connection needs no
    /// new one.
    generation: u64,
    reconnecting: bool,
}

/// Copies one snapshot view to one target. See the [module docs](self).
pub struct DiskCopy {
    snap: Arc<Snapshot>,
    target: Arc<dyn Target>,
    opts: CopyOptions,
    plan: Arc<Mutex<Plan>>,
    /// Clusters the target acknowledged (data or zeroes), and clusters
    /// skipped as zeroes on a zero target.
    acked: Mutex<Bits>,
    stats: Mutex<CopyStats>,
    trouble: Mutex<Trouble>,
    trouble_cv: Condvar,
    /// Wakes workers waiting for work that others may give back.
    work_cv: Condvar,
    /// Kernel copies turned out impossible (another file system): use
    /// buffers.
    no_offload: AtomicBool,
    _events: Option<Subscription>,
}

/// How a task failed.
enum Failed {
    Source(Error),
    Target(Error),
    Stopped,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Largest zero request: servers take 1 GiB effect lengths easily.
const MAX_ZERO_BYTES: u64 = 1 << 30;
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl DiskCopy {
    /// Plans the copy of `snap` to `target`: walks the view's block status
    /// once (holes and zeroes become zero tasks, or nothing on a target
    /// that reads as zeroes; clusters outside the snapshot's bitmap are
    /// skipped).
    pub fn new(snap: Arc<Snapshot>, target: Arc<dyn Target>, opts: CopyOptions) -> Result<Arc<DiskCopy>> {
        let size = snap.size();
        if target.size() != size {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "{} has {} bytes, the disk {size}",
                    target.describe(),
                    target.size()
                ),
            ));
        }
        let cluster = opts.cluster;
        if cluster == 0
            || !cluster.is_multiple_of(snap.cluster_size())
            || !cluster.is_multiple_of(target.cluster_size().max(1))
        {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "copy cluster {cluster} must be a multiple of the snapshot's cluster ({}) and of the target's ({})",
                    snap.cluster_size(),
                    target.cluster_size()
                ),
            ));
        }
        let clusters = size.div_ceil(cluster);
        let mut todo = Bits::new(clusters);
        let mut zero = Bits::new(clusters);
        let mut acked = Bits::new(clusters);
        let known_zero = target.known_zero();
        let mut stats = CopyStats {
            phase: "copying",
            ..CopyStats::default()
        };
        // Per cluster: seen data, seen zeroes, seen unavailable.
        let mut pos = 0;
        let mut cur: (u64, bool, bool, bool) = (0, false, false, false);
        let mut finish = |c: (u64, bool, bool, bool), stats: &mut CopyStats| -> Result<()> {
            let (i, data, zeroes, unavailable) = c;
            let len = cluster.min(size - i * cluster);
            match (data, zeroes, unavailable) {
                (_, _, true) if data || zeroes => Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "part of the {cluster}-byte cluster at offset {} of the snapshot is not readable (discarded, or outside its bitmap)",
                        i * cluster
                    ),
                )),
                (true, _, _) => {
                    todo.set(i);
                    stats.total_bytes += len;
                    Ok(())
                }
                (false, true, _) if known_zero => {
                    acked.set(i);
                    stats.skipped_clusters += 1;
                    Ok(())
                }
                (false, true, _) => {
                    zero.set(i);
                    stats.total_bytes += len;
                    Ok(())
                }
                _ => {
                    stats.skipped_clusters += 1;
                    Ok(())
                }
            }
        };
        while pos < size {
            let extents = snap
                .block_status(pos, size - pos)
                .map_err(|e| Error::new(ErrorKind::Source, format!("cannot map the snapshot: {e}")))?;
            if extents.is_empty() {
                return Err(Error::new(
                    ErrorKind::Source,
                    "the snapshot's block status said nothing",
                ));
            }
            for e in extents {
                let end = pos + e.length;
                while pos < end {
                    let c = pos / cluster;
                    if c != cur.0 {
                        finish(cur, &mut stats)?;
                        cur = (c, false, false, false);
                    }
                    match e.mapping {
                        Mapping::Data | Mapping::Unknown => cur.1 = true,
                        Mapping::Zero | Mapping::Hole => cur.2 = true,
                        Mapping::Unavailable => cur.3 = true,
                    }
                    pos = ((c + 1) * cluster).min(end);
                }
            }
        }
        finish(cur, &mut stats)?;
        let per = (opts.chunk / cluster).max(1);
        let plan = Arc::new(Mutex::new(Plan::new(
            opts.order,
            todo,
            zero,
            per,
            (MAX_ZERO_BYTES / cluster).max(1),
        )));
        // Saved clusters of the snapshot, in the job's clusters.
        let events = (opts.order == Order::Hinted).then(|| {
            let plan = Arc::downgrade(&plan);
            let ratio = cluster / snap.cluster_size();
            snap.subscribe(move |ev| {
                if let (SnapshotEvent::Saved { first, count }, Some(plan)) = (ev, plan.upgrade()) {
                    let f = first / ratio;
                    let l = (first + count - 1) / ratio;
                    lock(&plan).saved(f, l - f + 1);
                }
            })
        });
        Ok(Arc::new(DiskCopy {
            snap,
            target,
            opts,
            plan,
            acked: Mutex::new(acked),
            stats: Mutex::new(stats),
            trouble: Mutex::new(Trouble::default()),
            trouble_cv: Condvar::new(),
            work_cv: Condvar::new(),
            no_offload: AtomicBool::new(false),
            _events: events,
        }))
    }

    /// Counters now.
    pub fn stats(&self) -> CopyStats {
        lock(&self.stats).clone()
    }

    /// The target this copy writes.
    pub fn target(&self) -> &Arc<dyn Target> {
        &self.target
    }

    /// The copy's cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.opts.cluster
    }

    /// Byte ranges `(offset, length)` the target acknowledged so far (or
    /// skipped as zeroes it already reads): what a bitmap may drop when
    /// the job fails with `--bitmap-mode always`.
    pub fn acknowledged(&self) -> Vec<(u64, u64)> {
        let acked = lock(&self.acked);
        let size = self.snap.size();
        let c = self.opts.cluster;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut i = 0;
        while let Some(first) = acked.next_set(i) {
            let mut end = first + 1;
            while acked.get(end) {
                end += 1;
            }
            out.push((first * c, (end * c).min(size) - first * c));
            i = end;
        }
        out
    }

    fn set_phase(&self, phase: &'static str) {
        lock(&self.stats).phase = phase;
    }

    /// Runs the copy to the end: every cluster acknowledged, the target
    /// flushed, and verified if asked. Returns the error that ended it
    /// (cancelled: [`ErrorKind::Cancelled`]).
    pub fn run(&self, ctl: &Control) -> Result<()> {
        let workers = self.opts.workers.max(1);
        let res = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|i| {
                    std::thread::Builder::new()
                        .name(format!("backup-{i}"))
                        .spawn_scoped(s, || self.worker(ctl))
                })
                .collect();
            let mut first_err = None;
            for h in handles {
                let r = match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "a backup worker panicked"))),
                    Err(e) => Err(Error::io(ErrorKind::Io, "cannot start a backup worker", e)),
                };
                if let Err(e) = r {
                    if first_err.is_none() {
                        // The others stop at their next task.
                        ctl.fail_group();
                        first_err = Some(e);
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        });
        res?;
        self.set_phase("flushing");
        self.with_retry(ctl, || self.target.flush())?;
        if self.opts.verify {
            self.set_phase("verifying");
            self.verify(ctl)?;
        }
        self.set_phase("done");
        Ok(())
    }

    fn stopped(ctl: &Control) -> Error {
        let g = ctl.lock();
        if g.status.cancelled {
            Error::new(ErrorKind::Cancelled, "cancelled")
        } else {
            Error::new(ErrorKind::Cancelled, "stopped: another disk of the job failed")
        }
    }

    fn worker(&self, ctl: &Control) -> Result<()> {
        let mut buf = AlignedBuf::zeroed(0);
        loop {
            ctl.runnable().map_err(|_| Self::stopped(ctl))?;
            self.wait_reconnected(ctl)?;
            let generation = lock(&self.trouble).generation;
            let task = {
                let mut plan = lock(&self.plan);
                match plan.next(&self.snap) {
                    Some(t) => t,
                    None if plan.out == 0 => {
                        self.work_cv.notify_all();
                        return Ok(());
                    }
                    None => {
                        // Others hold the last tasks; one may come back.
                        let _ = self
                            .work_cv
                            .wait_timeout(plan, Duration::from_millis(100))
                            .unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                }
            };
            match self.exec(task, &mut buf, ctl) {
                Ok(()) => {
                    lock(&self.plan).done();
                    self.work_cv.notify_all();
                    let mut t = lock(&self.trouble);
                    t.since = None;
                    t.count = 0;
                }
                Err(f) => {
                    lock(&self.plan).requeue(task);
                    self.work_cv.notify_all();
                    match f {
                        Failed::Stopped => {}
                        Failed::Source(e) => match self.opts.on_source_error {
                            OnSourceError::Report => return Err(e),
                            OnSourceError::Stop => ctl.pause(Some(format!("cannot read the snapshot: {e}"))),
                        },
                        Failed::Target(e) => self.target_failed(e, generation, ctl)?,
                    }
                }
            }
        }
    }

    fn range(&self, first: u64, count: u64) -> (u64, u64) {
        let off = first * self.opts.cluster;
        (off, (count * self.opts.cluster).min(self.snap.size() - off))
    }

    fn exec(&self, task: Task, buf: &mut AlignedBuf, ctl: &Control) -> std::result::Result<(), Failed> {
        match task {
            Task::Data { first, count } => {
                let (off, len) = self.range(first, count);
                if !ctl.rate.take(len, || ctl.stopping()) {
                    return Err(Failed::Stopped);
                }
                buf.ensure(len as usize);
                if self.target.device().is_some() && !self.no_offload.load(Ordering::Relaxed) {
                    self.copy_pieces(off, len, buf)?;
                } else {
                    let data = &mut buf[..len as usize];
                    self.snap.read_at(data, off).map_err(|e| source_err(off, e))?;
                    self.write_data(off, data)?;
                }
                self.settle(first, count, len, true);
            }
            Task::Zero { first, count } => {
                let (off, len) = self.range(first, count);
                self.target.write_zeroes(off, len).map_err(Failed::Target)?;
                self.settle(first, count, len, false);
            }
        }
        Ok(())
    }

    /// Writes `data` (read from the view at `off`) to the target. Clusters
    /// that read as zeroes are not sent as data: a backup keeps holes where
    /// the disk reads as zeroes (raw images cannot tell allocated zeroes
    /// from data).
    fn write_data(&self, off: u64, data: &[u8]) -> std::result::Result<(), Failed> {
        let c = self.opts.cluster as usize;
        let mut i = 0usize;
        while i < data.len() {
            let zero = is_zero(&data[i..(i + c).min(data.len())]);
            let mut j = i + c;
            while j < data.len() && is_zero(&data[j..(j + c).min(data.len())]) == zero {
                j += c;
            }
            let j = j.min(data.len());
            let at = off + i as u64;
            match (zero, self.target.known_zero()) {
                (false, _) => self.target.write(at, &data[i..j]),
                (true, false) => self.target.write_zeroes(at, (j - i) as u64),
                (true, true) => Ok(()),
            }
            .map_err(Failed::Target)?;
            i = j;
        }
        Ok(())
    }

    /// Copies `[off, off + len)` with the kernel where the view's bytes are
    /// still on a raw live disk and the target is a file: `copy_file_range`,
    /// one copy instead of a read and a write through user memory. Each
    /// cluster's first 4 KiB is read first: a cluster that starts with
    /// zeroes is read whole and checked, so zero clusters still stay holes.
    /// Saved clusters, and devices that cannot, go through `buf`.
    fn copy_pieces(&self, off: u64, len: u64, buf: &mut AlignedBuf) -> std::result::Result<(), Failed> {
        let Some(tdev) = self.target.device() else {
            unreachable!("checked by the caller")
        };
        // `read_pieces` speaks block errors: a failure of ours stops it
        // with a stand-in and is kept here.
        let mut failed: Option<Failed> = None;
        let r = self.snap.read_pieces(off, len, |live, lo, n| {
            let data = &mut buf[(lo - off) as usize..(lo - off + n) as usize];
            match live {
                Some(base) => self.copy_live_run(base, tdev, lo, data),
                None => self
                    .snap
                    .read_at(data, lo)
                    .map_err(|e| source_err(lo, e))
                    .and_then(|_| self.write_data(lo, data)),
            }
            .map_err(|f| {
                failed = Some(f);
                fleece_block::Error::new(fleece_block::ErrorKind::Broken, "stopped")
            })
        });
        match (r, failed) {
            (_, Some(f)) => Err(f),
            (Err(e), None) => Err(source_err(off, e)),
            (Ok(()), None) => Ok(()),
        }
    }

    /// One pinned run at `lo` still on the live disk `base`: runs of
    /// clusters that start with data go to the kernel; a cluster whose
    /// first 4 KiB read as zeroes is read whole into `data` and written
    /// (or skipped) by [`write_data`](Self::write_data).
    fn copy_live_run(
        &self,
        base: &dyn BlockDev,
        tdev: &dyn BlockDev,
        lo: u64,
        data: &mut [u8],
    ) -> std::result::Result<(), Failed> {
        let c = self.opts.cluster;
        let end = lo + data.len() as u64;
        let mut probe = [0u8; 4096];
        let mut run: Option<(u64, u64)> = None;
        let mut pos = lo;
        while pos < end {
            let clen = (c - pos % c).min(end - pos);
            let p = (clen as usize).min(probe.len());
            base.read_at(&mut probe[..p], pos, IoFlags::NONE)
                .map_err(|e| source_err(pos, e))?;
            if !is_zero(&probe[..p]) {
                run = Some(run.map_or((pos, clen), |(a, l)| (a, l + clen)));
            } else {
                if let Some((a, l)) = run.take() {
                    let scratch = &mut data[(a - lo) as usize..(a - lo + l) as usize];
                    self.kernel_copy(base, tdev, a, l, scratch)?;
                }
                let whole = &mut data[(pos - lo) as usize..(pos - lo + clen) as usize];
                base.read_at(whole, pos, IoFlags::NONE)
                    .map_err(|e| source_err(pos, e))?;
                self.write_data(pos, whole)?;
            }
            pos += clen;
        }
        if let Some((a, l)) = run {
            let scratch = &mut data[(a - lo) as usize..(a - lo + l) as usize];
            self.kernel_copy(base, tdev, a, l, scratch)?;
        }
        Ok(())
    }

    /// `base.copy_to(target)`, or through `scratch` if the kernel cannot
    /// (then never tried again by this copy).
    fn kernel_copy(
        &self,
        base: &dyn BlockDev,
        tdev: &dyn BlockDev,
        at: u64,
        len: u64,
        scratch: &mut [u8],
    ) -> std::result::Result<(), Failed> {
        match base.copy_to(at, tdev, at, len) {
            Some(Ok(())) => return Ok(()),
            Some(Err(e)) => {
                // Which side failed is not known: the read side is the
                // disk, so look there first.
                if let Err(re) = base.read_at(&mut scratch[..len.min(4096) as usize], at, IoFlags::NONE) {
                    return Err(source_err(at, re));
                }
                return Err(Failed::Target(Error::new(
                    ErrorKind::Io,
                    format!("{}: cannot copy to it: {e}", self.target.describe()),
                )));
            }
            None => self.no_offload.store(true, Ordering::Relaxed),
        }
        base.read_at(scratch, at, IoFlags::NONE)
            .map_err(|e| source_err(at, e))?;
        self.target.write(at, scratch).map_err(Failed::Target)
    }

    /// Books an acknowledged task, and discards it from the view.
    fn settle(&self, first: u64, count: u64, len: u64, data: bool) {
        {
            let mut a = lock(&self.acked);
            for c in first..first + count {
                a.set(c);
            }
        }
        {
            let mut s = lock(&self.stats);
            s.done_bytes += len;
            if data {
                s.copied_clusters += count;
            } else {
                s.zeroed_clusters += count;
            }
        }
        if self.opts.discard_source {
            self.snap.discard(first * self.opts.cluster, len);
        }
    }

    /// Waits while another worker reconnects.
    fn wait_reconnected(&self, ctl: &Control) -> Result<()> {
        let mut t = lock(&self.trouble);
        while t.reconnecting {
            if ctl.stopping() {
                return Err(Self::stopped(ctl));
            }
            t = self
                .trouble_cv
                .wait_timeout(t, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn backoff(count: u32) -> Duration {
        (Duration::from_millis(100) * 2u32.saturating_pow(count.min(6))).min(MAX_BACKOFF)
    }

    /// Decides what a target failure does: fail, pause, or ride it out.
    fn target_failed(&self, e: Error, generation: u64, ctl: &Control) -> Result<()> {
        match self.opts.on_target_error {
            OnTargetError::Report => Err(e),
            OnTargetError::Stop => {
                ctl.pause(Some(format!("the target failed: {e}")));
                Ok(())
            }
            OnTargetError::Retry => {
                let mut t = lock(&self.trouble);
                let now = Instant::now();
                let since = *t.since.get_or_insert(now);
                if now.duration_since(since) > self.opts.retry_for {
                    return Err(Error::new(
                        e.kind(),
                        format!(
                            "gave up after retrying for {} s: {e}",
                            self.opts.retry_for.as_secs()
                        ),
                    ));
                }
                t.count += 1;
                if e.kind() != ErrorKind::Disconnected {
                    // An error reply: send again after a pause.
                    let wait = Self::backoff(t.count);
                    drop(t);
                    ctl.retrying(Some(format!("the target failed a request, sending again: {e}")));
                    ctl.sleep(wait);
                    ctl.retrying(None);
                    return Ok(());
                }
                if t.generation != generation || t.reconnecting {
                    // Someone reconnected (or is at it) since this task went out.
                    return Ok(());
                }
                t.reconnecting = true;
                drop(t);
                ctl.retrying(Some(format!("the target went away, reconnecting: {e}")));
                let r = self.reconnect(since, ctl);
                ctl.retrying(None);
                let mut t = lock(&self.trouble);
                t.reconnecting = false;
                if r.is_ok() {
                    t.generation += 1;
                }
                self.trouble_cv.notify_all();
                r
            }
        }
    }

    fn reconnect(&self, since: Instant, ctl: &Control) -> Result<()> {
        let mut tries = 0u32;
        loop {
            match self.target.reconnect() {
                Ok(()) => {
                    tracing::info!(target = %self.target.describe(), "reconnected to the backup target");
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Invalid => return Err(e),
                Err(e) => {
                    if since.elapsed() > self.opts.retry_for {
                        return Err(Error::new(
                            ErrorKind::Disconnected,
                            format!(
                                "the target did not come back within {} s: {e}",
                                self.opts.retry_for.as_secs()
                            ),
                        ));
                    }
                    tries += 1;
                    if !ctl.sleep(Self::backoff(tries)) {
                        return Err(Self::stopped(ctl));
                    }
                }
            }
        }
    }

    /// Runs `f` on the target, riding out failures like a task would.
    fn with_retry(&self, ctl: &Control, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        loop {
            let generation = lock(&self.trouble).generation;
            match f() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if self.opts.on_target_error != OnTargetError::Retry {
                        return Err(e);
                    }
                    self.target_failed(e, generation, ctl)?;
                }
            }
        }
    }

    /// Reads back every cluster written (or skipped as zeroes) and compares
    /// it with the view.
    fn verify(&self, ctl: &Control) -> Result<()> {
        let ranges = self.acknowledged();
        let chunk = self.opts.chunk.max(self.opts.cluster) as usize;
        let mut a = AlignedBuf::zeroed(chunk);
        let mut b = AlignedBuf::zeroed(chunk);
        let mut bad: Vec<u64> = Vec::new();
        let mut bad_count = 0u64;
        for (off, len) in ranges {
            let mut pos = off;
            while pos < off + len {
                if ctl.stopping() {
                    return Err(Self::stopped(ctl));
                }
                let n = (off + len - pos).min(chunk as u64) as usize;
                self.snap
                    .read_at(&mut a[..n], pos)
                    .map_err(|e| Error::new(ErrorKind::Source, format!("verify: at offset {pos}: {e}")))?;
                self.with_retry(ctl, || self.target.read(pos, &mut b[..n]))?;
                if a[..n] != b[..n] {
                    // Say which clusters differ.
                    let c = self.opts.cluster as usize;
                    for i in (0..n).step_by(c) {
                        let j = (i + c).min(n);
                        if a[i..j] != b[i..j] {
                            bad_count += 1;
                            if bad.len() < 16 {
                                bad.push(pos + i as u64);
                            }
                        }
                    }
                }
                pos += n as u64;
            }
        }
        if bad_count > 0 {
            return Err(Error::new(
                ErrorKind::Mismatch,
                format!(
                    "verify: {bad_count} cluster(s) of {} bytes differ between the target and the snapshot, at offsets {}{}",
                    self.opts.cluster,
                    bad.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
                    if bad_count > bad.len() as u64 { ", ..." } else { "" }
                ),
            ));
        }
        Ok(())
    }
}

fn source_err(off: u64, e: fleece_block::Error) -> Failed {
    Failed::Source(Error::new(ErrorKind::Source, format!("at offset {off}: {e}")))
}

/// True if `b` is all zero bytes.
fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any bytes are valid u64s; align_to splits off unaligned ends.
    let (head, body, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && body.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}
