//! Access lists: which client identity (TLS certificate subject, Unix
//! peer uid) may open which export, and how. A denied client gets
//! NBD_REP_ERR_POLICY and does not see the export in LIST; a read-only
//! grant gives a read-only export whose writes fail with EPERM. Checked
//! with nbdinfo, nbdcopy and qemu-io over TLS, and on the raw protocol.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::certs::{self, Ca};
use common::raw::*;
use common::*;

const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const TF_READ_ONLY: u16 = 1 << 1;
const CMD_TRIM: u16 = 4;
const EPERM: u32 = 1;

fn my_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Starts fleece with the config text `toml` (plus disks vm1, vm2) and a
/// TCP listener; returns it and its port.
fn start_with_config(toml: &str, disks: &[(&str, u64)]) -> (Daemon, u16) {
    let mut d = Daemon::prepare(Server::Fleece, disks);
    let cfg = d.path("fleece.toml");
    std::fs::write(&cfg, toml).unwrap();
    d.listeners.push("tcp:127.0.0.1:0".into());
    d.extra_args = vec!["--config".into(), cfg.into()];
    d.spawn();
    let st = d.cli_json(&["status"]);
    let port = st["nbd"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().unwrap().strip_prefix("tcp:127.0.0.1:"))
        .unwrap()
        .parse()
        .unwrap();
    (d, port)
}

fn uri(port: u16, export: &str, creds: &Path) -> String {
    format!(
        "nbds://localhost:{port}/{export}?tls-certificates={}",
        creds.display()
    )
}

/// Export names nbdinfo --list shows to `creds`.
fn listed(port: u16, creds: &Path) -> Vec<String> {
    let out = run("nbdinfo", &["--list", "--json", &uri(port, "", creds)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn qemu_io_tls(creds: &Path, port: u16, export: &str, cmd: &str) -> (bool, String) {
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display());
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={port},export={export},tls-creds=tls0"
    );
    let out = run_any(
        "qemu-io",
        &["--object", &object, "--image-opts", "-c", cmd, &opts],
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out.status.success() && !all.contains("failed"), all)
}

#[test]
fn the_vm_writes_its_disk_and_the_backup_server_reads_its_snapshots_and_nothing_else() {
    let ca = Ca::new("fleece test CA");
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::server_dir(&dir.path().join("pki"), &ca);
    let client =
        |name: &str| -> PathBuf { certs::client_dir(&dir.path().join(name), &ca, Some((&ca, name))) };
    let (vm, backup, stranger) = (client("vm1"), client("backup"), client("stranger"));
    let config = format!(
        r#"
[tls]
cert = "{pki}/server-cert.pem"
key = "{pki}/server-key.pem"
ca = "{pki}/ca-cert.pem"

[[access]]
cert = "{vm}"
exports = ["vm1"]
mode = "read-write"

[[access]]
cert = "{backup}"
exports = ["vm1@*"]
mode = "read-only"
"#,
        pki = pki.display(),
        vm = certs::dn("vm1"),
        backup = certs::dn("backup"),
    );
    let (d, port) = start_with_config(&config, &[("vm1", 4 * MIB), ("vm2", MIB)]);
    // The VM writes its disk, then a snapshot is taken.
    let (ok, out) = qemu_io_tls(&vm, port, "vm1", "write -P 0x11 0 1M");
    assert!(ok, "{out}");
    d.snapshot_create(&["vm1"], "s1", &[]);
    let (ok, out) = qemu_io_tls(&vm, port, "vm1", "write -P 0x22 0 1M");
    assert!(ok, "{out}");
    // Each sees only its own exports.
    assert_eq!(listed(port, &vm), ["vm1"]);
    assert_eq!(listed(port, &backup), ["vm1@s1"]);
    assert!(listed(port, &stranger).is_empty());
    // The backup server reads the snapshot (as it was), read-only.
    let info = run("nbdinfo", &["--json", &uri(port, "vm1@s1", &backup)]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    let copy = dir.path().join("copy.raw");
    run(
        "nbdcopy",
        &[&uri(port, "vm1@s1", &backup), copy.to_str().unwrap()],
    );
    assert_file_bytes(&copy, 0, MIB as usize, 0x11);
    let (ok, out) = qemu_io_tls(&backup, port, "vm1@s1", "write -P 0x33 0 4k");
    assert!(!ok, "the backup server wrote the snapshot view: {out}");
    // Denied: told so by the server, not "no such export".
    for (creds, export) in [
        (&vm, "vm1@s1"),
        (&backup, "vm1"),
        (&stranger, "vm1"),
        (&vm, "vm2"),
    ] {
        let out = nbdinfo_fails_debug(&uri(port, export, creds));
        assert!(out.contains("may not open export"), "{export}: {out}");
        let (ok, out) = qemu_io_tls(creds, port, export, "read 0 4k");
        assert!(!ok, "qemu-io opened {export}: {out}");
    }
}

/// Unix-socket clients by uid, on the raw protocol: exact reply codes.
#[test]
fn unix_peers_are_known_by_uid_denied_exports_get_err_policy_and_read_only_ones_eperm() {
    let uid = my_uid();
    let config = format!(
        r#"
[[access]]
uid = {uid}
exports = ["ro"]
[[access]]
uid = {uid}
exports = ["?w"]
mode = "read-write"
[[access]]
uid = {other}
exports = ["hidden"]
mode = "read-write"
"#,
        other = uid + 1
    );
    let (d, _) = start_with_config(&config, &[("ro", MIB), ("rw", MIB), ("hidden", MIB)]);
    // LIST: only what this uid may open.
    let mut s = greet(&d.sock);
    s.write_all(&option(OPT_LIST, b"")).unwrap();
    let mut names = Vec::new();
    loop {
        let (_, kind, p) = option_reply(&mut s);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let len = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(p[4..4 + len].to_vec()).unwrap());
    }
    names.sort();
    assert_eq!(names, ["ro", "rw"]);
    // INFO and GO on a denied export: ERR_POLICY, and negotiation goes on.
    for opt in [OPT_INFO, OPT_GO] {
        s.write_all(&option(opt, &go_data("hidden"))).unwrap();
        let (o, kind, msg) = option_reply(&mut s);
        assert_eq!((o, kind), (opt, REP_ERR_POLICY), "{}", text(&msg));
        assert!(text(&msg).contains(&format!("uid {uid}")), "{}", text(&msg));
    }
    // "ro" is read-only for this uid.
    s.write_all(&option(OPT_GO, &go_data("ro"))).unwrap();
    let mut flags = None;
    loop {
        let (_, kind, p) = option_reply(&mut s);
        match kind {
            REP_ACK => break,
            REP_INFO if p[..2] == [0, 0] => flags = Some(u16::from_be_bytes([p[10], p[11]])),
            REP_INFO => {}
            other => panic!("GO ro: {other:#x} {}", text(&p)),
        }
    }
    let flags = flags.unwrap();
    assert_ne!(flags & TF_READ_ONLY, 0, "flags {flags:#x}");
    let mut w = request(0, CMD_WRITE, 1, 0, 4096);
    w.extend_from_slice(&[0x44; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (EPERM, 1));
    s.write_all(&request(0, CMD_TRIM, 2, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s), (EPERM, 2));
    s.write_all(&request(0, CMD_READ, 3, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 3));
    let mut data = [0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0u8; 4096], "the refused write landed");
    drop(s);
    assert_file_bytes(&d.image("ro"), 0, 4096, 0);
    // Real clients agree.
    qemu_io(&d.uri("rw"), &["write -P 0x55 0 64k", "read -P 0x55 0 64k"]);
    // qemu will not even open a read-only export for writing.
    let out = run_fails(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 0 64k", &d.uri("ro")],
    );
    assert!(
        out.contains("Permission denied") || out.contains("read-only"),
        "{out}"
    );
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 64k", &d.uri("ro")],
    );
    let out = nbdinfo_fails_debug(&d.uri("hidden"));
    assert!(out.contains("may not open export 'hidden'"), "{out}");
    // NBD_OPT_EXPORT_NAME cannot be refused: the connection ends.
    let mut s = greet(&d.sock);
    s.write_all(&option(OPT_EXPORT_NAME, b"hidden")).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "EXPORT_NAME of a denied export got {} bytes",
        rest.len()
    );
}

#[test]
fn bad_access_rules_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    for (rules, needle) in [
        ("[[access]]\nexports = [\"a\"]\n", "exactly one of cert"),
        ("[[access]]\nuid = 1\nexports = []\n", "exports must list"),
        (
            "[[access]]\nuid = 1\nexports = [\"a\"]\nmode = \"rw\"\n",
            "read-write",
        ),
    ] {
        let cfg = dir.path().join("f.toml");
        std::fs::write(&cfg, rules).unwrap();
        let args: Vec<std::ffi::OsString> = vec![
            "--state-dir".into(),
            dir.path().join("s").into(),
            "--control".into(),
            control.clone().into(),
            "--config".into(),
            cfg.into(),
        ];
        serve_attempt(&args, &control).assert_refused(&[needle]);
    }
}

/// nbdinfo on `uri`, which must fail; its output with libnbd's debug
/// messages, which carry the server's own words (nbdinfo itself shows
/// NBD_REP_ERR_POLICY as "Operation not supported").
fn nbdinfo_fails_debug(uri: &str) -> String {
    let out = std::process::Command::new("nbdinfo")
        .arg(uri)
        .env("LIBNBD_DEBUG", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "nbdinfo {uri} worked");
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}
