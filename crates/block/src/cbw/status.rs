//! Block status of a view: the snapshot's own knowledge (saved, zeroed,
//! unavailable clusters) merged with one block status query of the live
//! disk for the unsaved clusters.

use super::pin::ReadPin;
use super::snapshot::Snapshot;
use super::view::Source;
use crate::dev::check_range;
use crate::mapping::{push_extent as push, Extent, Mapping};
use crate::Result;

impl Snapshot {
    /// Mapping of the disk at the instant.
    ///
    /// The live disk is asked once for the whole range, not once per run of
    /// unsaved clusters: on tmpfs each SEEK_HOLE walks the page cache to the
    /// next hole under the inode lock, and a fragmented view made thousands
    /// of such walks per request, starving live writes.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, offset, len)?;
        self.check_readable()?;
        // Bound the work per request; the client asks again from where we stop.
        let end = offset + len.min((1u64 << 16) * self.cluster);
        let first = offset / self.cluster;
        let last = (end - 1) / self.cluster;
        // Runs of (first cluster, end cluster, source).
        let mut runs: Vec<(u64, u64, Source)> = Vec::new();
        let mut g = self.lock();
        for c in first..=last {
            // Discarded or outside the scope: reads fail, and saying so lets
            // a client skip the range instead of reading it to find out.
            let src = self.source(c).unwrap_or(Source::Unavailable);
            match runs.last_mut() {
                Some(r) if r.2 == src => r.1 = c + 1,
                _ => runs.push((c, c + 1, src)),
            }
        }
        // Pin the unsaved clusters like a read: a live trim must not turn
        // data that existed at the instant into a reported hole.
        let pins: Vec<ReadPin> = runs
            .iter()
            .filter(|r| r.2 == Source::Live)
            .map(|r| ReadPin::new(self, &mut g, r.0, r.1))
            .collect();
        drop(g);
        let base = match (pins.first(), pins.last()) {
            (Some(a), Some(b)) => {
                let lo = (a.first() * self.cluster).max(offset);
                let hi = (b.end() * self.cluster).min(end);
                self.base.block_status(lo, hi - lo).map(|e| (lo, e))
            }
            _ => Ok((end, Vec::new())),
        };
        drop(pins);
        // Breaking lets writes through without waiting for pins.
        self.check_readable()?;
        let (mut bpos, base) = base?;
        let mut base = base.into_iter().peekable();
        let mut out: Vec<Extent> = Vec::new();
        for (a, b, src) in runs {
            let lo = (a * self.cluster).max(offset);
            let hi = (b * self.cluster).min(end);
            match src {
                Source::Store => {
                    push(&mut out, hi - lo, Mapping::Data);
                    continue;
                }
                Source::Zero => {
                    push(&mut out, hi - lo, Mapping::Hole);
                    continue;
                }
                Source::Unavailable => {
                    push(&mut out, hi - lo, Mapping::Unavailable);
                    continue;
                }
                Source::Live => {}
            }
            // Walk the live disk's extents over [lo, hi).
            let mut pos = lo;
            while pos < hi {
                while let Some(e) = base.peek() {
                    if bpos + e.length <= pos {
                        bpos += e.length;
                        base.next();
                    } else {
                        break;
                    }
                }
                match base.peek() {
                    Some(e) if bpos <= pos => {
                        let stop = (bpos + e.length).min(hi);
                        push(&mut out, stop - pos, e.mapping);
                        pos = stop;
                    }
                    // Not covered by the answer: claim nothing.
                    _ => {
                        push(&mut out, hi - pos, Mapping::Data);
                        pos = hi;
                    }
                }
            }
        }
        Ok(out)
    }
}
