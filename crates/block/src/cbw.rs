//! Copy-before-write and snapshot views.
//!
//! A [`LiveDisk`] sits in front of the image its users write. Each attached
//! [`Snapshot`] keeps, per cluster, where the contents as of its instant
//! live: still on the live disk (not yet copied), in flight to the store, in
//! the store, or no longer needed. The ordering rules (ARCHITECTURE.md,
//! "Copy-before-write"), which follow seed 003:
//!
//! 1. View reads never block: an untouched or in-flight cluster is read from
//!    the live disk, a saved one from the store.
//! 2. Store writes never wait for view reads.
//! 3. A live write to a cluster waits only while a view read of that cluster
//!    *from the live disk* is in flight, and (once) for its copy.
//!
//! Rule 3 is enforced with one "live readers" bit in each cluster's state
//! byte, set while a view read of the cluster from the live disk is in
//! flight. A cluster whose state is saved-or-not-needed with that bit clear
//! can be overwritten with no lock at all: no new live read of it can start,
//! because readers only go to the live disk for clusters not yet saved.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::bitmap::DirtyBitmap;
use crate::dev::{check_range, BlockDev, Capabilities, Extent, Mapping, ZeroFlags};
use crate::persist::NamedBitmap;
use crate::raw::RawFile;
use crate::store::Store;
use crate::{Error, ErrorKind, Result};

const NOT_COPIED: u8 = 0;
const COPYING: u8 = 1;
const SAVED: u8 = 2;
const NOT_NEEDED: u8 = 3;
/// Saved without a store slot: the cluster was a hole (or read as zeroes)
/// at the instant, so the view reads zeroes and the store stays empty.
const ZEROED: u8 = 4;
const MASK: u8 = 0x7f;
/// A view read of this cluster from the live disk is in flight.
const READERS: u8 = 0x80;

/// Clusters per lazily allocated page of state bytes.
const PAGE: u64 = 4096;
/// Most clusters copied in one store write.
const MAX_RUN: u64 = 64;
/// Condition variables a snapshot's waiters spread over, by cluster: a
/// settled copy or a finished view read wakes only writers that wait on
/// clusters of the same slot, not all of them.
const WAIT_SLOTS: usize = 64;

/// Per-cluster state bytes, allocated by page on first change, so a big
/// disk with few writes costs little. An absent page reads as `NOT_COPIED`.
struct States {
    pages: Box<[OnceLock<Box<[AtomicU8]>>]>,
}

impl States {
    fn new(clusters: u64) -> Self {
        let n = clusters.div_ceil(PAGE) as usize;
        States {
            pages: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, c: u64) -> u8 {
        match self.pages[(c / PAGE) as usize].get() {
            Some(p) => p[(c % PAGE) as usize].load(Ordering::Acquire),
            None => NOT_COPIED,
        }
    }

    /// Only called with the snapshot's lock held, so writers never race.
    fn set(&self, c: u64, v: u8) {
        let page =
            self.pages[(c / PAGE) as usize].get_or_init(|| (0..PAGE).map(|_| AtomicU8::new(0)).collect());
        page[(c % PAGE) as usize].store(v, Ordering::Release);
    }

    fn set_base(&self, c: u64, base: u8) {
        let s = self.get(c);
        self.set(c, base | (s & READERS));
    }
}

/// What happens when saving old data fails (I/O error, full store, timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCbwError {
    /// The user's write fails; the snapshot stays exact (QEMU's default).
    BreakGuestWrite,
    /// The snapshot breaks for good; user writes go on without copies.
    BreakSnapshot,
}

/// How a snapshot behaves.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// Copy unit in bytes; rounded up to the store's granularity.
    pub cluster_size: u64,
    /// Failure policy.
    pub on_cbw_error: OnCbwError,
    /// A copy slower than this counts as failed.
    pub cbw_timeout: Option<Duration>,
    /// Each view read discards the whole clusters it returned.
    pub read_once: bool,
    /// Most bytes the store may hold.
    pub store_limit: Option<u64>,
    /// Only clusters dirty in this (frozen) bitmap are copied or readable.
    pub scope: Option<DirtyBitmap>,
    /// Names the snapshot in log lines (the daemon uses `DISK@NAME`).
    pub label: String,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            cluster_size: 64 << 10,
            on_cbw_error: OnCbwError::BreakGuestWrite,
            cbw_timeout: None,
            read_once: false,
            store_limit: None,
            scope: None,
            label: String::new(),
        }
    }
}

/// Something a snapshot reports to whoever watches it.
#[derive(Clone, Debug)]
pub enum SnapshotEvent {
    /// It broke, with why.
    Broken(String),
    /// Store usage crossed `percent` (80 or 95) of the limit.
    StoreUsage {
        /// Threshold crossed.
        percent: u8,
        /// Bytes held.
        used: u64,
        /// The limit.
        limit: u64,
    },
}

/// Counters for status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Clusters whose contents at the instant are saved so far.
    pub copied_clusters: u64,
    /// Of those, clusters that were holes (or zeroes) at the instant, kept
    /// as such without taking store space.
    pub hole_clusters: u64,
    /// Clusters discarded from the view.
    pub discarded_clusters: u64,
    /// Bytes the store holds.
    pub used_bytes: u64,
    /// Why the snapshot broke, if it did.
    pub broken: Option<String>,
}

type Listener = Box<dyn Fn(SnapshotEvent) + Send + Sync>;

struct Inner {
    /// Live-disk view reads in flight, per cluster.
    readers: HashMap<u64, u32>,
    broken: Option<String>,
    /// Highest usage alert sent (0, 80, 95).
    alerted: u8,
    /// Writers waiting on each slot of `Snapshot::changed`, so that nobody
    /// pays a futex call to wake a slot with no one in it.
    waiting: [u32; WAIT_SLOTS],
}

/// The state of one disk at one instant.
pub struct Snapshot {
    base: Arc<dyn BlockDev>,
    size: u64,
    cluster: u64,
    store: Box<dyn Store>,
    states: States,
    inner: Mutex<Inner>,
    changed: Box<[Condvar]>,
    opts: SnapshotOptions,
    broken: AtomicBool,
    used: AtomicU64,
    copied: AtomicU64,
    holes: AtomicU64,
    discarded: AtomicU64,
    listener: OnceLock<Listener>,
}

impl Snapshot {
    fn new(base: Arc<dyn BlockDev>, store: Box<dyn Store>, opts: SnapshotOptions) -> Self {
        let size = base.size();
        let g = store.granularity().max(1);
        let cluster = opts.cluster_size.max(g).div_ceil(g) * g;
        let clusters = size.div_ceil(cluster).max(1);
        Snapshot {
            base,
            size,
            cluster,
            store,
            states: States::new(clusters),
            inner: Mutex::new(Inner {
                readers: HashMap::new(),
                broken: None,
                alerted: 0,
                waiting: [0; WAIT_SLOTS],
            }),
            changed: (0..WAIT_SLOTS).map(|_| Condvar::new()).collect(),
            opts,
            broken: AtomicBool::new(false),
            used: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            holes: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            listener: OnceLock::new(),
        }
    }

    /// Cluster size actually used (after rounding to the store).
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Size of the disk at the instant.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The options it was made with.
    pub fn options(&self) -> &SnapshotOptions {
        &self.opts
    }

    /// Store kind and path.
    pub fn store_description(&self) -> (&'static str, Option<PathBuf>) {
        self.store.describe()
    }

    /// Sets who hears about breakage and store usage (once).
    pub fn set_listener(&self, f: impl Fn(SnapshotEvent) + Send + Sync + 'static) {
        let _ = self.listener.set(Box::new(f));
    }

    /// Current counters.
    pub fn stats(&self) -> SnapshotStats {
        SnapshotStats {
            copied_clusters: self.copied.load(Ordering::Relaxed),
            hole_clusters: self.holes.load(Ordering::Relaxed),
            discarded_clusters: self.discarded.load(Ordering::Relaxed),
            used_bytes: self.used.load(Ordering::Relaxed),
            broken: self.lock().broken.clone(),
        }
    }

    /// True once a copy failure broke it (break-snapshot policy).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until cluster `c` may have changed (or the deadline passes).
    fn wait<'a>(
        &self,
        mut g: MutexGuard<'a, Inner>,
        c: u64,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, Inner>, bool) {
        let slot = (c % WAIT_SLOTS as u64) as usize;
        let cv = &self.changed[slot];
        g.waiting[slot] += 1;
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
        g.waiting[slot] -= 1;
        (g, timed_out)
    }

    /// Wakes writers waiting on clusters `[c, end)`. Call with the lock held.
    fn wake(&self, g: &Inner, c: u64, end: u64) {
        let slots = WAIT_SLOTS as u64;
        let n = (end - c).min(slots);
        for x in c..c + n {
            let slot = (x % slots) as usize;
            if g.waiting[slot] > 0 {
                self.changed[slot].notify_all();
            }
        }
    }

    /// Wakes every waiter (a break, a discard). Call with the lock held.
    fn wake_all(&self, g: &Inner) {
        for (slot, cv) in self.changed.iter().enumerate() {
            if g.waiting[slot] > 0 {
                cv.notify_all();
            }
        }
    }

    fn in_scope(&self, c: u64) -> bool {
        match &self.opts.scope {
            None => true,
            Some(b) => b.any(c * self.cluster, self.cluster_len(c)),
        }
    }

    fn cluster_len(&self, c: u64) -> u64 {
        self.cluster.min(self.size - c * self.cluster)
    }

    fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.cluster, (offset + len - 1) / self.cluster)
    }

    fn quiet(s: u8) -> bool {
        s & READERS == 0 && matches!(s & MASK, SAVED | ZEROED | NOT_NEEDED)
    }

    /// True if copies never wait for a disk or a timer: the store is in
    /// memory and there is no copy timeout (which needs its own thread).
    fn copies_in_memory(&self) -> bool {
        self.store.is_in_memory() && self.opts.cbw_timeout.is_none()
    }

    /// True if a live write to the range needs nothing from this snapshot.
    fn write_is_free(&self, offset: u64, len: u64) -> bool {
        if len == 0 || self.is_broken() || offset >= self.size {
            return true;
        }
        let (first, last) = self.clusters(offset, len.min(self.size - offset));
        (first..=last).all(|c| Self::quiet(self.states.get(c)))
    }

    fn break_with(&self, g: &mut Inner, why: String) {
        if g.broken.is_none() {
            tracing::error!(snapshot = %self.opts.label, reason = %why, "snapshot broken");
            g.broken = Some(why.clone());
            self.broken.store(true, Ordering::Release);
            self.wake_all(g);
            if let Some(l) = self.listener.get() {
                l(SnapshotEvent::Broken(why));
            }
        }
    }

    fn fail(&self, err: Error) -> Result<()> {
        match self.opts.on_cbw_error {
            OnCbwError::BreakGuestWrite => Err(err),
            OnCbwError::BreakSnapshot => {
                let mut g = self.lock();
                self.break_with(&mut g, format!("copy-before-write failed: {err}"));
                Ok(())
            }
        }
    }

    /// Saves the clusters that a live write to `[offset, offset+len)` is
    /// about to change, and returns once the write may go ahead.
    fn before_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        if self.write_is_free(offset, len) {
            return Ok(());
        }
        let len = len.min(self.size - offset);
        let (first, last) = self.clusters(offset, len);
        let deadline = self.opts.cbw_timeout.map(|t| Instant::now() + t);
        let mut g = self.lock();
        let mut c = first;
        while c <= last {
            if g.broken.is_some() {
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

    /// Copies clusters `[c, end)` (already marked COPYING, space reserved)
    /// from the live disk to the store. With a timeout the copy runs on its
    /// own thread so the writer can give up on it; the copy then still
    /// finishes and settles the cluster states itself.
    fn copy(self: &Arc<Self>, c: u64, end: u64, deadline: Option<Instant>) -> Result<()> {
        let Some(deadline) = deadline else {
            return self.copy_and_settle(c, end);
        };
        let (tx, rx) = mpsc::channel();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("cbw-copy".into())
            .spawn(move || {
                let _ = tx.send(me.copy_and_settle(c, end));
            });
        if let Err(e) = spawned {
            self.settle(c, end, 0, None);
            return Err(Error::io("cannot start a copy thread", e));
        }
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "copy-before-write took longer than {:?}",
                    self.opts.cbw_timeout.unwrap_or_default()
                ),
            )),
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
        self.settle(c, end, bytes, res.is_ok().then_some(&zero[..]));
        res
    }

    fn save_run(&self, c: u64, bytes: u64) -> Result<()> {
        // File to file, the kernel copies (or shares) the data itself.
        let direct = self.base.as_raw_file().and_then(|src| {
            self.store
                .save_from_file(c, self.cluster, src, c * self.cluster, bytes)
        });
        match direct {
            Some(r) => r,
            None => {
                let mut buf = vec![0u8; bytes as usize];
                self.base
                    .read_at(&mut buf, c * self.cluster)
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
            } else if done.is_some() && !zero {
                self.store.forget(x, self.cluster);
                freed += self.cluster_len(x);
            }
        }
        self.copied.fetch_add(copied, Ordering::Relaxed);
        self.holes.fetch_add(holes, Ordering::Relaxed);
        self.used.fetch_sub(freed, Ordering::Relaxed);
        self.wake(&g, c, end);
        self.alert_usage(&mut g);
    }

    fn alert_usage(&self, g: &mut Inner) {
        let Some(limit) = self.opts.store_limit.filter(|&l| l > 0) else {
            return;
        };
        let used = self.used.load(Ordering::Relaxed);
        let pct = used.saturating_mul(100) / limit;
        for threshold in [80u8, 95] {
            if pct >= threshold as u64 && g.alerted < threshold {
                g.alerted = threshold;
                if let Some(l) = self.listener.get() {
                    l(SnapshotEvent::StoreUsage {
                        percent: threshold,
                        used,
                        limit,
                    });
                }
            }
        }
    }

    fn check_readable(&self) -> Result<()> {
        match &self.lock().broken {
            Some(why) => Err(Error::new(
                ErrorKind::Broken,
                format!("snapshot is broken: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// Reads the disk as it was at the instant.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (first, last) = self.clusters(offset, buf.len() as u64);
        let mut c = first;
        while c <= last {
            // Classify a run of clusters with the same source under the lock.
            let mut g = self.lock();
            if let Some(why) = &g.broken {
                return Err(Error::new(
                    ErrorKind::Broken,
                    format!("snapshot is broken: {why}"),
                ));
            }
            let src = self.source(c)?;
            let mut end = c + 1;
            while end <= last && self.source(end).ok() == Some(src) {
                end += 1;
            }
            let from_live = src == Source::Live;
            if from_live {
                for x in c..end {
                    *g.readers.entry(x).or_insert(0) += 1;
                    let s = self.states.get(x);
                    self.states.set(x, s | READERS);
                }
            }
            drop(g);
            let lo = (c * self.cluster).max(offset);
            let hi = (end * self.cluster).min(offset + buf.len() as u64);
            let part = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            let res = if from_live {
                let r = self.base.read_at(part, lo);
                self.release_readers(c, end);
                r
            } else if src == Source::Zero {
                part.fill(0);
                Ok(())
            } else {
                // A discard may free a saved cluster while we load it; its
                // state then says so, and what we loaded cannot be trusted.
                self.load(part, lo).and_then(|_| {
                    let _g = self.lock();
                    if (c..end).any(|x| self.states.get(x) & MASK == NOT_NEEDED) {
                        Err(Error::new(
                            ErrorKind::AccessDenied,
                            "this part of the snapshot was discarded while it was being read",
                        ))
                    } else {
                        Ok(())
                    }
                })
            };
            res?;
            c = end;
        }
        // A break during the read may have let new data into what we read.
        self.check_readable()?;
        if self.opts.read_once {
            self.discard(offset, buf.len() as u64);
        }
        Ok(())
    }

    /// Where cluster `c` as of the instant is to be read from.
    fn source(&self, c: u64) -> Result<Source> {
        match self.states.get(c) & MASK {
            SAVED => Ok(Source::Store),
            ZEROED => Ok(Source::Zero),
            NOT_NEEDED => Err(Error::new(
                ErrorKind::AccessDenied,
                "this part of the snapshot was discarded and can no longer be read",
            )),
            _ if !self.in_scope(c) => Err(Error::new(
                ErrorKind::AccessDenied,
                "this part of the disk is outside the snapshot's bitmap",
            )),
            _ => Ok(Source::Live),
        }
    }

    fn release_readers(&self, c: u64, end: u64) {
        let mut g = self.lock();
        for x in c..end {
            if let Some(n) = g.readers.get_mut(&x) {
                *n -= 1;
                if *n == 0 {
                    g.readers.remove(&x);
                    let s = self.states.get(x);
                    self.states.set(x, s & !READERS);
                    self.wake(&g, x, x + 1);
                }
            }
        }
    }

    fn load(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos / self.cluster;
            let within = pos - c * self.cluster;
            let n = ((self.cluster - within) as usize).min(buf.len() - done);
            self.store
                .load(c, self.cluster, within, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Drops the whole clusters inside the range: their saved copies are
    /// freed, later live writes to them copy nothing, and later view reads of
    /// them fail.
    pub fn discard(&self, offset: u64, len: u64) {
        let end = (offset.saturating_add(len)).min(self.size);
        let first = offset.div_ceil(self.cluster);
        // The last cluster counts if the range reaches the end of the disk.
        let last_excl = if end == self.size {
            self.size.div_ceil(self.cluster)
        } else {
            end / self.cluster
        };
        if first >= last_excl {
            return;
        }
        let g = self.lock();
        let mut freed = 0;
        for c in first..last_excl {
            let s = self.states.get(c);
            // Mark first, then free: a reader that loaded the slot re-checks
            // the mark under this lock.
            self.states.set_base(c, NOT_NEEDED);
            match s & MASK {
                NOT_NEEDED => continue,
                SAVED => {
                    self.store.forget(c, self.cluster);
                    freed += self.cluster_len(c);
                }
                // ZEROED holds no store slot; NOT_COPIED and COPYING none yet.
                _ => {}
            }
            self.discarded.fetch_add(1, Ordering::Relaxed);
        }
        self.used.fetch_sub(freed, Ordering::Relaxed);
        self.wake_all(&g);
    }

    /// Mapping of the disk at the instant.
    ///
    /// The live disk is asked once for the whole range, not once per run of
    /// unsaved clusters: on tmpfs each SEEK_HOLE walks the page cache to the
    /// next hole under the inode lock, and a fragmented view made thousands
    /// of such walks per request, starving live writes.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, offset, len)?;
        self.check_readable()?;
        // Bound the work per request; the client asks again from where we stop.
        let end = offset + len.min((1u64 << 16) * self.cluster);
        let first = offset / self.cluster;
        let last = (end - 1) / self.cluster;
        // Runs of (first cluster, end cluster, source).
        let mut runs: Vec<(u64, u64, Source)> = Vec::new();
        let mut g = self.lock();
        for c in first..=last {
            // Discarded or outside the scope: reads fail, and saying so lets
            // a client skip the range instead of reading it to find out.
            let src = self.source(c).unwrap_or(Source::Unavailable);
            match runs.last_mut() {
                Some(r) if r.2 == src => r.1 = c + 1,
                _ => runs.push((c, c + 1, src)),
            }
        }
        // Pin the unsaved clusters like a read: a live trim must not turn
        // data that existed at the instant into a reported hole.
        let pinned: Vec<(u64, u64)> = runs
            .iter()
            .filter(|r| r.2 == Source::Live)
            .map(|r| (r.0, r.1))
            .collect();
        for &(a, b) in &pinned {
            for x in a..b {
                *g.readers.entry(x).or_insert(0) += 1;
                let s = self.states.get(x);
                self.states.set(x, s | READERS);
            }
        }
        drop(g);
        let base = if pinned.is_empty() {
            Ok((end, Vec::new()))
        } else {
            let lo = (pinned[0].0 * self.cluster).max(offset);
            let hi = (pinned[pinned.len() - 1].1 * self.cluster).min(end);
            self.base.block_status(lo, hi - lo).map(|e| (lo, e))
        };
        for &(a, b) in &pinned {
            self.release_readers(a, b);
        }
        // Breaking lets writes through without waiting for pins.
        self.check_readable()?;
        let (mut bpos, base) = base?;
        let mut base = base.into_iter().peekable();
        let mut out: Vec<Extent> = Vec::new();
        for (a, b, src) in runs {
            let lo = (a * self.cluster).max(offset);
            let hi = (b * self.cluster).min(end);
            match src {
                Source::Store => {
                    push(&mut out, hi - lo, Mapping::Data);
                    continue;
                }
                Source::Zero => {
                    push(&mut out, hi - lo, Mapping::Hole);
                    continue;
                }
                Source::Unavailable => {
                    push(&mut out, hi - lo, Mapping::Unavailable);
                    continue;
                }
                Source::Live => {}
            }
            // Walk the live disk's extents over [lo, hi).
            let mut pos = lo;
            while pos < hi {
                while let Some(e) = base.peek() {
                    if bpos + e.length <= pos {
                        bpos += e.length;
                        base.next();
                    } else {
                        break;
                    }
                }
                match base.peek() {
                    Some(e) if bpos <= pos => {
                        let stop = (bpos + e.length).min(hi);
                        push(&mut out, stop - pos, e.mapping);
                        pos = stop;
                    }
                    // Not covered by the answer: claim nothing.
                    _ => {
                        push(&mut out, hi - pos, Mapping::Data);
                        pos = hi;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Where a cluster as of the instant is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Not yet changed: the live disk.
    Live,
    /// Saved in the store.
    Store,
    /// A hole at the instant: zeroes.
    Zero,
    /// Discarded or outside the scope: not readable (block status only).
    Unavailable,
}

fn push(out: &mut Vec<Extent>, length: u64, mapping: Mapping) {
    if let Some(last) = out.last_mut() {
        if last.mapping == mapping {
            last.length += length;
            return;
        }
    }
    out.push(Extent { length, mapping });
}

/// A disk that its users write, with copy-before-write for every snapshot
/// attached to it.
pub struct LiveDisk {
    base: Arc<dyn BlockDev>,
    /// Writes hold it shared; taking a snapshot holds it exclusively, so a
    /// write in flight at the instant lands wholly before or after it.
    gate: RwLock<()>,
    snapshots: RwLock<Arc<Vec<Arc<Snapshot>>>>,
    /// Dirty bitmaps every change is recorded in.
    bitmaps: RwLock<Arc<Vec<Arc<NamedBitmap>>>>,
}

impl LiveDisk {
    /// Wraps the device users write.
    pub fn new(base: Arc<dyn BlockDev>) -> Self {
        LiveDisk {
            base,
            gate: RwLock::new(()),
            snapshots: RwLock::new(Arc::new(Vec::new())),
            bitmaps: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// The dirty bitmaps, in the order added.
    pub fn bitmaps(&self) -> Arc<Vec<Arc<NamedBitmap>>> {
        self.bitmaps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A dirty bitmap by name.
    pub fn bitmap(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        self.bitmaps().iter().find(|b| b.name() == name).cloned()
    }

    /// Starts recording changes in `b`. Call with the disk frozen, so that
    /// no write in flight misses it.
    pub fn add_bitmap(&self, b: Arc<NamedBitmap>) {
        let mut list = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let mut v = (**list).clone();
        v.push(b);
        *list = Arc::new(v);
    }

    /// Stops recording in the named bitmap and returns it.
    pub fn remove_bitmap(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        let mut list = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let found = list.iter().find(|b| b.name() == name).cloned()?;
        let v: Vec<_> = list.iter().filter(|b| b.name() != name).cloned().collect();
        *list = Arc::new(v);
        Some(found)
    }

    /// Blocks new writes and waits for those in flight; the instant of a
    /// snapshot is while this guard is held. Freeze several disks in a fixed
    /// order (by name) for one instant across them.
    pub fn freeze(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a snapshot at this instant. Call with the disk frozen.
    pub fn snapshot(&self, store: Box<dyn Store>, opts: SnapshotOptions) -> Arc<Snapshot> {
        let snap = Arc::new(Snapshot::new(self.base.clone(), store, opts));
        let mut list = self.snapshots.write().unwrap_or_else(|p| p.into_inner());
        let mut v = (**list).clone();
        v.push(snap.clone());
        *list = Arc::new(v);
        snap
    }

    /// Stops copy-before-write for a snapshot. Writes already in flight may
    /// still copy into it; that is harmless.
    pub fn detach(&self, snap: &Arc<Snapshot>) {
        let mut list = self.snapshots.write().unwrap_or_else(|p| p.into_inner());
        let v: Vec<_> = list.iter().filter(|s| !Arc::ptr_eq(s, snap)).cloned().collect();
        *list = Arc::new(v);
    }

    /// Number of attached snapshots.
    pub fn snapshot_count(&self) -> usize {
        self.snapshots.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn attached(&self) -> Arc<Vec<Arc<Snapshot>>> {
        self.snapshots.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` (a change to the range) after every snapshot saved what it
    /// needs, holding the gate shared throughout.
    fn changing<T>(&self, offset: u64, len: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        check_range(self.base.size(), offset, len)
            .map_err(|_| Error::new(ErrorKind::NoSpace, "write beyond the end of the disk"))?;
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if len > 0 {
            // Bits first: durable before the data can reach the disk.
            for b in self.bitmaps().iter() {
                b.mark(offset, len)?;
            }
            for s in self.attached().iter() {
                s.before_write(offset, len)?;
            }
        }
        f()
    }
}

impl BlockDev for LiveDisk {
    fn size(&self) -> u64 {
        self.base.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.base.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.base.read_at(buf, offset)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        self.base.try_read_at(buf, offset)
    }
    fn is_in_memory(&self) -> bool {
        self.base.is_in_memory()
    }
    fn as_raw_file(&self) -> Option<&RawFile> {
        self.base.as_raw_file()
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        let _gate = self.gate.try_read().ok()?;
        let len = buf.len() as u64;
        // A new bitmap bit means an fdatasync: that goes to the pool.
        if !self.bitmaps().iter().all(|b| b.covers(offset, len)) {
            return None;
        }
        let snaps = self.attached();
        if !snaps.iter().all(|s| s.write_is_free(offset, len)) {
            // With the disk and every store in memory a copy is a memory
            // copy, and running it here saves a hand-off to the pool in the
            // copy phase of a fresh snapshot, where the write latency tail is.
            // A wait here is for another thread's copy or view read of the
            // same cluster, which do not need this one.
            if !self.base.is_in_memory() || !snaps.iter().all(|s| s.copies_in_memory()) {
                return None;
            }
            check_range(self.base.size(), offset, len).ok()?;
            for s in snaps.iter() {
                if let Err(e) = s.before_write(offset, len) {
                    return Some(Err(e));
                }
            }
        }
        self.base.try_write_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.changing(offset, buf.len() as u64, || self.base.write_at(buf, offset, fua))
    }
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        self.changing(offset, length, || self.base.write_zeroes(offset, length, flags))
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.changing(offset, length, || self.base.trim(offset, length))
    }
    fn flush(&self) -> Result<()> {
        self.base.flush()
    }
    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.base.cache(offset, length)
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.base.block_status(offset, length)
    }
}

/// A snapshot as a read-only device; trim discards.
pub struct SnapshotView(pub Arc<Snapshot>);

impl BlockDev for SnapshotView {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            trim: true,
            fast_zero: false,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        // View reads never wait on copies (rule 1), so with both sides in
        // memory they cannot block and may run inline.
        (self.0.base.is_in_memory() && self.0.store.is_in_memory()).then(|| self.0.read_at(buf, offset))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(Error::new(ErrorKind::ReadOnly, "snapshot views are read-only"))
    }
    fn write_zeroes(&self, _offset: u64, _length: u64, _flags: ZeroFlags) -> Result<()> {
        Err(Error::new(ErrorKind::ReadOnly, "snapshot views are read-only"))
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        check_range(self.0.size, offset, length)?;
        self.0.discard(offset, length);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn cache(&self, offset: u64, length: u64) -> Result<()> {
        check_range(self.0.size, offset, length)
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.0.block_status(offset, length)
    }
}
