//! qcow2 images through imago (`sync` feature: plain threads, no runtime).
//!
//! [`Qcow2Dev`] is a [`BlockDev`] over imago's `FormatAccess`: reads and
//! writes go straight to imago (`&self`, safe on any ranges at once: it
//! orders allocations per L2 table itself); discards, which may free host
//! clusters that a read or write of the same range is still using, hold a
//! range lock of their own (`ranges`). Block status follows imago's
//! mappings down the backing chain and says at which depth each range is
//! allocated (`status`). The header is checked by fleece before imago sees
//! it (`header`): images imago cannot open safely are refused with what to
//! do about them.
//!
//! The backing chain is opened read-only through a gate that keeps every
//! file it opens, so the image factory can lock them the way QEMU does
//! (read-only, sharing writes of unchanged data).

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use imago::file::File as ImagoFile;
use imago::format::gate::ImplicitOpenGate;
use imago::format::PreallocateMode;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatCreateBuilder, FormatDriverBuilder, ShallowMapping, StorageOpenOptions};

use crate::dev::{check_range, BlockDev, Capabilities, IoFlags, IoHints, ZeroFlags};
use crate::ext::BlockDevExt;
use crate::mapping::Extent;
use crate::raw::RawFile;
use crate::{Error, ErrorKind, Result};

pub(crate) mod header;
mod ranges;
mod status;

use ranges::RangeLock;

/// Most images in a backing chain (the top one included); a longer chain
/// is taken for a loop.
const MAX_CHAIN: usize = 64;
/// Smallest and largest qcow2 cluster sizes.
pub const MIN_CLUSTER: u64 = 512;
/// See [`MIN_CLUSTER`].
pub const MAX_CLUSTER: u64 = 2 << 20;

/// A qcow2 image as a device. See the module doc.
pub struct Qcow2Dev {
    img: FormatAccess<ImagoFile>,
    /// The top image file: its `fdatasync` (with raw files' sticky error)
    /// makes imago's written metadata and data durable.
    file: Arc<RawFile>,
    /// The backing chain's files, top-down, opened read-only.
    backing: Vec<Arc<RawFile>>,
    cluster: u64,
    v3: bool,
    read_only: bool,
    in_memory: bool,
    ranges: RangeLock,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("{what} of qcow2 image {}", path.display()), e)
}

/// Opens the files of the backing chain for imago: read-only, their
/// headers checked, each kept so the image factory can lock it.
#[derive(Clone)]
struct ChainGate {
    files: Rc<RefCell<Vec<Arc<RawFile>>>>,
}

impl ImplicitOpenGate<ImagoFile> for ChainGate {
    fn open_format<F: FormatDriverBuilder<ImagoFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ImagoFile>> {
        Ok(FormatAccess::new(builder.open(self.clone())?))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<ImagoFile> {
        let path = opts
            .get_filename()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::other("a backing file without a name"))?;
        if opts.get_writable() {
            return Err(io::Error::other(format!(
                "{} would be opened for writing (an external data file?); fleece opens only backing files",
                path.display()
            )));
        }
        if self.files.borrow().len() + 1 >= MAX_CHAIN {
            return Err(io::Error::other(format!(
                "the backing chain is more than {MAX_CHAIN} images deep (a loop?) at {}",
                path.display()
            )));
        }
        let file = RawFile::open(&path, true).map_err(to_io)?;
        let id = file.id().map_err(to_io)?;
        if self.files.borrow().iter().any(|f| f.id().ok() == Some(id)) {
            return Err(io::Error::other(format!(
                "the backing chain comes back to {}: a loop",
                path.display()
            )));
        }
        if header::is_qcow2(file.std_file()).map_err(to_io)? {
            header::read(file.std_file(), &path)
                .and_then(|h| h.check(&path, false))
                .map_err(to_io)?;
        }
        let fd = file.std_file().try_clone()?;
        self.files.borrow_mut().push(Arc::new(file));
        ImagoFile::from_open_file(fd, StorageOpenOptions::new().filename(&path).write(false))
    }
}

fn to_io(e: Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl Qcow2Dev {
    /// Opens the qcow2 image in `file` (found at `path`) with its backing
    /// chain. Refuses images imago cannot serve safely (see
    /// `header::HeaderInfo::check`).
    pub fn open(file: Arc<RawFile>, path: &Path, read_only: bool) -> Result<Qcow2Dev> {
        let hdr = header::read(file.std_file(), path)?;
        hdr.check(path, !read_only)?;
        // The top's own file for the chain loop check.
        let files = Rc::new(RefCell::new(vec![file.clone()]));
        let fd = file.std_file().try_clone().map_err(|e| io_err("open", path, e))?;
        let storage =
            ImagoFile::from_open_file(fd, StorageOpenOptions::new().filename(path).write(!read_only))
                .map_err(|e| io_err("open", path, e))?;
        let gate = ChainGate { files: files.clone() };
        let q = Qcow2::<ImagoFile>::builder(storage)
            .write(!read_only)
            .open(gate)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Invalid,
                    format!("cannot open qcow2 image {}: {e}", path.display()),
                )
            })?;
        let img = FormatAccess::new(q);
        let backing: Vec<Arc<RawFile>> = files.borrow().iter().skip(1).cloned().collect();
        let in_memory = file.hints().in_memory && backing.iter().all(|f| f.hints().in_memory);
        Ok(Qcow2Dev {
            img,
            file,
            backing,
            cluster: hdr.cluster_size,
            v3: hdr.version >= 3,
            read_only,
            in_memory,
            ranges: RangeLock::new(hdr.cluster_size.max(1 << 20)),
        })
    }

    /// The backing chain's files, top-down (not the image's own).
    pub fn backing_files(&self) -> &[Arc<RawFile>] {
        &self.backing
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Grows the disk (the caller keeps I/O away). The new range reads as
    /// zeroes, also where a longer backing file has data. imago cannot
    /// shrink an image it shares: a smaller size is refused.
    pub fn resize(&self, size: u64) -> Result<()> {
        self.writable()?;
        let old = self.size();
        if size < old {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "fleece cannot shrink qcow2 image {} ({old} to {size} bytes); stop serving it and use \
                     `qemu-img resize --shrink`",
                    self.file.path().display()
                ),
            ));
        }
        // Zero clusters hide a longer backing file's data past the old end,
        // as QEMU does.
        let mode = if self.backing.is_empty() {
            PreallocateMode::None
        } else {
            PreallocateMode::Zero
        };
        self.img
            .resize_grow(size, mode)
            .map_err(|e| io_err("resize", self.file.path(), e))?;
        self.flush()?;
        self.make_l2_tables(old).map(drop)
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "device is read-only"));
        }
        Ok(())
    }

    /// The whole clusters inside `[offset, end)`; the last, partial cluster
    /// of the image counts as whole when the range reaches the end.
    fn inner_clusters(&self, offset: u64, end: u64) -> (u64, u64) {
        let start = offset.next_multiple_of(self.cluster);
        let stop = if end == self.size() {
            end
        } else {
            end / self.cluster * self.cluster
        };
        (start, stop.max(start))
    }

    /// Discards `[start, end)` (whole clusters) so that it reads as zeroes,
    /// as QEMU's qcow2 discards: zero clusters on v3 (they hide a backing
    /// file's data), unallocated on v2. Runs that already read as zeroes
    /// without a backing file are left alone (no L2 table is made for
    /// them). The caller holds the range exclusively.
    fn discard_zero(&self, start: u64, end: u64) -> Result<()> {
        let path = self.file.path();
        for (at, len) in self.runs_to_zero(start, end)? {
            // SAFETY: the caller holds [start, end) exclusively in
            // `self.ranges`, and every read and write of this device holds
            // its range shared while it runs: no mapping of this range is
            // in use while its clusters are freed.
            let r = unsafe {
                if self.v3 {
                    self.img.discard_to_zero_unsafe(at, len)
                } else {
                    self.img.discard_to_backing_unsafe(at, len)
                }
            };
            r.map_err(|e| io_err("discard", path, e))?;
        }
        Ok(())
    }

    fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Makes every L2 table of `[from, size)` that the top image lacks, then
    /// flushes and syncs: afterwards no write of a client makes an L2 table.
    ///
    /// Why: imago 0.2.6 writes a new L2 table's L1 entry to the file at once
    /// but keeps the table's refcount in its cache until the next flush. A
    /// kill -9 in between leaves a table the refcounts call free, which the
    /// next allocation hands out again for data: a corrupt image. Made here,
    /// before any client writes, and flushed at once, tables never go
    /// through that window while the disk is served. One table covers
    /// `cluster * cluster / 8` bytes (512 MiB with 64 KiB clusters), so this
    /// costs 128 MiB of metadata per TiB of a sparse disk, once.
    ///
    /// A range the top image allocates nothing in gets a table by a discard
    /// of its first cluster back to the backing chain: that cluster is
    /// unallocated already, so what the disk reads does not change. Tables
    /// shared with an internal snapshot are still copied on a client's
    /// first write (the same window; internal snapshots are rare on served
    /// disks). Call with no I/O running.
    /// Returns about how many tables it made (the file's growth in clusters).
    pub fn make_l2_tables(&self, from: u64) -> Result<u64> {
        if self.read_only {
            return Ok(0);
        }
        let path = self.file.path();
        let size = self.size();
        let region = self.cluster * (self.cluster / 8);
        let mut r = from / region * region;
        let before = self.file.file_len()?;
        let mut touched = 0;
        while r < size {
            let end = (r + region).min(size);
            let mut pos = r;
            let mut empty = true;
            while pos < end {
                let (m, l) = self
                    .img
                    .get_shallow_mapping(pos, end - pos)
                    .map_err(|e| io_err("map", path, e))?;
                match m {
                    ShallowMapping::Zero { explicit: false, .. }
                    | ShallowMapping::Indirect { .. }
                    | ShallowMapping::Eof { .. } => pos += l.clamp(1, end - pos),
                    _ => {
                        empty = false;
                        break;
                    }
                }
            }
            if empty {
                // SAFETY: no I/O runs (the caller's promise), and the
                // cluster is unallocated, so no mapping of it is in use.
                unsafe { self.img.discard_to_backing_unsafe(r, self.cluster.min(size - r)) }
                    .map_err(|e| io_err("make an L2 table", path, e))?;
                touched += 1;
            }
            r = end;
        }
        if touched == 0 {
            return Ok(0);
        }
        self.flush()?;
        // A range whose table exists but maps nothing looks the same as
        // one without: the file's growth says how many were made.
        Ok(self.file.file_len()?.saturating_sub(before) / self.cluster)
    }
}

impl BlockDev for Qcow2Dev {
    fn size(&self) -> u64 {
        self.img.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            trim: !self.read_only,
            fast_zero: self.v3,
            // Emulated: a FUA write is followed by a flush of the image.
            fua: true,
            min_io: 1,
            preferred_io: self.cluster.max(512) as u32,
            max_transfer: None,
            allocation_depth: true,
        }
    }

    fn hints(&self) -> IoHints {
        IoHints {
            in_memory: self.in_memory(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        if flags.no_wait && !self.in_memory() {
            return Err(Error::would_block());
        }
        let _g = self.ranges.shared(offset, buf.len() as u64, flags.no_wait)?;
        self.img
            .read(buf, offset)
            .map_err(|e| io_err("read", self.file.path(), e))
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        if flags.no_wait && (flags.fua || !self.in_memory()) {
            return Err(Error::would_block());
        }
        self.writable()?;
        check_range(self.size(), offset, buf.len() as u64)?;
        {
            let _g = self.ranges.shared(offset, buf.len() as u64, flags.no_wait)?;
            self.img
                .write(buf, offset)
                .map_err(|e| io_err("write", self.file.path(), e))?;
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(self.size(), offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let end = offset + length;
        let (s, e) = self.inner_clusters(offset, end);
        // Zero clusters need v3, and a partial cluster would be written.
        if flags.fast_only && (!self.v3 || s != offset || e != end) {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "qcow2 zeroes without writing need v3 and whole clusters",
            ));
        }
        if flags.may_unmap && self.v3 && s < e {
            {
                let _x = self.ranges.exclusive(s, e - s);
                self.discard_zero(s, e)?;
            }
            // Partial clusters at the ends keep their allocation.
            if offset < s {
                self.zero_keep(offset, s)?;
            }
            if e < end {
                self.zero_keep(e, end)?;
            }
        } else {
            self.zero_keep(offset, end)?;
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.writable()?;
        check_range(self.size(), offset, length)?;
        let (s, e) = self.inner_clusters(offset, offset + length);
        if s >= e {
            // Partial clusters stay as they are, as in QEMU: trim is advisory.
            return Ok(());
        }
        let _x = self.ranges.exclusive(s, e - s);
        match self.discard_zero(s, e) {
            Err(e) if e.kind() == ErrorKind::NotSupported => Ok(()),
            r => r,
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // imago's caches (L2 tables, refcount blocks) to the file, then the
        // file to the disk. The sync is the raw file's own `fdatasync`: it
        // keeps a failure sticky, and unlike imago's it holds no lock that
        // stops reads and writes while it waits.
        self.img
            .flush()
            .map_err(|e| io_err("flush", self.file.path(), e))?;
        self.file.flush()
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.map_range(offset, length)
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        self.find_data(offset, end)
    }
}

impl Qcow2Dev {
    /// Zeroes `[offset, end)` keeping allocations: imago's `write_zeroes`
    /// on v3 (zero clusters where whole, zero data in partial clusters
    /// that are not zero already); zero buffers on v2, which has no zero
    /// flag (imago refuses there). Runs that read as zeroes for good are
    /// skipped either way.
    fn zero_keep(&self, offset: u64, end: u64) -> Result<()> {
        if !self.v3 {
            // Each write holds its own range; holding it here too could
            // wait behind a discard that waits for this very hold.
            for (at, len) in self.runs_to_zero(offset, end)? {
                self.fill_zeroes(at, len, ZeroFlags::default())?;
            }
            return Ok(());
        }
        let _g = self.ranges.shared(offset, end - offset, false)?;
        for (at, len) in self.runs_to_zero(offset, end)? {
            self.img
                .write_zeroes(at, len)
                .map_err(|e| io_err("write zeroes", self.file.path(), e))?;
        }
        Ok(())
    }
}

/// How to create an image ([`create`]).
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// Bytes per cluster (a power of two, 512 B to 2 MiB); 64 KiB if `None`.
    pub cluster_size: Option<u64>,
    /// The backing file, as it goes into the header (relative to the new
    /// image's directory, or absolute), and its format (`qcow2` or `raw`).
    pub backing: Option<(String, String)>,
}

/// Creates a qcow2 image at `path`, which must not exist, of `size` bytes.
/// The file is removed again if it cannot be made whole.
pub fn create(path: &Path, size: u64, opts: &Qcow2Options) -> Result<()> {
    let cluster = opts.cluster_size.unwrap_or(64 << 10);
    if !cluster.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster) {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("qcow2 cluster size {cluster} must be a power of two from 512 B to 2 MiB"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    let made = (|| -> io::Result<()> {
        let storage = ImagoFile::from_open_file(
            file.try_clone()?,
            StorageOpenOptions::new().filename(path).write(true),
        )?;
        let mut b = Qcow2::<ImagoFile>::create_builder(storage)
            .size(size)
            .cluster_size(cluster as usize);
        if let Some((name, fmt)) = &opts.backing {
            b = b.backing(name.clone(), fmt.clone());
        }
        b.create()?;
        file.sync_all()
    })();
    made.map_err(|e| {
        let _ = std::fs::remove_file(path);
        Error::new(
            ErrorKind::Invalid,
            format!("cannot create qcow2 image {}: {e}", path.display()),
        )
    })
}

/// The path a backing file name in a header stands for: relative names
/// are relative to the image's directory.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(d) => d.join(p),
        None => p.to_path_buf(),
    }
}
