//! Who a client is: the subject DN of its TLS client certificate, and on
//! a Unix socket the uid of the process at the other end (`SO_PEERCRED`).
//!
//! The DN is read from the certificate's DER here (a few dozen lines)
//! rather than through an X.509 crate: rustls has already verified the
//! certificate, and only the subject's attributes are needed. It is
//! written as RFC 4514 strings are, but in the certificate's own RDN order
//! (`O=Example,CN=vm1` for `-subj /O=Example/CN=vm1`), which is how QEMU's
//! `authz-simple` identities and GnuTLS print it.

use std::fmt;
use std::os::unix::io::AsRawFd;

use super::Stream;

/// What is known of a client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Subject DN of the verified client certificate (TLS with `--tls-ca`).
    pub dn: Option<String>,
    /// Uid of the peer process (Unix sockets).
    pub uid: Option<u32>,
}

impl Identity {
    /// What the socket tells: the peer's uid on a Unix socket.
    pub fn of_socket(s: &Stream) -> Identity {
        let uid = match s {
            Stream::Unix(u) => peer_uid(u.as_raw_fd()),
            Stream::Tcp(_) => None,
        };
        Identity { dn: None, uid }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.dn, self.uid) {
            (Some(dn), Some(uid)) => write!(f, "certificate '{dn}' (uid {uid})"),
            (Some(dn), None) => write!(f, "certificate '{dn}'"),
            (None, Some(uid)) => write!(f, "uid {uid}"),
            (None, None) => write!(f, "an anonymous client"),
        }
    }
}

fn peer_uid(fd: std::os::unix::io::RawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the local `cred`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// One DER element: (tag, contents, what follows).
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *d.first()?;
    let first = *d.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in d.get(2..2 + n)? {
            len = (len << 8) | *b as usize;
        }
        (len, 2 + n)
    };
    let body = d.get(head..head.checked_add(len)?)?;
    Some((tag, body, &d[head + len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject DN of a DER certificate, or `None` if it cannot be read.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let (SEQUENCE, cert, _) = tlv(cert)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    // [0] version (optional), serial, signature algorithm, issuer, validity.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (SEQUENCE, name, _) = tlv(tbs)? else {
        return None;
    };
    format_name(name)
}

/// RDNs joined by `,` in the order given, the attributes of a multi-valued
/// RDN by `+`.
fn format_name(mut name: &[u8]) -> Option<String> {
    let mut out = String::new();
    while !name.is_empty() {
        let (SET, mut rdn, rest) = tlv(name)? else {
            return None;
        };
        name = rest;
        if !out.is_empty() {
            out.push(',');
        }
        let mut first = true;
        while !rdn.is_empty() {
            let (SEQUENCE, atv, rest) = tlv(rdn)? else {
                return None;
            };
            rdn = rest;
            let (OID, oid, value) = tlv(atv)? else { return None };
            if !first {
                out.push('+');
            }
            first = false;
            let oid = oid_string(oid)?;
            let (tag, body, _) = tlv(value)?;
            match (attribute_name(&oid), string_value(tag, body)) {
                (Some(short), Some(v)) => {
                    out.push_str(short);
                    out.push('=');
                    escape_into(&mut out, &v);
                }
                // RFC 4514: unknown types as dotted OIDs, odd values as hex
                // of their DER.
                (name, text) => {
                    out.push_str(name.unwrap_or(&oid));
                    out.push('=');
                    match text {
                        Some(v) => escape_into(&mut out, &v),
                        None => {
                            out.push('#');
                            let whole = &value[..value.len() - tlv(value)?.2.len()];
                            for b in whole {
                                out.push_str(&format!("{b:02x}"));
                            }
                        }
                    }
                }
            }
        }
    }
    Some(out)
}

fn oid_string(b: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut v: u64 = 0;
    for (i, byte) in b.iter().enumerate() {
        v = v.checked_mul(128)? | (*byte & 0x7f) as u64;
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (v / 40).min(2);
                arcs.push(first);
                arcs.push(v - first * 40);
            } else {
                arcs.push(v);
            }
            v = 0;
        } else if i == b.len() - 1 {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    Some(arcs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join("."))
}

/// The short names GnuTLS (and so QEMU) prints.
fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

fn string_value(tag: u8, body: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, NumericString, VisibleString
        0x0c | 0x13 | 0x16 | 0x12 | 0x1a => String::from_utf8(body.to_vec()).ok(),
        // TeletexString: Latin-1 in practice.
        0x14 => Some(body.iter().map(|b| *b as char).collect()),
        // BMPString: UTF-16BE.
        0x1e if body.len().is_multiple_of(2) => {
            let units: Vec<u16> = body.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// RFC 4514 escaping of an attribute value.
fn escape_into(out: &mut String, v: &str) {
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
}

/// A DN as written by a person (`O = Example, CN=vm1`) in the form
/// [`subject_dn`] gives: no spaces around the separators of RDNs and
/// attributes, attribute names as GnuTLS spells them.
pub fn normalize_dn(dn: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut seps: Vec<char> = Vec::new();
    let mut cur = String::new();
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' | '+' => {
                parts.push(std::mem::take(&mut cur));
                seps.push(c);
            }
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    let mut out = String::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(seps[i - 1]);
        }
        let p = p.trim();
        match p.split_once('=') {
            Some((k, v)) => {
                let k = k.trim();
                let known = ["CN", "SN", "C", "L", "ST", "O", "OU", "GN", "UID", "DC", "EMAIL"]
                    .into_iter()
                    .find(|n| n.eq_ignore_ascii_case(k));
                out.push_str(known.unwrap_or(k));
                out.push('=');
                out.push_str(v.trim_start());
            }
            None => out.push_str(p),
        }
    }
    out
}

/// A normalized DN with its RDNs in the opposite order (a multi-valued
/// RDN, joined by `+`, stays as it is).
pub fn reverse_rdns(dn: &str) -> String {
    let mut rdns: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' => rdns.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    rdns.push(cur);
    rdns.reverse();
    rdns.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_subject(subject: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_subject_dn_comes_out_in_certificate_order() {
        let der = cert_with_subject(&[
            (rcgen::DnType::CountryName, "DE"),
            (rcgen::DnType::OrganizationName, "Example, Inc."),
            (rcgen::DnType::CommonName, "vm1"),
        ]);
        assert_eq!(subject_dn(&der).unwrap(), "C=DE,O=Example\\, Inc.,CN=vm1");
        let der = cert_with_subject(&[(rcgen::DnType::CustomDnType(vec![1, 2, 3, 4]), "x")]);
        assert_eq!(subject_dn(&der).unwrap(), "1.2.3.4=x");
    }

    #[test]
    fn garbage_is_no_dn_and_no_panic() {
        let der = cert_with_subject(&[(rcgen::DnType::CommonName, "vm1")]);
        for cut in 0..der.len() {
            let _ = subject_dn(&der[..cut]);
        }
        let mut bad = der.clone();
        for i in 0..bad.len() {
            bad[i] ^= 0xff;
            let _ = subject_dn(&bad);
            bad[i] ^= 0xff;
        }
        assert_eq!(subject_dn(&[]), None);
        assert_eq!(subject_dn(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn written_dns_are_normalized_like_read_ones() {
        assert_eq!(normalize_dn(" o = Example , cn=vm1 "), "O=Example,CN=vm1");
        assert_eq!(normalize_dn("O=A\\, B,CN=x+UID=7"), "O=A\\, B,CN=x+UID=7");
        assert_eq!(reverse_rdns("O=A\\, B,CN=x+UID=7"), "CN=x+UID=7,O=A\\, B");
    }
}
