//! Block status of a qcow2 image: imago's mappings followed down the
//! backing chain, with the depth at which each range is allocated (as
//! QEMU's `qemu:allocation-depth` counts: 1 for the top image, 0 where no
//! image of the chain allocates the range).

use imago::ShallowMapping;

use super::Qcow2Dev;
use crate::dev::{check_range, BlockDev};
use crate::mapping::{Extent, Mapping};
use crate::Result;

/// Most mapping look-ups one block status makes; it answers for the range
/// it covered by then (a caller asks again from there).
const MAX_LOOKUPS: usize = 8192;

impl Qcow2Dev {
    /// What `[offset, offset+max)` starts with, through the whole chain:
    /// its mapping, depth, and how far that goes (at least one byte).
    fn resolve(&self, offset: u64, max: u64) -> Result<(Mapping, u32, u64)> {
        let mut layer = &self.img;
        let mut at = offset;
        let mut len = max;
        let mut depth = 1u32;
        loop {
            let (m, l) = layer
                .get_shallow_mapping(at, len)
                .map_err(|e| super::io_err("block status", self.file.path(), e))?;
            let l = l.min(len);
            return Ok(match m {
                ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => {
                    (Mapping::Data, depth, l.max(1))
                }
                // Zero clusters are allocated where they are (they hide
                // the backing chain: their depth counts) but hold no data:
                // holes, as qemu-nbd reports them in `base:allocation` (a
                // discard makes them; a write allocates a cluster).
                // Unallocated zeroes end the chain.
                ShallowMapping::Zero { explicit: true, .. } => (Mapping::Hole, depth, l.max(1)),
                ShallowMapping::Zero { .. } => (Mapping::Hole, 0, l.max(1)),
                // A backing file shorter than the image: zeroes past its end.
                ShallowMapping::Eof { .. } => (Mapping::Hole, 0, len),
                ShallowMapping::Indirect {
                    layer: next,
                    offset: o,
                    ..
                } => {
                    layer = next;
                    at = o;
                    len = l.max(1);
                    depth += 1;
                    continue;
                }
                _ => (Mapping::Data, depth, l.max(1)),
            });
        }
    }

    /// Block status (see the module doc).
    pub(super) fn map_range(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(self.size(), offset, length)?;
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let mut lookups = 0;
        while pos < end && lookups < MAX_LOOKUPS {
            let (mapping, depth, len) = self.resolve(pos, end - pos)?;
            let len = len.min(end - pos);
            lookups += 1;
            pos += len;
            match out.last_mut() {
                Some(last) if last.mapping == mapping && last.depth == Some(depth) => last.length += len,
                _ => out.push(Extent {
                    length: len,
                    mapping,
                    depth: Some(depth),
                }),
            }
        }
        Ok(out)
    }

    /// The first offset of `[offset, end)` that may hold data, without
    /// building extents: copy-before-write asks it for every run it copies.
    pub(super) fn find_data(&self, offset: u64, end: u64) -> Result<Option<u64>> {
        check_range(self.size(), offset, end.saturating_sub(offset))?;
        let mut pos = offset;
        while pos < end {
            let (mapping, _, len) = self.resolve(pos, end - pos)?;
            if !mapping.reads_as_zeroes() {
                return Ok(Some(pos));
            }
            pos += len.min(end - pos);
        }
        Ok(None)
    }

    /// The runs of `[offset, end)` that zeroing must touch: everything but
    /// what the top image already maps as zeroes for good (zero clusters,
    /// or unallocated clusters with no backing file). Ranges that fall
    /// through to a backing file are kept: their zeroes must hide it.
    pub(super) fn runs_to_zero(&self, offset: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (m, l) = self
                .img
                .get_shallow_mapping(pos, end - pos)
                .map_err(|e| super::io_err("block status", self.file.path(), e))?;
            let l = l.clamp(1, end - pos);
            let zero = matches!(m, ShallowMapping::Zero { .. });
            if !zero {
                match out.last_mut() {
                    Some((at, len)) if *at + *len == pos => *len += l,
                    _ => out.push((pos, l)),
                }
            }
            pos += l;
        }
        Ok(out)
    }
}
