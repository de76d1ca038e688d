//! The NBD connections of the daemon, by export: counted when a client
//! attaches, closed when an export goes away or the daemon stops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Stream;
use crate::clients::Clients;
use crate::registry::{Export, Registry};

/// How long closing waits for connections to finish their in-flight
/// requests, before it shuts their sockets completely (a client that never
/// reads its replies would hold them forever).
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long closing waits in all.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

struct Conn {
    export: String,
    stream: Stream,
}

/// Every connection in transmission.
#[derive(Default)]
pub struct Connections {
    conns: Mutex<HashMap<u64, Conn>>,
    /// Signalled whenever a connection goes away.
    gone: Condvar,
    next: AtomicU64,
}

impl Connections {
    /// No connections yet.
    pub fn new() -> Arc<Connections> {
        Arc::new(Connections::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks up the export a client negotiated and counts the connection,
    /// in one step under the registry's lock, so that a removal either sees
    /// the connection or the client finds the export gone (`None`). `size`
    /// is what the client was told in the handshake: a client told more
    /// than the export now has (it shrank meanwhile) is turned away, as its
    /// writes past the new end would fail under it.
    pub fn attach(
        &self,
        registry: &Registry,
        export: &str,
        size: u64,
        stream: Stream,
    ) -> Option<(Arc<Export>, u64)> {
        registry.with_export(export, |e| {
            let e = e?.clone();
            if size > e.dev.size() {
                return None;
            }
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            self.lock().insert(
                id,
                Conn {
                    export: e.name.clone(),
                    stream,
                },
            );
            Some((e, id))
        })
    }

    /// Forgets a closed connection.
    pub fn detach(&self, id: u64) {
        self.lock().remove(&id);
        self.gone.notify_all();
    }

    /// Connections in transmission, whether or not their clients hung up.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Asks every connection to stop reading requests; each finishes what
    /// is in flight and closes.
    pub fn close_all(&self) {
        for c in self.lock().values() {
            c.stream.shutdown_read();
        }
    }
}

impl Clients for Connections {
    fn active(&self, exports: &[String]) -> usize {
        self.lock()
            .values()
            .filter(|c| exports.contains(&c.export) && !c.stream.peer_closed())
            .count()
    }

    fn active_total(&self) -> usize {
        self.lock().values().filter(|c| !c.stream.peer_closed()).count()
    }

    fn close_and_wait(&self, exports: &[String]) -> bool {
        let start = Instant::now();
        let mut conns = self.lock();
        for c in conns.values().filter(|c| exports.contains(&c.export)) {
            c.stream.shutdown_read();
        }
        let mut cut = false;
        while conns.values().any(|c| exports.contains(&c.export)) {
            let waited = start.elapsed();
            if waited >= CLOSE_TIMEOUT {
                tracing::warn!(exports = ?exports, "connections did not close in time; going on without them");
                return false;
            }
            if !cut && waited >= CLOSE_GRACE {
                for c in conns.values().filter(|c| exports.contains(&c.export)) {
                    c.stream.shutdown_both();
                }
                cut = true;
            }
            let step = if cut { CLOSE_TIMEOUT } else { CLOSE_GRACE } - waited;
            conns = self
                .gone
                .wait_timeout(conns, step)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}
