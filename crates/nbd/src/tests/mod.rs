//! Unit tests from byte slices: each side alone, and both sides of this
//! crate talking to each other in memory.

mod client;
mod decoder;
mod decoder_props;
mod server;

use crate::consts::*;
use crate::*;

/// A server with one export, "disk" (also the default).
pub(super) struct OneExport;

pub(super) fn disk() -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        description: "a test disk".into(),
        size: 1 << 20,
        flags: TF_SEND_FLUSH | TF_SEND_DF,
        block_sizes: (1, 4096, 32 << 20),
        contexts: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:b0".into()],
    }
}

impl Catalog for OneExport {
    fn list(&self) -> Vec<ExportInfo> {
        vec![disk()]
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "disk" || name.is_empty()).then(disk)
    }
}
