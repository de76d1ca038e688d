//! Copy order (seed 004, item 7): which clusters a push job copies first,
//! and the same hint for pull clients (the `fleece:copy-order` NBD meta
//! context).
//!
//! The order saves work on the live disk while the backup runs:
//!
//! 1. saved clusters the store holds in memory: copying them out frees
//!    memory (and, when the store nears its limit, any saved cluster:
//!    space the next copy-before-write needs);
//! 2. clusters not yet saved: each one pushed and then discarded from the
//!    view is a copy-before-write the guest never pays (QEMU's
//!    `discard-source`);
//! 3. clusters saved in a store on disk: they cost the guest nothing any
//!    more, whenever they go;
//! 4. zero and hole ranges, as zero writes (nothing on a target known to
//!    read as zeroes).
//!
//! A cluster's class changes while the job runs (a guest write saves an
//! unsaved cluster), so the plan asks the snapshot at each step instead of
//! sorting once.

use std::collections::VecDeque;

use fleece_block::{ClusterState, Mapping, Snapshot};

use crate::error::{Error, ErrorKind, Result};

/// How a job orders its copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// By what saves the live disk the most work (the module docs).
    #[default]
    Hinted,
    /// In ascending offset, for comparison.
    Offset,
}

/// The value of the `fleece:copy-order` context for a range of a view:
/// lower goes first. Values are stable: they are documented for clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Hint {
    /// Saved in memory (or the store is nearly full): copy it now.
    SavedFirst = 0,
    /// Not yet saved: copying (and trimming) it spares a copy-before-write.
    Unsaved = 1,
    /// Saved in a store on disk: no hurry.
    Saved = 2,
    /// Reads as zeroes: write zeroes, last (or nothing on an empty target).
    Zero = 3,
    /// Not readable (discarded, or outside the snapshot's bitmap): skip.
    Unavailable = 4,
}

/// The hint of cluster `c` of `snap`.
pub fn cluster_hint(snap: &Snapshot, c: u64, pressed: bool) -> Hint {
    match snap.cluster_state(c) {
        ClusterState::SavedInMemory => Hint::SavedFirst,
        ClusterState::Saved if pressed => Hint::SavedFirst,
        ClusterState::Saved => Hint::Saved,
        ClusterState::Unsaved | ClusterState::Saving => Hint::Unsaved,
        ClusterState::Zero => Hint::Zero,
        ClusterState::Unavailable => Hint::Unavailable,
    }
}

/// Copy-order hints over `[offset, offset + len)` of `snap`, as runs of
/// `(length, hint)` (maybe covering less than `len`: ask again from where
/// they end). Zero and hole ranges come from the view's block status, the
/// rest from each cluster's state.
pub fn hints(snap: &Snapshot, offset: u64, len: u64) -> Result<Vec<(u64, Hint)>> {
    let extents = snap
        .block_status(offset, len)
        .map_err(|e| Error::new(ErrorKind::Source, e.to_string()))?;
    let cluster = snap.cluster_size();
    let pressed = snap.store_pressed();
    let mut out: Vec<(u64, Hint)> = Vec::new();
    let mut push = |n: u64, h: Hint| match out.last_mut() {
        Some((len, last)) if *last == h => *len += n,
        _ => out.push((n, h)),
    };
    let mut pos = offset;
    for e in extents {
        let end = pos + e.length;
        match e.mapping {
            Mapping::Zero | Mapping::Hole => push(e.length, Hint::Zero),
            Mapping::Unavailable => push(e.length, Hint::Unavailable),
            Mapping::Data | Mapping::Unknown => {
                let mut p = pos;
                while p < end {
                    let c = p / cluster;
                    let n = ((c + 1) * cluster).min(end) - p;
                    push(n, cluster_hint(snap, c, pressed));
                    p += n;
                }
            }
        }
        pos = end;
    }
    Ok(out)
}

/// A set of clusters.
#[derive(Clone, Debug)]
pub(crate) struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    pub(crate) fn new(len: u64) -> Self {
        Bits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    pub(crate) fn set(&mut self, i: u64) {
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }
    pub(crate) fn clear(&mut self, i: u64) {
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }
    /// First set bit at or after `from`.
    pub(crate) fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }
}

/// A piece of work: clusters `first..first + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Task {
    /// Read from the view, write to the target.
    Data { first: u64, count: u64 },
    /// Make them read as zeroes on the target.
    Zero { first: u64, count: u64 },
}

/// Most saved-cluster runs remembered for the first class; older ones are
/// found by the last data pass anyway.
const MAX_SAVED_RUNS: usize = 1 << 16;

/// What is left to copy, and the order it goes in.
pub(crate) struct Plan {
    order: Order,
    /// Clusters per data task, and per zero task.
    max_data: u64,
    max_zero: u64,
    /// Data clusters not handed out yet.
    todo: Bits,
    /// Zero clusters to write, not handed out yet.
    zero: Bits,
    /// Tasks that failed and go again, first.
    retry: VecDeque<Task>,
    /// Runs of clusters saved since the job started (snapshot events).
    saved: VecDeque<(u64, u64)>,
    live_cursor: u64,
    all_cursor: u64,
    zero_cursor: u64,
    /// Tasks handed out and not yet done or given back.
    pub(crate) out: u64,
}

impl Plan {
    pub(crate) fn new(order: Order, todo: Bits, zero: Bits, max_data: u64, max_zero: u64) -> Plan {
        Plan {
            order,
            max_data: max_data.max(1),
            max_zero: max_zero.max(1),
            todo,
            zero,
            retry: VecDeque::new(),
            saved: VecDeque::new(),
            live_cursor: 0,
            all_cursor: 0,
            zero_cursor: 0,
            out: 0,
        }
    }

    /// Remembers clusters that were just saved (first class candidates).
    pub(crate) fn saved(&mut self, first: u64, count: u64) {
        if self.order == Order::Hinted {
            if self.saved.len() >= MAX_SAVED_RUNS {
                self.saved.pop_front();
            }
            self.saved.push_back((first, count));
        }
    }

    /// Gives back a task that did not complete; it goes again first.
    pub(crate) fn requeue(&mut self, t: Task) {
        self.out -= 1;
        self.retry.push_back(t);
    }

    /// A task completed.
    pub(crate) fn done(&mut self) {
        self.out -= 1;
    }

    /// The next task, in order; `None` if nothing is left to hand out.
    pub(crate) fn next(&mut self, snap: &Snapshot) -> Option<Task> {
        let t = self.pick(snap)?;
        self.out += 1;
        Some(t)
    }

    fn pick(&mut self, snap: &Snapshot) -> Option<Task> {
        if let Some(t) = self.retry.pop_front() {
            return Some(t);
        }
        match self.order {
            Order::Offset => self.pick_ascending(),
            Order::Hinted => self
                .pick_saved_first(snap)
                .or_else(|| self.pick_unsaved(snap))
                .or_else(|| self.pick_any_data())
                .or_else(|| self.pick_zero()),
        }
    }

    fn take_data(&mut self, first: u64, fits: impl Fn(u64) -> bool) -> Task {
        let mut count = 0;
        while count < self.max_data && self.todo.get(first + count) && (count == 0 || fits(first + count)) {
            self.todo.clear(first + count);
            count += 1;
        }
        Task::Data { first, count }
    }

    fn pick_saved_first(&mut self, snap: &Snapshot) -> Option<Task> {
        let pressed = snap.store_pressed();
        let first_class = |c: u64| cluster_hint(snap, c, pressed) == Hint::SavedFirst;
        while let Some((f, n)) = self.saved.pop_front() {
            let Some(c) = (f..f + n).find(|&c| self.todo.get(c) && first_class(c)) else {
                continue;
            };
            let t = self.take_data(c, first_class);
            let Task::Data { count, .. } = t else {
                unreachable!()
            };
            if c + count < f + n {
                self.saved.push_front((c + count, f + n - c - count));
            }
            return Some(t);
        }
        None
    }

    fn pick_unsaved(&mut self, snap: &Snapshot) -> Option<Task> {
        let unsaved = |c: u64| {
            matches!(
                snap.cluster_state(c),
                ClusterState::Unsaved | ClusterState::Saving | ClusterState::Unavailable
            )
        };
        while let Some(c) = self.todo.next_set(self.live_cursor) {
            if unsaved(c) {
                let t = self.take_data(c, unsaved);
                let Task::Data { count, .. } = t else {
                    unreachable!()
                };
                self.live_cursor = c + count;
                return Some(t);
            }
            // Saved meanwhile: the last data pass takes it.
            self.live_cursor = c + 1;
        }
        None
    }

    fn pick_any_data(&mut self) -> Option<Task> {
        let c = self.todo.next_set(self.all_cursor)?;
        let t = self.take_data(c, |_| true);
        let Task::Data { count, .. } = t else {
            unreachable!()
        };
        self.all_cursor = c + count;
        Some(t)
    }

    fn pick_zero(&mut self) -> Option<Task> {
        let c = self.zero.next_set(self.zero_cursor)?;
        let mut count = 0;
        while count < self.max_zero && self.zero.get(c + count) {
            self.zero.clear(c + count);
            count += 1;
        }
        self.zero_cursor = c + count;
        Some(Task::Zero { first: c, count })
    }

    fn pick_ascending(&mut self) -> Option<Task> {
        let d = self.todo.next_set(self.all_cursor);
        let z = self.zero.next_set(self.zero_cursor);
        match (d, z) {
            (Some(d), Some(z)) if z < d => self.pick_zero(),
            (Some(_), _) => self.pick_any_data(),
            (None, Some(_)) => self.pick_zero(),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_find_the_next_set_bit_across_words() {
        let mut b = Bits::new(200);
        for i in [3, 64, 130, 199] {
            b.set(i);
        }
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(64));
        assert_eq!(b.next_set(65), Some(130));
        assert_eq!(b.next_set(131), Some(199));
        assert_eq!(b.next_set(200), None);
        b.clear(199);
        assert_eq!(b.next_set(131), None);
    }
}
