//! Disks and the NBD exports that serve them.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use fleece_block::{BlockDev, LiveDisk, LockMode, RawFile};
use fleece_nbd::consts::*;
use fleece_nbd::{Catalog, ExportInfo};
use serde_json::json;

use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::nbd::Stream;
use crate::snapshots::SnapshotEntry;
use crate::state::StateDir;

/// Largest payload of one request (reads and writes), advertised in
/// `NBD_INFO_BLOCK_SIZE`. Larger requests are refused or disconnected.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// One NBD export: a device and how it may be used.
pub struct Export {
    /// Export name clients ask for.
    pub name: String,
    /// Disk this export belongs to.
    pub disk: String,
    /// What reads and writes go to.
    pub dev: Arc<dyn BlockDev>,
    /// Writes are refused.
    pub read_only: bool,
    /// Where `qemu:dirty-bitmap:` contexts come from.
    pub meta: MetaSource,
}

/// The dirty bitmaps an export shows as `qemu:dirty-bitmap:NAME`.
pub enum MetaSource {
    /// A live disk: its bitmaps as they are now.
    Live(Arc<LiveDisk>),
    /// A snapshot: the bitmap that scoped it, as of its instant.
    Snapshot(Arc<fleece_block::Snapshot>, Option<String>),
}

/// Prefix of dirty-bitmap metadata contexts (qemu's namespace).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

impl Export {
    /// Dirty/clean runs of bitmap `name` over the range, as (length,
    /// dirty), or why they cannot be given.
    pub fn bitmap_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Vec<(u64, bool)>, String> {
        match &self.meta {
            MetaSource::Live(live) => match live.bitmap(name) {
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

    /// The bitmaps offered as metadata contexts: inconsistent ones are not,
    /// as QEMU does not export them either.
    fn bitmap_names(&self) -> Vec<String> {
        match &self.meta {
            MetaSource::Live(live) => live
                .bitmaps()
                .iter()
                .filter(|b| b.is_consistent())
                .map(|b| b.name().to_string())
                .collect(),
            MetaSource::Snapshot(_, b) => b.iter().cloned().collect(),
        }
    }

    fn info(&self) -> ExportInfo {
        let mut flags = TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
        if self.read_only {
            // A snapshot view takes trim as "discard this part of the view".
            // Clients (libnbd, qemu) refuse to send trim to an export flagged
            // read-only, so, as with QEMU's writable snapshot-access export,
            // a discardable view leaves the flag off and the server refuses
            // writes itself with EPERM.
            if self.dev.capabilities().trim {
                flags |= TF_SEND_TRIM;
            } else {
                flags |= TF_READ_ONLY;
            }
        } else {
            flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        let description = if self.read_only {
            format!("snapshot of disk {}", self.disk)
        } else {
            format!("live disk {}", self.disk)
        };
        ExportInfo {
            name: self.name.clone(),
            description,
            size: self.dev.size(),
            flags,
            block_sizes: (1, 4096, MAX_PAYLOAD),
            contexts: std::iter::once(BASE_ALLOCATION.to_string())
                .chain(
                    self.bitmap_names()
                        .into_iter()
                        .map(|b| format!("{DIRTY_BITMAP_PREFIX}{b}")),
                )
                .collect(),
        }
    }
}

/// A disk: an image file served read-write under its own name.
pub struct Disk {
    /// Name (also its export name).
    pub name: String,
    /// Image path as given.
    pub path: PathBuf,
    /// Device and inode of the image: one file is served under one name.
    pub id: (u64, u64),
    /// The open image.
    pub file: Arc<RawFile>,
    /// Copy-before-write layer in front of the image; what clients write.
    pub live: Arc<LiveDisk>,
    /// The live export.
    pub export: Arc<Export>,
}

struct Conn {
    export: String,
    stream: Stream,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub(crate) disks: BTreeMap<String, Arc<Disk>>,
    pub(crate) exports: BTreeMap<String, Arc<Export>>,
    /// Snapshots by (disk, name).
    pub(crate) snapshots: BTreeMap<(String, String), Arc<SnapshotEntry>>,
    /// First disk added: what a client gets when it asks for export `""`.
    default: Option<String>,
}

/// All disks, snapshots and exports; shared by the NBD server and the
/// control API.
pub struct Registry {
    pub(crate) inner: RwLock<Inner>,
    conns: Mutex<HashMap<u64, Conn>>,
    /// Signalled whenever a connection goes away.
    conns_changed: Condvar,
    /// Held by every change of disks, snapshots and bitmaps (disk add,
    /// remove and resize, transactions, snapshot deletes): a name is checked
    /// and taken under it, so two requests cannot both take one, and nothing
    /// is attached to a disk before its name is settled. Never taken on the
    /// data path or by NBD handshakes.
    ops: Mutex<()>,
    next_conn: AtomicU64,
    /// The state directory (default stores, store records).
    pub(crate) state: Arc<StateDir>,
    /// Where snapshot events go.
    pub(crate) events: Events,
}

/// How long a removal waits for the connections it closes to finish their
/// in-flight requests, before it shuts their sockets completely.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Largest size `disk resize` accepts (64 PiB): more cannot be meant, and
/// some file systems would take it.
const MAX_DISK_SIZE: u64 = 1 << 56;
/// How long a removal waits for closed connections in all.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Disk and snapshot names: short, and safe in URIs and file names.
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

impl Registry {
    /// An empty registry.
    pub fn new(state: Arc<StateDir>, events: Events) -> Self {
        Registry {
            inner: RwLock::default(),
            conns: Mutex::default(),
            conns_changed: Condvar::new(),
            ops: Mutex::new(()),
            next_conn: AtomicU64::new(0),
            state,
            events,
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Serializes changes; see [`Registry::ops`](Self).
    pub(crate) fn ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the image at `path` and exports it as `name`.
    pub fn add_disk(&self, name: &str, path: &Path) -> Result<Arc<Disk>> {
        check_name("disk", name)?;
        let _ops = self.ops();
        if self.disk(name).is_ok() {
            return Err(Error::new(Kind::Exists, format!("disk '{name}' already exists")));
        }
        if path
            .file_name()
            .is_some_and(|f| f.to_string_lossy().contains(".fleece-bitmap-"))
        {
            return Err(Error::invalid(format!(
                "{} is a fleece bitmap file, not a disk image",
                path.display()
            )));
        }
        let file = RawFile::open(path, false).map_err(|e| Error::invalid(e.to_string()))?;
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::invalid(format!("cannot stat {}: {e}", path.display())))?;
        let id = (meta.dev(), meta.ino());
        // Two names for one file would let writes through one name skip the
        // other's snapshots and bitmaps.
        if let Some(other) = self.disks().into_iter().find(|d| d.id == id) {
            return Err(Error::new(
                Kind::Exists,
                format!(
                    "{} is already served as disk '{}' ({}): one image may be served under one name only",
                    path.display(),
                    other.name,
                    other.path.display()
                ),
            ));
        }
        file.lock(LockMode::ReadWrite).map_err(|e| {
            let kind = match e.kind() {
                fleece_block::ErrorKind::Locked => Kind::Busy,
                _ => Kind::InvalidArgument,
            };
            Error::new(kind, e.to_string())
        })?;
        let file = Arc::new(file);
        let live = Arc::new(LiveDisk::new(file.clone()));
        for b in crate::bitmaps::load_sidecars(path, fleece_block::BlockDev::size(&*file))? {
            live.add_bitmap(Arc::new(b));
        }
        let export = Arc::new(Export {
            name: name.to_string(),
            disk: name.to_string(),
            dev: live.clone(),
            read_only: false,
            meta: MetaSource::Live(live.clone()),
        });
        let disk = Arc::new(Disk {
            name: name.to_string(),
            path: path.to_path_buf(),
            id,
            file,
            live,
            export: export.clone(),
        });
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.disks.insert(name.to_string(), disk.clone());
        inner.exports.insert(name.to_string(), export);
        if inner.default.is_none() {
            inner.default = Some(name.to_string());
        }
        Ok(disk)
    }

    /// Stops exporting a disk. Without `force` it refuses while clients are
    /// connected or snapshots exist; with it, snapshots are deleted and
    /// connections closed after their in-flight requests. Returns once every
    /// connection to the disk and its snapshots is gone and the image is
    /// unlocked, so other programs may open it at once.
    pub fn remove_disk(&self, name: &str, force: bool) -> Result<Arc<Disk>> {
        let _ops = self.ops();
        let disk = self.disk(name)?;
        let (exports, entries) = {
            let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
            let exports: Vec<String> = inner
                .exports
                .values()
                .filter(|e| e.disk == name)
                .map(|e| e.name.clone())
                .collect();
            let active = self.active_connections(&exports);
            if active > 0 && !force {
                return Err(Error::new(
                    Kind::Busy,
                    format!("disk '{name}' has {active} open connection(s); use --force to close them"),
                ));
            }
            let snaps: Vec<String> = inner
                .snapshots
                .keys()
                .filter(|(d, _)| d == name)
                .map(|(_, n)| n.clone())
                .collect();
            if !snaps.is_empty() && !force {
                return Err(Error::new(
                    Kind::Busy,
                    format!(
                        "disk '{name}' has snapshots ({}); delete them or use --force",
                        snaps.join(", ")
                    ),
                ));
            }
            let entries: Vec<Arc<SnapshotEntry>> = snaps
                .iter()
                .filter_map(|s| inner.snapshots.remove(&(name.to_string(), s.clone())))
                .collect();
            inner.disks.remove(name);
            inner.exports.retain(|_, e| e.disk != name);
            if inner.default.as_deref() == Some(name) {
                inner.default = inner.disks.keys().next().cloned();
            }
            (exports, entries)
        };
        for e in &entries {
            disk.live.detach(&e.snap);
        }
        let closed = self.close_and_wait(&exports);
        for e in &entries {
            self.events.emit(
                "snapshot_deleted",
                serde_json::json!({ "snapshot": e.export.name }),
            );
        }
        if let Err(e) = fleece_block::BlockDev::flush(&*disk.file) {
            tracing::warn!(disk = name, error = %e, "flush on removal failed");
        }
        if !closed {
            // A connection stuck in I/O may still write: the image stays
            // locked until it is gone (its descriptor closes with the last
            // reference), so no other program writes it meanwhile.
            return Err(Error::new(
                Kind::Busy,
                format!(
                    "disk '{name}' is no longer exported, but some of its connections did not finish within \
                     {} s; its image stays locked until they do",
                    CLOSE_TIMEOUT.as_secs()
                ),
            ));
        }
        disk.file.unlock();
        Ok(disk)
    }

    /// Connections to these exports whose clients have not hung up. A
    /// client that closed its socket (its process may already have exited)
    /// is on its way out and does not count: the caller waits for it.
    pub(crate) fn active_connections(&self, exports: &[String]) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| exports.contains(&c.export) && !c.stream.peer_closed())
            .count()
    }

    /// Closes the connections to these exports after their in-flight
    /// requests and waits until they are gone (bounded: a client that never
    /// reads its replies is cut off after [`CLOSE_GRACE`]). False if some
    /// were still there after [`CLOSE_TIMEOUT`].
    pub(crate) fn close_and_wait(&self, exports: &[String]) -> bool {
        let start = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
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
                .conns_changed
                .wait_timeout(conns, step)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// A disk by name.
    pub fn disk(&self, name: &str) -> Result<Arc<Disk>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .disks
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("disk '{name}' does not exist")))
    }

    /// All disks, by name.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .disks
            .values()
            .cloned()
            .collect()
    }

    /// An export by the name a client sent (`""` is the default disk).
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let name = if name.is_empty() {
            inner.default.as_deref()?
        } else {
            name
        };
        inner.exports.get(name).cloned()
    }

    /// Looks up the export a client negotiated and counts the connection,
    /// in one step under the registry lock, so that a removal either sees
    /// the connection or the client finds the export gone (`None`).
    /// `size` is what the client was told in the handshake: a client told
    /// more than the export now has (it shrank meanwhile) is turned away,
    /// as its writes past the new end would fail under it.
    pub fn attach(&self, export: &str, size: u64, stream: Stream) -> Option<(Arc<Export>, u64)> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let name = if export.is_empty() {
            inner.default.as_deref()?
        } else {
            export
        };
        let e = inner.exports.get(name)?.clone();
        if size > e.dev.size() {
            return None;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Conn {
                export: e.name.clone(),
                stream,
            },
        );
        Some((e, id))
    }

    /// Forgets a closed connection.
    pub fn detach(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.remove(&id);
        self.conns_changed.notify_all();
    }

    /// Changes a disk's size: the image file and the export (new
    /// connections see the new size; open ones keep what they negotiated,
    /// as NBD has no way to tell them). Refused while snapshots exist: a
    /// snapshot is of one size. Shrinking cuts data off, so it needs
    /// `shrink`. Bitmaps follow: a grown range counts as changed.
    pub fn resize_disk(&self, name: &str, size: u64, shrink: bool) -> Result<Arc<Disk>> {
        let _ops = self.ops();
        let disk = self.disk(name)?;
        let snaps = self.snapshot_names(name);
        if !snaps.is_empty() {
            return Err(Error::new(
                Kind::Busy,
                format!(
                    "disk '{name}' has snapshots ({}): delete them before resizing",
                    snaps.join(", ")
                ),
            ));
        }
        if size == 0 || !size.is_multiple_of(512) || size > MAX_DISK_SIZE {
            return Err(Error::invalid(format!(
                "size {size} must be a positive multiple of 512 bytes, at most {}",
                crate::units::human(MAX_DISK_SIZE)
            )));
        }
        let old = fleece_block::BlockDev::size(&*disk.file);
        if size == old {
            return Ok(disk);
        }
        if size < old && !shrink {
            return Err(Error::invalid(format!(
                "shrinking disk '{name}' from {} to {} discards the data past {}: add --shrink (API: \"shrink\": true) if that is meant",
                crate::units::human(old),
                crate::units::human(size),
                crate::units::human(size)
            )));
        }
        if size < old {
            // NBD cannot tell a connected client that its disk shrank: its
            // next write past the new end would fail under it.
            let active = self.active_connections(std::slice::from_ref(&disk.export.name));
            if active > 0 {
                return Err(Error::new(
                    Kind::Busy,
                    format!(
                        "disk '{name}' has {active} open connection(s); disconnect them before shrinking it"
                    ),
                ));
            }
        }
        let res = {
            // No write may run while the size changes under it.
            let _frozen = disk.live.freeze();
            let res = disk.file.resize(size);
            // Once the file has its new length (even if the sync after it
            // failed), the bitmaps follow.
            if fleece_block::BlockDev::size(&*disk.file) == size {
                for b in disk.live.bitmaps().iter() {
                    if let Err(e) = b.resize(size) {
                        b.mark_inconsistent(&format!("it could not follow a resize of its disk: {e}"));
                    }
                }
            }
            res
        };
        if let Err(e) = res {
            let kind = match e.kind() {
                fleece_block::ErrorKind::Invalid => Kind::InvalidArgument,
                _ => Kind::Internal,
            };
            return Err(Error::new(kind, e.to_string()));
        }
        tracing::info!(disk = name, old, size, "disk resized");
        self.events.emit(
            "disk_resized",
            json!({ "name": name, "old_size": old, "size": size }),
        );
        Ok(disk)
    }

    /// Number of open connections in transmission.
    pub fn connection_count(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Connections whose clients have not hung up, over all exports (what
    /// status shows: a client that has just exited no longer counts).
    pub fn active_connection_count(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| !c.stream.peer_closed())
            .count()
    }

    /// Asks every connection to stop reading requests; each finishes what is
    /// in flight and closes.
    pub fn close_all_connections(&self) {
        for c in self.conns.lock().unwrap_or_else(|p| p.into_inner()).values() {
            c.stream.shutdown_read();
        }
    }

    /// Flushes every disk (shutdown path).
    pub fn flush_all(&self) {
        for d in self.disks() {
            if let Err(e) = fleece_block::BlockDev::flush(&*d.file) {
                tracing::error!(disk = %d.name, error = %e, "flush failed");
            }
        }
    }
}

impl Catalog for Registry {
    fn list(&self) -> Vec<ExportInfo> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.exports.values().map(|e| e.info()).collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.export(name).map(|e| e.info())
    }
}
