//! [`HookStore`]: a store whose saves, loads and forgets can be held, made
//! to fail, and counted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::trap::{lock, Trap, DEADLINE};
use crate::dev::BlockDev;
use crate::store::Store;
use crate::{Error, ErrorKind, Result};

/// A store with traps, failure injection and counters around a real one.
///
/// Made with [`new`](HookStore::new) and handed to a snapshot with
/// [`boxed`](HookStore::boxed), so the test keeps a handle to it.
pub struct HookStore {
    inner: Box<dyn Store>,
    /// Holds `save` before it stores anything, and `save_from` after
    /// the data landed (the cluster is still in flight until the engine
    /// settles it).
    pub save: Trap,
    /// Holds `load`.
    pub load: Trap,
    /// Holds `forget` after the store has freed the slot.
    pub forget: Trap,
    fail: Mutex<Option<ErrorKind>>,
    /// Saves panic (a bug in a store, as far as the engine can tell).
    panic: std::sync::atomic::AtomicBool,
    /// Cluster indices saved, in order.
    saved: Mutex<Vec<u64>>,
    saved_cv: Condvar,
    forgets: Mutex<Vec<u64>>,
    loads: AtomicU64,
}

impl HookStore {
    /// Wraps `inner` with every trap disarmed and no failure injected.
    pub fn new(inner: Box<dyn Store>) -> Arc<Self> {
        Arc::new(HookStore {
            inner,
            save: Trap::default(),
            load: Trap::default(),
            forget: Trap::default(),
            fail: Mutex::new(None),
            panic: std::sync::atomic::AtomicBool::new(false),
            saved: Mutex::new(Vec::new()),
            saved_cv: Condvar::new(),
            forgets: Mutex::new(Vec::new()),
            loads: AtomicU64::new(0),
        })
    }

    fn record(&self, index: u64, cluster: u64, len: u64) {
        lock(&self.saved).extend(index..index + len.div_ceil(cluster));
        self.saved_cv.notify_all();
    }

    /// The store to give a snapshot; it shares this one's hooks.
    pub fn boxed(self: &Arc<Self>) -> Box<dyn Store> {
        Box::new(Shared(self.clone()))
    }

    /// Makes every later save fail with `kind` (`None`: saves work again).
    pub fn set_fail(&self, kind: Option<ErrorKind>) {
        *lock(&self.fail) = kind;
    }

    /// Makes every later save panic (`false`: saves work again).
    pub fn set_panic(&self, on: bool) {
        self.panic.store(on, Ordering::SeqCst);
    }

    /// Clusters saved so far, in order (a run saved at once counts each).
    pub fn saved(&self) -> Vec<u64> {
        lock(&self.saved).clone()
    }

    /// Clusters forgotten so far, in order.
    pub fn forgets(&self) -> Vec<u64> {
        lock(&self.forgets).clone()
    }

    /// `load` calls so far.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }

    /// Waits until `n` clusters have been saved.
    ///
    /// # Panics
    ///
    /// If they are not within a few seconds.
    pub fn wait_saved(&self, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        let mut s = lock(&self.saved);
        while s.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "store: only {} of {n} expected saves happened",
                s.len()
            );
            s = self
                .saved_cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

struct Shared(Arc<HookStore>);

impl Store for Shared {
    fn granularity(&self) -> u64 {
        self.0.inner.granularity()
    }
    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> Result<()> {
        let s = &self.0;
        s.save.hit(index, data.len() as u64);
        if s.panic.load(Ordering::SeqCst) {
            panic!("injected store panic");
        }
        if let Some(kind) = *lock(&s.fail) {
            return Err(Error::new(kind, "injected store failure"));
        }
        s.inner.save(index, cluster, data)?;
        s.record(index, cluster, data.len() as u64);
        Ok(())
    }
    /// The kernel-copy path, where the inner store has one: the failure is
    /// injected before it, the trap holds the copy after the data landed.
    fn save_from(
        &self,
        index: u64,
        cluster: u64,
        src: &dyn BlockDev,
        offset: u64,
        len: u64,
    ) -> Option<Result<()>> {
        let s = &self.0;
        if s.panic.load(Ordering::SeqCst) {
            panic!("injected store panic");
        }
        if let Some(kind) = *lock(&s.fail) {
            return Some(Err(Error::new(kind, "injected store failure")));
        }
        let res = s.inner.save_from(index, cluster, src, offset, len)?;
        s.save.hit(index, len);
        if res.is_ok() {
            s.record(index, cluster, len);
        }
        Some(res)
    }
    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.loads.fetch_add(1, Ordering::SeqCst);
        self.0.load.hit(index, buf.len() as u64);
        self.0.inner.load(index, cluster, offset, buf)
    }
    fn forget(&self, index: u64, cluster: u64) {
        lock(&self.0.forgets).push(index);
        self.0.inner.forget(index, cluster);
        self.0.forget.hit(index, cluster);
    }
    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        self.0.inner.describe()
    }
}
