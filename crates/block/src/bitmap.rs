//! Sparse dirty bitmap: one bit per granule, allocated in 4 KiB pages only
//! where bits are set, so a huge disk with few writes costs almost nothing.

use std::collections::HashMap;
use std::sync::RwLock;

/// Bits per page (4 KiB of bits).
const PAGE_BITS: u64 = 32768;

/// A set of dirty granules of a disk.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    pages: RwLock<HashMap<u64, Box<[u64]>>>,
}

impl Clone for DirtyBitmap {
    fn clone(&self) -> Self {
        DirtyBitmap {
            granularity: self.granularity,
            size: self.size,
            pages: RwLock::new(self.pages.read().unwrap_or_else(|p| p.into_inner()).clone()),
        }
    }
}

impl DirtyBitmap {
    /// An empty bitmap over `size` bytes; `granularity` is a power of two.
    pub fn new(size: u64, granularity: u64) -> Self {
        DirtyBitmap {
            granularity: granularity.max(512).next_power_of_two(),
            size,
            pages: RwLock::new(HashMap::new()),
        }
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Marks every granule touching `[offset, offset+len)`.
    pub fn set(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset + len - 1).min(self.size.saturating_sub(1)) / self.granularity;
        let mut pages = self.pages.write().unwrap_or_else(|p| p.into_inner());
        for bit in first..=last {
            let page = pages
                .entry(bit / PAGE_BITS)
                .or_insert_with(|| vec![0u64; (PAGE_BITS / 64) as usize].into_boxed_slice());
            let b = bit % PAGE_BITS;
            page[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// True if any granule touching `[offset, offset+len)` is set.
    pub fn any(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset / self.granularity;
        let last = (offset + len - 1) / self.granularity;
        let pages = self.pages.read().unwrap_or_else(|p| p.into_inner());
        (first..=last).any(|bit| {
            pages
                .get(&(bit / PAGE_BITS))
                .is_some_and(|p| p[((bit % PAGE_BITS) / 64) as usize] & (1 << (bit % 64)) != 0)
        })
    }

    /// Number of set bytes (granules times granularity, clipped to the size).
    pub fn dirty_bytes(&self) -> u64 {
        let pages = self.pages.read().unwrap_or_else(|p| p.into_inner());
        let bits: u64 = pages
            .values()
            .flat_map(|p| p.iter())
            .map(|w| w.count_ones() as u64)
            .sum();
        (bits * self.granularity).min(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_ranges_are_found_at_granule_precision() {
        let b = DirtyBitmap::new(1 << 40, 65536);
        b.set(65536 * 10 + 5, 1);
        assert!(b.any(65536 * 10, 65536));
        assert!(!b.any(65536 * 11, 65536));
        assert!(b.any(0, 65536 * 11));
        assert_eq!(b.dirty_bytes(), 65536);
        // A sparse bitmap over 1 TiB holds one page.
        assert_eq!(b.pages.read().unwrap().len(), 1);
    }
}
