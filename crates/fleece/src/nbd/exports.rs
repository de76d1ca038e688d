//! How the registry's exports look to NBD clients: the catalog the
//! handshake asks, with sizes, flags, block sizes and metadata contexts.
//! Flags and block sizes come from the device's capabilities.

use fleece_block::Capabilities;
use fleece_nbd::consts::*;
use fleece_nbd::{Catalog, ExportInfo};

use super::access::{Access, AccessList};
use super::identity::Identity;
use crate::registry::{Export, MetaSource, Registry};

/// Largest payload of one request (reads and writes) that fleece takes,
/// whatever the device: the most an export advertises in
/// `NBD_INFO_BLOCK_SIZE`. Larger requests are refused or disconnected.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Prefix of dirty-bitmap metadata contexts (qemu's namespace).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Where in a backing chain each range is allocated, as qemu-nbd serves
/// it: 0 unallocated, N the depth of the image that holds it (1 for the
/// top). Offered only by exports whose device can tell
/// ([`Capabilities::allocation_depth`]).
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// fleece's copy-order hint on snapshot views (seed 004, item 7): per
/// range, which to copy first, as a push job does. Values (lower first):
/// 0 saved in memory (or the store is nearly full): copy it now and trim
/// it, which frees the store; 1 not yet saved: copying and trimming it
/// spares the live disk a copy-before-write; 2 saved in a store on disk;
/// 3 reads as zeroes; 4 not readable (trimmed, or outside the bitmap).
pub const COPY_ORDER: &str = "fleece:copy-order";

/// Transmission flags of an export whose device can do `caps`.
fn transmission_flags(caps: &Capabilities) -> u16 {
    let mut flags = TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if caps.read_only {
        // A snapshot view takes trim as "discard this part of the view".
        // Clients (libnbd, qemu) refuse to send trim to an export flagged
        // read-only, so, as with QEMU's writable snapshot-access export, a
        // discardable view leaves the flag off and the server refuses
        // writes itself with EPERM.
        if caps.trim {
            flags |= TF_SEND_TRIM;
        } else {
            flags |= TF_READ_ONLY;
        }
        return flags;
    }
    // Every writable device zeroes: one without a faster way writes zeroes.
    flags |= TF_SEND_WRITE_ZEROES;
    if caps.fua {
        flags |= TF_SEND_FUA;
    }
    if caps.trim {
        flags |= TF_SEND_TRIM;
    }
    if caps.fast_zero {
        flags |= TF_SEND_FAST_ZERO;
    }
    flags
}

/// The largest read or write an export of a device that can do `caps`
/// takes: the device's maximum transfer, capped by [`MAX_PAYLOAD`].
pub fn max_payload(caps: &Capabilities) -> u32 {
    caps.max_transfer.map_or(MAX_PAYLOAD, |m| m.clamp(1, MAX_PAYLOAD))
}

/// `NBD_INFO_BLOCK_SIZE` (minimum, preferred, maximum) of an export whose
/// device can do `caps`. NBD wants powers of two, a minimum of at most
/// 64 KiB, a preferred size of at least 512 and a maximum that is a
/// multiple of the minimum.
fn block_sizes(caps: &Capabilities) -> (u32, u32, u32) {
    let min = caps.min_io.clamp(1, 1 << 16);
    let max = (max_payload(caps) / min * min).max(min);
    let preferred = caps.preferred_io.max(min).max(512).min(max);
    (min, preferred, max)
}

/// What the handshake says of an export.
fn info(e: &Export) -> ExportInfo {
    let description = match e.meta {
        MetaSource::Snapshot(..) => format!("snapshot of disk {}", e.disk),
        MetaSource::Live(_) => format!("live disk {}", e.disk),
    };
    ExportInfo {
        name: e.name.clone(),
        description,
        size: e.dev.size(),
        flags: transmission_flags(&e.caps),
        block_sizes: block_sizes(&e.caps),
        contexts: std::iter::once(BASE_ALLOCATION.to_string())
            .chain(e.caps.allocation_depth.then(|| ALLOCATION_DEPTH.to_string()))
            .chain(matches!(e.meta, MetaSource::Snapshot(..)).then(|| COPY_ORDER.to_string()))
            .chain(
                e.bitmap_names()
                    .into_iter()
                    .map(|b| format!("{DIRTY_BITMAP_PREFIX}{b}")),
            )
            .collect(),
    }
}

impl Catalog for Registry {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports().iter().map(|e| info(e)).collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.export(name).map(|e| info(&e))
    }
}

/// The catalog as one client sees it: with an access list, only the
/// exports it may open, read-only ones flagged so.
pub struct ClientCatalog<'a> {
    /// Every export.
    pub registry: &'a Registry,
    /// The rules; `None`: everyone may do everything.
    pub access: Option<&'a AccessList>,
    /// Who the client is.
    pub who: &'a Identity,
}

impl ClientCatalog<'_> {
    /// What this client may do with export `name` (its canonical name).
    pub fn grant(&self, name: &str) -> Option<Access> {
        match self.access {
            None => Some(Access::ReadWrite),
            Some(acl) => acl.grant(self.who, name),
        }
    }
}

/// An export's flags for a client that may only read it: read-only, and
/// none of the write commands offered (a view's trim discards, so it goes
/// too).
fn read_only_flags(flags: u16) -> u16 {
    (flags | TF_READ_ONLY) & !(TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FUA | TF_SEND_FAST_ZERO)
}

impl Catalog for ClientCatalog<'_> {
    fn list(&self) -> Vec<ExportInfo> {
        self.registry
            .list()
            .into_iter()
            .filter(|e| self.grant(&e.name).is_some())
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let mut e = self.registry.lookup(name)?;
        if self.grant(&e.name) == Some(Access::ReadOnly) {
            e.flags = read_only_flags(e.flags);
        }
        Some(e)
    }

    fn permit(&self, name: &str) -> Result<(), String> {
        match self.grant(name) {
            Some(_) => Ok(()),
            None => {
                tracing::info!(client = %self.who, export = name, "access denied");
                Err(format!("{} may not open export '{name}'", self.who))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a raw file on ext4 or tmpfs can do.
    fn raw() -> Capabilities {
        Capabilities {
            trim: true,
            fast_zero: true,
            fua: true,
            ..Capabilities::default()
        }
    }

    #[test]
    fn a_raw_disk_gets_every_write_flag_and_the_usual_block_sizes() {
        let f = transmission_flags(&raw());
        for flag in [
            TF_SEND_FUA,
            TF_SEND_TRIM,
            TF_SEND_WRITE_ZEROES,
            TF_SEND_FAST_ZERO,
            TF_SEND_FLUSH,
        ] {
            assert_ne!(f & flag, 0, "{flag:#x} missing from {f:#x}");
        }
        assert_eq!(f & TF_READ_ONLY, 0);
        assert_eq!(block_sizes(&raw()), (1, 4096, MAX_PAYLOAD));
    }

    #[test]
    fn a_view_takes_trim_as_discard_and_so_is_not_flagged_read_only() {
        let view = Capabilities {
            read_only: true,
            trim: true,
            ..Capabilities::default()
        };
        let f = transmission_flags(&view);
        assert_ne!(f & TF_SEND_TRIM, 0);
        assert_eq!(
            f & (TF_READ_ONLY | TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO),
            0
        );
        let ro = Capabilities {
            read_only: true,
            ..Capabilities::default()
        };
        let f = transmission_flags(&ro);
        assert_ne!(f & TF_READ_ONLY, 0);
        assert_eq!(f & TF_SEND_TRIM, 0);
    }

    #[test]
    fn flags_and_sizes_follow_what_the_device_can_do() {
        let plain = Capabilities::default();
        let f = transmission_flags(&plain);
        assert_ne!(
            f & TF_SEND_WRITE_ZEROES,
            0,
            "zeroes are written when nothing faster exists"
        );
        assert_eq!(f & (TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_FAST_ZERO), 0);
        let aligned = Capabilities {
            min_io: 4096,
            preferred_io: 65536,
            max_transfer: Some(1 << 20),
            ..Capabilities::default()
        };
        assert_eq!(block_sizes(&aligned), (4096, 65536, 1 << 20));
        assert_eq!(max_payload(&aligned), 1 << 20);
        let huge = Capabilities {
            max_transfer: Some(u32::MAX),
            preferred_io: 1 << 30,
            ..Capabilities::default()
        };
        assert_eq!(block_sizes(&huge), (1, MAX_PAYLOAD, MAX_PAYLOAD));
    }
}
