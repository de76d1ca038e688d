//! A remote NBD server as a job's target: an [`NbdTarget`] that is
//! replaced by a new connection when the old one is lost.

use std::sync::{Arc, RwLock};

use super::nbd::{ConnectOptions, NbdTarget};
use super::{OpenOptions, Target};
use crate::error::{Error, ErrorKind, Result};

/// Most bytes asked about per block-status request while checking that a
/// target reads as zeroes.
const STATUS_STEP: u64 = 1 << 30;
/// `NBD_STATE_ZERO`.
const STATE_ZERO: u64 = 2;

/// An NBD export written by a job. See [`NbdTarget`] for what a request's
/// outcome says; [`Target::reconnect`] opens a new connection to the same
/// export (and checks it is still the same size and writable).
pub struct RemoteTarget {
    uri: String,
    options: ConnectOptions,
    size: u64,
    cluster: u64,
    known_zero: bool,
    current: RwLock<Arc<NbdTarget>>,
}

impl RemoteTarget {
    /// Connects to `uri` for a disk of `size` bytes.
    pub fn connect(uri: &str, size: u64, options: &OpenOptions) -> Result<RemoteTarget> {
        let opts = ConnectOptions {
            handshake_timeout: Some(options.connect_timeout),
            ..ConnectOptions::default()
        };
        let t = open_checked(uri, size, &opts)?;
        let cluster = u64::from(t.preferred_block_size()).max(512);
        let known_zero = reads_as_zeroes(&t);
        Ok(RemoteTarget {
            uri: uri.to_string(),
            options: opts,
            size,
            cluster,
            known_zero,
            current: RwLock::new(Arc::new(t)),
        })
    }

    fn target(&self) -> Arc<NbdTarget> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn open_checked(uri: &str, size: u64, opts: &ConnectOptions) -> Result<NbdTarget> {
    let t = NbdTarget::connect(uri, opts)?;
    if t.info().read_only() {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("{uri}: the export is read-only"),
        ));
    }
    if t.size() != size {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "{uri}: the export has {} bytes but the disk has {size}: make the target the disk's size",
                t.size()
            ),
        ));
    }
    Ok(t)
}

/// True if the server says every byte reads as zeroes (a new image): zero
/// ranges then need no request. Any doubt (no block status, an error)
/// says no.
fn reads_as_zeroes(t: &NbdTarget) -> bool {
    if !t.info().block_status {
        return false;
    }
    let mut pos = 0;
    while pos < t.size() {
        let Ok(extents) = t.block_status(pos, (t.size() - pos).min(STATUS_STEP)) else {
            return false;
        };
        if extents.is_empty() {
            return false;
        }
        for e in extents {
            if e.flags & STATE_ZERO == 0 {
                return false;
            }
            pos += e.length;
        }
    }
    true
}

impl Target for RemoteTarget {
    fn describe(&self) -> String {
        self.uri.clone()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> u64 {
        self.cluster
    }
    fn known_zero(&self) -> bool {
        self.known_zero
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.target().write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.target().write_zeroes(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.target().flush()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.target().read(offset, buf)
    }
    fn reconnect(&self) -> Result<()> {
        let t = open_checked(&self.uri, self.size, &self.options)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
        Ok(())
    }
    fn retries_by_default(&self) -> bool {
        true
    }
}
