//! How client commands print: the daemon's JSON under `--json`, tables and
//! lines for people otherwise; and the small formats both need.

use std::fmt::Display;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Kind, Result};

/// Where a command's answer goes.
pub struct Output {
    /// `--json`: print what the daemon sent.
    pub json: bool,
}

impl Output {
    /// Prints a daemon answer: as it came under `--json` (so scripts see
    /// every field, even ones this CLI does not know), else read as `T` and
    /// rendered for people.
    pub fn show<T: DeserializeOwned>(&self, answer: Value, render: impl FnOnce(T)) -> Result<()> {
        if self.json {
            print_json(&answer);
            return Ok(());
        }
        let typed = serde_json::from_value(answer).map_err(|e| {
            Error::new(
                Kind::Internal,
                format!("the daemon's answer is not what this fleece expects (another version?): {e}"),
            )
        })?;
        render(typed);
        Ok(())
    }

    /// A command without an answer of its own: `json` under `--json`, else
    /// `line`.
    pub fn done(&self, json: Value, line: impl Display) -> Result<()> {
        if self.json {
            print_json(&json);
        } else {
            println!("{line}");
        }
        Ok(())
    }
}

/// Pretty JSON on stdout.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows under headers with columns padded to the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A value, or `-` for none (as a table cell).
pub fn or_dash<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Percent-encodes one path segment or query value: names may hold
/// characters that mean something in a URL.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_read_as_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_709_210_096), "2024-02-29 12:34:56 UTC");
    }

    #[test]
    fn names_are_percent_encoded_in_paths() {
        assert_eq!(enc("vm1@snap"), "vm1@snap");
        assert_eq!(enc("a/b c?%"), "a%2Fb%20c%3F%25");
    }
}
