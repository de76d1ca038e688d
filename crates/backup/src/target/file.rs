//! A raw image file as a target.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use fleece_block::{BlockDev, IoFlags, RawFile, ZeroFlags};

use super::Target;
use crate::error::{Error, ErrorKind, Result};

/// A raw image: created sparse if missing, else it must have the disk's
/// size. Zero ranges are punched out, so a full backup keeps holes where
/// the disk reads as zeroes. Written through fleece-block's [`RawFile`],
/// which also lets a copy from a raw disk run in the kernel
/// (`copy_file_range`, [`Target::device`]).
pub struct FileTarget {
    file: RawFile,
    path: PathBuf,
    size: u64,
    created: bool,
}

fn block_err(what: &str, path: &Path, e: fleece_block::Error) -> Error {
    let kind = match e.kind() {
        fleece_block::ErrorKind::Invalid => ErrorKind::Invalid,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what} {}: {e}", path.display()))
}

impl FileTarget {
    /// Opens or creates `path` for a disk of `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<FileTarget> {
        let label = path.display();
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(ErrorKind::Io, format!("cannot stat {label}"), e)),
        };
        let Some(meta) = meta else {
            let file = RawFile::create_new(path, size).map_err(|e| block_err("cannot create", path, e))?;
            return Ok(FileTarget {
                file,
                path: path.to_path_buf(),
                size,
                created: true,
            });
        };
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("{label} is neither a file nor a block device"),
            ));
        }
        let file = RawFile::open(path, false).map_err(|e| block_err("cannot open", path, e))?;
        let len = file.size();
        if len != size {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "{label} has {len} bytes but the disk has {size}: give a new path, or an image of the disk's size"
                ),
            ));
        }
        Ok(FileTarget {
            file,
            path: path.to_path_buf(),
            size,
            created: false,
        })
    }
}

impl Target for FileTarget {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> u64 {
        4096
    }
    fn known_zero(&self) -> bool {
        self.created
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_at(data, offset, IoFlags::NONE)
            .map_err(|e| block_err("cannot write", &self.path, e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let flags = ZeroFlags {
            may_unmap: true,
            ..ZeroFlags::default()
        };
        self.file
            .write_zeroes(offset, len, flags)
            .map_err(|e| block_err("cannot zero a range of", &self.path, e))
    }
    fn flush(&self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| block_err("cannot sync", &self.path, e))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_at(buf, offset, IoFlags::NONE)
            .map_err(|e| block_err("cannot read", &self.path, e))
    }
    fn device(&self) -> Option<&dyn BlockDev> {
        Some(&self.file)
    }
    fn abandon(&self) {
        if self.created {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a partial backup");
            }
        }
    }
}
