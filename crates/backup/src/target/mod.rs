//! Where a push job writes, behind one trait ([`Target`]) so that more
//! kinds can follow (qcow2, object storage):
//!
//! - [`file::FileTarget`]: a raw image file (`file:PATH`), created sparse
//!   if missing;
//! - [`qcow2::Qcow2Target`]: a new qcow2 image (`qcow2:PATH`), over the
//!   previous backup for an incremental one (`qcow2:PATH,backing=PREV`);
//! - [`remote::RemoteTarget`]: a remote NBD server (`nbd://`,
//!   `nbd+unix://`, over TLS `nbds://`, `nbds+unix://`) over
//!   [`nbd::NbdTarget`], which reconnects when asked.
//!
//! [`open`] turns a target string into one of them.

use std::time::Duration;

use fleece_block::BlockDev;

use crate::error::{Error, ErrorKind, Result};

pub mod file;
pub mod nbd;
pub mod qcow2;
pub mod remote;

/// A place a job copies a disk to. Every call may come from several
/// threads at once.
pub trait Target: Send + Sync {
    /// The target as the user named it, for messages.
    fn describe(&self) -> String;
    /// Size in bytes (the disk's).
    fn size(&self) -> u64;
    /// The unit the target writes without read-modify-write (a qcow2
    /// cluster, an NBD server's preferred block size): the job never writes
    /// less than whole units of it.
    fn cluster_size(&self) -> u64;
    /// True if every byte reads as zeroes now (made by this job, or found
    /// so): zero ranges need no write.
    fn known_zero(&self) -> bool;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes the range read as zeroes; it may be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes everything acknowledged so far durable.
    fn flush(&self) -> Result<()>;
    /// Reads back (the verify pass).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Connects again after [`ErrorKind::Disconnected`]; targets that
    /// cannot lose a connection say so.
    fn reconnect(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{}: cannot reconnect", self.describe()),
        ))
    }
    /// True if failures are worth retrying by default (a network target).
    fn retries_by_default(&self) -> bool {
        false
    }
    /// The target as a device that holds its bytes at the same offsets in
    /// a file ([`BlockDev::data_fd`]), so a copy from a raw disk can run in
    /// the kernel (`copy_file_range`); `None` for others.
    fn device(&self) -> Option<&dyn BlockDev> {
        None
    }
    /// The job failed or was cancelled: a target made by the job may
    /// remove what it made, so no partial backup is mistaken for one.
    fn abandon(&self) {}
}

/// How to open targets.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Limit for connecting and negotiating with a remote target.
    pub connect_timeout: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// Opens the target named `spec` for a disk of `size` bytes:
/// `file:PATH`, `qcow2:PATH[,backing=PREV][,cluster-size=SIZE]`,
/// `nbd://HOST[:PORT]/EXPORT`,
/// `nbd+unix:///EXPORT?socket=PATH`, or their TLS forms `nbds://` and
/// `nbds+unix://` with `tls-certificates=DIR` (see [`nbd::TlsParams`]).
pub fn open(spec: &str, size: u64, options: &OpenOptions) -> Result<Box<dyn Target>> {
    if let Some(path) = spec.strip_prefix("file:") {
        if path.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidTarget,
                "file: needs a path (file:PATH)",
            ));
        }
        return Ok(Box::new(file::FileTarget::open(path.as_ref(), size)?));
    }
    if let Some(rest) = spec.strip_prefix("qcow2:") {
        return Ok(Box::new(qcow2::Qcow2Target::create(rest, size)?));
    }
    if spec.starts_with("nbd") {
        return Ok(Box::new(remote::RemoteTarget::connect(spec, size, options)?));
    }
    Err(Error::new(
        ErrorKind::InvalidTarget,
        format!(
            "target '{spec}' must be file:PATH, qcow2:PATH[,backing=PREV], nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds:// and nbds+unix:// for TLS)"
        ),
    ))
}
