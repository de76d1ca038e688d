//! Group commit: one `fdatasync` shared by every caller waiting for one.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct SyncState {
    /// Generations handed out to callers.
    requested: u64,
    /// Highest generation covered by a successful sync.
    completed: u64,
    running: bool,
    /// OS error of the last failed sync, for the callers it fails.
    error: Option<i32>,
}

/// Shares one `fdatasync` among concurrent callers.
#[derive(Default)]
pub(super) struct GroupSync {
    state: Mutex<SyncState>,
    /// Failed syncs so far; only grows (changed under `state`).
    failures: AtomicU64,
    done: Condvar,
}

impl GroupSync {
    /// The failure count to pass to [`sync`](Self::sync), read *before*
    /// writing what must become durable.
    pub(super) fn epoch(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    /// Returns once a sync that started after this call has completed, and
    /// fails if any sync failed since `epoch`: a failed sync may have dropped
    /// pages written before it, which a later successful one does not bring
    /// back, so success must never be reported across a failure.
    pub(super) fn sync(&self, run: impl Fn() -> io::Result<()>, epoch: u64) -> io::Result<()> {
        let mut g = lock(&self.state);
        g.requested += 1;
        let mine = g.requested;
        loop {
            if self.failures.load(Ordering::Acquire) != epoch {
                return Err(match g.error {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::other("an earlier sync of the file failed"),
                });
            }
            if g.completed >= mine {
                return Ok(());
            }
            if g.running {
                g = self.done.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            g.running = true;
            let target = g.requested;
            drop(g);
            let r = run();
            g = lock(&self.state);
            g.running = false;
            match &r {
                Ok(()) => g.completed = g.completed.max(target),
                Err(e) => {
                    g.error = e.raw_os_error();
                    self.failures.fetch_add(1, Ordering::AcqRel);
                }
            }
            self.done.notify_all();
            r?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sync_fails_everyone_who_wrote_before_it() {
        use std::sync::mpsc;
        let gs = GroupSync::default();
        let epoch = gs.epoch();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        std::thread::scope(|sc| {
            let gs = &gs;
            let first = sc.spawn(move || {
                gs.sync(
                    || {
                        entered_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        Err(io::Error::from_raw_os_error(libc::EIO))
                    },
                    epoch,
                )
            });
            entered_rx.recv().unwrap();
            // Waits behind the running sync, which then fails; a later
            // successful sync must not be reported to it.
            let second = sc.spawn(move || gs.sync(|| Ok(()), epoch));
            while gs.state.lock().unwrap().requested < 2 {
                std::thread::yield_now();
            }
            go_tx.send(()).unwrap();
            assert_eq!(first.join().unwrap().unwrap_err().raw_os_error(), Some(libc::EIO));
            assert_eq!(
                second.join().unwrap().unwrap_err().raw_os_error(),
                Some(libc::EIO)
            );
        });
        assert!(
            gs.sync(|| Ok(()), epoch).is_err(),
            "words from before the failure"
        );
        gs.sync(|| Ok(()), gs.epoch()).unwrap();
    }
}
