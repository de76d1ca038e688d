//! The state directory: one daemon at a time, and a record of every
//! snapshot store the daemon creates, so that none outlives a crash.
//!
//! Snapshots do not survive a restart, so their stores are garbage once the
//! daemon that made them is gone. A store may live anywhere
//! (`--store file:/elsewhere/x.store`); the record of it lives here, written
//! and synced before the store file exists, and removed after the store
//! file is gone. At start, every recorded store is removed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Kind, Result};

/// Name of the lock file inside the state directory; it holds the pid of
/// the daemon that owns the directory.
const LOCK_FILE: &str = "fleece.lock";
/// Directory of store records inside the state directory.
const RECORDS: &str = "stores";

/// Exclusive ownership of a state directory, held for the daemon's life.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// Holds the `flock`; closing it (at exit, or when the process dies)
    /// releases the directory.
    _lock: File,
    next_record: AtomicU64,
}

impl StateDir {
    /// Takes the directory for this daemon, or says which process holds it.
    /// Nothing in the directory is touched before the lock is held.
    pub fn lock(dir: &Path) -> Result<StateDir> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::invalid(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::invalid(format!("cannot lock {}: {err}", path.display())));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("fleece daemon pid {pid}"),
                Err(_) => "another fleece daemon".to_string(),
            };
            return Err(Error::new(
                Kind::Busy,
                format!(
                    "state dir {} is in use by {holder}; stop it, or give this daemon its own --state-dir",
                    dir.display()
                ),
            ));
        }
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{pid}"));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the pid to the lock file");
        }
        Ok(StateDir {
            dir: dir.to_path_buf(),
            _lock: file,
            next_record: AtomicU64::new(0),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn records(&self) -> PathBuf {
        self.dir.join(RECORDS)
    }

    /// Removes every store that a previous run of a daemon on this directory
    /// created and did not remove (it was killed), then any store file left
    /// in the directory's own `snapshots/` (from versions that kept no
    /// records). Needs the lock: no live daemon can own them.
    pub fn remove_stale_stores(&self) {
        if let Ok(entries) = std::fs::read_dir(self.records()) {
            for e in entries.flatten() {
                let rec = e.path();
                match read_record(&rec) {
                    Ok(r) => remove_recorded(&r),
                    Err(why) => {
                        tracing::warn!(record = %rec.display(), %why, "ignoring an unreadable store record")
                    }
                }
                if let Err(err) = std::fs::remove_file(&rec) {
                    tracing::warn!(record = %rec.display(), error = %err, "cannot remove store record");
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(self.dir.join("snapshots")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".store") || name.ends_with(".spill") {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => {
                        tracing::info!(file = %e.path().display(), "removed the store of a snapshot lost in a restart")
                    }
                    Err(err) => {
                        tracing::warn!(file = %e.path().display(), error = %err, "cannot remove stale store")
                    }
                }
            }
        }
    }

    /// Records that a store file of `size` bytes is about to be created at
    /// `path`. Durable before it returns, so a crash right after the file is
    /// made still finds the record. Drop the record after the store.
    pub fn record_store(&self, path: &Path, size: u64) -> Result<StoreRecord> {
        self.record(path, size, false)
    }

    /// [`record_store`](Self::record_store) for a qcow2 store: its file's
    /// length is not `size` (the disk's), so before its inode is noted it is
    /// recognised by the virtual size in its header.
    pub fn record_qcow2_store(&self, path: &Path, size: u64) -> Result<StoreRecord> {
        self.record(path, size, true)
    }

    fn record(&self, path: &Path, size: u64, qcow2: bool) -> Result<StoreRecord> {
        let dir = self.records();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let id = self.next_record.fetch_add(1, Ordering::Relaxed);
        let file = dir.join(format!("{}-{id}.json", std::process::id()));
        let rec = Record {
            path: abs,
            size,
            dev: None,
            ino: None,
            qcow2,
        };
        write_record(&file, &rec)?;
        sync_dir(&dir);
        Ok(StoreRecord { file, rec })
    }
}

/// What is known of one store: where, how big, and once it exists, which
/// file it is (so that a file someone else put there later is never taken
/// for it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    path: PathBuf,
    size: u64,
    dev: Option<u64>,
    ino: Option<u64>,
    /// A qcow2 image: `size` is its virtual size, not its length.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    qcow2: bool,
}

/// A store's record; dropping it removes the record (drop it after the
/// store, whose own drop removes the store file).
#[derive(Debug)]
pub struct StoreRecord {
    file: PathBuf,
    rec: Record,
}

impl StoreRecord {
    /// Notes which file the store is, now that it exists.
    pub fn created(&mut self) {
        match std::fs::metadata(&self.rec.path) {
            Ok(m) => {
                self.rec.dev = Some(m.dev());
                self.rec.ino = Some(m.ino());
                if let Err(e) = write_record(&self.file, &self.rec) {
                    // The intent record still names the path and size.
                    tracing::warn!(record = %self.file.display(), error = %e, "cannot update store record");
                }
            }
            Err(e) => tracing::warn!(store = %self.rec.path.display(), error = %e, "cannot stat new store"),
        }
    }
}

impl Drop for StoreRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

fn write_record(file: &Path, rec: &Record) -> Result<()> {
    let tmp = file.with_extension("tmp");
    let text = serde_json::to_vec(rec).unwrap_or_default();
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    res.map_err(|e| {
        Error::new(
            Kind::Internal,
            format!("cannot write store record {}: {e}", file.display()),
        )
    })
}

fn read_record(file: &Path) -> std::result::Result<Record, String> {
    let text = std::fs::read(file).map_err(|e| e.to_string())?;
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

/// Removes a recorded store if the file at its path is the one recorded:
/// the same inode, or (if the daemon died before noting the inode) the size
/// the store was created with.
fn remove_recorded(r: &Record) {
    let Ok(m) = std::fs::symlink_metadata(&r.path) else {
        return; // gone already
    };
    let ours = match (r.dev, r.ino, r.qcow2) {
        (Some(dev), Some(ino), false) => m.dev() == dev && m.ino() == ino && m.len() == r.size,
        (Some(dev), Some(ino), true) => m.dev() == dev && m.ino() == ino,
        (_, _, false) => m.is_file() && m.len() == r.size,
        (_, _, true) => m.is_file() && qcow2_virtual_size(&r.path) == Some(r.size),
    };
    if !ours {
        tracing::warn!(
            file = %r.path.display(),
            "not removing a file at a recorded store path: it is not the store fleece made there"
        );
        return;
    }
    match std::fs::remove_file(&r.path) {
        Ok(()) => {
            tracing::info!(file = %r.path.display(), "removed the store of a snapshot lost in a restart")
        }
        Err(e) => tracing::warn!(file = %r.path.display(), error = %e, "cannot remove stale store"),
    }
}

/// The virtual size in a qcow2 header, if the file is a qcow2 image.
fn qcow2_virtual_size(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut h = [0u8; 32];
    File::open(path).ok()?.read_exact(&mut h).ok()?;
    (h[..4] == *b"QFI\xfb").then(|| u64::from_be_bytes(h[24..32].try_into().unwrap()))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_state_dir_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDir::lock(dir.path()).unwrap();
        let err = StateDir::lock(dir.path()).unwrap_err();
        assert_eq!(err.kind, Kind::Busy);
        assert!(
            err.message.contains(&std::process::id().to_string()),
            "{}",
            err.message
        );
        drop(first);
        StateDir::lock(dir.path()).unwrap();
    }

    #[test]
    fn recorded_stores_are_removed_at_start_but_other_files_at_their_path_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let state = StateDir::lock(dir.path()).unwrap();
        // A store that was made and noted, then the daemon died.
        let a = other.path().join("a.store");
        let mut ra = state.record_store(&a, 4096).unwrap();
        File::create(&a).unwrap().set_len(4096).unwrap();
        ra.created();
        std::mem::forget(ra);
        // The daemon died between the record and the file: someone else's
        // file of another size appeared there later.
        let b = other.path().join("b.store");
        std::mem::forget(state.record_store(&b, 1 << 20).unwrap());
        std::fs::write(&b, b"user data").unwrap();
        // Noted, then replaced by another file of the same size.
        let c = other.path().join("c.store");
        let mut rc = state.record_store(&c, 9).unwrap();
        std::fs::write(&c, b"123456789").unwrap();
        rc.created();
        std::mem::forget(rc);
        // (Made before the old one goes, so it cannot reuse its inode.)
        std::fs::write(other.path().join("c.new"), b"abcdefghi").unwrap();
        std::fs::rename(other.path().join("c.new"), &c).unwrap();
        drop(state);

        let state = StateDir::lock(dir.path()).unwrap();
        state.remove_stale_stores();
        assert!(!a.exists());
        assert_eq!(std::fs::read(&b).unwrap(), b"user data");
        assert_eq!(std::fs::read(&c).unwrap(), b"abcdefghi");
        assert_eq!(std::fs::read_dir(dir.path().join(RECORDS)).unwrap().count(), 0);
    }

    #[test]
    fn recorded_qcow2_stores_are_known_by_inode_or_virtual_size() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let state = StateDir::lock(dir.path()).unwrap();
        let mk = |p: &Path, size: u64| {
            let opts = fleece_block::image::CreateOptions {
                format: fleece_block::Format::Qcow2,
                size: Some(size),
                cluster_size: None,
                backing: None,
            };
            fleece_block::image::create(p, &opts).unwrap();
        };
        // Made and noted (its length is not the disk's size).
        let a = other.path().join("a.qcow2");
        let mut ra = state.record_qcow2_store(&a, 1 << 30).unwrap();
        mk(&a, 1 << 30);
        ra.created();
        std::mem::forget(ra);
        // Made, not noted: its header's size says it is ours.
        let b = other.path().join("b.qcow2");
        std::mem::forget(state.record_qcow2_store(&b, 1 << 20).unwrap());
        mk(&b, 1 << 20);
        // Not noted, and the file there is another image.
        let c = other.path().join("c.qcow2");
        std::mem::forget(state.record_qcow2_store(&c, 1 << 20).unwrap());
        mk(&c, 2 << 20);
        drop(state);
        let state = StateDir::lock(dir.path()).unwrap();
        state.remove_stale_stores();
        assert!(!a.exists() && !b.exists());
        assert!(c.exists());
    }

    #[test]
    fn a_dropped_record_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::lock(dir.path()).unwrap();
        let r = state.record_store(&dir.path().join("x.store"), 1).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(RECORDS)).unwrap().count(), 1);
        drop(r);
        assert_eq!(std::fs::read_dir(dir.path().join(RECORDS)).unwrap().count(), 0);
    }
}
