//! Cluster state bytes: where each cluster's contents as of the instant are.
//!
//! One byte per cluster: a base state (the low bits) and the [`READERS`]
//! bit. Bytes are atomics so that the write fast path can check them without
//! the snapshot's lock; they only change with that lock held.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Still only on the live disk.
pub(super) const NOT_COPIED: u8 = 0;
/// A copy to the store is in flight; the live disk still holds the data.
pub(super) const COPYING: u8 = 1;
/// In the store.
pub(super) const SAVED: u8 = 2;
/// Discarded from the view, or outside its scope: never copied, never read.
pub(super) const NOT_NEEDED: u8 = 3;
/// Saved without a store slot: the cluster was a hole (or read as zeroes)
/// at the instant, so the view reads zeroes and the store stays empty.
pub(super) const ZEROED: u8 = 4;
/// The base state's bits.
pub(super) const MASK: u8 = 0x7f;
/// A view read of this cluster from the live disk is in flight.
pub(super) const READERS: u8 = 0x80;

/// Clusters per lazily allocated page of state bytes.
const PAGE: u64 = 4096;

/// True if a live write may change the cluster without asking the snapshot:
/// its contents are kept elsewhere (or not needed) and nobody reads it from
/// the live disk. No live read can start on such a cluster (readers only go
/// to the live disk for unsaved clusters), so this stays true.
pub(super) fn quiet(s: u8) -> bool {
    s & READERS == 0 && matches!(s & MASK, SAVED | ZEROED | NOT_NEEDED)
}

/// Per-cluster state bytes, allocated by page on first change, so a big
/// disk with few writes costs little. An absent page reads as `NOT_COPIED`.
pub(super) struct States {
    pages: Box<[OnceLock<Box<[AtomicU8]>>]>,
}

impl States {
    pub(super) fn new(clusters: u64) -> Self {
        let n = clusters.div_ceil(PAGE) as usize;
        States {
            pages: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    pub(super) fn get(&self, c: u64) -> u8 {
        match self.pages[(c / PAGE) as usize].get() {
            Some(p) => p[(c % PAGE) as usize].load(Ordering::Acquire),
            None => NOT_COPIED,
        }
    }

    /// Only called with the snapshot's lock held, so writers never race.
    pub(super) fn set(&self, c: u64, v: u8) {
        let page =
            self.pages[(c / PAGE) as usize].get_or_init(|| (0..PAGE).map(|_| AtomicU8::new(0)).collect());
        page[(c % PAGE) as usize].store(v, Ordering::Release);
    }

    /// Sets the base state and keeps the `READERS` bit.
    pub(super) fn set_base(&self, c: u64, base: u8) {
        let s = self.get(c);
        self.set(c, base | (s & READERS));
    }
}
