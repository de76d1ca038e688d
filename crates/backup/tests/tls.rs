//! The client over TLS (`nbds://`, `nbds+unix://`) against real servers:
//! qemu-nbd with `--tls-creds` (client certificates required) and
//! `--tls-authz`, and nbdkit with `--tls=require`. Certificates are made
//! by each test (rcgen, the key usages QEMU wants). What arrived is checked
//! with `qemu-img compare` on the image; refusals (an identity the authz
//! does not allow, no client certificate, a server certificate from
//! another CA or for another name, plain NBD to a TLS server and TLS to a
//! plain one, missing credentials) each say what is wrong.

#[allow(dead_code)]
#[path = "../../fleece/tests/common/certs.rs"]
mod certs;
mod common;

use std::path::{Path, PathBuf};

use certs::Ca;
use common::*;
use fleece_backup::{ConnectOptions, ErrorKind, NbdTarget};

/// A CA, an image, and qemu-nbd's credentials, in one temporary directory.
struct Setup {
    ca: Ca,
    dir: tempfile::TempDir,
    img: PathBuf,
    server_pki: PathBuf,
}

impl Setup {
    fn new(size: u64) -> Setup {
        let ca = Ca::new("fleece test CA");
        let (dir, img) = image(size);
        let server_pki = certs::server_dir(&dir.path().join("server-pki"), &ca);
        Setup {
            ca,
            dir,
            img,
            server_pki,
        }
    }

    /// A client credentials directory trusting this CA, with a client
    /// certificate for `cn` (signed by this CA) if given.
    fn client(&self, name: &str, cn: Option<&str>) -> PathBuf {
        certs::client_dir(&self.dir.path().join(name), &self.ca, cn.map(|cn| (&self.ca, cn)))
    }

    /// qemu-nbd with client certificates required and only `O=fleece
    /// test,CN=backup` let in; on 127.0.0.1 if `tcp`.
    fn qemu_nbd(self, tcp: bool) -> (Server, Ca) {
        let dn = certs::dn("backup");
        let tls = QemuTls {
            creds: &self.server_pki,
            verify_peer: true,
            authz: Some(&dn),
            tcp_port: tcp.then(free_port),
        };
        let server = Server::qemu_nbd_tls(self.dir, &self.img, &tls);
        (server, self.ca)
    }
}

fn connect(uri: &str) -> fleece_backup::Result<NbdTarget> {
    NbdTarget::connect(uri, &ConnectOptions::default())
}

/// Pushes the common pattern (and four writers at once on their own
/// quarters of the second half) and compares the image with it.
fn push_and_compare(server: &Server, img: &Path, uri: &str) {
    let target = connect(uri).unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert_eq!(
        target.info().connections,
        4,
        "qemu-nbd --shared=4 offers multi-conn"
    );
    let mut expected = push(&target);
    expected.resize(16 * MIB as usize, 0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let target = &target;
            s.spawn(move || {
                let at = 8 * MIB + t * 2 * MIB;
                let data = pattern(t + 7, 2 * MIB as usize);
                // Large and small requests in flight at once.
                let big = target.submit_write(at, &data[..MIB as usize]).unwrap();
                for i in 0..16u64 {
                    let off = (MIB + i * 64 * 1024) as usize;
                    target
                        .write(at + off as u64, &data[off..off + 64 * 1024])
                        .unwrap();
                }
                big.wait().unwrap();
                let mut back = vec![0u8; data.len()];
                target.read(at, &mut back).unwrap();
                assert!(back == data, "writer {t}: read back differs");
            });
        }
    });
    for t in 0..4u64 {
        let at = (8 * MIB + t * 2 * MIB) as usize;
        expected[at..at + 2 * MIB as usize].copy_from_slice(&pattern(t + 7, 2 * MIB as usize));
    }
    target.flush().unwrap();
    target.close().unwrap();
    let want = expected_file(server.dir.path(), &expected);
    compare(img.to_str().unwrap(), want.to_str().unwrap());
}

#[test]
fn a_push_over_tls_to_qemu_nbd_with_tls_authz_arrives_exact() {
    for tcp in [false, true] {
        let s = Setup::new(16 * MIB);
        let creds = s.client("client", Some("backup"));
        let img = s.img.clone();
        let (server, _ca) = s.qemu_nbd(tcp);
        push_and_compare(&server, &img, &server.tls_uri(&creds));
    }
}

#[test]
fn one_tls_connection_carries_large_writes_and_reads_both_ways_at_once() {
    // Both directions full at once: the reader must drain replies while
    // writers are blocked sending, or client and server wait on each other.
    let s = Setup::new(64 * MIB);
    let creds = s.client("client", Some("backup"));
    let img = s.img.clone();
    let (server, _ca) = s.qemu_nbd(false);
    let target = NbdTarget::connect(&server.tls_uri(&creds), &one_connection()).unwrap();
    assert_eq!(target.info().connections, 1);
    let block = 4 * MIB as usize;
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let target = &target;
            sc.spawn(move || {
                for round in 0..4u64 {
                    let at = (t * 4 + round) * block as u64;
                    let data = pattern(t * 10 + round, block);
                    let w = target.submit_write(at, &data).unwrap();
                    // A read of what an earlier round wrote, in flight with the write.
                    let r = (round > 0).then(|| target.submit_read(at - block as u64, block).unwrap());
                    w.wait().unwrap();
                    if let Some(r) = r {
                        assert!(r.wait().unwrap() == pattern(t * 10 + round - 1, block));
                    }
                }
            });
        }
    });
    target.flush().unwrap();
    target.close().unwrap();
    let mut want = Vec::new();
    for t in 0..4u64 {
        for round in 0..4u64 {
            want.extend(pattern(t * 10 + round, block));
        }
    }
    let want = expected_file(server.dir.path(), &want);
    compare(img.to_str().unwrap(), want.to_str().unwrap());
}

#[test]
fn a_client_the_server_does_not_let_in_is_refused_saying_so() {
    let s = Setup::new(16 * MIB);
    let intruder = s.client("intruder", Some("intruder"));
    let anonymous = s.client("anonymous", None);
    let (server, _ca) = s.qemu_nbd(false);
    for (creds, who) in [
        (&intruder, "an identity the authz does not list"),
        (&anonymous, "no certificate"),
    ] {
        let e = connect(&server.tls_uri(creds)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Handshake, "{who}: {e}");
        assert!(
            e.to_string().contains("it does not accept this client"),
            "{who}: {e}"
        );
    }
}

#[test]
fn a_server_certificate_from_another_ca_or_for_another_name_is_refused() {
    let s = Setup::new(16 * MIB);
    let other = Ca::new("another CA");
    let wrong_ca = certs::client_dir(&s.dir.path().join("wrong-ca"), &other, Some((&s.ca, "backup")));
    let creds = s.client("client", Some("backup"));
    let (server, _ca) = s.qemu_nbd(true);
    let e = connect(&server.tls_uri(&wrong_ca)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
    assert!(e.to_string().contains("TLS handshake with"), "{e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    // The certificate is for localhost and 127.0.0.1.
    let port = server.port.unwrap();
    let uri = |host: &str, extra: &str| {
        format!(
            "nbds://{host}:{port}/?tls-certificates={}{extra}",
            creds.display()
        )
    };
    let e = connect(&uri("localhost", "&tls-hostname=backup.example")).unwrap_err();
    assert!(
        e.to_string().contains("not valid for name \"backup.example\""),
        "{e}"
    );
    // An address is checked as an address; tls-hostname overrides the host.
    connect(&uri("127.0.0.1", "")).unwrap().close().unwrap();
    connect(&uri("127.0.0.1", "&tls-hostname=localhost"))
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn a_unix_socket_checks_the_chain_and_tls_hostname_when_given() {
    let s = Setup::new(16 * MIB);
    let creds = s.client("client", Some("backup"));
    let (server, _ca) = s.qemu_nbd(false);
    let uri = server.tls_uri(&creds);
    connect(&uri).unwrap().close().unwrap();
    connect(&format!("{uri}&tls-hostname=localhost"))
        .unwrap()
        .close()
        .unwrap();
    let e = connect(&format!("{uri}&tls-hostname=backup.example")).unwrap_err();
    assert!(
        e.to_string().contains("not valid for name \"backup.example\""),
        "{e}"
    );
}

#[test]
fn plain_nbd_to_a_tls_server_is_told_to_use_nbds_and_tls_to_a_plain_one_is_refused() {
    let s = Setup::new(16 * MIB);
    let creds = s.client("client", Some("backup"));
    let (server, _ca) = s.qemu_nbd(false);
    let e = connect(&server.uri()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("use nbds://"), "{e}");

    let (dir, img) = image(16 * MIB);
    let plain = Server::qemu_nbd(dir, &img, None);
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        plain.socket.display(),
        creds.display()
    );
    let e = connect(&uri).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
    assert!(e.to_string().contains("the server does not do TLS"), "{e}");
}

#[test]
fn nbdkit_requiring_tls_and_client_certificates_takes_a_push() {
    let s = Setup::new(16 * MIB);
    let creds = s.client("client", Some("backup"));
    let pki = format!("--tls-certificates={}", s.server_pki.display());
    let server = Server::nbdkit(
        s.dir,
        &["--tls=require", &pki, "--tls-verify-peer", "memory", "16M"],
    );
    let target = connect(&server.tls_uri(&creds)).unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    // push() reads everything back through the client and checks it.
    push(&target);
    target.close().unwrap();
}

#[test]
fn missing_or_mismatched_credentials_are_named() {
    let s = Setup::new(MIB);
    let creds = s.client("client", Some("backup"));
    let (server, ca) = s.qemu_nbd(false);
    let uri = server.tls_uri(&creds);

    std::fs::remove_file(creds.join("client-key.pem")).unwrap();
    let e = connect(&uri).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTarget, "{e}");
    assert!(
        e.to_string().contains("client-cert.pem without client-key.pem"),
        "{e}"
    );

    // Another certificate's key.
    let (_, key) = ca.client("other");
    std::fs::write(creds.join("client-key.pem"), key).unwrap();
    let e = connect(&uri).unwrap_err();
    assert!(e.to_string().contains("is the key the certificate's?"), "{e}");

    std::fs::remove_file(creds.join("ca-cert.pem")).unwrap();
    let e = connect(&uri).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTarget, "{e}");
    assert!(e.to_string().contains("no ca-cert.pem"), "{e}");
}
