//! Copier threads: where copies with a timeout run, so that the writer can
//! give up waiting for one.
//!
//! A few threads per live disk, started on first need and ended after a
//! while without work. A copy that takes a thread keeps it until it ends,
//! however long after its writer gave up; so a stuck store can hold every
//! thread, and a copy that finds none free waits in the queue, where its
//! writer takes it back at the deadline (it then counts as timed out and
//! never runs). No copy waits for ever, and there are never more than
//! [`COPIERS`] threads.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Most copier threads per live disk.
const COPIERS: usize = 4;
/// A copier thread ends after this long without work.
const IDLE: Duration = Duration::from_secs(30);

/// Work for a copier: a copy that settles its clusters and sends its result.
pub(super) type Job = Box<dyn FnOnce() + Send>;

/// The copier threads of one live disk (shared with its snapshots).
pub(super) struct Copiers {
    shared: Arc<Shared>,
}

struct Shared {
    st: Mutex<State>,
    /// Signalled when a job is queued or the pool closes.
    work: Condvar,
}

struct State {
    /// Jobs no copier has taken yet, with their tickets.
    queue: VecDeque<(u64, Job)>,
    threads: usize,
    /// Threads waiting for work.
    idle: usize,
    next: u64,
    /// The owner is gone: idle threads end.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Copiers {
    /// No threads yet.
    pub(super) fn new() -> Self {
        Copiers {
            shared: Arc::new(Shared {
                st: Mutex::new(State {
                    queue: VecDeque::new(),
                    threads: 0,
                    idle: 0,
                    next: 0,
                    closed: false,
                }),
                work: Condvar::new(),
            }),
        }
    }

    /// Queues `job` and returns its ticket (for [`cancel`](Self::cancel)),
    /// starting a copier thread if none is free and the bound allows. Fails
    /// only if there is no copier thread and none can be started.
    pub(super) fn submit(&self, job: Job) -> std::io::Result<u64> {
        let mut st = self.shared.lock();
        let ticket = st.next;
        st.next += 1;
        st.queue.push_back((ticket, job));
        if st.queue.len() > st.idle && st.threads < COPIERS {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("cbw-copy".into())
                .spawn(move || work(shared));
            match spawned {
                Ok(_) => st.threads += 1,
                Err(e) if st.threads == 0 => {
                    let job = st.queue.pop_back();
                    drop(st);
                    drop(job);
                    return Err(e);
                }
                // The running copiers will get to it, or its writer gives up.
                Err(e) => tracing::warn!(error = %e, "cannot start another copier thread"),
            }
        }
        drop(st);
        self.shared.work.notify_one();
        Ok(ticket)
    }

    /// Takes back a job no copier has started: true if it will never run,
    /// false if it runs (or ran) to its end.
    pub(super) fn cancel(&self, ticket: u64) -> bool {
        let mut st = self.shared.lock();
        match st.queue.iter().position(|(t, _)| *t == ticket) {
            Some(i) => {
                // Dropped outside the lock: it holds a snapshot.
                let job = st.queue.remove(i);
                drop(st);
                drop(job);
                true
            }
            None => false,
        }
    }
}

impl Drop for Copiers {
    /// Idle copiers end now rather than after [`IDLE`]. Nothing is queued:
    /// every job holds a snapshot, which holds this.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
    }
}

/// A copier thread's loop.
fn work(shared: Arc<Shared>) {
    let mut st = shared.lock();
    loop {
        if let Some((_, job)) = st.queue.pop_front() {
            drop(st);
            // A copy that panics (a buggy store or subscriber) must not take
            // the thread count down with it; its writer sees the lost result.
            let _ = panic::catch_unwind(AssertUnwindSafe(job));
            st = shared.lock();
            continue;
        }
        if st.closed {
            break;
        }
        st.idle += 1;
        let (g, r) = shared
            .work
            .wait_timeout(st, IDLE)
            .unwrap_or_else(|p| p.into_inner());
        st = g;
        st.idle -= 1;
        if r.timed_out() && st.queue.is_empty() {
            break;
        }
    }
    st.threads -= 1;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// Jobs beyond the bound wait in the queue; a queued job can be taken
    /// back and never runs, a started one cannot.
    #[test]
    fn at_most_four_copies_run_and_queued_ones_can_be_taken_back() {
        let pool = Copiers::new();
        let running = Arc::new(AtomicUsize::new(0));
        let (started_tx, started) = mpsc::channel();
        let mut gates = Vec::new();
        let mut tickets = Vec::new();
        for _ in 0..6 {
            let (gate_tx, gate) = mpsc::channel::<()>();
            gates.push(gate_tx);
            let (running, started_tx) = (running.clone(), started_tx.clone());
            let job: Job = Box::new(move || {
                running.fetch_add(1, Ordering::SeqCst);
                started_tx.send(()).unwrap();
                let _ = gate.recv();
            });
            tickets.push(pool.submit(job).unwrap());
        }
        for _ in 0..COPIERS {
            started.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert!(started.recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(running.load(Ordering::SeqCst), COPIERS);
        assert_eq!(pool.shared.lock().threads, COPIERS);
        assert!(!pool.cancel(tickets[0]), "a started job was taken back");
        assert!(pool.cancel(tickets[5]), "a queued job could not be taken back");
        drop(gates.remove(0));
        started.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(gates);
        assert!(started.recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(
            running.load(Ordering::SeqCst),
            COPIERS + 1,
            "the job taken back ran"
        );
    }
}
