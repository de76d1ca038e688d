//! Disks and the NBD exports that serve them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fleece_block::{BlockDev, LiveDisk, RawFile};
use fleece_nbd::consts::*;
use fleece_nbd::{Catalog, ExportInfo};
use serde_json::{json, Value};

use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::nbd::Stream;
use crate::snapshots::SnapshotEntry;

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
    /// Open connections, for status and removal.
    pub connections: AtomicUsize,
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
    /// Dirty/clean runs of bitmap `name` over the range, as (length, dirty).
    pub fn bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        match &self.meta {
            MetaSource::Live(live) => live.bitmap(name).map(|b| b.bits().extents(offset, len)),
            MetaSource::Snapshot(snap, Some(b)) if b == name => {
                snap.options().scope.as_ref().map(|s| s.extents(offset, len))
            }
            MetaSource::Snapshot(..) => None,
        }
    }

    fn bitmap_names(&self) -> Vec<String> {
        match &self.meta {
            MetaSource::Live(live) => live.bitmaps().iter().map(|b| b.name().to_string()).collect(),
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
    next_conn: AtomicU64,
    /// Where default snapshot stores go.
    pub(crate) state_dir: PathBuf,
    /// Where snapshot events go.
    pub(crate) events: Events,
}

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
    pub fn new(state_dir: PathBuf, events: Events) -> Self {
        Registry {
            inner: RwLock::default(),
            conns: Mutex::default(),
            next_conn: AtomicU64::new(0),
            state_dir,
            events,
        }
    }

    /// Opens the image at `path` and exports it as `name`.
    pub fn add_disk(&self, name: &str, path: &Path) -> Result<Arc<Disk>> {
        check_name("disk", name)?;
        if self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .disks
            .contains_key(name)
        {
            return Err(Error::new(Kind::Exists, format!("disk '{name}' already exists")));
        }
        let file = RawFile::open(path, false).map_err(|e| Error::invalid(e.to_string()))?;
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
            connections: AtomicUsize::new(0),
            meta: MetaSource::Live(live.clone()),
        });
        let disk = Arc::new(Disk {
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            live,
            export: export.clone(),
        });
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if inner.disks.contains_key(name) {
            return Err(Error::new(Kind::Exists, format!("disk '{name}' already exists")));
        }
        inner.disks.insert(name.to_string(), disk.clone());
        inner.exports.insert(name.to_string(), export);
        if inner.default.is_none() {
            inner.default = Some(name.to_string());
        }
        Ok(disk)
    }

    /// Stops exporting a disk. Without `force` it refuses while clients are
    /// connected; with it, their connections are closed after in-flight
    /// requests.
    pub fn remove_disk(&self, name: &str, force: bool) -> Result<Arc<Disk>> {
        let disk = self.disk(name)?;
        let conns = disk.export.connections.load(Ordering::SeqCst);
        if conns > 0 && !force {
            return Err(Error::new(
                Kind::Busy,
                format!("disk '{name}' has {conns} open connection(s); use --force to close them"),
            ));
        }
        let snaps = self.snapshot_names(name);
        if !snaps.is_empty() && !force {
            return Err(Error::new(
                Kind::Busy,
                format!(
                    "disk '{name}' has snapshots ({}); delete them or use --force",
                    snaps.join(", ")
                ),
            ));
        }
        for s in snaps {
            self.delete_snapshot(name, &s)?;
        }
        {
            let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
            inner.disks.remove(name);
            inner.exports.retain(|_, e| e.disk != name);
            if inner.default.as_deref() == Some(name) {
                inner.default = inner.disks.keys().next().cloned();
            }
        }
        self.close_connections_to(name);
        if let Err(e) = fleece_block::BlockDev::flush(&*disk.file) {
            tracing::warn!(disk = name, error = %e, "flush on removal failed");
        }
        Ok(disk)
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

    /// Remembers an open connection so that shutdown and forced removal can
    /// reach it; returns its id.
    pub fn register_conn(&self, export: &str, stream: Stream) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Conn {
                export: export.to_string(),
                stream,
            },
        );
        id
    }

    /// Forgets a closed connection.
    pub fn unregister_conn(&self, id: u64) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Closes the connections to one export after their in-flight requests.
    pub fn close_connections_to(&self, export: &str) {
        for c in self.conns.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if c.export == export {
                c.stream.shutdown_read();
            }
        }
    }

    /// Number of open connections in transmission.
    pub fn connection_count(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
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

    /// JSON form of a disk for the control API.
    pub fn disk_json(&self, d: &Disk, nbd_uri: &dyn Fn(&str) -> String) -> Value {
        json!({
            "name": d.name,
            "path": d.path,
            "size": fleece_block::BlockDev::size(&*d.file),
            "export": d.export.name,
            "uri": nbd_uri(&d.export.name),
            "connections": d.export.connections.load(Ordering::SeqCst),
            "snapshots": self.snapshot_names(&d.name),
        })
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
