//! Human sizes: `64K`, `1M`, `2G`, `1T` (powers of 1024) or plain bytes.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A size in bytes as the control API takes it: a number of bytes or a
/// string with a suffix (`"64K"`). It is always sent as a number, so
/// scripts reading answers never parse suffixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl Size {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Size {
    type Err = Error;
    fn from_str(s: &str) -> Result<Size> {
        parse_size(s).map(Size)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Size, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of bytes or a size like \"64K\"")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<Size, E> {
                u64::try_from(n).map(Size).map_err(|_| E::custom(not_whole(n)))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> std::result::Result<Size, E> {
                // 1.5 bytes, or 1e9 written as a float: no guessing.
                Err(E::custom(not_whole(x)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Size, E> {
                parse_size(s).map(Size).map_err(|e| E::custom(e.message))
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

fn not_whole(x: impl fmt::Display) -> String {
    format!("size {x} must be a whole number of bytes or a string like \"64K\"")
}

/// Parses a size with an optional binary suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let t = t.strip_suffix(['i']).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("'{s}' is not a size (examples: 65536, 64K, 1M, 2G)")))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| Error::invalid(format!("size '{s}' is too large")))
}

/// Formats bytes for people: `1.0 GiB`, `64 KiB`, `512 B`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes_parse_as_powers_of_1024() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sizes_deserialize_from_numbers_and_suffixed_strings() {
        let size = |j: &str| serde_json::from_str::<Size>(j).map_err(|e| e.to_string());
        assert_eq!(size("65536"), Ok(Size(65536)));
        assert_eq!(size("\"64K\""), Ok(Size(65536)));
        assert_eq!(size("\"2G\""), Ok(Size(2 << 30)));
        assert_eq!(size("0"), Ok(Size(0)));
        for (bad, why) in [
            ("-1", "whole number"),
            ("1.5", "whole number"),
            ("1e3", "whole number"),
            ("\"lots\"", "not a size"),
            ("\"99999999999T\"", "too large"),
            ("true", "a number of bytes or a size like"),
            ("null", "a number of bytes or a size like"),
            ("[]", "a number of bytes or a size like"),
        ] {
            let e = size(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_serialize_as_numbers_of_bytes() {
        assert_eq!(serde_json::to_string(&Size(65536)).unwrap(), "65536");
        let back: Size =
            serde_json::from_str(&serde_json::to_string(&"1M".parse::<Size>().unwrap()).unwrap()).unwrap();
        assert_eq!(back, Size(1 << 20));
        assert!("lots".parse::<Size>().is_err());
    }

    #[test]
    fn human_sizes_read_naturally() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
