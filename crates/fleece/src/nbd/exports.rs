//! How the registry's exports look to NBD clients: the catalog the
//! handshake asks, with sizes, flags, block sizes and metadata contexts.

use fleece_nbd::consts::*;
use fleece_nbd::{Catalog, ExportInfo};

use crate::registry::{Export, Registry};

/// Largest payload of one request (reads and writes), advertised in
/// `NBD_INFO_BLOCK_SIZE`. Larger requests are refused or disconnected.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Prefix of dirty-bitmap metadata contexts (qemu's namespace).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// What the handshake says of an export.
fn info(e: &Export) -> ExportInfo {
    let mut flags = TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if e.read_only {
        // A snapshot view takes trim as "discard this part of the view".
        // Clients (libnbd, qemu) refuse to send trim to an export flagged
        // read-only, so, as with QEMU's writable snapshot-access export, a
        // discardable view leaves the flag off and the server refuses
        // writes itself with EPERM.
        if e.dev.capabilities().trim {
            flags |= TF_SEND_TRIM;
        } else {
            flags |= TF_READ_ONLY;
        }
    } else {
        flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    let description = if e.read_only {
        format!("snapshot of disk {}", e.disk)
    } else {
        format!("live disk {}", e.disk)
    };
    ExportInfo {
        name: e.name.clone(),
        description,
        size: e.dev.size(),
        flags,
        block_sizes: (1, 4096, MAX_PAYLOAD),
        contexts: std::iter::once(BASE_ALLOCATION.to_string())
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
