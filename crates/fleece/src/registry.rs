//! The registry: what the daemon serves (disks, their snapshots, and the
//! exports of both), behind one lock, with checked inserts and removals.
//!
//! It is a store, not a service: it knows nothing of NBD, files, events or
//! the control API. The services (`disks`, `snapshots`, `txn`) change it;
//! the NBD server reads it. Every change holds [`Registry::change`], so
//! that what a service checked (a name is free, an image is not served)
//! still holds when it inserts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use fleece_block::{BlockDev, Capabilities, Image, LiveDisk, Snapshot, Subscription};

use crate::error::{Error, Kind, Result};

/// One export: a device and how it may be used.
pub struct Export {
    /// Export name clients ask for.
    pub name: String,
    /// Disk this export belongs to.
    pub disk: String,
    /// What reads and writes go to.
    pub dev: Arc<dyn BlockDev>,
    /// What `dev` can do, asked once when the export was made: the
    /// handshake's flags and every request's checks read it here.
    pub caps: Capabilities,
    /// Where the export's dirty bitmaps come from.
    pub meta: MetaSource,
}

/// The dirty bitmaps an export shows.
pub enum MetaSource {
    /// A live disk: its bitmaps as they are now.
    Live(Arc<LiveDisk>),
    /// A snapshot: the bitmap that scoped it, as of its instant.
    Snapshot(Arc<Snapshot>, Option<String>),
}

impl Export {
    /// The export `name` of disk `disk`, serving `dev`.
    pub fn new(name: &str, disk: &str, dev: Arc<dyn BlockDev>, meta: MetaSource) -> Self {
        Export {
            name: name.to_string(),
            disk: disk.to_string(),
            caps: dev.capabilities(),
            dev,
            meta,
        }
    }

    /// Dirty/clean runs of bitmap `name` over the range, as (length,
    /// dirty), or why they cannot be given.
    pub fn bitmap_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Vec<(u64, bool)>, String> {
        match &self.meta {
            MetaSource::Live(live) => match live.bitmap(name).filter(|b| !is_hidden(b.name())) {
                None => Err(format!("dirty bitmap '{name}' no longer exists")),
                // Its clean bits may be wrong: a client must not skip them.
                Some(b) if !b.is_consistent() => Err(format!(
                    "dirty bitmap '{name}' is inconsistent ({}): take a full backup",
                    b.inconsistent_reason().unwrap_or_default()
                )),
                Some(b) => Ok(b.bits().extents(offset, len)),
            },
            MetaSource::Snapshot(snap, Some(b)) if b == name => snap
                .options()
                .scope
                .as_ref()
                .map(|s| s.extents(offset, len))
                .ok_or_else(|| format!("dirty bitmap '{name}' is not part of this snapshot")),
            MetaSource::Snapshot(..) => Err(format!("dirty bitmap '{name}' is not part of this snapshot")),
        }
    }

    /// Copy-order hints (`fleece:copy-order`) over the range, as (length,
    /// value): only snapshot views have them.
    pub fn copy_order(&self, offset: u64, len: u64) -> std::result::Result<Vec<(u64, u32)>, String> {
        match &self.meta {
            MetaSource::Snapshot(snap, _) => fleece_backup::order::hints(snap, offset, len)
                .map(|runs| runs.into_iter().map(|(n, h)| (n, h as u32)).collect())
                .map_err(|e| e.to_string()),
            MetaSource::Live(_) => Err("fleece:copy-order is only offered on snapshot views".into()),
        }
    }

    /// The bitmaps a client may ask for: inconsistent ones are left out,
    /// as QEMU does not export them either.
    pub fn bitmap_names(&self) -> Vec<String> {
        match &self.meta {
            MetaSource::Live(live) => live
                .bitmaps()
                .iter()
                .filter(|b| b.is_consistent() && !is_hidden(b.name()))
                .map(|b| b.name().to_string())
                .collect(),
            MetaSource::Snapshot(_, b) => b.iter().cloned().collect(),
        }
    }
}

/// A disk: an image served read-write under its own name.
pub struct Disk {
    /// Name (also its export name).
    pub name: String,
    /// The open image: its device, its path as given, its file's device and
    /// inode (one file is served under one name), locks, length, resize.
    pub image: Image,
    /// Copy-before-write layer in front of the image; what clients write.
    pub live: Arc<LiveDisk>,
    /// The live export.
    pub export: Arc<Export>,
}

/// One snapshot of one disk.
pub struct SnapshotEntry {
    /// Disk name.
    pub disk: String,
    /// Snapshot name.
    pub name: String,
    /// The engine object.
    pub snap: Arc<Snapshot>,
    /// Its read-only export.
    pub export: Arc<Export>,
    /// Seconds since the epoch at the instant.
    pub created: u64,
    /// Bitmap it was scoped to, if any.
    pub bitmap: Option<String>,
    /// Most bytes a RAM store keeps in memory (after capping to the disk).
    pub memory_limit: Option<u64>,
    /// The daemon's subscription to the snapshot's events, held for as
    /// long as the entry lives.
    pub _subscription: Subscription,
}

#[derive(Default)]
struct Inner {
    disks: BTreeMap<String, Arc<Disk>>,
    exports: BTreeMap<String, Arc<Export>>,
    /// Snapshots by (disk, name).
    snapshots: BTreeMap<(String, String), Arc<SnapshotEntry>>,
    /// First disk added: what a client gets when it asks for export `""`.
    default: Option<String>,
}

/// What a removal took out of the registry.
pub struct Removed {
    /// The disk.
    pub disk: Arc<Disk>,
    /// Its snapshots.
    pub snapshots: Vec<Arc<SnapshotEntry>>,
    /// The names of every export that went: the disk's and its snapshots'.
    pub exports: Vec<String>,
}

/// All disks, snapshots and exports.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    /// Held by every change (disk add, remove and resize, transactions,
    /// snapshot deletes): never on the data path or by NBD handshakes.
    change: Mutex<()>,
}

/// True for names users cannot give (they start with '.'): the daemon's
/// own objects, such as a backup job's successor bitmaps, which no
/// listing shows and no command by name reaches.
pub fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Disk, snapshot and bitmap names: short, and safe in URIs and file names.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} name '{name}': use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

/// Splits `DISK@NAME`.
pub fn split_id(id: &str) -> Result<(&str, &str)> {
    id.split_once('@')
        .filter(|(d, n)| !d.is_empty() && !n.is_empty())
        .ok_or_else(|| Error::invalid(format!("'{id}' is not a snapshot id: use DISK@NAME")))
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Held by whoever changes the registry, for the whole change (checks,
    /// preparation, the instant): two changes never interleave.
    pub fn change(&self) -> MutexGuard<'_, ()> {
        self.change.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A disk by name.
    pub fn disk(&self, name: &str) -> Result<Arc<Disk>> {
        self.read()
            .disks
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("disk '{name}' does not exist")))
    }

    /// All disks, by name.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        self.read().disks.values().cloned().collect()
    }

    /// The disk serving the file with this device and inode, if any.
    pub fn disk_by_id(&self, id: (u64, u64)) -> Option<Arc<Disk>> {
        self.read().disks.values().find(|d| d.image.id() == id).cloned()
    }

    /// Every export.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.read().exports.values().cloned().collect()
    }

    /// An export by the name a client sent (`""` is the default disk).
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        let inner = self.read();
        let name = if name.is_empty() {
            inner.default.as_deref()?
        } else {
            name
        };
        inner.exports.get(name).cloned()
    }

    /// Runs `f` on an export while nothing can remove it: a removal either
    /// happens before (and `f` gets `None`) or after `f` returns.
    pub fn with_export<T>(&self, name: &str, f: impl FnOnce(Option<&Arc<Export>>) -> T) -> T {
        let inner = self.read();
        let name = if name.is_empty() {
            inner.default.as_deref().unwrap_or_default()
        } else {
            name
        };
        f(inner.exports.get(name))
    }

    /// Runs `f` while no client can attach to any export (the registry is
    /// locked for writing): what `f` checks of connections holds while it
    /// runs. Keep `f` short.
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _inner = self.write();
        f()
    }

    /// Names of a disk's snapshots.
    pub fn snapshot_names(&self, disk: &str) -> Vec<String> {
        self.read()
            .snapshots
            .keys()
            .filter(|(d, _)| d == disk)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// All snapshots, or one disk's.
    pub fn snapshots(&self, disk: Option<&str>) -> Vec<Arc<SnapshotEntry>> {
        self.read()
            .snapshots
            .values()
            .filter(|e| disk.is_none_or(|d| e.disk == d))
            .cloned()
            .collect()
    }

    /// One snapshot by `DISK@NAME`.
    pub fn snapshot(&self, id: &str) -> Result<Arc<SnapshotEntry>> {
        let (disk, name) = split_id(id)?;
        self.read()
            .snapshots
            .get(&(disk.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| Error::not_found(format!("snapshot '{id}' does not exist")))
    }

    /// Adds a disk and its export: refused if the name is taken or the same
    /// file is already served.
    pub fn insert_disk(&self, disk: Arc<Disk>) -> Result<()> {
        let mut inner = self.write();
        if inner.disks.contains_key(&disk.name) || inner.exports.contains_key(&disk.export.name) {
            return Err(Error::new(
                Kind::Exists,
                format!("disk '{}' already exists", disk.name),
            ));
        }
        if let Some(other) = inner.disks.values().find(|d| d.image.id() == disk.image.id()) {
            return Err(Error::new(
                Kind::Exists,
                format!("image already served as disk '{}'", other.name),
            ));
        }
        inner
            .exports
            .insert(disk.export.name.clone(), disk.export.clone());
        if inner.default.is_none() {
            inner.default = Some(disk.name.clone());
        }
        inner.disks.insert(disk.name.clone(), disk);
        Ok(())
    }

    /// Adds a snapshot and its export: refused if its disk is gone or the
    /// name is taken.
    pub fn insert_snapshot(&self, entry: Arc<SnapshotEntry>) -> Result<()> {
        let mut inner = self.write();
        if !inner.disks.contains_key(&entry.disk) {
            return Err(Error::not_found(format!("disk '{}' does not exist", entry.disk)));
        }
        let key = (entry.disk.clone(), entry.name.clone());
        if inner.snapshots.contains_key(&key) || inner.exports.contains_key(&entry.export.name) {
            return Err(Error::new(
                Kind::Exists,
                format!("snapshot '{}' already exists", entry.export.name),
            ));
        }
        inner
            .exports
            .insert(entry.export.name.clone(), entry.export.clone());
        inner.snapshots.insert(key, entry);
        Ok(())
    }

    /// Takes a disk, its snapshots and their exports out, if `check`
    /// (given the export names and snapshot names) agrees. `check` runs
    /// under the registry lock: no client can attach to these exports
    /// between the check and the removal.
    pub fn remove_disk_if(
        &self,
        name: &str,
        check: impl FnOnce(&[String], &[String]) -> Result<()>,
    ) -> Result<Removed> {
        let mut inner = self.write();
        let disk = inner
            .disks
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("disk '{name}' does not exist")))?;
        let exports: Vec<String> = inner
            .exports
            .values()
            .filter(|e| e.disk == name)
            .map(|e| e.name.clone())
            .collect();
        let snaps: Vec<String> = inner
            .snapshots
            .keys()
            .filter(|(d, _)| d == name)
            .map(|(_, n)| n.clone())
            .collect();
        check(&exports, &snaps)?;
        let snapshots = snaps
            .iter()
            .filter_map(|s| inner.snapshots.remove(&(name.to_string(), s.clone())))
            .collect();
        inner.disks.remove(name);
        inner.exports.retain(|_, e| e.disk != name);
        if inner.default.as_deref() == Some(name) {
            inner.default = inner.disks.keys().next().cloned();
        }
        Ok(Removed {
            disk,
            snapshots,
            exports,
        })
    }

    /// Takes a snapshot and its export out, if `check` (given the export
    /// name) agrees; `check` runs under the registry lock.
    pub fn remove_snapshot_if(
        &self,
        disk: &str,
        name: &str,
        check: impl FnOnce(&str) -> Result<()>,
    ) -> Result<Arc<SnapshotEntry>> {
        let mut inner = self.write();
        let key = (disk.to_string(), name.to_string());
        let id = format!("{disk}@{name}");
        if !inner.snapshots.contains_key(&key) {
            return Err(Error::not_found(format!("snapshot '{id}' does not exist")));
        }
        check(&id)?;
        inner.exports.remove(&id);
        inner
            .snapshots
            .remove(&key)
            .ok_or_else(|| Error::not_found(format!("snapshot '{id}' does not exist")))
    }
}
