//! Sparse dirty bitmap: one bit per granule, allocated in 4 KiB pages only
//! where bits are set, so a huge disk with few writes costs almost nothing.

use std::collections::HashMap;
use std::sync::RwLock;

/// Bits per page (4 KiB of bits).
const PAGE_BITS: u64 = 32768;
const PAGE_WORDS: usize = (PAGE_BITS / 64) as usize;

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
            pages: RwLock::new(self.read().clone()),
        }
    }
}

impl DirtyBitmap {
    /// An empty bitmap over `size` bytes; `granularity` is rounded up to a
    /// power of two of at least 512.
    pub fn new(size: u64, granularity: u64) -> Self {
        DirtyBitmap {
            granularity: granularity.max(512).next_power_of_two(),
            size,
            pages: RwLock::new(HashMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Box<[u64]>>> {
        self.pages.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Box<[u64]>>> {
        self.pages.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Size of the disk it covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of bits (granules).
    pub fn bits(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    fn bit_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset / self.granularity, (end - 1) / self.granularity))
    }

    /// Marks every granule touching `[offset, offset+len)`.
    pub fn set(&self, offset: u64, len: u64) {
        self.set_then(offset, len, |_, _| {});
    }

    /// Marks the granules and calls `changed(word_index, new_value)` for
    /// every 64-bit word that changed, while still holding the bitmap's
    /// lock, so a caller mirroring words elsewhere never reorders them.
    /// Returns true if any bit was newly set.
    pub fn set_then(&self, offset: u64, len: u64, mut changed: impl FnMut(u64, u64)) -> bool {
        let Some((first, last)) = self.bit_range(offset, len) else {
            return false;
        };
        if self.all_set_bits(first, last) {
            return false;
        }
        let mut pages = self.write();
        let mut any = false;
        let mut bit = first;
        while bit <= last {
            let word = bit / 64;
            let lo = bit % 64;
            let hi = (last - word * 64).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            let page = pages
                .entry(word / PAGE_WORDS as u64)
                .or_insert_with(|| vec![0u64; PAGE_WORDS].into_boxed_slice());
            let w = &mut page[(word % PAGE_WORDS as u64) as usize];
            if *w & mask != mask {
                *w |= mask;
                any = true;
                changed(word, *w);
            }
            bit = (word + 1) * 64;
        }
        any
    }

    fn all_set_bits(&self, first: u64, last: u64) -> bool {
        let pages = self.read();
        (first..=last).all(|bit| {
            pages
                .get(&(bit / PAGE_BITS))
                .is_some_and(|p| p[((bit % PAGE_BITS) / 64) as usize] & (1 << (bit % 64)) != 0)
        })
    }

    /// True if every granule touching the range is set (nothing to mark).
    pub fn all_set(&self, offset: u64, len: u64) -> bool {
        match self.bit_range(offset, len) {
            None => true,
            Some((first, last)) => self.all_set_bits(first, last),
        }
    }

    /// True if any granule touching `[offset, offset+len)` is set.
    pub fn any(&self, offset: u64, len: u64) -> bool {
        let Some((first, last)) = self.bit_range(offset, len) else {
            return false;
        };
        let pages = self.read();
        (first..=last).any(|bit| {
            pages
                .get(&(bit / PAGE_BITS))
                .is_some_and(|p| p[((bit % PAGE_BITS) / 64) as usize] & (1 << (bit % 64)) != 0)
        })
    }

    /// Clears every bit.
    pub fn clear(&self) {
        self.write().clear();
    }

    /// Sets every bit set in `other` (same geometry); calls `changed` for
    /// each word that changed, under the lock. Returns true if any did.
    pub fn merge_then(&self, other: &DirtyBitmap, mut changed: impl FnMut(u64, u64)) -> bool {
        let src = other.read().clone();
        let mut pages = self.write();
        let mut any = false;
        for (p, words) in src {
            let page = pages
                .entry(p)
                .or_insert_with(|| vec![0u64; PAGE_WORDS].into_boxed_slice());
            for (i, w) in words.iter().enumerate() {
                if page[i] | w != page[i] {
                    page[i] |= w;
                    any = true;
                    changed(p * PAGE_WORDS as u64 + i as u64, page[i]);
                }
            }
        }
        any
    }

    /// One 64-bit word of bits, by index.
    pub fn word(&self, index: u64) -> u64 {
        self.read()
            .get(&(index / PAGE_WORDS as u64))
            .map(|p| p[(index % PAGE_WORDS as u64) as usize])
            .unwrap_or(0)
    }

    /// Overwrites one word (used when loading from disk).
    pub fn set_word(&self, index: u64, value: u64) {
        let mut pages = self.write();
        if value == 0 && !pages.contains_key(&(index / PAGE_WORDS as u64)) {
            return;
        }
        let page = pages
            .entry(index / PAGE_WORDS as u64)
            .or_insert_with(|| vec![0u64; PAGE_WORDS].into_boxed_slice());
        page[(index % PAGE_WORDS as u64) as usize] = value;
    }

    /// Number of set bytes (granules times granularity, clipped to the size).
    pub fn dirty_bytes(&self) -> u64 {
        let pages = self.read();
        let bits: u64 = pages
            .values()
            .flat_map(|p| p.iter())
            .map(|w| w.count_ones() as u64)
            .sum();
        (bits * self.granularity).min(self.size)
    }

    /// Runs of clean and dirty bytes from `offset`, covering `[offset,
    /// offset+len)` (clipped to the size), as (length, dirty).
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        let Some((first, last)) = self.bit_range(offset, len) else {
            return out;
        };
        let end = offset.saturating_add(len).min(self.size);
        let pages = self.read();
        let mut bit = first;
        while bit <= last {
            let page = pages.get(&(bit / PAGE_BITS));
            // A missing page is a run of clean bits up to its end.
            let (dirty, next) = match page {
                None => (false, ((bit / PAGE_BITS) + 1) * PAGE_BITS),
                Some(p) => (
                    p[((bit % PAGE_BITS) / 64) as usize] & (1 << (bit % 64)) != 0,
                    bit + 1,
                ),
            };
            let lo = (bit * self.granularity).max(offset);
            let hi = (next * self.granularity).min(end);
            match out.last_mut() {
                Some(last) if last.1 == dirty => last.0 += hi - lo,
                _ => out.push((hi - lo, dirty)),
            }
            bit = next;
        }
        out
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

    #[test]
    fn extents_alternate_between_clean_and_dirty_runs() {
        let b = DirtyBitmap::new(1 << 20, 4096);
        b.set(8192, 8192);
        b.set(65536, 1);
        let e = b.extents(0, 1 << 20);
        assert_eq!(
            e,
            vec![
                (8192, false),
                (8192, true),
                (49152, false),
                (4096, true),
                ((1 << 20) - 69632, false)
            ]
        );
        assert_eq!(b.extents(9000, 100), vec![(100, true)]);
    }

    #[test]
    fn set_then_reports_each_changed_word_once_and_merge_unions() {
        let b = DirtyBitmap::new(1 << 30, 512);
        let mut words = Vec::new();
        assert!(b.set_then(0, 512 * 130, |w, v| words.push((w, v))));
        assert_eq!(words, vec![(0, u64::MAX), (1, u64::MAX), (2, 0b11)]);
        assert!(!b.set_then(0, 512 * 130, |_, _| panic!("nothing changed")));
        let c = DirtyBitmap::new(1 << 30, 512);
        c.set(512 * 1000, 1);
        assert!(b.merge_then(&c, |_, _| {}));
        assert!(b.any(512 * 1000, 1));
        b.clear();
        assert_eq!(b.dirty_bytes(), 0);
    }
}
