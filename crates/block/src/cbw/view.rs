//! View reads and discards: the disk as it was at the instant, and
//! [`SnapshotView`], the read-only device that serves it.
//!
//! A read classifies each cluster under the snapshot's lock: saved clusters
//! come from the store, holes at the instant are zeroes, unsaved clusters
//! come from the live disk (pinned with `READERS` meanwhile, so the write
//! that would change them waits), discarded or out-of-scope ones fail.
//! Reads never wait for a copy (rule 1).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::events::{Runs, SnapshotEvent};
use super::pin::ReadPin;
use super::snapshot::Snapshot;
use super::state::{MASK, NOT_NEEDED, SAVED, ZEROED};
use crate::dev::{check_range, BlockDev, Capabilities, IoFlags, ZeroFlags};
use crate::ext::read_split;
use crate::mapping::Extent;
use crate::{Error, ErrorKind, Result};

/// Where a cluster as of the instant is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// Not yet changed: the live disk.
    Live,
    /// Saved in the store.
    Store,
    /// A hole at the instant: zeroes.
    Zero,
    /// Discarded or outside the scope: not readable (block status only).
    Unavailable,
}

impl Snapshot {
    /// Reads the disk as it was at the instant.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.runs(offset, buf.len() as u64, |src, pin, c, end, lo, hi| {
            let part = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if let Some(pin) = pin {
                let r = read_split(&*self.base, part, lo, IoFlags::NONE, self.base_max);
                drop(pin);
                r
            } else if src == Source::Zero {
                part.fill(0);
                Ok(())
            } else {
                // A discard may free a saved cluster while we load it; its
                // state then says so, and what we loaded cannot be trusted.
                self.load(part, lo).and_then(|_| {
                    let _g = self.lock();
                    if (c..end).any(|x| self.states.get(x) & MASK == NOT_NEEDED) {
                        Err(Error::new(
                            ErrorKind::AccessDenied,
                            "this part of the snapshot was discarded while it was being read",
                        ))
                    } else {
                        Ok(())
                    }
                })
            }
        })?;
        // A break during the read may have let new data into what we read.
        self.check_readable()?;
        if self.opts.read_once {
            self.discard(offset, buf.len() as u64);
        }
        Ok(())
    }

    /// Walks `[offset, offset + len)` of the view in runs, for a copy that
    /// can move bytes without reading them: `f(Some(base), lo, n)` for a run
    /// still on the live disk (its device, pinned like a read until `f`
    /// returns, so no write changes it meanwhile: `f` may read it or
    /// [`copy_to`](BlockDev::copy_to) it), `f(None, lo, n)` for the rest
    /// (saved or zero: `f` reads it with [`read_at`](Self::read_at)). Fails
    /// like a read on discarded or out-of-scope clusters, and after the
    /// snapshot broke or was deleted (also during the walk).
    pub fn read_pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Option<&dyn BlockDev>, u64, u64) -> Result<()>,
    ) -> Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.runs(offset, len, |_, pin, _, _, lo, hi| {
            let r = f(pin.as_ref().map(|_| &*self.base as &dyn BlockDev), lo, hi - lo);
            drop(pin);
            r
        })?;
        // A break during the walk may have let new data into what was copied.
        self.check_readable()
    }

    /// Walks the clusters of the non-empty range `[offset, offset + len)` in
    /// runs of one source, each classified under the snapshot's lock with a
    /// read's checks (deleted, broken, discarded, outside the scope), and
    /// calls `f(source, pin, first, end, lo, hi)` for clusters
    /// `[first, end)`, bytes `[lo, hi)`. Runs still on the live disk come
    /// pinned; `f` drops the pin when done with the live disk.
    fn runs(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Source, Option<ReadPin<'_>>, u64, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let (first, last) = self.clusters(offset, len);
        let mut c = first;
        while c <= last {
            let mut g = self.lock();
            if g.retired {
                return Err(Error::new(ErrorKind::Broken, "this snapshot was deleted"));
            }
            if let Some(why) = &g.broken {
                return Err(Error::new(
                    ErrorKind::Broken,
                    format!("snapshot is broken: {why}"),
                ));
            }
            let src = self.source(c)?;
            let mut end = c + 1;
            while end <= last && self.source(end).ok() == Some(src) {
                end += 1;
            }
            let pin = (src == Source::Live).then(|| ReadPin::new(self, &mut g, c, end));
            drop(g);
            let lo = (c * self.cluster).max(offset);
            let hi = (end * self.cluster).min(offset + len);
            f(src, pin, c, end, lo, hi)?;
            c = end;
        }
        Ok(())
    }

    /// Where cluster `c` as of the instant is to be read from.
    pub(super) fn source(&self, c: u64) -> Result<Source> {
        match self.states.get(c) & MASK {
            SAVED => Ok(Source::Store),
            ZEROED => Ok(Source::Zero),
            NOT_NEEDED => Err(Error::new(
                ErrorKind::AccessDenied,
                "this part of the snapshot was discarded and can no longer be read",
            )),
            _ if !self.in_scope(c) => Err(Error::new(
                ErrorKind::AccessDenied,
                "this part of the disk is outside the snapshot's bitmap",
            )),
            _ => Ok(Source::Live),
        }
    }

    fn load(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos / self.cluster;
            let within = pos - c * self.cluster;
            let n = ((self.cluster - within) as usize).min(buf.len() - done);
            self.store
                .load(c, self.cluster, within, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Drops the whole clusters inside the range: their saved copies are
    /// freed, later live writes to them copy nothing, and later view reads of
    /// them fail.
    pub fn discard(&self, offset: u64, len: u64) {
        let end = (offset.saturating_add(len)).min(self.size);
        let first = offset.div_ceil(self.cluster);
        // The last cluster counts if the range reaches the end of the disk.
        let last_excl = if end == self.size {
            self.size.div_ceil(self.cluster)
        } else {
            end / self.cluster
        };
        if first >= last_excl {
            return;
        }
        let report = self.events.any();
        let mut discarded = Runs::default();
        let g = self.lock();
        let mut freed = 0;
        for c in first..last_excl {
            let s = self.states.get(c);
            // Mark first, then free: a reader that loaded the slot re-checks
            // the mark under this lock.
            self.states.set_base(c, NOT_NEEDED);
            match s & MASK {
                NOT_NEEDED => continue,
                SAVED => {
                    self.store.forget(c, self.cluster);
                    freed += self.cluster_len(c);
                }
                // ZEROED holds no store slot; NOT_COPIED and COPYING none yet.
                _ => {}
            }
            self.discarded.fetch_add(1, Ordering::Relaxed);
            if report {
                discarded.add(c);
            }
        }
        self.used.fetch_sub(freed, Ordering::Relaxed);
        self.wake_all(&g);
        drop(g);
        self.events
            .emit_runs(&discarded, |first, count| SnapshotEvent::Discarded {
                first,
                count,
            });
    }
}

/// A snapshot as a read-only device; trim discards.
pub struct SnapshotView(pub Arc<Snapshot>);

impl BlockDev for SnapshotView {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            trim: true,
            preferred_io: self.0.base.capabilities().preferred_io,
            ..Capabilities::default()
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        // View reads never wait on copies (rule 1), so with both sides in
        // memory they cannot block and may run inline.
        if flags.no_wait && !(self.0.base.hints().in_memory && self.0.store.hints().in_memory) {
            return Err(Error::would_block());
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _flags: IoFlags) -> Result<()> {
        Err(Error::new(ErrorKind::ReadOnly, "snapshot views are read-only"))
    }
    fn write_zeroes(&self, _offset: u64, _length: u64, _flags: ZeroFlags) -> Result<()> {
        Err(Error::new(ErrorKind::ReadOnly, "snapshot views are read-only"))
    }
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        check_range(self.0.size, offset, length)?;
        self.0.discard(offset, length);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.0.block_status(offset, length)
    }
}
