//! Dirty bitmaps: which parts of a disk changed since a point in time.
//!
//! - `dirty`: [`DirtyBitmap`], a sparse bit set in memory.
//! - `named`: [`NamedBitmap`], a bitmap with a name, a recording flag and
//!   an optional sidecar file kept crash-safe (the technique is in its
//!   module doc).
//! - `sidecar`: the sidecar file's format (docs/bitmap-format.md) and I/O.
//! - `sync`: the group commit that shares one `fdatasync` among writers.

mod dirty;
mod named;
mod sidecar;
mod sync;

pub use dirty::DirtyBitmap;
pub use named::NamedBitmap;
