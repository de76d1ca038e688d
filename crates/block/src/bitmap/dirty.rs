//! Sparse dirty bitmap: one bit per granule, allocated in 4 KiB pages only
//! where bits are set, so a huge disk with few writes costs almost nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Bits per page (4 KiB of bits).
const PAGE_BITS: u64 = 32768;
const PAGE_WORDS: usize = (PAGE_BITS / 64) as usize;

type Pages = HashMap<u64, Box<[u64]>>;

/// A set of dirty granules of a disk.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    /// Changed only under the pages' write lock, so whoever holds either
    /// lock sees a size that matches the pages.
    size: AtomicU64,
    pages: RwLock<Pages>,
}

impl Clone for DirtyBitmap {
    fn clone(&self) -> Self {
        let pages = self.read();
        DirtyBitmap {
            granularity: self.granularity,
            size: AtomicU64::new(self.size.load(Ordering::Acquire)),
            pages: RwLock::new(pages.clone()),
        }
    }
}

/// The word index and mask of every word holding bits `[first, last]`.
fn word_masks(first: u64, last: u64) -> impl Iterator<Item = (u64, u64)> {
    (first / 64..=last / 64).map(move |word| {
        let lo = first.max(word * 64) - word * 64;
        let hi = last.min(word * 64 + 63) - word * 64;
        let mask = if hi - lo == 63 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo + 1)) - 1) << lo
        };
        (word, mask)
    })
}

fn page_of(pages: &mut Pages, word: u64) -> &mut u64 {
    let page = pages
        .entry(word / PAGE_WORDS as u64)
        .or_insert_with(|| vec![0u64; PAGE_WORDS].into_boxed_slice());
    &mut page[(word % PAGE_WORDS as u64) as usize]
}

fn get_word(pages: &Pages, word: u64) -> u64 {
    pages
        .get(&(word / PAGE_WORDS as u64))
        .map(|p| p[(word % PAGE_WORDS as u64) as usize])
        .unwrap_or(0)
}

fn bit_is_set(pages: &Pages, bit: u64) -> bool {
    pages
        .get(&(bit / PAGE_BITS))
        .is_some_and(|p| p[((bit % PAGE_BITS) / 64) as usize] & (1 << (bit % 64)) != 0)
}

impl DirtyBitmap {
    /// An empty bitmap over `size` bytes; `granularity` is rounded up to a
    /// power of two of at least 512.
    pub fn new(size: u64, granularity: u64) -> Self {
        DirtyBitmap {
            granularity: granularity.max(512).next_power_of_two(),
            size: AtomicU64::new(size),
            pages: RwLock::new(HashMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Pages> {
        self.pages.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Pages> {
        self.pages.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Size of the disk it covers.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Number of bits (granules).
    pub fn bits(&self) -> u64 {
        self.size().div_ceil(self.granularity)
    }

    /// First and last bit touching the range, clipped to the size; call
    /// with a lock held so that the size cannot change meanwhile.
    fn bit_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let size = self.size();
        if len == 0 || offset >= size {
            return None;
        }
        let end = offset.saturating_add(len).min(size);
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
        let r: std::result::Result<bool, std::convert::Infallible> =
            self.try_set_then(offset, len, |w, v| {
                changed(w, v);
                Ok(())
            });
        r.unwrap_or_else(|e| match e {})
    }

    /// Like [`set_then`](Self::set_then), but a word changes only if
    /// `write(word_index, new_value)` succeeds; the first failure stops the
    /// marking and is returned (words already written stay set).
    pub(crate) fn try_set_then<E>(
        &self,
        offset: u64,
        len: u64,
        mut write: impl FnMut(u64, u64) -> std::result::Result<(), E>,
    ) -> std::result::Result<bool, E> {
        if self.all_set(offset, len) {
            return Ok(false);
        }
        let mut pages = self.write();
        let Some((first, last)) = self.bit_range(offset, len) else {
            return Ok(false);
        };
        let mut any = false;
        for (word, mask) in word_masks(first, last) {
            let old = get_word(&pages, word);
            if old & mask != mask {
                write(word, old | mask)?;
                *page_of(&mut pages, word) = old | mask;
                any = true;
            }
        }
        Ok(any)
    }

    /// True if every granule touching the range is set (nothing to mark).
    pub fn all_set(&self, offset: u64, len: u64) -> bool {
        let pages = self.read();
        match self.bit_range(offset, len) {
            None => true,
            Some((first, last)) => (first..=last).all(|bit| bit_is_set(&pages, bit)),
        }
    }

    /// True if any granule touching `[offset, offset+len)` is set.
    pub fn any(&self, offset: u64, len: u64) -> bool {
        let pages = self.read();
        let Some((first, last)) = self.bit_range(offset, len) else {
            return false;
        };
        (first..=last).any(|bit| bit_is_set(&pages, bit))
    }

    /// Changes the size of the disk it covers. Bits at or beyond the new
    /// end are cleared; when growing with `mark_grown`, the grown range is
    /// marked dirty: it did not exist before, so whatever it holds now is a
    /// change (without it, the caller says otherwise that it changed).
    pub fn resize(&self, new_size: u64, mark_grown: bool) {
        let mut pages = self.write();
        let old_size = self.size();
        let new_bits = new_size.div_ceil(self.granularity);
        // Whole pages past the end go; the page holding the end is trimmed.
        pages.retain(|&p, _| p * PAGE_BITS < new_bits);
        if let Some(page) = pages.get_mut(&(new_bits / PAGE_BITS)) {
            let in_page = (new_bits % PAGE_BITS) as usize;
            let (word, bit) = (in_page / 64, in_page % 64);
            if bit != 0 {
                page[word] &= (1u64 << bit) - 1;
            }
            let from = word + usize::from(bit != 0);
            page[from..].iter_mut().for_each(|w| *w = 0);
        }
        if new_size > old_size && mark_grown {
            let first = old_size / self.granularity;
            let last = (new_size - 1) / self.granularity;
            for (word, mask) in word_masks(first, last) {
                *page_of(&mut pages, word) |= mask;
            }
        }
        self.size.store(new_size, Ordering::Release);
    }

    /// Clears every bit.
    pub fn clear(&self) {
        self.write().clear();
    }

    /// Sets every bit set in `other` (same geometry); calls `changed` for
    /// each word that changed, under the lock. Returns true if any did.
    pub fn merge_then(&self, other: &DirtyBitmap, mut changed: impl FnMut(u64, u64)) -> bool {
        let r: std::result::Result<bool, std::convert::Infallible> = self.try_merge_then(other, |w, v| {
            changed(w, v);
            Ok(())
        });
        r.unwrap_or_else(|e| match e {})
    }

    /// Like [`merge_then`](Self::merge_then), but a word changes only if
    /// `write(word_index, new_value)` succeeds; the first failure stops the
    /// merge and is returned (words already written stay set).
    pub(crate) fn try_merge_then<E>(
        &self,
        other: &DirtyBitmap,
        mut write: impl FnMut(u64, u64) -> std::result::Result<(), E>,
    ) -> std::result::Result<bool, E> {
        let mut src: Vec<(u64, Box<[u64]>)> = other.read().iter().map(|(&p, w)| (p, w.clone())).collect();
        // In file order, so that a failure part way leaves a prefix written.
        src.sort_unstable_by_key(|&(p, _)| p);
        let mut pages = self.write();
        let bits = self.bits();
        let mut any = false;
        for (p, words) in src {
            for (i, &w) in words.iter().enumerate() {
                let word = p * PAGE_WORDS as u64 + i as u64;
                // Never set bits past our end, whatever the other holds.
                let w = match bits.checked_sub(word * 64) {
                    Some(0) | None => 0,
                    Some(n) if n < 64 => w & ((1u64 << n) - 1),
                    Some(_) => w,
                };
                let old = get_word(&pages, word);
                if old | w != old {
                    write(word, old | w)?;
                    *page_of(&mut pages, word) = old | w;
                    any = true;
                }
            }
        }
        Ok(any)
    }

    /// One 64-bit word of bits, by index.
    pub fn word(&self, index: u64) -> u64 {
        get_word(&self.read(), index)
    }

    /// Overwrites one word (used when loading from disk).
    pub fn set_word(&self, index: u64, value: u64) {
        let mut pages = self.write();
        if value == 0 && !pages.contains_key(&(index / PAGE_WORDS as u64)) {
            return;
        }
        *page_of(&mut pages, index) = value;
    }

    /// Number of set bytes (granules times granularity, clipped to the size).
    pub fn dirty_bytes(&self) -> u64 {
        let pages = self.read();
        let bits: u64 = pages
            .values()
            .flat_map(|p| p.iter())
            .map(|w| w.count_ones() as u64)
            .sum();
        (bits * self.granularity).min(self.size())
    }

    /// Runs of clean and dirty bytes from `offset`, covering `[offset,
    /// offset+len)` (clipped to the size), as (length, dirty).
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        let pages = self.read();
        let Some((first, last)) = self.bit_range(offset, len) else {
            return out;
        };
        let end = offset.saturating_add(len).min(self.size());
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

    #[test]
    fn resize_clears_bits_past_the_end_and_marks_what_grew() {
        let g = 4096;
        let b = DirtyBitmap::new(100 * g, g);
        b.set(0, 1);
        b.set(60 * g, 1);
        b.set(70 * g, 1);
        b.set(99 * g, 1);
        b.resize(65 * g + 1, true);
        assert_eq!(b.size(), 65 * g + 1);
        assert_eq!(b.bits(), 66);
        assert!(b.any(60 * g, 1) && b.any(0, 1));
        // Bits 66.. are gone from the words, not just out of sight.
        assert_eq!(b.word(1) >> 2, 0);
        assert_eq!(b.dirty_bytes(), 2 * g);
        // Growing: the granule holding the old end and all after it are dirty.
        b.resize(200 * g, true);
        assert_eq!(
            b.extents(0, 200 * g),
            vec![
                (g, true),
                (59 * g, false),
                (g, true),
                (4 * g, false),
                (135 * g, true)
            ]
        );
        // Shrinking to a page boundary and to nothing.
        let big = DirtyBitmap::new(1 << 40, 512);
        big.set(0, 1 << 30);
        big.resize(512 * PAGE_BITS, true);
        assert_eq!(big.dirty_bytes(), 512 * PAGE_BITS);
        big.resize(0, true);
        assert_eq!(big.dirty_bytes(), 0);
        assert!(big.pages.read().unwrap().is_empty());
    }

    #[test]
    fn a_failed_write_leaves_its_word_unset() {
        let b = DirtyBitmap::new(1 << 20, 512);
        let r: Result<bool, ()> = b.try_set_then(0, 512 * 70, |w, _| if w == 1 { Err(()) } else { Ok(()) });
        assert!(r.is_err());
        assert_eq!(b.word(0), u64::MAX);
        assert_eq!(b.word(1), 0);
        let other = DirtyBitmap::new(1 << 20, 512);
        other.set(512 * 64, 1);
        assert_eq!(b.try_merge_then(&other, |_, _| Err::<(), _>(())), Err(()));
        assert_eq!(b.word(1), 0);
        assert_eq!(b.try_merge_then(&other, |_, _| Ok::<(), ()>(())), Ok(true));
        assert_eq!(b.word(1), 1);
    }
}
