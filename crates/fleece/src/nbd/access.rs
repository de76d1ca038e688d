//! Who may open which export, and how: the `[[access]]` tables of the
//! config file. Without any, every client may open every export read-write
//! (the daemon's behaviour before access lists). With them, a client gets
//! what the rules naming it grant, the strongest if several do, and
//! nothing else: denied exports are refused with `NBD_REP_ERR_POLICY` and
//! left out of `NBD_OPT_LIST`.

use serde::Deserialize;

use super::identity::{normalize_dn, reverse_rdns, Identity};
use crate::error::{Error, Result};

/// One `[[access]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Subject DN of a client certificate, as in `O=Example,CN=vm1` (in
    /// the certificate's order, or reversed as RFC 4514 writes it).
    pub cert: Option<String>,
    /// Uid of a client on a Unix socket.
    pub uid: Option<u32>,
    /// Export names or globs (`*` any run of characters, `?` one): `vm1`,
    /// `vm1@*` (every snapshot of vm1), `*`.
    pub exports: Vec<String>,
    /// `read-write` or `read-only` (the default).
    #[serde(default)]
    pub mode: Access,
}

/// What a rule grants.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Reads (and block status) only: the export is flagged read-only and
    /// writes, zeroes and trims are refused with EPERM.
    #[default]
    ReadOnly,
    /// Everything the export allows.
    ReadWrite,
}

/// The checked rules.
#[derive(Clone, Debug)]
pub struct AccessList {
    rules: Vec<AccessRule>,
    /// Each rule's DN with its RDNs in the other order: `openssl x509
    /// -subject` prints a name in certificate order, RFC 4514 (and
    /// `-nameopt RFC2253`) reversed; either names the same certificate.
    reversed: Vec<Option<String>>,
}

impl AccessList {
    /// Checks the rules: each names exactly one client (`cert` or `uid`)
    /// and at least one export.
    pub fn new(mut rules: Vec<AccessRule>) -> Result<AccessList> {
        for (i, r) in rules.iter_mut().enumerate() {
            let n = i + 1;
            match (&r.cert, r.uid) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(Error::invalid(format!(
                        "access rule {n}: give exactly one of cert = \"SUBJECT DN\" or uid = NUMBER"
                    )))
                }
                (Some(dn), None) if dn.trim().is_empty() => {
                    return Err(Error::invalid(format!("access rule {n}: cert is empty")))
                }
                _ => {}
            }
            if r.exports.is_empty() || r.exports.iter().any(|e| e.is_empty()) {
                return Err(Error::invalid(format!(
                    "access rule {n}: exports must list export names or globs, as in exports = [\"vm1\", \"vm1@*\"]"
                )));
            }
            r.cert = r.cert.as_deref().map(normalize_dn);
        }
        let reversed = rules
            .iter()
            .map(|r| r.cert.as_deref().map(reverse_rdns))
            .collect();
        Ok(AccessList { rules, reversed })
    }

    /// What `who` may do with export `name`: `None` if nothing.
    pub fn grant(&self, who: &Identity, name: &str) -> Option<Access> {
        self.rules
            .iter()
            .zip(&self.reversed)
            .filter(|(r, rev)| {
                let by_cert = match (&r.cert, &who.dn) {
                    (Some(a), Some(b)) => a == b || rev.as_deref() == Some(b),
                    _ => false,
                };
                let by_uid = r.uid.is_some() && r.uid == who.uid;
                by_cert || by_uid
            })
            .map(|(r, _)| r)
            .filter(|r| r.exports.iter().any(|g| glob(g, name)))
            .map(|r| r.mode)
            .max()
    }
}

/// `*` matches any run of characters (`@` included), `?` one character.
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point: linear in practice,
    // never exponential however many stars.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> Result<AccessList> {
        #[derive(Deserialize)]
        struct F {
            access: Vec<AccessRule>,
        }
        let f: F = toml::from_str(toml_text).map_err(|e| Error::invalid(e.to_string()))?;
        AccessList::new(f.access)
    }

    #[test]
    fn globs_match_names_and_snapshots() {
        assert!(glob("vm1", "vm1"));
        assert!(!glob("vm1", "vm10"));
        assert!(glob("vm1@*", "vm1@nightly"));
        assert!(!glob("vm1@*", "vm1"));
        assert!(glob("*@*", "db@s1"));
        assert!(!glob("*@*", "db"));
        assert!(glob("*", ""));
        assert!(glob("vm?", "vm2"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob(&"*".repeat(50), &"a".repeat(50)));
    }

    #[test]
    fn the_vm_writes_its_disk_and_the_backup_server_reads_its_snapshots() {
        let acl = rules(
            r#"
            [[access]]
            cert = "O=Example, CN=vm1"
            exports = ["vm1"]
            mode = "read-write"
            [[access]]
            cert = "O=Example,CN=backup"
            exports = ["vm1@*"]
            [[access]]
            uid = 0
            exports = ["*"]
            mode = "read-write"
            "#,
        )
        .unwrap();
        let vm = Identity {
            dn: Some("O=Example,CN=vm1".into()),
            uid: None,
        };
        let backup = Identity {
            dn: Some("O=Example,CN=backup".into()),
            uid: None,
        };
        assert_eq!(acl.grant(&vm, "vm1"), Some(Access::ReadWrite));
        assert_eq!(acl.grant(&vm, "vm1@s1"), None);
        assert_eq!(acl.grant(&backup, "vm1@s1"), Some(Access::ReadOnly));
        assert_eq!(acl.grant(&backup, "vm1"), None);
        assert_eq!(acl.grant(&Identity::default(), "vm1"), None);
        let root = Identity {
            dn: None,
            uid: Some(0),
        };
        assert_eq!(acl.grant(&root, "anything@s"), Some(Access::ReadWrite));
    }

    #[test]
    fn a_dn_may_be_written_in_either_rdn_order() {
        let acl = rules("[[access]]\ncert = \"CN=vm1,OU=VMs+L=x,O=Example\"\nexports = [\"vm1\"]\n").unwrap();
        let who = Identity {
            dn: Some("O=Example,OU=VMs+L=x,CN=vm1".into()),
            uid: None,
        };
        assert_eq!(acl.grant(&who, "vm1"), Some(Access::ReadOnly));
        let other = Identity {
            dn: Some("O=Example,CN=vm2".into()),
            uid: None,
        };
        assert_eq!(acl.grant(&other, "vm1"), None);
    }

    #[test]
    fn rules_name_one_client_and_some_exports() {
        assert!(rules("[[access]]\nexports = [\"a\"]\n").is_err());
        assert!(rules("[[access]]\ncert = \"CN=a\"\nuid = 1\nexports = [\"a\"]\n").is_err());
        assert!(rules("[[access]]\nuid = 1\nexports = []\n").is_err());
        assert!(rules("[[access]]\nuid = 1\nexports = [\"a\"]\nmode = \"write\"\n").is_err());
        assert!(rules("[[access]]\nuid = 1\nexports = [\"a\"]\nwho = 2\n").is_err());
    }
}
