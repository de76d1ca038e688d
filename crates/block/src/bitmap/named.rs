//! Named dirty bitmaps that survive crashes.
//!
//! Technique (docs/bitmap-format.md): a write that sets a bit that was clear
//! first writes that bit's 64-bit word to the bitmap's sidecar file and waits
//! for an `fdatasync` of it, *before* the data write is issued. Writes into
//! granules that are already dirty (all but the first write to each granule)
//! skip this entirely. Concurrent first writes share one `fdatasync` (group
//! commit). So after kill -9 or power loss the file holds every bit of every
//! write that may have reached the disk: the bitmap is exact or, for writes
//! that were marked but never made it, over-approximate.
//!
//! A bit is set in the bitmap that everyone reads ([`NamedBitmap::bits`])
//! only once it is durable. If it cannot be written, the caller's write fails
//! and nothing is set, so the next write to the granule tries again. Words
//! written to the file but not yet known durable are kept apart ("staged"):
//! markers OR into those, so a file word never loses a bit that another
//! thread wrote and may already have synced.
//!
//! If an `fdatasync` fails, Linux may already have dropped the dirty pages it
//! could not write, and a later `fdatasync` reports success without them. No
//! word written before the failure can be trusted any more, so the bitmap
//! becomes *inconsistent*: every marker whose word was in flight gets the
//! error, later marks do nothing, and the next backup must be a full one.
//! Clearing the bitmap (after that full backup) makes it consistent again.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::dirty::DirtyBitmap;
#[cfg(test)]
use super::sidecar::injected;
use super::sidecar::{read_words, sync_dir, Header, Sidecar, HEADER, MAX_NAME};
use super::sync::lock;
use crate::{Error, ErrorKind, Result};

/// Most granules a resize marks as changed (16 MiB of bits); a disk that
/// grows by more makes its bitmaps inconsistent instead.
const MAX_GROWN_BITS: u64 = 1 << 27;

/// A dirty bitmap with a name, an enabled flag, and (if persistent) a
/// sidecar file kept crash-safe as described in the module docs.
pub struct NamedBitmap {
    name: String,
    bits: DirtyBitmap,
    enabled: AtomicBool,
    /// False once the bitmap may have missed writes.
    consistent: AtomicBool,
    /// Why it is inconsistent, for people.
    why: Mutex<Option<String>>,
    /// Marked inconsistent, but the header may not say so yet (its sync
    /// failed): tried again when the bitmap is dropped.
    flag_pending: AtomicBool,
    sidecar: Option<Sidecar>,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

impl NamedBitmap {
    fn assemble(name: &str, bits: DirtyBitmap, enabled: bool, sidecar: Option<Sidecar>) -> Self {
        NamedBitmap {
            name: name.to_string(),
            bits,
            enabled: AtomicBool::new(enabled),
            consistent: AtomicBool::new(true),
            why: Mutex::new(None),
            flag_pending: AtomicBool::new(false),
            sidecar,
        }
    }

    /// A new empty bitmap; with `path`, persisted there (the file must not exist).
    pub fn create(
        name: &str,
        size: u64,
        granularity: u64,
        enabled: bool,
        path: Option<&Path>,
    ) -> Result<Self> {
        if name.len() > MAX_NAME {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("bitmap name is longer than {MAX_NAME} bytes"),
            ));
        }
        let bits = DirtyBitmap::new(size, granularity);
        let Some(p) = path else {
            return Ok(Self::assemble(name, bits, enabled, None));
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .map_err(|e| io_err("cannot create bitmap file", p, e))?;
        let staged = DirtyBitmap::new(size, bits.granularity());
        let b = Self::assemble(
            name,
            bits,
            enabled,
            Some(Sidecar::new(file, p.to_path_buf(), staged)),
        );
        let made = b.init_file();
        if let Err(e) = made {
            // A half-made file would be loaded (and refused) at the next start.
            let _ = std::fs::remove_file(p);
            return Err(e);
        }
        sync_dir(p);
        Ok(b)
    }

    fn init_file(&self) -> Result<()> {
        let Some(s) = &self.sidecar else { return Ok(()) };
        let epoch = s.sync.epoch();
        s.size_for(self.bits.bits().div_ceil(64))
            .map_err(|e| io_err("cannot size bitmap file", &s.path, e))?;
        let _h = lock(&s.header);
        self.write_header(s, self.is_enabled(), false)
            .and_then(|_| s.sync(epoch))
            .map_err(|e| io_err("cannot write bitmap header", &s.path, e))
    }

    /// Loads a persistent bitmap written by [`create`](Self::create) for a
    /// disk of `size` bytes.
    ///
    /// If its header records another disk size (the image was resized while
    /// fleece was not serving it, or a crash came between a resize and the
    /// bitmap's update), the bits inside `size` are kept, the file is
    /// rewritten for `size`, and the bitmap is returned inconsistent: it may
    /// have missed the writes of whoever resized the image.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        NamedBitmap::open_checked(path, size, None)
    }

    /// [`open`](Self::open), refusing (before anything in the file is
    /// changed) a file whose header names another bitmap than `name`: a
    /// renamed or copied sidecar must not come back as a second bitmap of
    /// that name.
    pub fn open_named(path: &Path, size: u64, name: &str) -> Result<Self> {
        NamedBitmap::open_checked(path, size, Some(name))
    }

    fn open_checked(path: &Path, size: u64, expected: Option<&str>) -> Result<Self> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Invalid,
                format!(
                    "bitmap file {}: {why}; remove the file if the bitmap is not needed",
                    path.display()
                ),
            )
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("cannot open bitmap file", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| io_err("cannot stat bitmap file", path, e))?
            .len();
        if file_len < HEADER {
            return Err(bad("not a fleece bitmap (shorter than its header)"));
        }
        let mut h = [0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| io_err("cannot read bitmap header", path, e))?;
        let Header {
            name,
            granularity,
            disk_size,
            enabled,
            inconsistent,
        } = Header::decode(&h).map_err(|why| bad(&why))?;
        if let Some(want) = expected.filter(|w| *w != name) {
            return Err(bad(&format!(
                "it holds bitmap '{name}', not '{want}' as its file name says (a renamed or copied file?)"
            )));
        }

        let bits = DirtyBitmap::new(size, granularity);
        let staged = DirtyBitmap::new(size, granularity);
        // Bits beyond the smaller of the two sizes are dropped.
        let keep_bits = disk_size.min(size).div_ceil(granularity);
        let want_words = disk_size.div_ceil(granularity).div_ceil(64);
        let file_words = (file_len - HEADER) / 8;
        let words = keep_bits.div_ceil(64).min(file_words);
        read_words(&file, words, |w, v| {
            let v = match keep_bits - w * 64 {
                n if n < 64 => v & ((1u64 << n) - 1),
                _ => v,
            };
            bits.set_word(w, v);
            staged.set_word(w, v);
        })
        .map_err(|e| io_err("cannot read bitmap", path, e))?;

        let mut reasons = Vec::new();
        if inconsistent {
            reasons.push("marked inconsistent in its sidecar file".to_string());
        }
        if disk_size != size {
            reasons.push(format!(
                "it was made for a disk of {disk_size} bytes, but the disk has {size} bytes \
                 (resized while fleece was not serving it, or a crash during a resize)"
            ));
        }
        if file_words < want_words {
            reasons.push("its sidecar file is shorter than its header says".to_string());
        }
        let b = Self::assemble(
            &name,
            bits,
            enabled,
            Some(Sidecar::new(file, path.to_path_buf(), staged)),
        );
        if disk_size != size || file_words < want_words {
            // Size the bit array first, the header last: a crash in between
            // leaves the old size in the header, which comes back here.
            if let Some(s) = &b.sidecar {
                if let Err(e) = s.size_for(b.bits.bits().div_ceil(64)) {
                    tracing::warn!(bitmap = %b.name, path = %path.display(), error = %e,
                        "cannot resize the bitmap file for the disk's size");
                }
            }
        }
        if !reasons.is_empty() {
            b.mark_inconsistent(&reasons.join("; "));
        }
        Ok(b)
    }

    /// Writes the header with these flags and the bitmap's size (no sync).
    /// Call with the header lock held.
    fn write_header(&self, s: &Sidecar, enabled: bool, inconsistent: bool) -> io::Result<()> {
        self.write_header_sized(s, enabled, inconsistent, self.bits.size())
    }

    fn write_header_sized(
        &self,
        s: &Sidecar,
        enabled: bool,
        inconsistent: bool,
        size: u64,
    ) -> io::Result<()> {
        let h = Header::encode(&self.name, self.bits.granularity(), size, enabled, inconsistent);
        s.write_at(&h, 0)
    }

    /// Syncs the sidecar; a failed sync makes the bitmap inconsistent.
    fn sync_since(&self, s: &Sidecar, epoch: u64) -> io::Result<()> {
        s.sync(epoch).inspect_err(|e| {
            self.mark_inconsistent(&format!("its sidecar file could not be synced: {e}"));
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bits.
    pub fn bits(&self) -> &DirtyBitmap {
        &self.bits
    }

    /// Whether writes are being recorded.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Whether it is kept in a sidecar file.
    pub fn is_persistent(&self) -> bool {
        self.sidecar.is_some()
    }

    /// Sidecar path, if persistent.
    pub fn path(&self) -> Option<&Path> {
        self.sidecar.as_ref().map(|s| s.path.as_path())
    }

    /// False if the bitmap may have missed writes (see
    /// [`inconsistent_reason`](Self::inconsistent_reason)); the next backup
    /// based on it must then be a full one. [`clear`](Self::clear) makes it
    /// consistent again.
    pub fn is_consistent(&self) -> bool {
        self.consistent.load(Ordering::Acquire)
            && self
                .sidecar
                .as_ref()
                .is_none_or(|s| s.sync.epoch() == s.clean_epoch.load(Ordering::Acquire))
    }

    /// Why the bitmap is inconsistent, for people; `None` if it is consistent.
    pub fn inconsistent_reason(&self) -> Option<String> {
        let why = lock(&self.why).clone();
        match why {
            Some(w) => Some(w),
            None if !self.is_consistent() => Some("a sync of its sidecar file failed".to_string()),
            None => None,
        }
    }

    /// Marks the bitmap inconsistent: it may have missed writes. Marking
    /// then does nothing until it is cleared. The flag is also written to
    /// the sidecar's header, so it holds after a restart.
    pub fn mark_inconsistent(&self, why: &str) {
        {
            let mut w = lock(&self.why);
            if w.is_some() {
                return;
            }
            *w = Some(why.to_string());
            self.consistent.store(false, Ordering::Release);
        }
        tracing::error!(
            bitmap = %self.name,
            reason = %why,
            "dirty bitmap is inconsistent: it may have missed writes, so the next backup must be a full one"
        );
        if let Err(e) = self.persist_inconsistent() {
            let path = self.path().map(|p| p.display().to_string()).unwrap_or_default();
            tracing::warn!(
                bitmap = %self.name,
                path = %path,
                error = %e,
                "cannot record in the bitmap file that it is inconsistent (will try again when it is closed)"
            );
        }
    }

    /// Writes the inconsistent flag to the header and syncs it.
    fn persist_inconsistent(&self) -> io::Result<()> {
        let Some(s) = &self.sidecar else { return Ok(()) };
        let _h = lock(&s.header);
        let epoch = s.sync.epoch();
        // Not through sync_since: a failure here changes nothing more. The
        // whole header page is rewritten, so a sync that succeeds after an
        // earlier failure does carry it.
        let r = self
            .write_header(s, self.is_enabled(), true)
            .and_then(|_| s.sync(epoch));
        self.flag_pending.store(r.is_err(), Ordering::Release);
        r
    }

    /// True if recording a change to the range needs no work.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        !self.is_enabled() || self.bits.all_set(offset, len) || !self.is_consistent()
    }

    /// Records that the range is about to change; returns once that is
    /// durable. Call before issuing the data write.
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.set_durably(offset, len)
    }

    /// Marks the range dirty (whether or not recording), durably. The bits
    /// show in [`bits`](Self::bits) only once they are durable; on failure
    /// nothing is set. An inconsistent bitmap is left alone: it already
    /// asks for a full backup, and must not block writes.
    pub fn set_durably(&self, offset: u64, len: u64) -> Result<()> {
        if self.bits.all_set(offset, len) || !self.is_consistent() {
            return Ok(());
        }
        let Some(s) = &self.sidecar else {
            self.bits.set(offset, len);
            return Ok(());
        };
        let _ops = s.ops_shared();
        // Before looking at the staged words: one staged before a failed
        // sync may be lost, and the failure count tells.
        let epoch = s.sync.epoch();
        if epoch != s.clean_epoch.load(Ordering::Acquire) {
            return Ok(());
        }
        s.staged
            .try_set_then(offset, len, |word, value| s.write_word(word, value))
            .map_err(|e| self.record_error(e))?;
        // Even if every word was staged already, the thread that wrote it
        // may not have synced it yet.
        self.sync_since(s, epoch).map_err(|e| self.record_error(e))?;
        self.bits.set(offset, len);
        Ok(())
    }

    fn record_error(&self, e: io::Error) -> Error {
        Error::io(
            format!("cannot record the write in dirty bitmap '{}'", self.name),
            e,
        )
    }

    /// Starts or stops recording. The header is written (and synced) first;
    /// if that fails nothing changes.
    pub fn set_enabled(&self, on: bool) -> Result<()> {
        let Some(s) = &self.sidecar else {
            self.enabled.store(on, Ordering::Release);
            return Ok(());
        };
        let synced = {
            let _h = lock(&s.header);
            let epoch = s.sync.epoch();
            self.write_header(s, on, !self.is_consistent())
                .map_err(|e| io_err("cannot write bitmap header", &s.path, e))?;
            let r = s.sync(epoch);
            if r.is_ok() {
                self.enabled.store(on, Ordering::Release);
                if !self.is_consistent() {
                    self.flag_pending.store(false, Ordering::Release);
                }
            }
            r
        };
        // Outside the header lock: marking inconsistent writes the header.
        synced.map_err(|e| {
            self.mark_inconsistent(&format!("its sidecar file could not be synced: {e}"));
            io_err("cannot sync bitmap", &s.path, e)
        })
    }

    /// Clears every bit (durably) and makes the bitmap consistent again:
    /// this is what a user does after a full backup.
    ///
    /// Memory is cleared first and the file after: if the file part fails,
    /// the file keeps extra bits, which only over-approximates.
    pub fn clear(&self) -> Result<()> {
        let Some(s) = &self.sidecar else {
            self.bits.clear();
            *lock(&self.why) = None;
            self.consistent.store(true, Ordering::Release);
            return Ok(());
        };
        let _ops = s.ops_exclusive();
        self.bits.clear();
        s.staged.clear();
        let epoch = s.sync.epoch();
        let words = self.bits.bits().div_ceil(64);
        // The bits go (durably) before the header says "consistent": a
        // header that claims it over bits that may not be cleared, or after
        // a sync that failed, would be trusted after a restart.
        s.size_for(words)
            .map_err(|e| io_err("cannot size bitmap file", &s.path, e))?;
        self.zero_words(s, words)
            .map_err(|e| io_err("cannot clear bitmap", &s.path, e))?;
        self.sync_since(s, epoch)
            .map_err(|e| io_err("cannot sync bitmap", &s.path, e))?;
        let header = {
            let _h = lock(&s.header);
            self.write_header(s, self.is_enabled(), false)
                .and_then(|_| s.sync(epoch))
        };
        if let Err(e) = header {
            // The header may now say "consistent" on disk: say otherwise
            // again, whatever the bitmap was before.
            self.force_inconsistent(&format!("its sidecar file could not be synced: {e}"));
            return Err(io_err("cannot write bitmap header", &s.path, e));
        }
        let mut why = lock(&self.why);
        s.clean_epoch.store(epoch, Ordering::Release);
        *why = None;
        self.flag_pending.store(false, Ordering::Release);
        self.consistent.store(true, Ordering::Release);
        Ok(())
    }

    /// Clears the bits set in `mask` (same granularity and size), durably,
    /// without touching the consistency flag: what a backup job does at its
    /// end to drop what it copied. Call with the disk frozen (no marks may
    /// run meanwhile). A crash part way leaves some of the bits set, which
    /// only over-approximates; an inconsistent bitmap is left alone.
    pub fn clear_bits(&self, mask: &DirtyBitmap) -> Result<()> {
        if mask.granularity() != self.bits.granularity() || mask.size() != self.bits.size() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "cannot clear bits of another granularity or size from '{}'",
                    self.name
                ),
            ));
        }
        if !self.is_consistent() {
            return Ok(());
        }
        let words = self.bits.bits().div_ceil(64);
        let Some(s) = &self.sidecar else {
            for w in 0..words {
                let m = mask.word(w);
                if m != 0 {
                    self.bits.set_word(w, self.bits.word(w) & !m);
                }
            }
            return Ok(());
        };
        let _ops = s.ops_exclusive();
        let epoch = s.sync.epoch();
        let mut r = Ok(());
        for w in 0..words {
            let m = mask.word(w);
            if m == 0 {
                continue;
            }
            // Memory first: a failed file write keeps extra bits on disk,
            // and the next mark of a granule writes its word again.
            self.bits.set_word(w, self.bits.word(w) & !m);
            let v = s.staged.word(w) & !m;
            s.staged.set_word(w, v);
            if r.is_ok() {
                r = s.write_word(w, v);
            }
        }
        r.and_then(|_| s.sync(epoch)).map_err(|e| {
            self.force_inconsistent(&format!("its sidecar file could not be synced: {e}"));
            io_err("cannot clear bits of bitmap", &s.path, e)
        })
    }

    /// Like [`mark_inconsistent`](Self::mark_inconsistent), but writes the
    /// flag to the header even if the bitmap was inconsistent already (a
    /// failed header write may have lost it).
    fn force_inconsistent(&self, why: &str) {
        {
            let mut w = lock(&self.why);
            if w.is_none() {
                *w = Some(why.to_string());
            }
            self.consistent.store(false, Ordering::Release);
        }
        if self.persist_inconsistent().is_err() {
            // Tried again when the bitmap is closed.
            self.flag_pending.store(true, Ordering::Release);
        }
    }

    /// Makes the bit array read as zeroes: punching it out is one call and
    /// leaves the file sparse; where that fails, zeroes are written.
    fn zero_words(&self, s: &Sidecar, words: u64) -> io::Result<()> {
        let len = words * 8;
        if len == 0 {
            return Ok(());
        }
        #[cfg(test)]
        injected(&s.faults.write)?;
        // SAFETY: plain syscall on a descriptor we own.
        let r = unsafe {
            libc::fallocate(
                s.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                HEADER as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let zero = vec![0u8; (1 << 20).min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64) as usize;
            s.write_at(&zero[..n], HEADER + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Adds every bit of `other` (same granularity and size), durably: the
    /// words are written and synced first, and only then set in memory; on
    /// failure memory is unchanged.
    pub fn merge(&self, other: &DirtyBitmap) -> Result<()> {
        if other.granularity() != self.bits.granularity() || other.size() != self.bits.size() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "cannot merge a bitmap of granularity {} over {} bytes into '{}' of granularity {} over {} bytes",
                    other.granularity(),
                    other.size(),
                    self.name,
                    self.bits.granularity(),
                    self.bits.size()
                ),
            ));
        }
        let Some(s) = &self.sidecar else {
            self.bits.merge_then(other, |_, _| {});
            return Ok(());
        };
        let _ops = s.ops_shared();
        let epoch = s.sync.epoch();
        s.staged
            .try_merge_then(other, |word, value| s.write_word(word, value))
            .map_err(|e| self.record_error(e))?;
        self.sync_since(s, epoch).map_err(|e| self.record_error(e))?;
        self.bits.merge_then(other, |_, _| {});
        Ok(())
    }

    /// Follows a resize of the disk: bits past the new end are dropped, and
    /// a grown range is marked dirty (it changed: it did not exist before).
    ///
    /// The sidecar is updated so that a crash at any point leaves either
    /// the old header (whose size then differs from the disk's, so
    /// [`open`](Self::open) makes the bitmap inconsistent) or the new one
    /// over durable bits: the bit array is sized, the grown words written
    /// and synced, and the header with the new size written and synced
    /// last. If the file cannot be updated, the bitmap follows the disk in
    /// memory, becomes inconsistent, and the error is returned. Call with
    /// the disk frozen, after resizing the image.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let old_size = self.bits.size();
        let g = self.bits.granularity();
        // Marking a huge grown range would take memory for every granule
        // (and write every word): past a bound the bitmap says instead that
        // the next backup must be a full one.
        let grown = new_size.saturating_sub(old_size).div_ceil(g);
        let mark_grown = grown <= MAX_GROWN_BITS;
        let too_much = || {
            format!(
                "its disk grew from {old_size} to {new_size} bytes, more than it can mark as changed \
                 ({MAX_GROWN_BITS} granules)"
            )
        };
        let Some(s) = &self.sidecar else {
            self.bits.resize(new_size, mark_grown);
            if !mark_grown {
                self.mark_inconsistent(&too_much());
            }
            return Ok(());
        };
        let _ops = s.ops_exclusive();
        s.staged.resize(new_size, mark_grown);
        let words = s.staged.bits().div_ceil(64);
        // From the word holding the old end (it gains the grown bits, or
        // loses those past a smaller end) to the new end; unmarked grown
        // words are holes of the resized file already.
        let from = (old_size.min(new_size) / g / 64).min(words);
        let to = if mark_grown { words } else { (from + 1).min(words) };
        let epoch = s.sync.epoch();
        let r = s
            .size_for(words)
            .and_then(|_| self.write_words(s, from, to))
            .and_then(|_| s.sync(epoch))
            .and_then(|_| {
                let _h = lock(&s.header);
                self.write_header_sized(
                    s,
                    self.is_enabled(),
                    !self.is_consistent() || !mark_grown,
                    new_size,
                )
            })
            .and_then(|_| s.sync(epoch));
        // Memory follows the disk whatever happened to the file.
        self.bits.resize(new_size, mark_grown);
        if !mark_grown {
            self.mark_inconsistent(&too_much());
        }
        r.map_err(|e| {
            self.force_inconsistent(&format!(
                "its sidecar file could not be resized from {old_size} to {new_size} bytes: {e}"
            ));
            io_err("cannot resize bitmap file", &s.path, e)
        })
    }

    /// Writes staged words `[from, to)` to the file.
    fn write_words(&self, s: &Sidecar, from: u64, to: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut buf = Vec::with_capacity(CHUNK);
        let mut start = from;
        for w in from..to {
            buf.extend_from_slice(&s.staged.word(w).to_le_bytes());
            if buf.len() >= CHUNK || w + 1 == to {
                s.write_at(&buf, HEADER + start * 8)?;
                buf.clear();
                start = w + 1;
            }
        }
        Ok(())
    }

    /// Deletes the sidecar file, if the file at its path is still this
    /// bitmap's (never another bitmap's file that took its name).
    pub fn remove_file(&self) -> Result<()> {
        if let Some(s) = &self.sidecar {
            use std::os::unix::fs::MetadataExt;
            let ours = s.file.metadata().ok().map(|m| (m.dev(), m.ino()));
            let there = std::fs::metadata(&s.path).ok().map(|m| (m.dev(), m.ino()));
            if ours.is_none() || ours != there {
                return Ok(());
            }
            std::fs::remove_file(&s.path).map_err(|e| io_err("cannot remove bitmap file", &s.path, e))?;
            sync_dir(&s.path);
        }
        Ok(())
    }
}

impl Drop for NamedBitmap {
    fn drop(&mut self) {
        // A bitmap that looks consistent after a restart must be.
        if self.flag_pending.load(Ordering::Acquire) && !self.is_consistent() {
            if let Err(e) = self.persist_inconsistent() {
                tracing::error!(
                    bitmap = %self.name,
                    error = %e,
                    "cannot record in the bitmap file that it is inconsistent: after a restart it may look \
                     consistent but miss writes; clear it after a full backup"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
