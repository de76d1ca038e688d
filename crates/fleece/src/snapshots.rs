//! Snapshot lifecycle: create (for several disks at one instant), list,
//! delete, and their exports `DISK@NAME`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleece_block::{
    BlockDev, FileStore, IoHints, OnCbwError, Qcow2Store, RamStore, SnapshotEvent, SnapshotOptions,
    SnapshotView, Store,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clients::Clients;
use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::registry::{check_name, Disk, Export, MetaSource, Registry, SnapshotEntry};
use crate::state::{StateDir, StoreRecord};
use crate::units::{human, parse_size, Size};

/// Default copy unit.
const DEFAULT_CLUSTER: u64 = 64 << 10;

/// A checked snapshot request with its stores made.
pub(crate) struct PreparedSnapshot {
    pub(crate) req: CreateSnapshot,
    pub(crate) disks: Vec<Arc<Disk>>,
    stores: Vec<Box<dyn Store>>,
    opts: SnapshotOptions,
    memory_limit: Option<u64>,
}

/// Longest copy timeout that can be meant: a guest write waits that long.
const MAX_CBW_TIMEOUT_SECS: f64 = 3600.0;

/// A store and its record in the state directory. Fields drop in order:
/// the store (which removes its file) before the record of it.
struct Recorded {
    store: Box<dyn Store>,
    _record: StoreRecord,
}

impl Store for Recorded {
    fn granularity(&self) -> u64 {
        self.store.granularity()
    }
    fn save(&self, index: u64, cluster: u64, data: &[u8]) -> fleece_block::Result<()> {
        self.store.save(index, cluster, data)
    }
    fn load(&self, index: u64, cluster: u64, offset: u64, buf: &mut [u8]) -> fleece_block::Result<()> {
        self.store.load(index, cluster, offset, buf)
    }
    fn forget(&self, index: u64, cluster: u64) {
        self.store.forget(index, cluster)
    }
    fn describe(&self) -> (&'static str, Option<PathBuf>) {
        self.store.describe()
    }
    fn save_from(
        &self,
        index: u64,
        cluster: u64,
        src: &dyn BlockDev,
        offset: u64,
        len: u64,
    ) -> Option<fleece_block::Result<()>> {
        self.store.save_from(index, cluster, src, offset, len)
    }
    fn hints(&self) -> IoHints {
        self.store.hints()
    }
    fn holds_in_memory(&self, index: u64) -> bool {
        self.store.holds_in_memory(index)
    }
}

/// Bytes of memory this host has.
fn host_memory() -> Option<u64> {
    // SAFETY: sysconf reads system constants; no memory is passed.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page > 0).then(|| pages as u64 * page as u64)
}

/// Body of `POST /v1/snapshots` and of a `snapshot-create` action (also
/// what the CLI sends; re-exported as `api::types::CreateSnapshot`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a snapshot request object {\"disks\": [...], \"name\", ...}"
)]
pub struct CreateSnapshot {
    /// Disks that share the instant.
    pub disks: Vec<String>,
    /// Snapshot name.
    pub name: String,
    /// Copy unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<Size>,
    /// `file:PATH` or `ram:SIZE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Most bytes the store may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_limit: Option<Size>,
    /// Dirty bitmap scoping the snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// Discard what each read returned.
    #[serde(default)]
    pub read_once: bool,
    /// `break-guest-write` (default) or `break-snapshot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_cbw_error: Option<String>,
    /// Copy timeout in seconds (0 or absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cbw_timeout_secs: Option<f64>,
    /// Bitmap that starts recording at the instant (cleared if it exists);
    /// the scoping bitmap then stops recording.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotate: Option<String>,
}

enum StoreSpec {
    File(Option<PathBuf>),
    Qcow2(PathBuf),
    Ram(u64),
}

fn parse_store(s: &Option<String>) -> Result<StoreSpec> {
    match s.as_deref() {
        None | Some("") | Some("file") => Ok(StoreSpec::File(None)),
        Some(s) => {
            if let Some(p) = s.strip_prefix("file:") {
                Ok(StoreSpec::File(Some(PathBuf::from(p))))
            } else if let Some(p) = s.strip_prefix("qcow2:").filter(|p| !p.is_empty()) {
                Ok(StoreSpec::Qcow2(PathBuf::from(p)))
            } else if let Some(sz) = s.strip_prefix("ram:") {
                Ok(StoreSpec::Ram(parse_size(sz)?))
            } else {
                Err(Error::invalid(format!(
                    "store '{s}' must be file:PATH, qcow2:PATH or ram:SIZE"
                )))
            }
        }
    }
}

/// The snapshot service: prepares, takes and deletes snapshots.
pub struct Snapshots {
    registry: Arc<Registry>,
    clients: Arc<dyn Clients>,
    state: Arc<StateDir>,
    events: Events,
}

impl Snapshots {
    /// Snapshots of `registry`'s disks, with stores recorded in `state`.
    pub fn new(
        registry: Arc<Registry>,
        clients: Arc<dyn Clients>,
        state: Arc<StateDir>,
        events: Events,
    ) -> Self {
        Snapshots {
            registry,
            clients,
            state,
            events,
        }
    }

    /// Checks a snapshot request and makes its stores; nothing is visible
    /// until [`commit`](Self::commit) runs at the instant.
    /// Call with [`Registry::change`] held: the names checked free here stay
    /// free until the commit.
    pub(crate) fn prepare(&self, req: &CreateSnapshot) -> Result<PreparedSnapshot> {
        check_name("snapshot", &req.name)?;
        if req.disks.is_empty() {
            return Err(Error::invalid("name at least one disk to snapshot"));
        }
        let mut names = req.disks.clone();
        names.sort();
        names.dedup();
        if names.len() != req.disks.len() {
            return Err(Error::invalid("a disk is listed twice"));
        }
        let cluster = req.cluster_size.map_or(DEFAULT_CLUSTER, Size::bytes);
        if cluster == 0 || cluster > 64 << 20 || !cluster.is_power_of_two() {
            return Err(Error::invalid(format!(
                "cluster size {cluster} must be a power of two between 1 and 64 MiB"
            )));
        }
        let limit = req.store_limit.map(Size::bytes);
        if let Some(l) = limit.filter(|&l| l < cluster) {
            // Every copy would fail, and by default so would every write
            // to data on the live disk.
            return Err(Error::invalid(format!(
                "store limit {} is smaller than one cluster ({}): no copy could ever be saved",
                human(l),
                human(cluster)
            )));
        }
        let on_cbw_error = match req.on_cbw_error.as_deref() {
            None | Some("break-guest-write") => OnCbwError::BreakGuestWrite,
            Some("break-snapshot") => OnCbwError::BreakSnapshot,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "on_cbw_error '{other}' must be break-guest-write or break-snapshot"
                )))
            }
        };
        let timeout = match req.cbw_timeout_secs {
            None => None,
            Some(t) if t.is_finite() && (0.0..=MAX_CBW_TIMEOUT_SECS).contains(&t) => {
                (t > 0.0).then(|| Duration::from_secs_f64(t))
            }
            Some(t) => {
                return Err(Error::invalid(format!(
                    "cbw timeout {t} must be from 0 (no timeout) to {MAX_CBW_TIMEOUT_SECS} seconds: a guest write waits that long"
                )))
            }
        };
        let spec = parse_store(&req.store)?;
        if let (StoreSpec::File(Some(_)) | StoreSpec::Qcow2(_), true) = (&spec, names.len() > 1) {
            return Err(Error::invalid(
                "one store path cannot serve several disks; leave --store out to get one store per disk",
            ));
        }
        let disks = names
            .iter()
            .map(|n| self.registry.disk(n))
            .collect::<Result<Vec<_>>>()?;
        for d in &disks {
            if self
                .registry
                .snapshot(&format!("{}@{}", d.name, req.name))
                .is_ok()
            {
                return Err(Error::new(
                    Kind::Exists,
                    format!("snapshot '{}@{}' already exists", d.name, req.name),
                ));
            }
        }
        if let Some(b) = &req.bitmap {
            for d in &disks {
                if let Some(bm) = d.live.bitmap(b) {
                    if !bm.is_consistent() {
                        return Err(Error::invalid(format!(
                            "dirty bitmap '{b}' of disk '{}' is inconsistent ({}): it may have missed writes, so \
                             an incremental backup from it could miss data; take a full backup instead \
                             (snapshot without --bitmap, with --rotate to start a new bitmap)",
                            d.name,
                            bm.inconsistent_reason().unwrap_or_default()
                        )));
                    }
                }
            }
        }
        // A RAM budget past the disk's size can never be used: cap it. One
        // past the host's memory cannot be meant.
        let mut memory_limit = None;
        if let StoreSpec::Ram(budget) = spec {
            if budget == 0 {
                return Err(Error::invalid(
                    "a RAM store needs a size above 0 (ram:SIZE, e.g. ram:1G); for no memory use a file store",
                ));
            }
            let largest = disks.iter().map(|d| d.image.size()).max().unwrap_or(0);
            let capped = budget.min(largest);
            if let Some(mem) = host_memory() {
                if capped > mem {
                    return Err(Error::invalid(format!(
                        "ram:{} is more than this host's memory ({}); use a smaller size (the rest spills to a file) or a file store",
                        human(budget),
                        human(mem)
                    )));
                }
            }
            memory_limit = Some(capped);
        }
        // Stores are made before the instant: file creation must not stall writers.
        let dir = self.state.path().join("snapshots");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
        let mut stores: Vec<Box<dyn Store>> = Vec::new();
        for d in &disks {
            let size = d.image.size();
            let store: Box<dyn Store> = match &spec {
                StoreSpec::File(p) => {
                    let path = p
                        .clone()
                        .unwrap_or_else(|| dir.join(format!("{}@{}.store", d.name, req.name)));
                    let mut record = self.state.record_store(&path, size)?;
                    let store = FileStore::create(&path, size).map_err(|e| Error::invalid(e.to_string()))?;
                    record.created();
                    Box::new(Recorded {
                        store: Box::new(store),
                        _record: record,
                    })
                }
                StoreSpec::Qcow2(path) => {
                    let mut record = self.state.record_qcow2_store(path, size)?;
                    let store =
                        Qcow2Store::create(path, size, cluster).map_err(|e| Error::invalid(e.to_string()))?;
                    record.created();
                    Box::new(Recorded {
                        store: Box::new(store),
                        _record: record,
                    })
                }
                StoreSpec::Ram(_) => {
                    let spill = dir.join(format!("{}@{}.spill", d.name, req.name));
                    let record = self.state.record_store(&spill, size)?;
                    Box::new(Recorded {
                        store: Box::new(RamStore::new(memory_limit.unwrap_or(0).min(size), spill, size)),
                        _record: record,
                    })
                }
            };
            stores.push(store);
        }
        let opts = SnapshotOptions {
            cluster_size: cluster,
            on_cbw_error,
            cbw_timeout: timeout,
            read_once: req.read_once,
            store_limit: limit,
            scope: None,
            label: String::new(),
        };
        Ok(PreparedSnapshot {
            req: req.clone(),
            disks,
            stores,
            opts,
            memory_limit,
        })
    }

    /// Makes the snapshots of a prepared request. Call with every disk of
    /// the request frozen: this is the instant.
    pub(crate) fn commit(&self, p: PreparedSnapshot) -> Vec<Arc<SnapshotEntry>> {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let req = &p.req;
        let mut out = Vec::new();
        for (d, store) in p.disks.iter().zip(p.stores) {
            let mut opts = p.opts.clone();
            let id = format!("{}@{}", d.name, req.name);
            opts.label = id.clone();
            // The bitmap as of the instant scopes the snapshot.
            opts.scope = req
                .bitmap
                .as_ref()
                .and_then(|b| d.live.bitmap(b))
                .map(|b| b.bits().clone());
            let snap = d.live.snapshot(store, opts);
            let events = self.events.clone();
            let sid = id.clone();
            let subscription = snap.subscribe(move |ev| match ev {
                SnapshotEvent::Broken(why) => {
                    events.emit("snapshot_broken", json!({ "snapshot": sid, "error": why }))
                }
                SnapshotEvent::StoreUsage { percent, used, limit } => events.emit(
                    "store_usage",
                    json!({ "snapshot": sid, "percent": percent, "used_bytes": used, "limit_bytes": limit }),
                ),
                _ => {}
            });
            let export = Arc::new(Export::new(
                &id,
                &d.name,
                Arc::new(SnapshotView(snap.clone())),
                MetaSource::Snapshot(snap.clone(), req.bitmap.clone()),
            ));
            let entry = Arc::new(SnapshotEntry {
                disk: d.name.clone(),
                name: req.name.clone(),
                snap,
                export: export.clone(),
                created,
                bitmap: req.bitmap.clone(),
                memory_limit: p.memory_limit.map(|m| m.min(d.image.size())),
                _subscription: subscription,
            });
            // The name was checked free under the same hold of the
            // registry's change lock: this cannot clash.
            if let Err(e) = self.registry.insert_snapshot(entry.clone()) {
                tracing::error!(snapshot = %id, error = %e, "snapshot taken but not registered");
                d.live.detach(&entry.snap);
                continue;
            }
            out.push(entry);
        }
        out
    }

    /// Deletes a snapshot: its export goes away, its clients are
    /// disconnected after their in-flight requests, and its store is freed
    /// once the last of them is gone. Without `force` it refuses while
    /// clients are connected to the view (a backup may be reading it).
    pub fn delete(&self, disk: &str, name: &str, force: bool) -> Result<()> {
        let _change = self.registry.change();
        let entry = self.registry.remove_snapshot_if(disk, name, |id| {
            let active = self.clients.active(&[id.to_string()]);
            if active > 0 && !force {
                return Err(Error::new(
                    Kind::Busy,
                    format!(
                        "snapshot '{id}' has {active} open connection(s), maybe a backup reading it; \
                         wait for it to finish, or use --force to close them"
                    ),
                ));
            }
            Ok(())
        })?;
        let id = entry.export.name.clone();
        if let Ok(d) = self.registry.disk(disk) {
            d.live.detach(&entry.snap);
        }
        let closed = self.clients.close_and_wait(std::slice::from_ref(&id));
        self.events.emit("snapshot_deleted", json!({ "snapshot": id }));
        if !closed {
            tracing::warn!(snapshot = %id, "deleted, but some of its connections are still closing; its store goes with the last of them");
        }
        Ok(())
    }
}
