//! Settling a job's bitmaps at its end (the module docs of `jobs` say
//! what each mode leaves): with the disk frozen, the successor merged in,
//! then the bits that are no longer dirty cleared, each step durable.

use fleece_block::DirtyBitmap;

use super::job::{lock, BitmapMode, Job};
use crate::error::{Error, Kind, Result};

/// Settles each disk's bitmap at the end (module docs), with the disk
/// frozen so no write slips between the successor and the bitmap.
pub(super) fn bitmaps(job: &Job, ok: bool) -> Result<()> {
    let mut first_err = None;
    for p in &job.parts {
        let Some(held) = p.held() else { continue };
        let Some((b, s)) = &held.bitmap else { continue };
        let _frozen = held.disk.live.freeze();
        let r = (|| -> fleece_block::Result<()> {
            match (job.mode, ok) {
                (BitmapMode::Never, _) => Ok(()),
                (BitmapMode::OnSuccess, false) => b.merge(s.bits()),
                (_, true) => {
                    b.merge(s.bits())?;
                    b.clear_bits(&minus(b.bits(), s.bits()))
                }
                (BitmapMode::Always, false) => {
                    b.merge(s.bits())?;
                    let copied = lock(&p.copy)
                        .as_ref()
                        .map(|c| granules_within(&c.acknowledged(), b.bits()))
                        .unwrap_or_else(|| DirtyBitmap::new(b.bits().size(), b.bits().granularity()));
                    b.clear_bits(&minus(&copied, s.bits()))
                }
            }
        })();
        held.disk.live.remove_bitmap(s.name());
        if let Err(e) = r {
            tracing::error!(job = %job.name, bitmap = b.name(), error = %e, "cannot update the bitmap after the backup");
            first_err.get_or_insert(Error::new(
                Kind::Internal,
                format!("bitmap '{}' of disk '{}': {e}", b.name(), p.disk_name),
            ));
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `a` without the bits of `b` (same granularity and size).
fn minus(a: &DirtyBitmap, b: &DirtyBitmap) -> DirtyBitmap {
    let out = DirtyBitmap::new(a.size(), a.granularity());
    for w in 0..a.bits().div_ceil(64) {
        let v = a.word(w) & !b.word(w);
        if v != 0 {
            out.set_word(w, v);
        }
    }
    out
}

/// The granules of `like`'s shape that lie wholly inside `ranges`.
fn granules_within(ranges: &[(u64, u64)], like: &DirtyBitmap) -> DirtyBitmap {
    let g = like.granularity();
    let size = like.size();
    let out = DirtyBitmap::new(size, g);
    for &(off, len) in ranges {
        let end = off + len;
        let first = off.div_ceil(g);
        // The last granule counts if the range reaches the end of the disk.
        let last = if end >= size { size.div_ceil(g) } else { end / g };
        if last > first {
            out.set(first * g, ((last - first) * g).min(size - first * g));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granules_within_keeps_only_whole_granules_and_the_tail() {
        let like = DirtyBitmap::new(10 * 4096 + 100, 4096);
        let g = granules_within(&[(0, 8192), (4096 * 3 + 1, 8192), (4096 * 9, 4096 + 100)], &like);
        let set: Vec<u64> = (0..11).filter(|i| g.any(i * 4096, 1)).collect();
        assert_eq!(set, vec![0, 1, 4, 9, 10]);
        let m = minus(&g, &{
            let b = DirtyBitmap::new(10 * 4096 + 100, 4096);
            b.set(4096, 1);
            b
        });
        let set: Vec<u64> = (0..11).filter(|i| m.any(i * 4096, 1)).collect();
        assert_eq!(set, vec![0, 4, 9, 10]);
    }
}
