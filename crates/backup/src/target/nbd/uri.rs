//! NBD URIs (NetworkBlockDevice/nbd `doc/uri.md`): `nbd://HOST[:PORT]/EXPORT`
//! and `nbd+unix:///EXPORT?socket=PATH`, and their TLS forms `nbds://` and
//! `nbds+unix://` with libnbd's query parameters `tls-certificates=DIR`
//! (required here) and `tls-hostname=NAME`. PSK (`tls-psk-file`,
//! `tls-username`, a user name in the authority) is refused: rustls has no
//! TLS-PSK.

use std::fmt;
use std::path::PathBuf;

use fleece_nbd::consts::MAX_STRING;

use crate::error::{Error, ErrorKind, Result};

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket.
    Unix(PathBuf),
    /// TCP, by host name or address.
    Tcp {
        /// Host name, IPv4 or IPv6 address (without brackets).
        host: String,
        /// Port, 10809 unless the URI says otherwise.
        port: u16,
    },
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Where to connect.
    pub address: Address,
    /// Export name (`""` for the server's default export).
    pub export: String,
    /// TLS settings (`nbds://`, `nbds+unix://`); `None` for plain NBD.
    pub tls: Option<TlsParams>,
}

/// The TLS settings of an `nbds://` or `nbds+unix://` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsParams {
    /// `tls-certificates=DIR`: a directory laid out as libnbd and QEMU read
    /// one: `ca-cert.pem` (the CA the server's certificate must chain to)
    /// and, to present a client certificate, `client-cert.pem` with
    /// `client-key.pem`.
    pub certificates: PathBuf,
    /// `tls-hostname=NAME`: the name the server's certificate must carry.
    /// Without it, a TCP target's host; a Unix socket has no host name, so
    /// then only the chain to the CA is checked (as libnbd and QEMU do).
    pub hostname: Option<String>,
}

/// Why PSK parameters are refused.
const NO_PSK: &str =
    "TLS-PSK is not supported (rustls has no PSK): use x509 certificates (?tls-certificates=DIR)";

impl NbdUri {
    /// Parses `nbd://`, `nbd+unix://`, `nbds://` and `nbds+unix://` URIs.
    /// PSK parameters are refused with [`ErrorKind::Unsupported`].
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let invalid = |why: &str| Error::new(ErrorKind::InvalidTarget, format!("NBD URI '{uri}': {why}"));
        let unsupported = |why: &str| Error::new(ErrorKind::Unsupported, format!("NBD URI '{uri}': {why}"));
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| invalid("no scheme"))?;
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            _ => {
                return Err(invalid(
                    "the scheme must be nbd://, nbd+unix://, nbds:// or nbds+unix://",
                ))
            }
        };
        if rest.contains('#') {
            return Err(invalid("a fragment (#) means nothing here"));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| invalid("bad percent-encoding in the export name"))?;
        if export.len() > MAX_STRING || export.contains('\0') {
            return Err(invalid("the export name is too long or contains NUL"));
        }
        let mut socket = None;
        let (mut certificates, mut hostname) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value).ok_or_else(|| invalid("bad percent-encoding in the query"))?;
            match key {
                "socket" if unix => socket = Some(value),
                "tls-psk-file" | "tls-username" => return Err(unsupported(&format!("{key}: {NO_PSK}"))),
                "tls-verify-peer" if value == "false" => {
                    return Err(unsupported(
                        "tls-verify-peer=false: this client always checks the server's certificate",
                    ))
                }
                k if k.starts_with("tls-") && !tls => {
                    return Err(invalid(&format!(
                    "{k} on a plain {scheme}:// URI would connect without TLS: write nbds:// or nbds+unix://"
                )))
                }
                "tls-certificates" => {
                    certificates = Some(PathBuf::from(value)).filter(|p| !p.as_os_str().is_empty())
                }
                "tls-hostname" => hostname = Some(value).filter(|h| !h.is_empty()),
                "tls-verify-peer" => {}
                // The URI spec asks clients to diagnose what they do not understand.
                k => return Err(invalid(&format!("unknown query parameter '{k}'"))),
            }
        }
        let tls = if tls {
            if authority.contains('@') {
                return Err(unsupported(&format!("a user name is for TLS-PSK: {NO_PSK}")));
            }
            let certificates = certificates.ok_or_else(|| {
                invalid(
                    "TLS needs ?tls-certificates=DIR, a directory with ca-cert.pem (and client-cert.pem \
                     with client-key.pem to present a client certificate)",
                )
            })?;
            Some(TlsParams {
                certificates,
                hostname,
            })
        } else {
            None
        };
        let address = if unix {
            if !authority.is_empty() {
                return Err(invalid(&format!(
                    "{scheme}:// takes no host (write {scheme}:///EXPORT?socket=PATH)"
                )));
            }
            let path = socket.ok_or_else(|| invalid(&format!("{scheme}:// needs ?socket=PATH")))?;
            if path.is_empty() || path.starts_with('\0') {
                return Err(invalid(
                    "the socket must be a path (abstract sockets are not supported)",
                ));
            }
            Address::Unix(PathBuf::from(path))
        } else {
            tcp(authority).map_err(invalid)?
        };
        Ok(NbdUri { address, export, tls })
    }
}

fn tcp(authority: &str) -> std::result::Result<Address, &'static str> {
    if authority.contains('@') {
        return Err("a user name is for TLS-PSK, which is not supported (rustls has no PSK)");
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '[' in the host")?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or("junk after ']'")?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host (or use nbd+unix:///EXPORT?socket=PATH)");
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse()
            .map_err(|_| "the port is not a number from 0 to 65535")?,
    };
    Ok(Address::Tcp {
        host: host.to_string(),
        port,
    })
}

/// Percent-decoding (RFC 3986) into UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encoding of what would end or split a path or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'%' | b'?' | b'#' | b'&' | b'=' | b' ' | 0..=0x1f | 0x7f.. => out.push_str(&format!("%{b:02X}")),
            _ => out.push(b as char),
        }
    }
    out
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls.is_some() { "s" } else { "" };
        let export = encode(&self.export);
        let mut sep = '?';
        match &self.address {
            Address::Unix(p) => {
                write!(
                    f,
                    "nbd{s}+unix:///{export}?socket={}",
                    encode(&p.to_string_lossy())
                )?;
                sep = '&';
            }
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{export}")?
            }
            Address::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{export}")?,
        }
        if let Some(tls) = &self.tls {
            write!(
                f,
                "{sep}tls-certificates={}",
                encode(&tls.certificates.to_string_lossy())
            )?;
            if let Some(h) = &tls.hostname {
                write!(f, "&tls-hostname={}", encode(h))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: None,
        }
    }

    #[test]
    fn the_examples_of_the_uri_spec_parse() {
        let p = |s| NbdUri::parse(s).unwrap();
        assert_eq!(p("nbd://example.com/disk"), tcp("example.com", 10809, "disk"));
        assert_eq!(p("nbd://example.com/"), tcp("example.com", 10809, ""));
        assert_eq!(p("nbd://example.com"), tcp("example.com", 10809, ""));
        assert_eq!(p("nbd://example.com//disk"), tcp("example.com", 10809, "/disk"));
        assert_eq!(
            p("nbd://example.com/hello%20world"),
            tcp("example.com", 10809, "hello world")
        );
        assert_eq!(p("nbd://10.0.0.1:1234/x"), tcp("10.0.0.1", 1234, "x"));
        assert_eq!(p("nbd://[::1]:99/x"), tcp("::1", 99, "x"));
        assert_eq!(p("nbd://[::1]/x"), tcp("::1", 10809, "x"));
        assert_eq!(
            p("nbd+unix:///disk?socket=/run/a%20b.sock"),
            NbdUri {
                address: Address::Unix("/run/a b.sock".into()),
                export: "disk".into(),
                tls: None,
            }
        );
        assert_eq!(p("NBD+UNIX:///?socket=s").export, "");
    }

    #[test]
    fn tls_uris_take_libnbds_certificate_and_hostname_parameters() {
        let p = |s| NbdUri::parse(s).unwrap();
        let u = p("nbds://h:99/x?tls-certificates=/etc/pki/a%20b&tls-verify-peer=true");
        assert_eq!(u.address, tcp("h", 99, "").address);
        assert_eq!(
            u.tls,
            Some(TlsParams {
                certificates: "/etc/pki/a b".into(),
                hostname: None
            })
        );
        let u = p("NBDS+UNIX:///x?socket=/s&tls-certificates=/c&tls-hostname=backup.example");
        assert_eq!(u.address, Address::Unix("/s".into()));
        assert_eq!(u.tls.unwrap().hostname.as_deref(), Some("backup.example"));
    }

    #[test]
    fn psk_and_unverified_tls_are_refused_as_unsupported() {
        for uri in [
            "nbds://h/x?tls-certificates=/c&tls-psk-file=/k",
            "nbds://h/x?tls-certificates=/c&tls-username=u",
            "nbds://alice@h/x?tls-certificates=/c",
            "nbds://h/x?tls-certificates=/c&tls-verify-peer=false",
        ] {
            let e = NbdUri::parse(uri).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{uri}");
        }
    }

    #[test]
    fn malformed_uris_say_what_is_wrong() {
        for (uri, why) in [
            ("disk", "no scheme"),
            ("http://h/x", "scheme"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix://h/x?socket=s", "takes no host"),
            ("nbd://h/x?socket=s", "unknown query parameter 'socket'"),
            ("nbd://h/x?frobnicate=1", "unknown query parameter"),
            ("nbd:///x", "needs a host"),
            ("nbd://h:99999/x", "port"),
            ("nbd://h/%zz", "percent"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://u@h/x", "user name"),
            ("nbd+unix:///?socket=%00abs", "abstract"),
            ("nbds://h/x", "tls-certificates=DIR"),
            ("nbds+unix:///x?socket=s", "tls-certificates=DIR"),
            ("nbd://h/x?tls-certificates=/c", "write nbds://"),
            (
                "nbds://h/x?tls-certificates=/c&tls-frob=1",
                "unknown query parameter 'tls-frob'",
            ),
        ] {
            let e = NbdUri::parse(uri).unwrap_err();
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
    }

    #[test]
    fn display_gives_a_uri_that_parses_back() {
        for uri in [
            "nbd://[::1]:99/x",
            "nbd://h:10809/d",
            "nbd+unix:///d?socket=/s",
            "nbd://h:1/a%20b%3Fc",
            "nbds://h:10809/d?tls-certificates=/p%26q&tls-hostname=n",
            "nbds+unix:///d?socket=/s&tls-certificates=/c",
        ] {
            let u = NbdUri::parse(uri).unwrap();
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }
}
