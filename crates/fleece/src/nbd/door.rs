//! The front door: what every new connection goes through before it is
//! served. A cap on connections still negotiating, and a deadline for the
//! whole negotiation, so that clients which connect and then say nothing
//! (or trickle bytes) cannot pile up threads and descriptors forever.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::access::AccessList;
use super::tls::Tls;
use super::Stream;
use crate::error::{Error, Result};

/// Default of `--handshake-timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: u64 = 10;
/// Default of `--max-handshakes`.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Refusals are logged at most this often (with how many there were), so a
/// flood of connections cannot flood the log too.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Checks `--handshake-timeout` / `handshake_timeout` (seconds).
pub fn check_handshake_timeout(secs: u64) -> Result<Duration> {
    if (1..=3600).contains(&secs) {
        Ok(Duration::from_secs(secs))
    } else {
        Err(Error::invalid(format!(
            "handshake timeout {secs} is out of range: use 1 to 3600 seconds (default {DEFAULT_HANDSHAKE_TIMEOUT})"
        )))
    }
}

/// Checks `--max-handshakes` / `max_handshakes`.
pub fn check_max_handshakes(n: usize) -> Result<usize> {
    if (1..=65536).contains(&n) {
        Ok(n)
    } else {
        Err(Error::invalid(format!(
            "max handshakes {n} is out of range: use 1 to 65536 (default {DEFAULT_MAX_HANDSHAKES})"
        )))
    }
}

/// The limits every listener applies to new connections.
pub struct FrontDoor {
    /// A client that has not finished negotiating (TLS included) this long
    /// after it connected is disconnected.
    pub handshake_timeout: Duration,
    /// Connections still negotiating, at most; more are closed at once.
    pub max_handshakes: usize,
    negotiating: AtomicUsize,
    /// When a refusal was last logged, and refusals since.
    refused: Mutex<(Option<Instant>, u64)>,
    /// TLS, if configured.
    pub tls: Option<Tls>,
    /// Who may open what; `None`: everyone everything.
    pub access: Option<AccessList>,
}

impl FrontDoor {
    /// A front door with these limits.
    pub fn new(handshake_timeout: Duration, max_handshakes: usize) -> FrontDoor {
        FrontDoor {
            handshake_timeout,
            max_handshakes,
            negotiating: AtomicUsize::new(0),
            refused: Mutex::new((None, 0)),
            tls: None,
            access: None,
        }
    }

    /// The same door with TLS and an access list.
    pub fn with_security(self, tls: Option<Tls>, access: Option<AccessList>) -> FrontDoor {
        FrontDoor { tls, access, ..self }
    }

    /// Lets a new connection in to negotiate, or says no (and logs it,
    /// rate-limited) when too many are negotiating already.
    pub fn enter(self: &Arc<Self>, listener: &str) -> Option<Ticket> {
        let taken = self
            .negotiating
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_handshakes).then_some(n + 1)
            });
        if taken.is_ok() {
            return Some(Ticket {
                door: self.clone(),
                deadline: Instant::now() + self.handshake_timeout,
            });
        }
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.1 += 1;
        if r.0.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                listener,
                refused = r.1,
                limit = self.max_handshakes,
                "too many connections still negotiating: new ones are closed at once"
            );
            *r = (Some(Instant::now()), 0);
        }
        None
    }

    /// Connections negotiating now.
    #[cfg(test)]
    fn negotiating(&self) -> usize {
        self.negotiating.load(Ordering::Acquire)
    }
}

/// A connection's place among those negotiating, given back on drop.
pub struct Ticket {
    door: Arc<FrontDoor>,
    /// When the negotiation must be over.
    pub deadline: Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.door.negotiating.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A blocking socket whose every read and write gives up at `deadline`:
/// a per-call timeout alone would let a client that sends one byte at a
/// time stay forever.
pub struct Deadline<'a> {
    /// The socket (blocking).
    pub stream: &'a mut Stream,
    /// When reads and writes stop waiting.
    pub deadline: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf).map_err(timed_out)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf).map_err(timed_out)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket timeout shows as `WouldBlock`; callers that retry on it would
/// spin, so it becomes what it means here.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "handshake timed out")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_door_admits_up_to_its_limit_and_takes_tickets_back() {
        let door = Arc::new(FrontDoor::new(Duration::from_secs(1), 2));
        let a = door.enter("t").unwrap();
        let b = door.enter("t").unwrap();
        assert!(door.enter("t").is_none());
        drop(a);
        let c = door.enter("t").unwrap();
        assert_eq!(door.negotiating(), 2);
        drop((b, c));
        assert_eq!(door.negotiating(), 0);
    }

    #[test]
    fn limits_must_be_sane() {
        assert!(check_handshake_timeout(0).is_err());
        assert!(check_handshake_timeout(10).is_ok());
        assert!(check_max_handshakes(0).is_err());
        assert!(check_max_handshakes(64).is_ok());
    }
}
