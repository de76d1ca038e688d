//! How many requests each connection has in flight, which connection the
//! next one goes to, and whether the target is still usable.
//!
//! One lock for all connections of a target: a request waits for room on
//! any of them and takes the least busy, and a lost connection wakes every
//! waiter at once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Debug)]
struct State {
    in_flight: Vec<usize>,
    /// Why the target stopped taking requests, once it has.
    lost: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Flow {
    state: Mutex<State>,
    room: Condvar,
    window: usize,
}

impl Flow {
    pub(crate) fn new(connections: usize, window: usize) -> Arc<Flow> {
        Arc::new(Flow {
            state: Mutex::new(State {
                in_flight: vec![0; connections],
                lost: None,
            }),
            room: Condvar::new(),
            window: window.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for room on some connection and takes it; fails with the cause
    /// once the target is lost.
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<Permit, String> {
        let mut s = self.lock();
        loop {
            if let Some(cause) = &s.lost {
                return Err(cause.clone());
            }
            let least = (0..s.in_flight.len()).min_by_key(|&i| s.in_flight[i]);
            if let Some(conn) = least.filter(|&i| s.in_flight[i] < self.window) {
                s.in_flight[conn] += 1;
                return Ok(Permit {
                    flow: self.clone(),
                    conn,
                });
            }
            s = self.room.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops the target taking requests; the first cause is the one kept.
    pub(crate) fn lose(&self, cause: String) {
        let mut s = self.lock();
        s.lost.get_or_insert(cause);
        self.room.notify_all();
    }

    pub(crate) fn lost(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// Waits until no request is in flight on any connection.
    pub(crate) fn drain(&self) {
        let mut s = self.lock();
        while s.in_flight.iter().any(|&n| n > 0) {
            s = self.room.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Room for one request on connection `conn`, given back when dropped
/// (with the request's entry, once it is answered or failed).
#[derive(Debug)]
pub(crate) struct Permit {
    flow: Arc<Flow>,
    conn: usize,
}

impl Permit {
    pub(crate) fn conn(&self) -> usize {
        self.conn
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.flow.lock();
        s.in_flight[self.conn] -= 1;
        // Both a request waiting for room and a drain waiting for none.
        self.flow.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_to_the_least_busy_connection_and_wait_for_room() {
        let flow = Flow::new(2, 2);
        let a = flow.acquire().unwrap();
        let b = flow.acquire().unwrap();
        assert_ne!(a.conn(), b.conn());
        let _c = flow.acquire().unwrap();
        let _d = flow.acquire().unwrap();
        let f = flow.clone();
        let waiter = std::thread::spawn(move || f.acquire().map(|p| p.conn()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        let freed = b.conn();
        drop(b);
        assert_eq!(waiter.join().unwrap(), Ok(freed));
    }

    #[test]
    fn a_lost_target_wakes_waiters_and_refuses_requests() {
        let flow = Flow::new(1, 1);
        let _a = flow.acquire().unwrap();
        let f = flow.clone();
        let waiter = std::thread::spawn(move || f.acquire().map(|p| p.conn()));
        flow.lose("gone".into());
        flow.lose("later".into());
        assert_eq!(waiter.join().unwrap(), Err("gone".into()));
        assert_eq!(flow.lost().as_deref(), Some("gone"));
    }
}
