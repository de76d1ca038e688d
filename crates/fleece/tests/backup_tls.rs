//! Push backups to TLS targets (`nbds+unix://`, `nbds://`): qemu-nbd with
//! `--tls-creds` (client certificates required) and `--tls-authz`, killed
//! and restarted mid-job; another fleece with mutual TLS on TCP. A client
//! identity the authz does not allow, and a plain target where TLS is
//! required, are refused at `backup start` with what to do. Certificates
//! are made by each test (rcgen).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::{self, Ca};
use common::jobs::*;
use common::*;

/// qemu-nbd over a raw image on a private Unix socket, with TLS: client
/// certificates required, and only the identity `O=fleece test,CN=backup`
/// let in. Killed on drop.
struct TlsQemuNbd {
    child: Option<Child>,
    sock: PathBuf,
    image: PathBuf,
    pki: PathBuf,
}

impl TlsQemuNbd {
    fn start(image: &Path, pki: &Path) -> TlsQemuNbd {
        let mut q = TlsQemuNbd {
            child: None,
            sock: image.with_extension("sock"),
            image: image.to_path_buf(),
            pki: pki.to_path_buf(),
        };
        q.restart();
        q
    }

    fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let identity = certs::dn("backup").replace(',', ",,");
        let child = Command::new("qemu-nbd")
            .args(["-t", "-f", "raw", "--cache=writeback", "--shared=16", "-k"])
            .arg(&self.sock)
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                self.pki.display()
            ))
            .args(["--tls-creds", "tls0"])
            .arg("--object")
            .arg(format!("authz-simple,id=authz0,identity={identity}"))
            .args(["--tls-authz", "authz0"])
            .arg(&self.image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run qemu-nbd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The target for a client whose credentials are in `creds`.
    fn uri(&self, creds: &Path) -> String {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            self.sock.display(),
            creds.display()
        )
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TlsQemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The CA, qemu-nbd's credentials and a client's (`CN=backup`), in `d`'s
/// directory.
fn pki(d: &Daemon) -> (Ca, PathBuf, PathBuf) {
    let ca = Ca::new("fleece test CA");
    let server = certs::server_dir(&d.path("server-pki"), &ca);
    let client = certs::client_dir(&d.path("client-pki"), &ca, Some((&ca, "backup")));
    (ca, server, client)
}

/// A sparse raw file of `size` bytes in `d`'s directory.
fn empty_image(d: &Daemon, name: &str, size: u64) -> PathBuf {
    let p = d.path(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

#[test]
fn a_backup_pushed_over_tls_to_qemu_nbd_with_tls_authz_is_exact() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 1M 3M", "write -P 0x6b 12M 64k"]);
    let want = d.copy_image_as_raw("vm", "at.raw");
    let (ca, server_pki, creds) = pki(&d);
    let img = empty_image(&d, "t.raw", 16 * MIB);
    let q = TlsQemuNbd::start(&img, &server_pki);

    let job = start(&d, &["vm", "--target", &q.uri(&creds), "--verify"]);
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "completed", "{j}\n{}", d.log());
    assert!(same_file(&img, &want), "the target differs from the disk");

    // An identity the authz does not list, and no certificate at all.
    let intruder = certs::client_dir(&d.path("intruder-pki"), &ca, Some((&ca, "intruder")));
    let anonymous = certs::client_dir(&d.path("anonymous-pki"), &ca, None);
    for creds in [&intruder, &anonymous] {
        let err = start_fails(&d, &["vm", "--target", &q.uri(creds)]);
        assert!(err.contains("does not accept this client"), "{err}");
    }
    // Plain NBD where TLS is required: told to use nbds://.
    let plain = format!("nbd+unix:///?socket={}", q.sock.display());
    let err = start_fails(&d, &["vm", "--target", &plain]);
    assert!(err.contains("use nbds://"), "{err}");
    // No job was left behind by the refusals.
    let jobs = d.json(&["backup", "list"]);
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
}

#[test]
fn a_backup_pushed_over_tls_to_another_fleece_with_mutual_tls_is_exact() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x3c 0 5M", "write -P 0x4d 15M 1M"]);
    let want = d.copy_image_as_raw("vm", "at.raw");
    let (_ca, server_pki, creds) = pki(&d);

    let mut other = Daemon::prepare(Server::Fleece, &[("copy", 16 * MIB)]);
    other.listeners.push("tcp:127.0.0.1:0".into());
    other.extra_args = certs::serve_flags(&server_pki, true)
        .into_iter()
        .map(Into::into)
        .collect();
    other.spawn();
    let st = other.cli_json(&["status"]);
    let port = st["nbd"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().unwrap().strip_prefix("tcp:127.0.0.1:"))
        .unwrap_or_else(|| panic!("no TCP listener in {st}"))
        .to_string();
    let target = format!(
        "nbds://localhost:{port}/copy?tls-certificates={}",
        creds.display()
    );
    let job = start(&d, &["vm", "--target", &target]);
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "completed", "{j}\n{}", d.log());
    assert!(
        same_file(&other.image("copy"), &want),
        "the target differs from the disk"
    );
}

#[test]
fn a_tls_target_killed_mid_job_and_restarted_is_resumed_and_exact() {
    let d = Daemon::start(&[("vm", 32 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x33 0 24M"]);
    let want = d.copy_image_as_raw("vm", "at.raw");
    let (_ca, server_pki, creds) = pki(&d);
    let img = empty_image(&d, "t.raw", 32 * MIB);
    let mut q = TlsQemuNbd::start(&img, &server_pki);
    let job = start(
        &d,
        &[
            "vm",
            "--target",
            &q.uri(&creds),
            "--speed",
            "8M",
            "--chunk-size",
            "256K",
        ],
    );
    wait_job_for(&d, &job, "some progress", |j| {
        j["done_bytes"].as_u64().unwrap() > 2 * MIB
    });
    q.kill();
    let j = wait_job_for(&d, &job, "retrying", |j| j["state"] == "retrying");
    assert!(j["retrying"].as_str().unwrap().contains("reconnect"), "{j}");
    // The guest does not notice: writes go on meanwhile.
    qemu_io(&d.uri("vm"), &["write -P 0x44 4M 1M"]);
    q.restart();
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "completed", "{j}\n{}", d.log());
    assert!(same_file(&img, &want), "the target differs from the disk");
}
