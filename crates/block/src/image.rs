//! Opening an image: the one place that turns a path into a device.
//!
//! [`open`] finds the image's format and stacks the device that reads it on
//! the image file; the [`Image`] it returns serves that device and manages
//! the image as a file: QEMU-compatible locks ([`LockMode`]), its current
//! length (which another program may change), resize.
//!
//! Formats: raw (the file is the disk) and qcow2 ([`Qcow2Dev`], imago over
//! the image file and its backing chain). Where a new format goes: a
//! [`Format`] variant, its test in `detect`, a `Driver` arm that wraps the
//! image file, and its arms in [`Image::resize`] and [`create`]. Locks and
//! the length stay on the file whatever the format, as in QEMU; a qcow2
//! image's backing files are locked read-only ([`Image::lock`]) and never
//! written.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dev::BlockDev;
use crate::lock::LockMode;
use crate::qcow2::{self, Qcow2Dev, Qcow2Options};
use crate::raw::RawFile;
use crate::{Error, ErrorKind, Result};

/// The format of an image's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// The bytes are the disk.
    Raw,
    /// QEMU's copy-on-write format (through imago).
    Qcow2,
}

impl Format {
    /// Its name, as QEMU spells it: `raw`, `qcow2`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::new(
                ErrorKind::Invalid,
                format!("format '{s}' is unknown: use raw or qcow2"),
            )),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageOptions {
    /// Open for reading only.
    pub read_only: bool,
    /// The format, or `None` to detect it.
    pub format: Option<Format>,
}

/// What reads the image file's bytes as a disk.
enum Driver {
    /// The file is the disk.
    Raw,
    /// imago reads the file (and its backing chain) as qcow2.
    Qcow2(Arc<Qcow2Dev>),
}

/// An open image: its device, and the image file under it.
pub struct Image {
    path: PathBuf,
    id: (u64, u64),
    driver: Driver,
    /// The image file: locks and length are the file's, whatever the
    /// format.
    file: Arc<RawFile>,
    /// What reads and writes go to.
    dev: Arc<dyn BlockDev>,
}

/// Opens the image at `path`, unlocked: the caller checks that it does not
/// serve this file already (OFD locks conflict within one process too, with
/// a less clear message), then [`lock`](Image::lock)s it.
pub fn open(path: &Path, options: &ImageOptions) -> Result<Image> {
    let file = Arc::new(RawFile::open(path, options.read_only)?);
    let id = file.id()?;
    let format = match options.format {
        Some(f) => f,
        None => detect(&file)?,
    };
    let (driver, dev): (Driver, Arc<dyn BlockDev>) = match format {
        Format::Raw => (Driver::Raw, file.clone()),
        Format::Qcow2 => {
            let q = Arc::new(Qcow2Dev::open(file.clone(), path, options.read_only)?);
            (Driver::Qcow2(q.clone()), q)
        }
    };
    Ok(Image {
        path: path.to_path_buf(),
        id,
        driver,
        file,
        dev,
    })
}

/// The format of an image file's bytes: qcow2 by its magic (`QFI\xfb`),
/// raw otherwise.
fn detect(file: &RawFile) -> Result<Format> {
    if qcow2::header::is_qcow2(file.std_file())? {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// The format of the image at `path` (qcow2 by its magic, raw otherwise).
pub fn detect_path(path: &Path) -> Result<Format> {
    detect(&RawFile::open(path, true)?)
}

/// How to create an image ([`create`]).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// The format.
    pub format: Format,
    /// Size of the disk; with a backing file, `None` takes its size.
    pub size: Option<u64>,
    /// qcow2: bytes per cluster (a power of two, 512 B to 2 MiB; 64 KiB if
    /// `None`).
    pub cluster_size: Option<u64>,
    /// qcow2: the backing file, as written into the header: relative to
    /// the new image's directory, or absolute. Its format is detected.
    pub backing: Option<String>,
}

/// Creates an image at `path`, which must not exist: a sparse raw file,
/// or a qcow2 image (optionally over a backing file, which is only read).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let refuse = |msg: &str| Err(Error::new(ErrorKind::Invalid, msg.to_string()));
    match opts.format {
        Format::Raw => {
            if opts.backing.is_some() {
                return refuse("a raw image has no backing file: use --format qcow2");
            }
            if opts.cluster_size.is_some() {
                return refuse("a raw image has no cluster size: use --format qcow2");
            }
            let Some(size) = opts.size else {
                return refuse("a raw image needs a size");
            };
            RawFile::create_new(path, size).map(drop)
        }
        Format::Qcow2 => {
            let mut q = Qcow2Options {
                cluster_size: opts.cluster_size,
                backing: None,
            };
            let mut size = opts.size;
            if let Some(name) = &opts.backing {
                let bpath = qcow2::backing_path(path, name);
                let base = open(
                    &bpath,
                    &ImageOptions {
                        read_only: true,
                        format: None,
                    },
                )
                .map_err(|e| Error::new(e.kind(), format!("backing file {}: {e}", bpath.display())))?;
                size = size.or(Some(base.size()));
                q.backing = Some((name.clone(), base.format().name().to_string()));
            }
            let Some(size) = size else {
                return refuse("a qcow2 image without a backing file needs a size");
            };
            qcow2::create(path, size, &q)
        }
    }
}

impl Image {
    /// The device that serves the disk.
    pub fn device(&self) -> &Arc<dyn BlockDev> {
        &self.dev
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the image file: one file is one image.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        match self.driver {
            Driver::Raw => Format::Raw,
            Driver::Qcow2(_) => Format::Qcow2,
        }
    }

    /// Size of the disk.
    pub fn size(&self) -> u64 {
        self.dev.size()
    }

    /// Locks the image file the way QEMU does (see [`LockMode`]), and a
    /// qcow2 image's backing files read-only, as QEMU locks a chain: other
    /// programs may read them but not change them meanwhile. Locks already
    /// taken are released if a later one fails.
    pub fn lock(&self, mode: LockMode) -> Result<()> {
        self.file.lock(mode)?;
        for f in self.backing_files() {
            if let Err(e) = f.lock(LockMode::ReadOnly) {
                self.unlock();
                return Err(Error::new(
                    e.kind(),
                    format!("backing file {}: {e}", f.path().display()),
                ));
            }
        }
        Ok(())
    }

    /// Releases the locks of the image file (and its backing files), so
    /// another program may take the image at once, even while something
    /// still holds this image.
    pub fn unlock(&self) {
        self.file.unlock();
        for f in self.backing_files() {
            f.unlock();
        }
    }

    /// A qcow2 image's backing chain, top-down; empty for raw images.
    pub fn backing_files(&self) -> &[Arc<RawFile>] {
        match &self.driver {
            Driver::Raw => &[],
            Driver::Qcow2(q) => q.backing_files(),
        }
    }

    /// The image file's current length, which another program may have
    /// changed (see [`RawFile::file_len`]). Only a raw image's length is
    /// its disk's size; a qcow2 file grows as clusters are allocated.
    pub fn file_len(&self) -> Result<u64> {
        self.file.file_len()
    }

    /// Gets the image ready to be served read-write so that a crash of the
    /// process cannot corrupt it: for qcow2, makes its missing L2 tables up
    /// front ([`Qcow2Dev::make_l2_tables`]); nothing for raw. Returns how
    /// many tables it made. Call after [`lock`](Self::lock), before I/O.
    pub fn prepare_for_serving(&self) -> Result<u64> {
        match &self.driver {
            Driver::Raw => Ok(0),
            Driver::Qcow2(q) => q.make_l2_tables(0),
        }
    }

    /// Changes the disk's size. The caller keeps I/O away (it freezes the
    /// disk). See [`RawFile::resize`] for what fails how; a qcow2 image
    /// only grows ([`Qcow2Dev::resize`]).
    pub fn resize(&self, size: u64) -> Result<()> {
        match &self.driver {
            Driver::Raw => self.file.resize(size),
            Driver::Qcow2(q) => q.resize(size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::IoFlags;
    use crate::ErrorKind;

    #[test]
    fn an_image_is_a_raw_device_over_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        RawFile::create(&p, 1 << 20).unwrap();
        let img = open(&p, &ImageOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Raw);
        assert_eq!(img.path(), p);
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(img.id(), (m.dev(), m.ino()));
        img.device().write_at(&[1u8; 512], 0, IoFlags::NONE).unwrap();
        img.resize(2 << 20).unwrap();
        assert_eq!((img.size(), img.file_len().unwrap()), (2 << 20, 2 << 20));
        img.lock(LockMode::ReadWrite).unwrap();
        img.unlock();
        let ro = open(
            &p,
            &ImageOptions {
                read_only: true,
                format: Some(Format::Raw),
            },
        )
        .unwrap();
        assert!(ro.device().capabilities().read_only);
        assert_eq!(ro.resize(1 << 20).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert!(open(dir.path(), &ImageOptions::default()).is_err(), "a directory");
    }
}
