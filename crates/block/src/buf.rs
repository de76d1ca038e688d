//! Page-aligned I/O buffers.
//!
//! The kernel copies file and socket data into user memory with `rep movsb`,
//! which on some CPUs (measured on AMD EPYC: 4x) is far slower when the
//! destination is not cache-line aligned. `Vec<u8>` of a few hundred KiB
//! comes from `mmap` at a page offset of 16, the slow case, so buffers that
//! take large reads come from here instead. Page alignment also suits
//! `O_DIRECT`.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: a page.
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised, page-aligned byte buffer of fixed length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes. Aborts on allocation failure, like `Vec`.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len }
    }

    /// Makes the buffer at least `len` bytes long; contents are not kept.
    pub fn ensure(&mut self, len: usize) {
        if self.len < len {
            *self = AlignedBuf::zeroed(len);
        }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, BUF_ALIGN).expect("buffer length overflows a Layout")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this same layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_growable() {
        for len in [0, 1, 4096, 300 << 10] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
            }
        }
        let mut b = AlignedBuf::zeroed(10);
        b.ensure(5);
        assert_eq!(b.len(), 10);
        b.ensure(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
    }
}
