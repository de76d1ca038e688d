//! A raw image file as a target.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::Target;
use crate::error::{Error, ErrorKind, Result};

/// A raw image: created sparse if missing, else it must have the disk's
/// size. Zero ranges are punched out, so a full backup keeps holes where
/// the disk reads as zeroes.
pub struct FileTarget {
    file: File,
    path: PathBuf,
    size: u64,
    created: bool,
    /// Punching holes failed once (a file system without it): write zeroes.
    no_punch: AtomicBool,
}

impl FileTarget {
    /// Opens or creates `path` for a disk of `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<FileTarget> {
        let label = path.display();
        let (file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => {
                f.set_len(size)
                    .map_err(|e| Error::io(ErrorKind::Io, format!("cannot size {label}"), e))?;
                (f, true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(ErrorKind::Io, format!("cannot open {label}"), e))?;
                let meta = f
                    .metadata()
                    .map_err(|e| Error::io(ErrorKind::Io, format!("cannot stat {label}"), e))?;
                if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
                    return Err(Error::new(
                        ErrorKind::Invalid,
                        format!("{label} is neither a file nor a block device"),
                    ));
                }
                let len = if meta.file_type().is_block_device() {
                    block_device_size(&f)
                        .map_err(|e| Error::io(ErrorKind::Io, format!("cannot size {label}"), e))?
                } else {
                    meta.len()
                };
                if len != size {
                    return Err(Error::new(
                        ErrorKind::Invalid,
                        format!(
                            "{label} has {len} bytes but the disk has {size}: give a new path, or an image of the disk's size"
                        ),
                    ));
                }
                (f, false)
            }
            Err(e) => return Err(Error::io(ErrorKind::Io, format!("cannot create {label}"), e)),
        };
        Ok(FileTarget {
            file,
            path: path.to_path_buf(),
            size,
            created,
            no_punch: AtomicBool::new(false),
        })
    }

    fn io(&self, what: &str, e: io::Error) -> Error {
        Error::io(ErrorKind::Io, format!("{what} {}", self.path.display()), e)
    }
}

fn block_device_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0))
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
            .write_all_at(data, offset)
            .map_err(|e| self.io("cannot write", e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.no_punch.load(Ordering::Relaxed) {
            // SAFETY: plain syscall on a descriptor we own.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(self.io("cannot zero a range of", e));
            }
            self.no_punch.store(true, Ordering::Relaxed);
        }
        let zero = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64) as usize;
            self.write(offset + done, &zero[..n])?;
            done += n as u64;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io("cannot sync", e))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io("cannot read", e))
    }
    fn abandon(&self) {
        if self.created {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a partial backup");
            }
        }
    }
}
