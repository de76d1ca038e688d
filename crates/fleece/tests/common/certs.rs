//! Test certificates, made fresh by each test with rcgen: a CA, a server
//! certificate and client certificates, with the key usages QEMU insists
//! on (digitalSignature, keyEncipherment) and the extended key usages
//! (serverAuth, clientAuth) that GnuTLS and rustls check. Laid out as QEMU
//! and libnbd read a credentials directory: `ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Organisation of every test subject: DNs read `O=fleece test,CN=NAME`.
pub const ORG: &str = "fleece test";

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORG);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    p
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut p = params(name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    fn sign(&self, mut p: CertificateParams, eku: ExtendedKeyUsagePurpose) -> (String, String) {
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server certificate for `localhost` and 127.0.0.1: (cert, key) PEM.
    pub fn server(&self) -> (String, String) {
        let mut p = params("localhost");
        p.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        self.sign(p, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with subject `O=fleece test,CN=cn`: (cert, key) PEM.
    pub fn client(&self, cn: &str) -> (String, String) {
        self.sign(params(cn), ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The DN fleece (and QEMU) reads from a client certificate for `cn`.
pub fn dn(cn: &str) -> String {
    format!("O={ORG},CN={cn}")
}

/// Writes the server's credentials into `dir` (created):
/// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`. Returns `dir`.
pub fn server_dir(dir: &Path, ca: &Ca) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = ca.server();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert).unwrap();
    std::fs::write(dir.join("server-key.pem"), key).unwrap();
    dir.to_path_buf()
}

/// A client's credentials directory: `ca-cert.pem` of `trust` (to check
/// the server) and, if `client` names a CA and a common name, a
/// `client-cert.pem` and `client-key.pem` that CA signed.
pub fn client_dir(dir: &Path, trust: &Ca, client: Option<(&Ca, &str)>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), trust.pem()).unwrap();
    if let Some((ca, cn)) = client {
        let (cert, key) = ca.client(cn);
        std::fs::write(dir.join("client-cert.pem"), cert).unwrap();
        std::fs::write(dir.join("client-key.pem"), key).unwrap();
    }
    dir.to_path_buf()
}

/// `fleece serve` flags for the credentials in `dir` (see [`server_dir`]),
/// with mutual TLS if `mutual`.
pub fn serve_flags(dir: &Path, mutual: bool) -> Vec<String> {
    let mut v = vec![
        "--tls-cert".to_string(),
        dir.join("server-cert.pem").display().to_string(),
        "--tls-key".to_string(),
        dir.join("server-key.pem").display().to_string(),
    ];
    if mutual {
        v.push("--tls-ca".into());
        v.push(dir.join("ca-cert.pem").display().to_string());
    }
    v
}
