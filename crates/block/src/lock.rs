//! Image locks that QEMU understands, so that fleece and QEMU processes
//! (qemu, qemu-nbd, qemu-storage-daemon, qemu-img, qemu-io) keep out of each
//! other's images the way QEMU processes do among themselves.
//!
//! The scheme is QEMU's: open file description (OFD) locks on single bytes
//! of the image. For each of four permissions `i` (consistent read, write,
//! write unchanged, resize) a process holds a shared lock on byte `100 + i`
//! if it has the permission, and on byte `200 + i` if it does not let others
//! have it. Only shared locks are taken; a conflict is found by asking the
//! kernel whether an exclusive lock on a byte would be refused, which means
//! another process holds a shared lock there. The locks are taken first and
//! checked after, so that of two processes racing for an image both fail
//! rather than both succeed. OFD locks belong to an open file description:
//! a second `open` of the image in the same process conflicts too, and
//! closing the descriptor releases them.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, ErrorKind, Result};

/// How an image is used, which decides the permissions fleece takes and
/// the ones it refuses to share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Serving the disk read-write: holds consistent read, write, write
    /// unchanged and resize; lets others read and write unchanged data, but
    /// neither write nor resize.
    ReadWrite,
    /// Reading only: holds consistent read; lets others read and write
    /// unchanged data, but neither write nor resize (what a read-only QEMU
    /// open does).
    ReadOnly,
}

/// QEMU's names of the permissions, by bit.
const PERMS: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const WRITE_UNCHANGED: u8 = 1 << 2;
const RESIZE: u8 = 1 << 3;
const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;
/// Byte `HELD + i` is locked by whoever holds permission `i`.
const HELD: i64 = 100;
/// Byte `UNSHARED + i` is locked by whoever refuses to share permission `i`.
const UNSHARED: i64 = 200;

impl LockMode {
    fn held(self) -> u8 {
        match self {
            LockMode::ReadWrite => ALL,
            LockMode::ReadOnly => CONSISTENT_READ,
        }
    }

    fn unshared(self) -> u8 {
        match self {
            LockMode::ReadWrite | LockMode::ReadOnly => ALL & !(CONSISTENT_READ | WRITE_UNCHANGED),
        }
    }

    /// Every byte this mode locks.
    fn bytes(self) -> Vec<i64> {
        let mut v = Vec::new();
        for i in 0..PERMS.len() {
            if self.held() & (1 << i) != 0 {
                v.push(HELD + i as i64);
            }
            if self.unshared() & (1 << i) != 0 {
                v.push(UNSHARED + i as i64);
            }
        }
        v
    }
}

/// One OFD lock call on a single byte (or `len` bytes); returns the
/// `flock` as the kernel left it (F_OFD_GETLK fills in a conflicting lock).
fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_int, start: i64, len: i64) -> io::Result<libc::flock> {
    // SAFETY: a zeroed flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    // OFD locks require l_pid 0 (the zeroed value).
    loop {
        // SAFETY: fcntl reads and writes the flock we pass, which outlives the call.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
        if r != -1 {
            return Ok(fl);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn unlock_bytes(file: &File, bytes: &[i64]) {
    for &b in bytes {
        // Failing to unlock a byte we may not hold changes nothing.
        let _ = ofd(file, libc::F_OFD_SETLK, libc::F_UNLCK, b, 1);
    }
}

/// Releases every lock byte fleece or QEMU uses on this descriptor.
pub(crate) fn release_all(file: &File) {
    let _ = ofd(file, libc::F_OFD_SETLK, libc::F_UNLCK, HELD, PERMS.len() as i64);
    let _ = ofd(
        file,
        libc::F_OFD_SETLK,
        libc::F_UNLCK,
        UNSHARED,
        PERMS.len() as i64,
    );
}

/// What [`acquire`] found.
pub(crate) enum Acquired {
    /// The locks are held.
    Locked,
    /// The file system has no OFD locks; nothing is held.
    Unsupported(io::Error),
}

fn in_use(path: &Path, what: String) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!(
            "image {} is in use by another program (QEMU, qemu-nbd or another fleece?): {what}",
            path.display()
        ),
    )
}

/// Takes the locks of `mode` (on top of those of `previous`, which stay
/// if this fails and are dropped where `mode` does not need them if it
/// succeeds), then checks that nobody else conflicts.
pub(crate) fn acquire(
    file: &File,
    path: &Path,
    mode: LockMode,
    previous: Option<LockMode>,
) -> Result<Acquired> {
    let new = mode.bytes();
    let old = previous.map(LockMode::bytes).unwrap_or_default();
    let fresh: Vec<i64> = new.iter().copied().filter(|b| !old.contains(b)).collect();
    let fail = |e: Error| {
        unlock_bytes(file, &fresh);
        Err(e)
    };
    for &b in &new {
        if let Err(e) = ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, b, 1) {
            return match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOLCK) => {
                    unlock_bytes(file, &fresh);
                    Ok(Acquired::Unsupported(e))
                }
                // Someone holds an exclusive lock: nobody may share with it.
                Some(libc::EAGAIN) | Some(libc::EACCES) => {
                    fail(in_use(path, format!("it holds an exclusive lock on byte {b}")))
                }
                _ => fail(Error::io(format!("cannot lock {}", path.display()), e)),
            };
        }
    }
    // Whoever refuses to share what we hold, or holds what we refuse to share.
    let checks = (0..PERMS.len())
        .filter(|&i| mode.held() & (1 << i) != 0)
        .map(|i| (UNSHARED + i as i64, i, "refuses to share"))
        .chain(
            (0..PERMS.len())
                .filter(|&i| mode.unshared() & (1 << i) != 0)
                .map(|i| (HELD + i as i64, i, "holds")),
        );
    for (byte, perm, how) in checks {
        match ofd(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte, 1) {
            Ok(fl) if fl.l_type == libc::F_UNLCK as libc::c_short => {}
            Ok(_) => {
                return fail(in_use(
                    path,
                    format!("it {how} the \"{}\" permission", PERMS[perm]),
                ))
            }
            Err(e) => {
                return fail(Error::io(
                    format!("cannot test the locks of {}", path.display()),
                    e,
                ))
            }
        }
    }
    let stale: Vec<i64> = old.into_iter().filter(|b| !new.contains(b)).collect();
    unlock_bytes(file, &stale);
    Ok(Acquired::Locked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_lock_the_bytes_qemu_expects() {
        assert_eq!(LockMode::ReadWrite.bytes(), vec![100, 101, 201, 102, 103, 203]);
        assert_eq!(LockMode::ReadOnly.bytes(), vec![100, 201, 203]);
    }
}
