//! NBD over TLS with real clients: nbdinfo and nbdcopy (`nbds://`,
//! `nbds+unix://`), qemu-img and qemu-io (`tls-creds-x509`), with and
//! without client certificates; refusals of clients without a
//! certificate, with one from another CA, and of plaintext; STARTTLS as
//! the spec has it (raw protocol over a rustls client); plaintext TCP on
//! an address others can reach refused at start.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::certs::{self, Ca};
use common::raw::{IHAVEOPT, OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_REPLY_MAGIC, REP_ACK, REP_ERR_INVALID};
use common::*;

const OPT_STARTTLS: u32 = 5;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// fleece with TLS on a Unix socket and on 127.0.0.1 (a port of its
/// choosing), serving `disk` (4 MiB).
struct TlsServer {
    d: Daemon,
    ca: Ca,
    port: u16,
}

impl TlsServer {
    fn start(mutual: bool, extra: &[&str]) -> TlsServer {
        let ca = Ca::new("fleece test CA");
        let mut d = Daemon::prepare(Server::Fleece, &[("disk", 4 * MIB)]);
        let dir = certs::server_dir(&d.path("server-pki"), &ca);
        d.listeners.push("tcp:127.0.0.1:0".into());
        d.extra_args = certs::serve_flags(&dir, mutual)
            .into_iter()
            .map(Into::into)
            .collect();
        d.extra_args.extend(extra.iter().map(Into::into));
        d.spawn();
        let st = d.cli_json(&["status"]);
        let port = st["nbd"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|a| a.as_str().unwrap().strip_prefix("tcp:127.0.0.1:"))
            .unwrap_or_else(|| panic!("no TCP listener in {st}"))
            .parse()
            .unwrap();
        TlsServer { d, ca, port }
    }

    /// A client credentials dir trusting this server's CA, with a client
    /// certificate `cn` signed by it if given.
    fn client(&self, name: &str, cn: Option<&str>) -> PathBuf {
        certs::client_dir(&self.d.path(name), &self.ca, cn.map(|cn| (&self.ca, cn)))
    }

    fn tcp_uri(&self, export: &str, creds: &Path) -> String {
        format!(
            "nbds://localhost:{}/{export}?tls-certificates={}",
            self.port,
            creds.display()
        )
    }

    fn unix_uri(&self, export: &str, creds: &Path) -> String {
        format!(
            "nbds+unix:///{export}?socket={}&tls-certificates={}",
            self.d.sock.display(),
            creds.display()
        )
    }

    /// qemu `--image-opts` for `export` over TCP with `tls-creds=tls0`.
    fn qemu_opts(&self, export: &str) -> String {
        format!(
            "driver=nbd,server.type=inet,server.host=localhost,server.port={},export={export},tls-creds=tls0",
            self.port
        )
    }

    fn qemu_unix_opts(&self, export: &str) -> String {
        format!(
            "driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tls0,tls-hostname=localhost",
            self.d.sock.display()
        )
    }
}

fn tls_object(creds: &Path) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display())
}

/// qemu-io with TLS credentials `creds` on `opts`; its output, and whether
/// every command worked.
fn qemu_io_tls(creds: &Path, opts: &str, cmds: &[&str]) -> (bool, String) {
    let object = tls_object(creds);
    let mut a = vec!["--object", &object, "--image-opts"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(opts);
    let out = run_any("qemu-io", &a);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let ok = out.status.success() && !all.contains("failed") && !all.contains("Pattern verification");
    (ok, all)
}

#[test]
fn nbdinfo_and_nbdcopy_work_over_tls_without_client_certificates() {
    let s = TlsServer::start(false, &[]);
    let creds = s.client("client", None);
    let info = run("nbdinfo", &["--json", &s.tcp_uri("disk", &creds)]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 4 * MIB, "{info}");
    assert_eq!(info["TLS"], true, "{info}");
    // Data both ways, over TCP and over the Unix socket.
    let src = s.d.path("src.raw");
    std::fs::write(&src, pattern(4 * MIB as usize, 7)).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), &s.tcp_uri("disk", &creds)]);
    assert_same_file(&src, &s.d.image("disk"));
    let back = s.d.path("back.raw");
    run("nbdcopy", &[&s.unix_uri("disk", &creds), back.to_str().unwrap()]);
    assert_same_file(&src, &back);
    // qemu without a client certificate too.
    let (ok, out) = qemu_io_tls(
        &creds,
        &s.qemu_opts("disk"),
        &["write -P 0x3c 2M 64k", "read -P 0x3c 2M 64k"],
    );
    assert!(ok, "{out}");
    // The daemon prints nbds URIs.
    let out = s.d.stdout();
    assert!(
        out.contains(&format!("nbds://127.0.0.1:{}/disk", s.port)),
        "{out}"
    );
    assert!(out.contains("nbds+unix:///disk?socket="), "{out}");
}

#[test]
fn with_tls_allowed_plaintext_and_tls_clients_are_both_served() {
    let s = TlsServer::start(false, &["--tls", "allow"]);
    let creds = s.client("client", None);
    qemu_io(
        &format!("nbd://127.0.0.1:{}/disk", s.port),
        &["write -P 9 0 64k", "read -P 9 0 64k"],
    );
    let (ok, out) = qemu_io_tls(&creds, &s.qemu_opts("disk"), &["read -P 9 0 64k"]);
    assert!(ok, "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &s.unix_uri("disk", &creds)])).unwrap();
    assert_eq!(info["TLS"], true, "{info}");
    // Plaintext works, so the printed URIs stay nbd://.
    let out = s.d.stdout();
    assert!(out.contains(&format!("nbd://127.0.0.1:{}/disk", s.port)), "{out}");
}

#[test]
fn qemu_img_and_qemu_io_work_over_tls_with_client_certificates() {
    let s = TlsServer::start(true, &[]);
    let creds = s.client("client", Some("qemu"));
    let (ok, out) = qemu_io_tls(
        &creds,
        &s.qemu_opts("disk"),
        &["write -P 0x5a 1M 256k", "flush", "read -P 0x5a 1M 256k"],
    );
    assert!(ok, "{out}");
    assert_file_bytes(&s.d.image("disk"), MIB, 256 << 10, 0x5a);
    let (ok, out) = qemu_io_tls(&creds, &s.qemu_unix_opts("disk"), &["read -P 0x5a 1M 256k"]);
    assert!(ok, "{out}");
    let object = tls_object(&creds);
    let opts = s.qemu_opts("disk");
    let info = run("qemu-img", &["info", "--object", &object, "--image-opts", &opts]);
    assert!(info.contains("4 MiB"), "{info}");
    let copy = s.d.path("copy.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            copy.to_str().unwrap(),
        ],
    );
    assert_same_file(&copy, &s.d.image("disk"));
    // libnbd with a client certificate too.
    let info = run("nbdinfo", &[&s.tcp_uri("disk", &creds)]);
    assert!(info.contains("export-size: 4194304"), "{info}");
    run("nbdcopy", &[&s.unix_uri("disk", &creds), "null:"]);
}

#[test]
fn with_a_ca_clients_without_a_certificate_or_with_one_from_another_ca_are_refused() {
    let s = TlsServer::start(true, &[]);
    let bare = s.client("bare", None);
    let other = Ca::new("another CA");
    let foreign = certs::client_dir(&s.d.path("foreign"), &s.ca, Some((&other, "mallory")));
    for creds in [&bare, &foreign] {
        let out = run_fails("nbdinfo", &[&s.tcp_uri("disk", creds)]);
        assert!(
            out.to_lowercase().contains("tls") || out.contains("handshake") || out.contains("certificate"),
            "{out}"
        );
        let (ok, out) = qemu_io_tls(creds, &s.qemu_opts("disk"), &["read 0 4k"]);
        assert!(!ok, "qemu-io got in with {}: {out}", creds.display());
    }
    assert!(
        wait_for(Duration::from_secs(5), || s
            .d
            .log()
            .contains("TLS handshake failed")),
        "{}",
        s.d.log()
    );
    let log = s.d.log();
    assert!(
        log.contains("certificate") || log.contains("Certificate"),
        "the daemon does not say why:\n{log}"
    );
    // A good one still gets in.
    let good = s.client("good", Some("ok"));
    run("nbdinfo", &[&s.tcp_uri("disk", &good)]);
}

#[test]
fn plaintext_clients_are_told_tls_is_required() {
    let s = TlsServer::start(false, &[]);
    let out = run_fails("nbdinfo", &[&format!("nbd://127.0.0.1:{}/disk", s.port)]);
    assert!(out.contains("TLS") || out.contains("tls"), "{out}");
    let out = run_fails("qemu-img", &["info", &format!("nbd://127.0.0.1:{}/disk", s.port)]);
    assert!(out.contains("TLS"), "{out}");
    // On the wire: every option gets NBD_REP_ERR_TLS_REQD, and
    // NBD_OPT_EXPORT_NAME (which cannot be refused) ends the connection.
    let mut c = greet_tcp(s.port);
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_GO, go_data("disk")),
        (OPT_STRUCTURED_REPLY, Vec::new()),
    ] {
        c.write_all(&option(opt, &data)).unwrap();
        let (o, kind, _) = option_reply(&mut c);
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD));
    }
    c.write_all(&option(OPT_EXPORT_NAME, b"disk")).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "EXPORT_NAME before STARTTLS got {} bytes",
        rest.len()
    );
}

#[test]
fn starttls_once_then_negotiation_starts_over_inside_tls() {
    let s = TlsServer::start(false, &[]);
    let mut c = greet_tcp(s.port);
    c.write_all(&option(OPT_STARTTLS, b"")).unwrap();
    assert_eq!(option_reply(&mut c).1, REP_ACK);
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        let pem = s.ca.pem();
        use rustls::pki_types::pem::PemObject;
        r.add(rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
        r
    };
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut t = rustls::StreamOwned::new(conn, c);
    // Inside TLS: a second STARTTLS is invalid; the rest works.
    t.write_all(&option(OPT_STARTTLS, b"")).unwrap();
    let (opt, kind, _) = option_reply(&mut t);
    assert_eq!((opt, kind), (OPT_STARTTLS, REP_ERR_INVALID));
    t.write_all(&option(OPT_LIST, b"")).unwrap();
    let (_, kind, p) = option_reply(&mut t);
    assert_eq!(kind, 2, "NBD_REP_SERVER");
    assert_eq!(&p[4..8], b"disk");
    assert_eq!(option_reply(&mut t).1, REP_ACK);
    // Transmission over TLS: a simple-reply read of what was written.
    t.write_all(&option(OPT_GO, &go_data("disk"))).unwrap();
    loop {
        let (_, kind, _) = option_reply(&mut t);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, 3, "NBD_REP_INFO");
    }
    let data = pattern(64 << 10, 3);
    let mut req = common::raw::request(0, common::raw::CMD_WRITE, 1, 4096, data.len() as u32);
    req.extend_from_slice(&data);
    t.write_all(&req).unwrap();
    t.write_all(&common::raw::request(
        0,
        common::raw::CMD_READ,
        2,
        4096,
        data.len() as u32,
    ))
    .unwrap();
    let mut h = [0u8; 16];
    t.read_exact(&mut h).unwrap();
    assert_eq!(&h[4..8], &[0; 4], "write failed");
    t.read_exact(&mut h).unwrap();
    assert_eq!(&h[4..8], &[0; 4], "read failed");
    let mut back = vec![0u8; data.len()];
    t.read_exact(&mut back).unwrap();
    assert!(back == data, "read over TLS differs from what was written");
    t.write_all(&common::raw::request(0, common::raw::CMD_DISC, 3, 0, 0))
        .unwrap();
}

#[test]
fn a_client_that_stalls_inside_the_tls_handshake_is_cut_off_at_the_deadline() {
    let s = TlsServer::start(false, &["--handshake-timeout", "2"]);
    let mut c = greet_tcp(s.port);
    c.write_all(&option(OPT_STARTTLS, b"")).unwrap();
    assert_eq!(option_reply(&mut c).1, REP_ACK);
    // Half a TLS record header, then nothing.
    c.write_all(&[0x16, 0x03]).unwrap();
    let t = std::time::Instant::now();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 64];
    let closed = loop {
        match c.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "still open after {:?}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_millis(1500) && t.elapsed() < Duration::from_secs(10),
        "closed after {:?}, not at the 2 s deadline",
        t.elapsed()
    );
    // Meanwhile and after, real clients are served.
    run("nbdinfo", &[&s.tcp_uri("disk", &s.client("c", None))]);
}

#[test]
fn plaintext_tcp_on_an_address_others_can_reach_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    let base = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--state-dir".into(),
            dir.path().join("s").into(),
            "--control".into(),
            control.clone().into(),
            "--nbd".into(),
            "tcp:0.0.0.0:0".into(),
        ];
        v.extend(extra.iter().map(Into::into));
        v
    };
    serve_attempt(&base(&[]), &control).assert_refused(&[
        "tcp:0.0.0.0:0",
        "not a loopback",
        "--insecure-tcp",
    ]);
    serve_attempt(&base(&["--tls", "allow"]), &control).assert_refused(&["--tls-cert"]);
    // With TLS required, or said to be fine, it starts.
    let ca = Ca::new("ca");
    let pki = certs::server_dir(&dir.path().join("pki"), &ca);
    let tls = certs::serve_flags(&pki, false);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    for extra in [&["--insecure-tcp"][..], &tls[..]] {
        let a = serve_attempt(&base(extra), &control);
        assert!(a.status.is_none(), "{extra:?}: {}", a.stderr);
    }
    // Bad credentials are refused with the file named.
    let mut bad = base(&[]);
    bad.extend(
        [
            "--tls-cert",
            pki.join("server-key.pem").to_str().unwrap(),
            "--tls-key",
            pki.join("server-key.pem").to_str().unwrap(),
        ]
        .map(Into::into),
    );
    serve_attempt(&bad, &control).assert_refused(&["server-key.pem"]);
}

fn greet_tcp(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[8..16], IHAVEOPT);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn option_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), OPT_REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        p,
    )
}
