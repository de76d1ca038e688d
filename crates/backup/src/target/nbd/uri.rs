//! NBD URIs (NetworkBlockDevice/nbd `doc/uri.md`): `nbd://HOST[:PORT]/EXPORT`
//! and `nbd+unix:///EXPORT?socket=PATH`. The TLS schemes are refused until
//! the client speaks TLS, rather than connecting without it.

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
}

impl NbdUri {
    /// Parses `nbd://` and `nbd+unix://` URIs; `nbds://` and `nbds+unix://`
    /// are refused with [`ErrorKind::Unsupported`] (TLS comes later).
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let invalid = |why: &str| Error::new(ErrorKind::InvalidTarget, format!("NBD URI '{uri}': {why}"));
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| invalid("no scheme"))?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "NBD URI '{uri}': TLS ({scheme}://) comes later; this client speaks plain NBD only"
                    ),
                ))
            }
            _ => return Err(invalid("the scheme must be nbd:// or nbd+unix://")),
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
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value).ok_or_else(|| invalid("bad percent-encoding in the query"))?;
            match key {
                "socket" if unix => socket = Some(value),
                k if k.starts_with("tls-") => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("NBD URI '{uri}': {k}: TLS comes later"),
                    ))
                }
                // The URI spec asks clients to diagnose what they do not understand.
                k => return Err(invalid(&format!("unknown query parameter '{k}'"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(invalid(
                    "nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            let path = socket.ok_or_else(|| invalid("nbd+unix:// needs ?socket=PATH"))?;
            if path.is_empty() || path.starts_with('\0') {
                return Err(invalid(
                    "the socket must be a path (abstract sockets are not supported)",
                ));
            }
            Address::Unix(PathBuf::from(path))
        } else {
            tcp(authority).map_err(invalid)?
        };
        Ok(NbdUri { address, export })
    }
}

fn tcp(authority: &str) -> std::result::Result<Address, &'static str> {
    if authority.contains('@') {
        return Err("a user name is for TLS authentication, which comes later");
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

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
        }
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
                export: "disk".into()
            }
        );
        assert_eq!(p("NBD+UNIX:///?socket=s").export, "");
    }

    #[test]
    fn tls_is_refused_as_not_yet_supported() {
        for uri in ["nbds://h/x", "nbds+unix:///x?socket=s", "nbd://h/x?tls-type=x509"] {
            let e = NbdUri::parse(uri).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{uri}");
            assert!(e.to_string().contains("TLS"), "{e}");
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
        ] {
            let e = NbdUri::parse(uri).unwrap_err();
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
    }

    #[test]
    fn display_gives_a_uri_that_parses_back() {
        for uri in ["nbd://[::1]:99/x", "nbd://h:10809/d", "nbd+unix:///d?socket=/s"] {
            let u = NbdUri::parse(uri).unwrap();
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }
}
