//! What a range of a device reads as: the answer of block status, which
//! serves NBD clients (`base:allocation`) and copy skipping alike.

/// What a range of a device reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Allocated data that may be anything.
    Data,
    /// Allocated, reads as zeroes.
    Zero,
    /// Not allocated, reads as zeroes: a hole of a file, an unallocated
    /// range or a zero cluster of a qcow2 image (no data behind it: a write
    /// allocates). A zero cluster still hides its backing chain: its
    /// [`Extent::depth`] says where it is allocated, 0 where nothing is.
    Hole,
    /// Readable, but the device cannot tell what it holds (a file system
    /// without `SEEK_DATA`, a remote without block status): may be data.
    Unknown,
    /// Not part of this device's data: discarded from a snapshot view or
    /// outside its bitmap; reading it fails.
    Unavailable,
}

impl Mapping {
    /// True if the range is known to read as zeroes, so a copy may skip it.
    pub fn reads_as_zeroes(self) -> bool {
        matches!(self, Mapping::Zero | Mapping::Hole)
    }
}

/// A run of bytes with one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub length: u64,
    /// What those bytes are.
    pub mapping: Mapping,
    /// Where in a backing chain the bytes come from: 1 for the top image,
    /// 2 for its backing file, and so on (qcow2's `qemu:allocation-depth`);
    /// `None` where there is no chain (raw files, views).
    pub depth: Option<u32>,
}

impl Extent {
    /// A run outside any backing chain.
    pub fn new(length: u64, mapping: Mapping) -> Self {
        Extent {
            length,
            mapping,
            depth: None,
        }
    }
}

/// Appends a run of `length` bytes of `mapping`, merged into the last
/// extent when that says the same.
pub(crate) fn push_extent(out: &mut Vec<Extent>, length: u64, mapping: Mapping) {
    if let Some(last) = out.last_mut() {
        if last.mapping == mapping && last.depth.is_none() {
            last.length += length;
            return;
        }
    }
    out.push(Extent::new(length, mapping));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_one_mapping_merge_and_others_do_not() {
        let mut v = Vec::new();
        push_extent(&mut v, 10, Mapping::Data);
        push_extent(&mut v, 5, Mapping::Data);
        push_extent(&mut v, 5, Mapping::Unknown);
        push_extent(&mut v, 1, Mapping::Hole);
        assert_eq!(
            v,
            vec![
                Extent::new(15, Mapping::Data),
                Extent::new(5, Mapping::Unknown),
                Extent::new(1, Mapping::Hole)
            ]
        );
        assert!(Mapping::Hole.reads_as_zeroes() && Mapping::Zero.reads_as_zeroes());
        assert!(!Mapping::Unknown.reads_as_zeroes() && !Mapping::Unavailable.reads_as_zeroes());
    }
}
