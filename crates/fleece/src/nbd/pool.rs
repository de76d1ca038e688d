//! A fixed pool of I/O threads shared by all connections, so thread count and
//! memory stay bounded however many clients connect.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::error::{Error, Kind, Result};

type Job = Box<dyn FnOnce() + Send>;

/// Runs jobs on `n` threads in submission order of pickup.
pub struct Pool {
    tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Pool {
    /// Starts `n` worker threads.
    pub fn new(n: usize) -> Result<Arc<Pool>> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let pool = Arc::new(Pool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(Vec::new()),
        });
        for i in 0..n.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let spawned = thread::Builder::new()
                .name(format!("io-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            match spawned {
                Ok(t) => pool.threads.lock().unwrap_or_else(|p| p.into_inner()).push(t),
                Err(e) => {
                    pool.stop();
                    return Err(Error::new(
                        Kind::Internal,
                        format!("cannot start I/O thread {i} of {n}: {e}"),
                    ));
                }
            }
        }
        Ok(pool)
    }

    /// Queues a job; runs it inline if the pool is shutting down, so no
    /// request is ever dropped without a reply.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        match tx {
            Some(tx) => {
                if let Err(e) = tx.send(Box::new(job)) {
                    (e.0)();
                }
            }
            None => job(),
        }
    }

    /// Lets the workers finish queued jobs and exit.
    pub fn stop(&self) {
        if let Ok(mut t) = self.tx.lock() {
            t.take();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}
