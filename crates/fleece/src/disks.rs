//! Disks: opening an image and serving it, removing it, resizing it.

use std::path::Path;
use std::sync::Arc;

use fleece_block::{image, BlockDev, ImageOptions, LiveDisk, LockMode};
use serde_json::json;

use crate::bitmaps;
use crate::clients::Clients;
use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::registry::{check_name, Disk, Export, MetaSource, Registry};
use crate::units::human;

/// Largest size `disk resize` accepts (64 PiB): more cannot be meant, and
/// some file systems would take it.
const MAX_DISK_SIZE: u64 = 1 << 56;

/// The disk service.
pub struct Disks {
    registry: Arc<Registry>,
    clients: Arc<dyn Clients>,
    events: Events,
}

impl Disks {
    /// Disks of `registry`, whose clients `clients` knows.
    pub fn new(registry: Arc<Registry>, clients: Arc<dyn Clients>, events: Events) -> Self {
        Disks {
            registry,
            clients,
            events,
        }
    }

    /// Opens the image at `path` (in `format`, `raw` or `qcow2`, or the
    /// one the image factory finds; locked as QEMU locks its images, a
    /// qcow2 backing chain read-only) and exports it as `name`, with the
    /// dirty bitmaps saved beside it.
    pub fn add(&self, name: &str, path: &Path, format: Option<&str>) -> Result<Arc<Disk>> {
        check_name("disk", name)?;
        let format = format.map(crate::config::check_format).transpose()?;
        let _change = self.registry.change();
        if self.registry.disk(name).is_ok() {
            return Err(Error::new(Kind::Exists, format!("disk '{name}' already exists")));
        }
        if bitmaps::is_sidecar(path) {
            return Err(Error::invalid(format!(
                "{} is a fleece bitmap file, not a disk image",
                path.display()
            )));
        }
        let opts = ImageOptions {
            read_only: false,
            format,
        };
        let image = image::open(path, &opts).map_err(|e| Error::invalid(e.to_string()))?;
        // Two names for one file would let writes through one name skip the
        // other's snapshots and bitmaps.
        if let Some(other) = self.registry.disk_by_id(image.id()) {
            return Err(Error::new(
                Kind::Exists,
                format!(
                    "{} is already served as disk '{}' ({}): one image may be served under one name only",
                    path.display(),
                    other.name,
                    other.image.path().display()
                ),
            ));
        }
        image.lock(LockMode::ReadWrite).map_err(|e| {
            let kind = match e.kind() {
                fleece_block::ErrorKind::Locked => Kind::Busy,
                _ => Kind::InvalidArgument,
            };
            Error::new(kind, e.to_string())
        })?;
        match image.prepare_for_serving() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                disk = name,
                tables = n,
                "made the qcow2 image's missing L2 tables"
            ),
            Err(e) => {
                image.unlock();
                return Err(Error::invalid(e.to_string()));
            }
        }
        let live = Arc::new(LiveDisk::new(image.device().clone()));
        for b in bitmaps::load_sidecars(path, image.size())? {
            live.add_bitmap(Arc::new(b));
        }
        let export = Arc::new(Export::new(
            name,
            name,
            live.clone(),
            MetaSource::Live(live.clone()),
        ));
        let disk = Arc::new(Disk {
            name: name.to_string(),
            image,
            live,
            export,
        });
        self.registry.insert_disk(disk.clone())?;
        Ok(disk)
    }

    /// Stops exporting a disk. Without `force` it refuses while clients are
    /// connected or snapshots exist; with it, snapshots are deleted and
    /// connections closed after their in-flight requests. Returns once every
    /// connection to the disk and its snapshots is gone and the image is
    /// unlocked, so other programs may open it at once.
    pub fn remove(&self, name: &str, force: bool) -> Result<Arc<Disk>> {
        let _change = self.registry.change();
        let removed = self.registry.remove_disk_if(name, |exports, snaps| {
            let active = self.clients.active(exports);
            if active > 0 && !force {
                return Err(Error::new(
                    Kind::Busy,
                    format!("disk '{name}' has {active} open connection(s); use --force to close them"),
                ));
            }
            if !snaps.is_empty() && !force {
                return Err(Error::new(
                    Kind::Busy,
                    format!(
                        "disk '{name}' has snapshots ({}); delete them or use --force",
                        snaps.join(", ")
                    ),
                ));
            }
            Ok(())
        })?;
        let disk = removed.disk;
        for e in &removed.snapshots {
            disk.live.detach(&e.snap);
        }
        let closed = self.clients.close_and_wait(&removed.exports);
        for e in &removed.snapshots {
            self.events
                .emit("snapshot_deleted", json!({ "snapshot": e.export.name }));
        }
        // Through the top of the stack: whatever a layer above the image
        // holds back is flushed too.
        if let Err(e) = disk.live.flush() {
            tracing::warn!(disk = name, error = %e, "flush on removal failed");
        }
        if !closed {
            // A connection stuck in I/O may still write: the image stays
            // locked until it is gone (its descriptor closes with the last
            // reference), so no other program writes it meanwhile.
            return Err(Error::new(
                Kind::Busy,
                format!(
                    "disk '{name}' is no longer exported, but some of its connections did not finish in \
                     time; its image stays locked until they do"
                ),
            ));
        }
        disk.image.unlock();
        Ok(disk)
    }

    /// Changes a disk's size: the image file and the export (new
    /// connections see the new size; open ones keep what they negotiated,
    /// as NBD has no way to tell them). Refused while snapshots exist: a
    /// snapshot is of one size. Shrinking cuts data off, so it needs
    /// `shrink`, and no client may be connected. Bitmaps follow: a grown
    /// range counts as changed.
    pub fn resize(&self, name: &str, size: u64, shrink: bool) -> Result<Arc<Disk>> {
        let _change = self.registry.change();
        let disk = self.registry.disk(name)?;
        let snaps = self.registry.snapshot_names(name);
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
                human(MAX_DISK_SIZE)
            )));
        }
        let old = disk.image.size();
        if size == old {
            return Ok(disk);
        }
        if size < old && !shrink {
            return Err(Error::invalid(format!(
                "shrinking disk '{name}' from {} to {} discards the data past {}: add --shrink (API: \"shrink\": true) if that is meant",
                human(old),
                human(size),
                human(size)
            )));
        }
        let apply = || {
            // No write may run while the size changes under it.
            let _frozen = disk.live.freeze();
            let res = disk.image.resize(size);
            // Once the file has its new length (even if the sync after it
            // failed), the bitmaps follow.
            if disk.image.size() == size {
                for b in disk.live.bitmaps().iter() {
                    if let Err(e) = b.resize(size) {
                        b.mark_inconsistent(&format!("it could not follow a resize of its disk: {e}"));
                    }
                }
            }
            res
        };
        let res = if size < old {
            // NBD cannot tell a connected client that its disk shrank: its
            // next write past the new end would fail under it. Checked and
            // done while no client can attach.
            self.registry.exclusive(|| {
                let active = self.clients.active(std::slice::from_ref(&disk.export.name));
                if active > 0 {
                    return Err(Error::new(
                        Kind::Busy,
                        format!(
                            "disk '{name}' has {active} open connection(s); disconnect them before shrinking it"
                        ),
                    ));
                }
                Ok(apply())
            })?
        } else {
            apply()
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

    /// Flushes every disk (shutdown path).
    pub fn flush_all(&self) {
        for d in self.registry.disks() {
            if let Err(e) = d.live.flush() {
                tracing::error!(disk = %d.name, error = %e, "flush failed");
            }
        }
    }
}
