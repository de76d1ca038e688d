//! Runs the real `fleece` binary for integration tests and drives real
//! clients against it.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_fleece");

/// A running daemon in its own temp dir; killed on drop.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub control: PathBuf,
    pub disks: Vec<(String, PathBuf)>,
}

impl Daemon {
    /// Creates sparse raw images of the given sizes and serves them.
    pub fn start(disks: &[(&str, u64)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let disks: Vec<(String, PathBuf)> = disks
            .iter()
            .map(|(name, size)| {
                let p = dir.path().join(format!("{name}.raw"));
                File::create(&p).unwrap().set_len(*size).unwrap();
                (name.to_string(), p)
            })
            .collect();
        let mut d = Daemon {
            sock: dir.path().join("nbd.sock"),
            control: dir.path().join("control.sock"),
            dir,
            child: None,
            disks,
        };
        d.spawn();
        d
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn image(&self, disk: &str) -> PathBuf {
        self.disks.iter().find(|(n, _)| n == disk).unwrap().1.clone()
    }

    pub fn spawn(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        for (n, p) in &self.disks {
            cmd.arg("--disk").arg(format!("{n}={}", p.display()));
        }
        cmd.arg("--nbd")
            .arg(format!("unix:{}", self.sock.display()))
            .arg("--control")
            .arg(&self.control)
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.path().join("daemon.log")).unwrap());
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.control).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// Runs a client subcommand of the binary against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap()
    }

    /// Like `cli`, asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "fleece {args:?} failed: {}\n{}",
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout)
    }

    /// `cli_ok` with `--json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.cli_ok(&a)).unwrap()
    }

    pub fn snapshot_create(&self, disks: &[&str], name: &str, extra: &[&str]) {
        let mut a = vec!["snapshot", "create"];
        a.extend_from_slice(disks);
        a.extend_from_slice(&["--name", name]);
        a.extend_from_slice(extra);
        self.cli_ok(&a);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a command and returns its output whatever the status.
pub fn run_any(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// qemu-io on an NBD URI (raw format), asserting success; returns stdout.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut a: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(uri);
    let out = run("qemu-io", &a);
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
    assert!(
        !out.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// Starts fio random 4 KiB writes at QD16 in the background.
pub fn fio_writer(uri: &str, seconds: u32, size: &str) -> Child {
    Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={size}"),
            &format!("--runtime={seconds}"),
            "--time_based",
            "--output=/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio")
}

/// Waits for a child and asserts it succeeded.
pub fn wait_ok(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{what} failed: {}", text(&out.stderr));
}

/// True if two files have the same bytes.
pub fn same_file(a: &Path, b: &Path) -> bool {
    let out = run_any("cmp", &[a.to_str().unwrap(), b.to_str().unwrap()]);
    out.status.success()
}
