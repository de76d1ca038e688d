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

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};

use crate::bitmap::DirtyBitmap;
use crate::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"FLEECEBM";
const VERSION: u32 = 1;
/// Header size; the bit array starts here.
pub const HEADER: u64 = 4096;
const FLAG_ENABLED: u32 = 1;
const FLAG_INCONSISTENT: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_ENABLED | FLAG_INCONSISTENT;
/// Longest name a header holds.
const MAX_NAME: usize = 1024;
/// Most granules a resize marks as changed (16 MiB of bits); a disk that
/// grows by more makes its bitmaps inconsistent instead.
const MAX_GROWN_BITS: u64 = 1 << 27;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
struct GroupSync {
    state: Mutex<SyncState>,
    /// Failed syncs so far; only grows (changed under `state`).
    failures: AtomicU64,
    done: Condvar,
}

impl GroupSync {
    /// The failure count to pass to [`sync`](Self::sync), read *before*
    /// writing what must become durable.
    fn epoch(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    /// Returns once a sync that started after this call has completed, and
    /// fails if any sync failed since `epoch`: a failed sync may have dropped
    /// pages written before it, which a later successful one does not bring
    /// back, so success must never be reported across a failure.
    fn sync(&self, run: impl Fn() -> io::Result<()>, epoch: u64) -> io::Result<()> {
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

/// Errors to return instead of doing I/O, so tests can reach the failure
/// paths (ENOSPC, a failed fsync) without a full or failing disk.
#[cfg(test)]
#[derive(Default)]
struct Faults {
    write: std::sync::atomic::AtomicI32,
    sync: std::sync::atomic::AtomicI32,
}

#[cfg(test)]
fn injected(errno: &std::sync::atomic::AtomicI32) -> io::Result<()> {
    match errno.load(Ordering::Relaxed) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

struct Sidecar {
    file: File,
    path: PathBuf,
    sync: GroupSync,
    /// Every word as written to the file, durable or not. Marks OR into
    /// these (under their lock, around the `pwrite`), never into `bits`, so a
    /// file word never goes back on a bit another thread wrote; it only
    /// shrinks on clear and resize.
    staged: DirtyBitmap,
    /// Marks and merges hold it shared, clear and resize exclusively: a word
    /// written before a clear must not be taken for durable after it.
    ops: RwLock<()>,
    /// Serializes header writes, each built from the state in memory.
    header: Mutex<()>,
    /// The sync failure count when the bitmap was last made consistent; a
    /// different count means a sync failed since, and the bitmap is (or is
    /// about to be marked) inconsistent.
    clean_epoch: AtomicU64,
    #[cfg(test)]
    faults: Faults,
}

impl Sidecar {
    fn new(file: File, path: PathBuf, staged: DirtyBitmap) -> Self {
        Sidecar {
            file,
            path,
            sync: GroupSync::default(),
            staged,
            ops: RwLock::new(()),
            header: Mutex::new(()),
            clean_epoch: AtomicU64::new(0),
            #[cfg(test)]
            faults: Faults::default(),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        injected(&self.faults.write)?;
        self.file.write_all_at(buf, offset)
    }

    fn write_word(&self, word: u64, value: u64) -> io::Result<()> {
        self.write_at(&value.to_le_bytes(), HEADER + word * 8)
    }

    fn datasync(&self) -> io::Result<()> {
        #[cfg(test)]
        injected(&self.faults.sync)?;
        self.file.sync_data()
    }

    /// Group-commit sync; fails if any sync failed since `epoch`.
    fn sync(&self, epoch: u64) -> io::Result<()> {
        self.sync.sync(|| self.datasync(), epoch)
    }

    fn ops_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.ops.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ops_exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.ops.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the file's length for a bit array of `words` words.
    fn size_for(&self, words: u64) -> io::Result<()> {
        #[cfg(test)]
        injected(&self.faults.write)?;
        self.file.set_len(HEADER + words * 8)
    }
}

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
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if &h[..8] != MAGIC {
            return Err(bad("not a fleece bitmap (bad magic)"));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let flags = u32_at(12);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(&format!("unknown flags {flags:#x}")));
        }
        let granularity = u64_at(16);
        let disk_size = u64_at(24);
        let name_len = u16::from_le_bytes([h[32], h[33]]) as usize;
        if name_len > MAX_NAME || !granularity.is_power_of_two() || granularity < 512 {
            return Err(bad("corrupt header"));
        }
        let name = std::str::from_utf8(&h[34..34 + name_len]).map_err(|_| bad("name is not UTF-8"))?;
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
        if flags & FLAG_INCONSISTENT != 0 {
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
            name,
            bits,
            flags & FLAG_ENABLED != 0,
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
        let mut h = vec![0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let mut flags = 0;
        if enabled {
            flags |= FLAG_ENABLED;
        }
        if inconsistent {
            flags |= FLAG_INCONSISTENT;
        }
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.bits.granularity().to_le_bytes());
        h[24..32].copy_from_slice(&size.to_le_bytes());
        h[32..34].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        h[34..34 + self.name.len()].copy_from_slice(self.name.as_bytes());
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

/// Reads the first `words` words of a bit array, calling `found` for each
/// non-zero one; holes (never-set regions of a sparse file) are skipped.
fn read_words(file: &File, words: u64, mut found: impl FnMut(u64, u64)) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut w = 0u64;
    while w < words {
        let off = HEADER + w * 8;
        // SAFETY: plain lseek on a descriptor we own; all other I/O is positioned.
        let data = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after this
            }
            // No SEEK_DATA here: read everything.
        } else {
            w = (data as u64).max(off).saturating_sub(HEADER) / 8;
        }
        if w >= words {
            break;
        }
        let n = ((words - w) * 8).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], HEADER + w * 8)?;
        for (i, c) in buf[..n].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = u64::from_le_bytes(b);
            if v != 0 {
                found(w + i as u64, v);
            }
        }
        w += (n / 8) as u64;
    }
    Ok(())
}

/// Makes a file's creation or removal durable.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 65536;

    fn faults(b: &NamedBitmap) -> &Faults {
        &b.sidecar.as_ref().unwrap().faults
    }

    fn new_bitmap(dir: &tempfile::TempDir, size: u64) -> (PathBuf, NamedBitmap) {
        let p = dir.path().join("b0");
        let b = NamedBitmap::create("b0", size, G, true, Some(&p)).unwrap();
        (p, b)
    }

    #[test]
    fn bits_survive_a_reopen_with_their_flags() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        b.mark(G * 3, 10).unwrap();
        b.mark((1 << 30) - 1, 1).unwrap();
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 30).unwrap();
        assert_eq!(b.name(), "b0");
        assert!(b.is_enabled());
        assert!(b.is_consistent());
        assert_eq!(b.inconsistent_reason(), None);
        assert_eq!(b.bits().dirty_bytes(), 2 * G);
        assert!(b.bits().any(G * 3, 1));
        b.set_enabled(false).unwrap();
        b.mark(0, 1).unwrap();
        b.clear().unwrap();
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 30).unwrap();
        assert!(!b.is_enabled());
        assert!(b.is_consistent());
        assert_eq!(b.bits().dirty_bytes(), 0);
    }

    #[test]
    fn bad_headers_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 20);
        drop(b);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 4], 12).unwrap();
        let e = NamedBitmap::open(&p, 1 << 20).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains("remove"),
            "{msg}"
        );
        f.write_all_at(b"NOTABMAP", 0).unwrap();
        assert!(NamedBitmap::open(&p, 1 << 20)
            .err()
            .unwrap()
            .to_string()
            .contains("magic"));
        f.set_len(100).unwrap();
        assert_eq!(
            NamedBitmap::open(&p, 1 << 20).err().unwrap().kind(),
            ErrorKind::Invalid
        );
    }

    #[test]
    fn a_failed_word_write_sets_nothing_and_a_later_mark_retries() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
        let e = b.mark(G * 5, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::StoreFull, "{e}");
        assert!(!b.bits().any(G * 5, 1));
        assert!(!b.covers(G * 5, 1));
        assert!(b.is_consistent(), "a failed pwrite leaves the bitmap exact");
        assert!(b.mark(G * 5, 1).is_err());
        faults(&b).write.store(0, Ordering::Relaxed);
        b.mark(G * 5, 1).unwrap();
        assert!(b.covers(G * 5, 1));
        drop(b);
        assert!(NamedBitmap::open(&p, 1 << 30).unwrap().bits().any(G * 5, 1));
    }

    #[test]
    fn a_clear_that_cannot_sync_leaves_an_inconsistent_bitmap_inconsistent_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        b.mark_inconsistent("a test said so");
        faults(&b).sync.store(libc::EIO, Ordering::Relaxed);
        assert!(b.clear().is_err());
        assert!(!b.is_consistent());
        faults(&b).sync.store(0, Ordering::Relaxed);
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 30).unwrap();
        assert!(
            !b.is_consistent(),
            "a failed clear must not make the header say exact"
        );
    }

    #[test]
    fn a_huge_grow_makes_the_bitmap_inconsistent_instead_of_marking_every_granule() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        b.mark(0, 1).unwrap();
        // 512 TiB more at 64 KiB granules is 2^33 granules: far past the bound.
        b.resize(1 << 49).unwrap();
        assert!(!b.is_consistent());
        assert!(b.inconsistent_reason().unwrap().contains("grew"));
        assert!(b.bits().any(0, 1));
        assert!(!b.bits().any(1 << 40, 1), "nothing marked in the grown range");
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 49).unwrap();
        assert!(!b.is_consistent());
        // A small grow is marked, and keeps it consistent.
        b.clear().unwrap();
        b.resize((1 << 49) + 10 * G).unwrap();
        assert!(b.is_consistent());
        assert!(b.bits().any((1 << 49) + 5 * G, 1));
    }

    #[test]
    fn remove_file_leaves_a_file_that_took_the_name_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"someone else's").unwrap();
        b.remove_file().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
    }

    #[test]
    fn a_failed_sync_makes_it_inconsistent_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        b.mark(0, 1).unwrap();
        faults(&b).sync.store(libc::EIO, Ordering::Relaxed);
        let e = b.mark(G * 7, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(!b.bits().any(G * 7, 1), "not known durable, so not set");
        assert!(!b.is_consistent());
        assert!(b.inconsistent_reason().unwrap().contains("synced"));
        faults(&b).sync.store(0, Ordering::Relaxed);
        // Writes go on, and nothing is written for them.
        faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
        assert!(b.covers(G * 9, 1));
        b.mark(G * 9, 1).unwrap();
        assert!(!b.bits().any(G * 9, 1));
        faults(&b).write.store(0, Ordering::Relaxed);
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 30).unwrap();
        assert!(!b.is_consistent());
        assert_eq!(
            b.inconsistent_reason().as_deref(),
            Some("marked inconsistent in its sidecar file")
        );
        b.clear().unwrap();
        assert!(b.is_consistent());
        b.mark(G * 9, 1).unwrap();
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 30).unwrap();
        assert!(b.is_consistent());
        assert_eq!(b.bits().dirty_bytes(), G);
    }

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

    #[test]
    fn set_enabled_and_merge_change_nothing_when_the_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
        assert!(b.set_enabled(false).is_err());
        assert!(b.is_enabled());
        let other = DirtyBitmap::new(1 << 30, G);
        other.set(G * 100, G * 3);
        assert_eq!(b.merge(&other).unwrap_err().kind(), ErrorKind::StoreFull);
        assert_eq!(b.bits().dirty_bytes(), 0);
        assert!(b.is_consistent());
        faults(&b).write.store(0, Ordering::Relaxed);
        faults(&b).sync.store(libc::EIO, Ordering::Relaxed);
        assert!(b.merge(&other).is_err());
        assert_eq!(b.bits().dirty_bytes(), 0);
        assert!(!b.is_consistent());
        faults(&b).sync.store(0, Ordering::Relaxed);
        b.clear().unwrap();
        b.merge(&other).unwrap();
        assert_eq!(b.bits().dirty_bytes(), 3 * G);
        assert!(b.merge(&DirtyBitmap::new(1 << 20, G)).is_err());
        drop(b);
        assert_eq!(
            NamedBitmap::open(&p, 1 << 30).unwrap().bits().dirty_bytes(),
            3 * G
        );
    }

    #[test]
    fn resize_keeps_bits_inside_and_marks_what_grew_on_disk_too() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 100 * G);
        b.mark(0, 1).unwrap();
        b.mark(90 * G, 1).unwrap();
        b.resize(80 * G).unwrap();
        assert_eq!(b.bits().dirty_bytes(), G);
        b.resize(300 * G + 5).unwrap();
        assert!(b.is_consistent());
        assert_eq!(b.bits().dirty_bytes(), G + 221 * G);
        drop(b);
        let b = NamedBitmap::open(&p, 300 * G + 5).unwrap();
        assert!(b.is_consistent(), "{:?}", b.inconsistent_reason());
        assert_eq!(
            b.bits().extents(0, 300 * G + 5),
            vec![(G, true), (79 * G, false), (220 * G + 5, true)]
        );
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            HEADER + (301u64).div_ceil(64) * 8
        );
        b.resize(10 * G).unwrap();
        drop(b);
        assert_eq!(NamedBitmap::open(&p, 10 * G).unwrap().bits().dirty_bytes(), G);
    }

    #[test]
    fn a_failed_resize_leaves_memory_resized_and_the_bitmap_inconsistent() {
        let dir = tempfile::tempdir().unwrap();
        let (_p, b) = new_bitmap(&dir, 100 * G);
        faults(&b).write.store(libc::ENOSPC, Ordering::Relaxed);
        assert!(b.resize(200 * G).is_err());
        assert_eq!(b.bits().size(), 200 * G);
        assert!(!b.is_consistent());
    }

    #[test]
    fn a_size_mismatch_on_open_keeps_the_bits_and_makes_it_inconsistent() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        b.mark(G, 1).unwrap();
        b.mark((1 << 29) + G, 1).unwrap();
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 29).unwrap();
        assert!(!b.is_consistent());
        let why = b.inconsistent_reason().unwrap();
        assert!(why.contains("1073741824") && why.contains("536870912"), "{why}");
        assert_eq!(b.bits().size(), 1 << 29);
        assert_eq!(b.bits().dirty_bytes(), G);
        // The file now describes the new size, and still says inconsistent.
        drop(b);
        let b = NamedBitmap::open(&p, 1 << 29).unwrap();
        assert_eq!(
            b.inconsistent_reason().as_deref(),
            Some("marked inconsistent in its sidecar file")
        );
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            HEADER + ((1u64 << 29) / G).div_ceil(64) * 8
        );
        b.clear().unwrap();
        drop(b);
        assert!(NamedBitmap::open(&p, 1 << 29).unwrap().is_consistent());
    }

    #[test]
    fn transient_bitmaps_mark_and_clear_in_memory() {
        let b = NamedBitmap::create("t", 1 << 20, G, true, None).unwrap();
        b.mark(0, 1).unwrap();
        assert!(b.covers(0, G));
        b.mark_inconsistent("test");
        assert_eq!(b.inconsistent_reason().as_deref(), Some("test"));
        b.mark(5 * G, 1).unwrap();
        assert!(!b.bits().any(5 * G, 1));
        b.clear().unwrap();
        assert!(b.is_consistent());
        b.resize(2 << 20).unwrap();
        assert!(b.bits().any(1 << 20, 1));
    }

    #[test]
    fn concurrent_marks_share_syncs_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = new_bitmap(&dir, 1 << 30);
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let b = &b;
                sc.spawn(move || {
                    for i in 0..64u64 {
                        b.mark((i * 4 + t) * G, 1).unwrap();
                    }
                });
            }
        });
        assert_eq!(b.bits().dirty_bytes(), 256 * G);
        drop(b);
        assert_eq!(
            NamedBitmap::open(&p, 1 << 30).unwrap().bits().dirty_bytes(),
            256 * G
        );
    }
}
