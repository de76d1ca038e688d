//! Dirty bitmaps of a disk: where their sidecar files live, loading them
//! with the disk, and making new ones (for the `txn` engine, which applies
//! every change to bitmaps).

use std::path::{Path, PathBuf};

use fleece_block::NamedBitmap;

use crate::error::{Error, Kind, Result};
use crate::registry::{check_name, Disk};
use crate::units::Size;

/// Default bitmap granularity.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// Sidecar file of bitmap `name` of the image at `image`.
pub fn sidecar_path(image: &Path, name: &str) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(format!(".fleece-bitmap-{name}"));
    PathBuf::from(s)
}

/// True if `path` names a bitmap sidecar file rather than an image.
pub fn is_sidecar(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|f| f.to_string_lossy().contains(".fleece-bitmap-"))
}

/// Loads every persistent bitmap saved beside an image.
pub fn load_sidecars(image: &Path, size: u64) -> Result<Vec<NamedBitmap>> {
    let dir = match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(file) = image.file_name().map(|f| f.to_string_lossy().into_owned()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{file}.fleece-bitmap-");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    paths.sort();
    for p in paths {
        // The file name says which bitmap it is; a copy or a renamed file
        // (`...-b2.bak`) is not a second `b2`, and is left alone.
        let fname = p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = &fname[prefix.len()..];
        if check_name("bitmap", name).is_err() || out.iter().any(|b: &NamedBitmap| b.name() == name) {
            tracing::warn!(file = %p.display(), "ignoring a file that is not a bitmap of this disk by its name");
            continue;
        }
        let b = match NamedBitmap::open_named(&p, size, name) {
            Ok(b) => b,
            Err(e)
                if e.kind() == fleece_block::ErrorKind::Invalid
                    && e.to_string().contains("file name says") =>
            {
                tracing::warn!(file = %p.display(), error = %e, "ignoring a bitmap file under another bitmap's name");
                continue;
            }
            Err(e) => return Err(Error::invalid(e.to_string())),
        };
        tracing::info!(
            bitmap = b.name(),
            dirty = b.bits().dirty_bytes(),
            exact = b.is_consistent(),
            "loaded dirty bitmap"
        );
        out.push(b);
    }
    Ok(out)
}

/// A new bitmap of disk `d`; a persistent one gets its sidecar file now
/// (refused if a file is there).
pub(crate) fn new_bitmap(
    d: &Disk,
    name: &str,
    granularity: u64,
    enabled: bool,
    persistent: bool,
) -> Result<NamedBitmap> {
    let size = d.image.size();
    let path = sidecar_path(d.image.path(), name);
    // Nothing is deleted while a transaction is only being checked: a file
    // there may be a bitmap that an earlier action removes (at the instant,
    // or never if the transaction fails), or someone's copy.
    if persistent && std::fs::symlink_metadata(&path).is_ok() {
        return Err(Error::new(
            Kind::Exists,
            format!(
                "a file already exists at {}: remove it, or pick another bitmap name \
                 (to empty a bitmap, clear it instead of removing and adding it)",
                path.display()
            ),
        ));
    }
    NamedBitmap::create(
        name,
        size,
        granularity,
        enabled,
        persistent.then_some(path.as_path()),
    )
    .map_err(|e| Error::new(Kind::Internal, e.to_string()))
}

/// Checks a bitmap granularity (default 64 KiB).
pub(crate) fn granularity(g: Option<Size>) -> Result<u64> {
    let g = g.map_or(DEFAULT_GRANULARITY, Size::bytes);
    if !g.is_power_of_two() || !(512..=(1 << 30)).contains(&g) {
        return Err(Error::invalid(format!(
            "granularity {g} must be a power of two from 512 bytes to 1 GiB"
        )));
    }
    Ok(g)
}
