//! What fleece reads of a qcow2 header itself, before imago opens the
//! image: whether imago can open it safely, and if not, what the user can
//! do about it.
//!
//! imago refuses some images on its own (dirty, extended L2, zstd), but a
//! read-write open clears the autoclear bits in the header *before* it
//! checks the incompatible ones, and that clear is what makes QEMU's
//! persistent bitmaps inconsistent. So every check runs here first, on the
//! bytes, and nothing is written until they pass.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Error, ErrorKind, Result};

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const EXT_END: u32 = 0;
const EXT_BITMAPS: u32 = 0x2385_2875;

/// What fleece needs of a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    /// 2 or 3.
    pub version: u32,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Virtual disk size.
    pub size: u64,
    /// The backing file named in the header, if any.
    pub backing: Option<String>,
    /// Names of QEMU's persistent dirty bitmaps in the image.
    pub bitmaps: Vec<String>,
    incompatible: u64,
    crypt_method: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Invalid,
        format!("{} is not a valid qcow2 image: {what}", path.display()),
    )
}

/// Reads the header of the qcow2 image in `file`.
pub fn read(file: &std::fs::File, path: &Path) -> Result<HeaderInfo> {
    let mut h = vec![0u8; 4096];
    let n =
        read_some(file, &mut h, 0).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if n < 72 || h[..4] != MAGIC {
        return Err(invalid(path, "no qcow2 header"));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(invalid(path, format!("qcow2 version {version} is unknown")));
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(path, format!("cluster bits {cluster_bits}")));
    }
    let cluster_size = 1u64 << cluster_bits;
    // The whole first cluster holds the header, its extensions and the
    // backing file name.
    if (h.len() as u64) < cluster_size {
        h.resize(cluster_size as usize, 0);
        read_some(file, &mut h, 0).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    }
    let h = &h[..cluster_size as usize];
    let (incompatible, header_len) = if version == 3 {
        (be64(h, 72), be32(h, 100) as usize)
    } else {
        (0, 72)
    };
    if header_len < 72 || header_len > h.len() {
        return Err(invalid(path, format!("header length {header_len}")));
    }
    let backing = match (be64(h, 8), be32(h, 16) as u64) {
        (0, _) | (_, 0) => None,
        (off, len) => {
            let end = off.checked_add(len).filter(|&e| e <= h.len() as u64);
            let Some(end) = end else {
                return Err(invalid(path, "backing file name outside the first cluster"));
            };
            Some(String::from_utf8_lossy(&h[off as usize..end as usize]).into_owned())
        }
    };
    let mut bitmaps = Vec::new();
    if version == 3 {
        let mut at = header_len.next_multiple_of(8);
        while at + 8 <= h.len() {
            let (ty, len) = (be32(h, at), be32(h, at + 4) as usize);
            at += 8;
            if ty == EXT_END || at + len > h.len() {
                break;
            }
            if ty == EXT_BITMAPS && len >= 24 {
                let count = be32(h, at);
                let dir_size = be64(h, at + 8);
                let dir_off = be64(h, at + 16);
                bitmaps = bitmap_names(file, path, count, dir_off, dir_size);
            }
            at += len.next_multiple_of(8);
        }
    }
    Ok(HeaderInfo {
        version,
        cluster_size,
        size: be64(h, 24),
        backing,
        bitmaps,
        incompatible,
        crypt_method: be32(h, 32),
    })
}

/// Names in the bitmap directory; a directory that cannot be read still
/// counts its bitmaps, unnamed.
fn bitmap_names(file: &std::fs::File, path: &Path, count: u32, off: u64, size: u64) -> Vec<String> {
    let unnamed = || (0..count).map(|i| format!("#{i}")).collect();
    if size > 64 << 20 {
        return unnamed();
    }
    let mut dir = vec![0u8; size as usize];
    if file.read_exact_at(&mut dir, off).is_err() {
        tracing::warn!(image = %path.display(), "cannot read the qcow2 bitmap directory");
        return unnamed();
    }
    let mut names = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + 24 > dir.len() {
            return unnamed();
        }
        let name_len = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
        let extra = be32(&dir, at + 20) as usize;
        let name_at = at + 24 + extra;
        if name_at + name_len > dir.len() {
            return unnamed();
        }
        names.push(String::from_utf8_lossy(&dir[name_at..name_at + name_len]).into_owned());
        at = (name_at + name_len).next_multiple_of(8);
    }
    names
}

fn read_some(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl HeaderInfo {
    /// Refuses an image that imago cannot open safely, saying what to do.
    /// `writable`: the image would be opened read-write (the served image,
    /// not a backing file), which would make QEMU's persistent bitmaps
    /// inconsistent.
    pub fn check(&self, path: &Path, writable: bool) -> Result<()> {
        let p = path.display();
        let refuse = |msg: String| Err(Error::new(ErrorKind::Invalid, msg));
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return refuse(format!(
                "{p} is marked corrupt by QEMU; repair it with `qemu-img check -r all {p}` first"
            ));
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return refuse(format!(
                "{p} was not closed cleanly (qcow2 dirty bit: lazy refcounts) and its refcounts may be \
                 wrong; repair it with `qemu-img check -r all {p}` first"
            ));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return refuse(format!(
                "{p} uses extended L2 entries (subclusters), which fleece cannot serve; convert it with \
                 `qemu-img convert -O qcow2 {p} NEW.qcow2` and serve the copy"
            ));
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 {
            return refuse(format!(
                "{p} uses zstd compression, which fleece cannot read; convert it with \
                 `qemu-img convert -O qcow2 {p} NEW.qcow2` (or `-c -o compression_type=zlib`) and serve the copy"
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return refuse(format!(
                "{p} keeps its data in an external data file, which fleece does not serve; convert it with \
                 `qemu-img convert -O qcow2 {p} NEW.qcow2`"
            ));
        }
        let known =
            INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
        if self.incompatible & !known != 0 {
            return refuse(format!(
                "{p} uses qcow2 features fleece does not know (incompatible bits {:#x}); convert it with \
                 `qemu-img convert -O qcow2 {p} NEW.qcow2`",
                self.incompatible & !known
            ));
        }
        if self.crypt_method != 0 {
            return refuse(format!(
                "{p} is encrypted, which fleece does not serve; convert it to a plain image with qemu-img convert"
            ));
        }
        if writable && !self.bitmaps.is_empty() {
            let first = &self.bitmaps[0];
            return refuse(format!(
                "{p} holds QEMU persistent dirty bitmaps ({}): fleece keeps its own bitmaps, and serving \
                 the image read-write would leave QEMU's inconsistent (QEMU then drops them). Remove them \
                 with `qemu-img bitmap --remove {p} {first}` (once per bitmap), or keep using QEMU for this image",
                self.bitmaps.join(", ")
            ));
        }
        Ok(())
    }
}

/// True if `file` starts with the qcow2 magic.
pub fn is_qcow2(file: &std::fs::File) -> Result<bool> {
    let mut magic = [0u8; 4];
    let n = read_some(file, &mut magic, 0).map_err(|e| Error::io("cannot read the image header", e))?;
    Ok(n == 4 && magic == MAGIC)
}
