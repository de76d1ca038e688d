//! A new qcow2 image as a target: `qcow2:PATH` for a full backup,
//! `qcow2:PATH,backing=PREV` for an incremental one whose backing file is
//! the previous backup, so that reading the newest image of the chain (with
//! `qemu-img convert`, or serving it) gives the disk at that instant.
//!
//! The image is made by the job (a qcow2 target is never an existing
//! file), through fleece-block's image factory, and written through its
//! qcow2 device: what is not written stays unallocated (zeroes in a full
//! backup, the previous backup's data in an incremental one); zero ranges
//! of an incremental backup become zero clusters, which hide the backing
//! data. The job's cluster is at least the image's, so no cluster is ever
//! half written.

use std::path::{Path, PathBuf};

use fleece_block::image::{self, CreateOptions};
use fleece_block::{BlockDev, Format, Image, ImageOptions, IoFlags, LockMode, ZeroFlags};

use super::Target;
use crate::error::{Error, ErrorKind, Result};

/// A qcow2 image the job created.
pub struct Qcow2Target {
    img: Image,
    path: PathBuf,
    spec: String,
    cluster: u64,
    backing: bool,
}

fn block_err(what: &str, e: fleece_block::Error) -> Error {
    let kind = match e.kind() {
        fleece_block::ErrorKind::Invalid | fleece_block::ErrorKind::NotSupported => ErrorKind::Invalid,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what}: {e}"))
}

/// `4096`, `64K`, `2M`.
fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl Qcow2Target {
    /// Parses `PATH[,backing=PREV][,cluster-size=SIZE]` (what follows
    /// `qcow2:`) and creates the image for a disk of `size` bytes.
    pub fn create(spec: &str, size: u64) -> Result<Qcow2Target> {
        let mut parts = spec.split(',');
        let path = PathBuf::from(parts.next().unwrap_or_default());
        let mut backing = None;
        let mut cluster_size = None;
        for p in parts {
            match p.split_once('=') {
                Some(("backing", b)) if !b.is_empty() => backing = Some(b.to_string()),
                Some(("cluster-size", c)) => {
                    cluster_size = Some(parse_size(c).ok_or_else(|| {
                        Error::new(ErrorKind::InvalidTarget, format!("qcow2 target: bad cluster size '{c}'"))
                    })?)
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidTarget,
                        format!("qcow2 target: unknown option '{p}' (use qcow2:PATH[,backing=PREV][,cluster-size=SIZE])"),
                    ))
                }
            }
        }
        if path.as_os_str().is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidTarget,
                "qcow2: needs a path (qcow2:PATH)",
            ));
        }
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "{} exists: a qcow2 backup is always a new image (for an incremental one, name the last backup with ,backing=)",
                    path.display()
                ),
            ));
        }
        if let Some(b) = &backing {
            check_backing(&path, b, size)?;
        }
        image::create(
            &path,
            &CreateOptions {
                format: Format::Qcow2,
                size: Some(size),
                cluster_size,
                backing: backing.clone(),
            },
        )
        .map_err(|e| block_err(&format!("cannot create {}", path.display()), e))?;
        let opened = image::open(
            &path,
            &ImageOptions {
                read_only: false,
                format: Some(Format::Qcow2),
            },
        )
        .and_then(|img| img.lock(LockMode::ReadWrite).map(|_| img));
        let img = match opened {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(block_err(&format!("cannot open {}", path.display()), e));
            }
        };
        let cluster = img.device().capabilities().preferred_io.max(512) as u64;
        Ok(Qcow2Target {
            img,
            spec: format!("qcow2:{spec}"),
            path,
            cluster,
            backing: backing.is_some(),
        })
    }

    fn dev(&self) -> &dyn BlockDev {
        &**self.img.device()
    }
}

/// The previous backup must read as a disk of the same size.
fn check_backing(path: &Path, name: &str, size: u64) -> Result<()> {
    let bpath = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        path.parent().unwrap_or(Path::new(".")).join(name)
    };
    let b = image::open(
        &bpath,
        &ImageOptions {
            read_only: true,
            format: None,
        },
    )
    .map_err(|e| block_err(&format!("backing file {}", bpath.display()), e))?;
    if b.size() != size {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "backing file {} is a disk of {} bytes, this one has {size}: name the previous backup of this disk",
                bpath.display(),
                b.size()
            ),
        ));
    }
    Ok(())
}

impl Target for Qcow2Target {
    fn describe(&self) -> String {
        self.spec.clone()
    }
    fn size(&self) -> u64 {
        self.img.size()
    }
    fn cluster_size(&self) -> u64 {
        self.cluster
    }
    fn known_zero(&self) -> bool {
        // Over a backing file, what is not written reads as the previous
        // backup, not as zeroes.
        !self.backing
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.dev()
            .write_at(data, offset, IoFlags::NONE)
            .map_err(|e| block_err(&format!("cannot write {}", self.path.display()), e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let flags = ZeroFlags {
            may_unmap: true,
            ..ZeroFlags::default()
        };
        self.dev()
            .write_zeroes(offset, len, flags)
            .map_err(|e| block_err(&format!("cannot zero {}", self.path.display()), e))
    }
    fn flush(&self) -> Result<()> {
        self.dev()
            .flush()
            .map_err(|e| block_err(&format!("cannot flush {}", self.path.display()), e))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.dev()
            .read_at(buf, offset, IoFlags::NONE)
            .map_err(|e| block_err(&format!("cannot read {}", self.path.display()), e))
    }
    fn abandon(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a partial backup");
        }
    }
}
