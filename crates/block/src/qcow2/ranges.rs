//! A range lock for the few qcow2 operations that may move data clusters
//! under concurrent I/O (discards): they hold their stripes exclusively,
//! every read and write holds its stripes shared.
//!
//! imago's reads and writes take `&self` and are safe together on any
//! ranges; its discards (`discard_to_zero_unsafe`,
//! `discard_to_backing_unsafe`) free host clusters, which a read or write
//! of the same guest range in flight may still be using (and which another
//! allocation could reuse). So a discard excludes I/O on its range, and
//! nothing else: I/O on other stripes goes on.
//!
//! The shared side costs two atomic increments and two loads on one
//! padded counter per stripe it touches (one, for a request inside a
//! stripe); it takes no mutex unless a discard holds or waits for the
//! stripe. Stripes are aligned multiples of the cluster size, so a
//! request's partial clusters lie in its stripes. With more stripes than
//! slots, slots are shared round-robin (a discard then waits for I/O in
//! other stripes of its slots too, which is only slower).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};

use crate::{Error, Result};

/// Slots; stripe `i` uses slot `i % SLOTS`.
const SLOTS: usize = 64;

#[repr(align(64))]
#[derive(Default)]
struct Slot {
    /// Reads and writes in flight (or trying to start) in this slot.
    users: AtomicU32,
    /// A discard holds this slot.
    exclusive: AtomicBool,
}

/// See the module doc.
pub(super) struct RangeLock {
    /// log2 of the stripe size.
    shift: u32,
    slots: Box<[Slot]>,
    /// Only for waiting: shared users wait for a slot's exclusive holder to
    /// leave, exclusive holders for a slot's users to drain.
    wait: Mutex<()>,
    cv: Condvar,
}

/// The slots a range touches: `first` and the next `count - 1`, mod SLOTS.
#[derive(Clone, Copy)]
struct Slots {
    first: usize,
    count: usize,
}

impl Slots {
    fn iter(self) -> impl Iterator<Item = usize> {
        (0..self.count).map(move |i| (self.first + i) % SLOTS)
    }
}

/// A shared hold; dropping it lets a waiting discard go.
pub(super) struct Shared<'a> {
    lock: &'a RangeLock,
    slots: Slots,
}

/// An exclusive hold; dropping it lets I/O on the range go on.
pub(super) struct Exclusive<'a> {
    lock: &'a RangeLock,
    slots: Slots,
}

impl RangeLock {
    /// Stripes of `stripe` bytes (a power of two).
    pub fn new(stripe: u64) -> Self {
        debug_assert!(stripe.is_power_of_two());
        RangeLock {
            shift: stripe.trailing_zeros(),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            wait: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    fn slots(&self, offset: u64, len: u64) -> Slots {
        let first = offset >> self.shift;
        let last = (offset + len.max(1) - 1) >> self.shift;
        let stripes = last - first + 1;
        Slots {
            first: (first % SLOTS as u64) as usize,
            count: stripes.min(SLOTS as u64) as usize,
        }
    }

    /// Holds `[offset, offset+len)` for a read or a write. With `no_wait`
    /// it fails with `WouldBlock` rather than wait for a discard.
    pub fn shared(&self, offset: u64, len: u64, no_wait: bool) -> Result<Shared<'_>> {
        let slots = self.slots(offset, len);
        loop {
            for s in slots.iter() {
                self.slots[s].users.fetch_add(1, SeqCst);
            }
            if slots.iter().all(|s| !self.slots[s].exclusive.load(SeqCst)) {
                return Ok(Shared { lock: self, slots });
            }
            // A discard holds (or is taking) one of them: step back so it
            // can drain, and wait until it is done.
            self.release_shared(slots);
            if no_wait {
                return Err(Error::would_block());
            }
            let mut g = self.wait.lock().unwrap_or_else(|p| p.into_inner());
            while slots.iter().any(|s| self.slots[s].exclusive.load(SeqCst)) {
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    fn release_shared(&self, slots: Slots) {
        let mut wake = false;
        for s in slots.iter() {
            self.slots[s].users.fetch_sub(1, SeqCst);
            wake |= self.slots[s].exclusive.load(SeqCst);
        }
        if wake {
            // Under the mutex, so a discard between its check and its wait
            // cannot miss it.
            let _g = self.wait.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
        }
    }

    /// Holds `[offset, offset+len)` alone: waits for other discards on its
    /// slots, then for the reads and writes in them to finish.
    pub fn exclusive(&self, offset: u64, len: u64) -> Exclusive<'_> {
        let slots = self.slots(offset, len);
        let mut g = self.wait.lock().unwrap_or_else(|p| p.into_inner());
        while slots.iter().any(|s| self.slots[s].exclusive.load(SeqCst)) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        for s in slots.iter() {
            self.slots[s].exclusive.store(true, SeqCst);
        }
        while slots.iter().any(|s| self.slots[s].users.load(SeqCst) != 0) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        Exclusive { lock: self, slots }
    }
}

impl Drop for Shared<'_> {
    fn drop(&mut self) {
        self.lock.release_shared(self.slots);
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let _g = self.lock.wait.lock().unwrap_or_else(|p| p.into_inner());
        for s in self.slots.iter() {
            self.lock.slots[s].exclusive.store(false, SeqCst);
        }
        self.lock.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_discard_waits_for_io_on_its_stripes_only_and_io_waits_for_it() {
        let l = Arc::new(RangeLock::new(1 << 20));
        let io = l.shared(0, 4096, false).unwrap();
        let other = l.shared(5 << 20, 4096, false).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = {
            let (l, done) = (l.clone(), done.clone());
            std::thread::spawn(move || {
                let _x = l.exclusive(0, 2 << 20);
                done.store(1, SeqCst);
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                done.store(2, SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            done.load(SeqCst),
            0,
            "the discard waits for the read in its stripe"
        );
        drop(other); // not in its stripes: changes nothing
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(done.load(SeqCst), 0);
        drop(io);
        held_rx.recv().unwrap();
        // I/O elsewhere goes on while it holds its range...
        drop(l.shared(3 << 20, 4096, true).unwrap());
        // ...I/O in its range declines without waiting, or waits.
        assert_eq!(
            l.shared(4096, 4096, true).err().map(|e| e.kind()),
            Some(crate::ErrorKind::WouldBlock)
        );
        let waiter = {
            let (l, done) = (l.clone(), done.clone());
            std::thread::spawn(move || {
                let _g = l.shared(4096, 4096, false).unwrap();
                done.load(SeqCst)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        go_tx.send(()).unwrap();
        assert_eq!(waiter.join().unwrap(), 2, "the read waited for the discard");
        t.join().unwrap();
    }
}
