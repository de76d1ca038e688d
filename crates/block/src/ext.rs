//! What every device gets from the core trait: requests of any length
//! split by the device's maximum transfer, and zero fill for devices that
//! cannot zero a range faster. (`next_data` through block status is the
//! default of the core method; why is said there.)
//!
//! Callers that ask a device's capabilities once and keep them (stores,
//! snapshots) use the splitting functions with the limit they kept, so a
//! request costs no extra call.

use crate::dev::{BlockDev, Capabilities, IoFlags, ZeroFlags};
use crate::{Error, ErrorKind, Result};

/// Largest zero buffer written at once by [`BlockDevExt::fill_zeroes`].
const ZERO_CHUNK: u64 = 1 << 20;

/// Algorithms shared by every [`BlockDev`]; implemented for all of them.
pub trait BlockDevExt: BlockDev {
    /// Reads `buf.len()` bytes from `offset`, in requests of at most the
    /// device's maximum transfer.
    fn read_all_at(&self, buf: &mut [u8], offset: u64, flags: IoFlags) -> Result<()> {
        read_split(self, buf, offset, flags, max_transfer(&self.capabilities()))
    }

    /// Writes `buf` at `offset`, in requests of at most the device's
    /// maximum transfer; with FUA each of them is durable on return.
    fn write_all_at(&self, buf: &[u8], offset: u64, flags: IoFlags) -> Result<()> {
        write_split(self, buf, offset, flags, max_transfer(&self.capabilities()))
    }

    /// Zeroes the range by writing zero buffers: what
    /// [`write_zeroes`](BlockDev::write_zeroes) of a device falls back to
    /// when it has no faster way. With `fast_only` that is refused
    /// (`NotSupported`), as NBD's `FAST_ZERO` asks; with `fua` the device
    /// is flushed after.
    fn fill_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast_only {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "this device cannot zero a range faster than writing it",
            ));
        }
        if length > 0 {
            let unit = ZERO_CHUNK.min(max_transfer(&self.capabilities()));
            let zeroes = vec![0u8; unit.min(length) as usize];
            for (at, n) in chunks(offset, length, unit) {
                self.write_at(&zeroes[..n as usize], at, IoFlags::NONE)?;
            }
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }
}

impl<T: BlockDev + ?Sized> BlockDevExt for T {}

/// The longest request a device with these capabilities takes.
pub(crate) fn max_transfer(caps: &Capabilities) -> u64 {
    caps.max_transfer.map_or(u64::MAX, |m| u64::from(m.max(1)))
}

/// Splits `[offset, offset + len)` at multiples of `unit`, as
/// (offset, length) pieces.
pub(crate) fn chunks(offset: u64, len: u64, unit: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = (unit - at % unit).min(end - at);
        let piece = (at, n);
        at += n;
        Some(piece)
    })
}

/// Reads in requests of at most `max` bytes.
pub(crate) fn read_split<D: BlockDev + ?Sized>(
    dev: &D,
    buf: &mut [u8],
    offset: u64,
    flags: IoFlags,
    max: u64,
) -> Result<()> {
    if buf.len() as u64 <= max {
        return dev.read_at(buf, offset, flags);
    }
    for (at, n) in chunks(offset, buf.len() as u64, max) {
        let o = (at - offset) as usize;
        dev.read_at(&mut buf[o..o + n as usize], at, flags)?;
    }
    Ok(())
}

/// Writes in requests of at most `max` bytes.
pub(crate) fn write_split<D: BlockDev + ?Sized>(
    dev: &D,
    buf: &[u8],
    offset: u64,
    flags: IoFlags,
    max: u64,
) -> Result<()> {
    if buf.len() as u64 <= max {
        return dev.write_at(buf, offset, flags);
    }
    for (at, n) in chunks(offset, buf.len() as u64, max) {
        let o = (at - offset) as usize;
        dev.write_at(&buf[o..o + n as usize], at, flags)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::mapping::{Extent, Mapping};

    /// A memory device that takes at most 4 KiB per request and records
    /// every request.
    struct Small {
        data: Mutex<Vec<u8>>,
        calls: Mutex<Vec<(u64, u64)>>,
    }

    impl BlockDev for Small {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                max_transfer: Some(4096),
                ..Capabilities::default()
            }
        }
        fn read_at(&self, buf: &mut [u8], offset: u64, _flags: IoFlags) -> Result<()> {
            assert!(buf.len() <= 4096);
            self.calls.lock().unwrap().push((offset, buf.len() as u64));
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64, _flags: IoFlags) -> Result<()> {
            assert!(buf.len() <= 4096);
            self.calls.lock().unwrap().push((offset, buf.len() as u64));
            self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
            self.fill_zeroes(offset, length, flags)
        }
        fn trim(&self, _offset: u64, _length: u64) -> Result<()> {
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
            // Holes up to 8 KiB, data after.
            Ok(if offset < 8192 {
                vec![Extent::new((8192 - offset).min(length), Mapping::Hole)]
            } else {
                vec![Extent::new(length, Mapping::Unknown)]
            })
        }
    }

    fn small() -> Small {
        Small {
            data: Mutex::new(vec![1u8; 64 << 10]),
            calls: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn long_requests_are_split_at_the_maximum_transfer() {
        let d = small();
        d.write_all_at(&[7u8; 10000], 1000, IoFlags::NONE).unwrap();
        assert_eq!(
            *d.calls.lock().unwrap(),
            vec![(1000, 3096), (4096, 4096), (8192, 2808)]
        );
        let mut b = vec![0u8; 10000];
        d.read_all_at(&mut b, 1000, IoFlags::NONE).unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn zero_fill_writes_zeroes_unless_only_fast_zeroes_may_be_used() {
        let d = small();
        let fast = ZeroFlags {
            fast_only: true,
            ..ZeroFlags::default()
        };
        assert_eq!(
            d.write_zeroes(0, 9000, fast).unwrap_err().kind(),
            ErrorKind::NotSupported
        );
        assert!(d.data.lock().unwrap().iter().all(|&x| x == 1));
        d.write_zeroes(100, 9000, ZeroFlags::default()).unwrap();
        let data = d.data.lock().unwrap();
        assert!(data[100..9100].iter().all(|&x| x == 0));
        assert_eq!((data[99], data[9100]), (1, 1));
    }

    #[test]
    fn next_data_by_status_skips_holes_and_takes_unknown_for_data() {
        let d = small();
        assert_eq!(d.next_data(0, 4096).unwrap(), None);
        assert_eq!(d.next_data(100, 20000).unwrap(), Some(8192));
    }
}
