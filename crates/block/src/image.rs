//! Opening an image: the one place that turns a path into a device.
//!
//! [`open`] finds the image's format and stacks the device that reads it on
//! the image file; the [`Image`] it returns serves that device and manages
//! the image as a file: QEMU-compatible locks ([`LockMode`]), its current
//! length (which another program may change), resize.
//!
//! Where a new format goes: a [`Format`] variant, its test in `detect`
//! (qcow2: the magic `QFI\xfb` at offset 0), a `Driver` arm that wraps the
//! image file (qcow2: imago over the [`RawFile`]), and its arm in
//! [`Image::resize`]. Locks and the length stay on the file whatever the
//! format, as in QEMU.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dev::BlockDev;
use crate::lock::LockMode;
use crate::raw::RawFile;
use crate::Result;

/// The format of an image's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// The bytes are the disk.
    Raw,
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
    };
    Ok(Image {
        path: path.to_path_buf(),
        id,
        driver,
        file,
        dev,
    })
}

/// The format of an image file's bytes.
fn detect(_file: &RawFile) -> Result<Format> {
    // Every image is raw until a format driver exists, as fleece has always
    // served it (a qcow2 file too, as its bytes). qcow2 goes here: read the
    // first 4 bytes, `QFI\xfb` -> Format::Qcow2.
    Ok(Format::Raw)
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
        }
    }

    /// Size of the disk.
    pub fn size(&self) -> u64 {
        self.dev.size()
    }

    /// Locks the image file the way QEMU does (see [`LockMode`]).
    pub fn lock(&self, mode: LockMode) -> Result<()> {
        self.file.lock(mode)
    }

    /// Releases the image file's locks, so another program may take the
    /// image at once, even while something still holds this image.
    pub fn unlock(&self) {
        self.file.unlock()
    }

    /// The image file's current length, which another program may have
    /// changed (see [`RawFile::file_len`]).
    pub fn file_len(&self) -> Result<u64> {
        self.file.file_len()
    }

    /// Changes the disk's size. The caller keeps I/O away (it freezes the
    /// disk). See [`RawFile::resize`] for what fails how.
    pub fn resize(&self, size: u64) -> Result<()> {
        match self.driver {
            Driver::Raw => self.file.resize(size),
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
