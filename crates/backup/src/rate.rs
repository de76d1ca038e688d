//! The job's speed limit: bytes per second, changeable while it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest single sleep, so pause, cancel and a new rate are seen soon.
const SLICE: Duration = Duration::from_millis(100);

/// A schedule of sends: each chunk gets a slot after the previous one's
/// end at the current rate, so over any stretch the job sends at most
/// `rate` bytes per second plus one chunk. No credit builds up while the
/// job waits for other reasons (a pause, a slow target).
pub struct RateLimit {
    /// Bytes per second; 0 is unlimited.
    rate: AtomicU64,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// A limit of `rate` bytes per second (0: none).
    pub fn new(rate: u64) -> Self {
        RateLimit {
            rate: AtomicU64::new(rate),
            next: Mutex::new(None),
        }
    }

    /// The limit now (0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the limit; it applies to the next chunk.
    pub fn set(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        // A schedule made at a slow rate must not hold back a faster one.
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Waits until `bytes` may be sent. Returns early (false) once `stop`
    /// says so.
    pub fn take(&self, bytes: u64, stop: impl Fn() -> bool) -> bool {
        let rate = self.rate();
        if rate == 0 || bytes == 0 {
            return true;
        }
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
            start
        };
        loop {
            let now = Instant::now();
            if now >= start {
                return true;
            }
            if stop() {
                return false;
            }
            std::thread::sleep((start - now).min(SLICE));
            if self.rate() != rate {
                // Taken again at the new rate.
                return self.take(bytes, stop);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_at_the_rate_and_a_new_rate_applies_at_once() {
        let r = RateLimit::new(10 << 20);
        let t = Instant::now();
        for _ in 0..6 {
            assert!(r.take(1 << 20, || false));
        }
        // Six chunks at 10 MiB/s: the sixth starts after five slots.
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(490), "{took:?}");
        r.set(0);
        // Unlimited: no wait, so no reason to ask whether to stop.
        for _ in 0..100 {
            assert!(r.take(1 << 20, || unreachable!("an unlimited take waited")));
        }
        r.set(1);
        assert!(
            r.take(1 << 20, || true),
            "the first chunk at a new rate goes at once"
        );
        assert!(!r.take(1 << 20, || true), "a stop ends the wait for the next");
    }
}
