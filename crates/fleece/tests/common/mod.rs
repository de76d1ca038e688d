//! Shared harness for the integration tests: runs the real `fleece` binary in
//! its own temp dir with its own sockets, drives external NBD clients against
//! it, and speaks the control API over the Unix socket.
//!
//! Pure-NBD tests start their server with [`Daemon::start_nbd`]. By default it
//! is fleece. While developing, `FLEECE_TEST_SERVER=qemu-nbd` (one disk: qemu-nbd,
//! several: qemu-storage-daemon), `FLEECE_TEST_SERVER=qsd` or
//! `FLEECE_TEST_SERVER=nbdkit` runs the same tests against a reference server,
//! to check that the tests themselves are right. Tests that need the control
//! API use [`Daemon::start`], which is always fleece.
#![allow(dead_code)]

pub mod certs;
pub mod jobs;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_fleece");
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Which NBD server a [`Daemon`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Fleece,
    /// qemu-nbd for one disk, qemu-storage-daemon for several.
    QemuNbd,
    QemuStorageDaemon,
    Nbdkit,
}

impl Server {
    /// The server chosen by `FLEECE_TEST_SERVER` (default: fleece).
    pub fn from_env() -> Server {
        match std::env::var("FLEECE_TEST_SERVER").as_deref() {
            Err(_) | Ok("") | Ok("fleece") => Server::Fleece,
            Ok("qemu-nbd") => Server::QemuNbd,
            Ok("qsd") | Ok("qemu-storage-daemon") => Server::QemuStorageDaemon,
            Ok("nbdkit") => Server::Nbdkit,
            Ok(other) => panic!("FLEECE_TEST_SERVER={other}: expected fleece, qemu-nbd, qsd or nbdkit"),
        }
    }
}

/// The format of the images a [`Daemon`] makes for its disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Sparse raw files (every test so far).
    Raw,
    /// qcow2 images made by `qemu-img create` (64 KiB clusters).
    Qcow2,
}

impl Format {
    /// Every format, in the order [`both_formats!`] runs them.
    pub const ALL: [Format; 2] = [Format::Raw, Format::Qcow2];

    /// QEMU's name of it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Runs test bodies on raw and on qcow2 disks: for each `NAME`, a
/// function `fn NAME(format: Format)` of the test file, it makes a module
/// `NAME` with two tests, `NAME::raw` and `NAME::qcow2`, that call it with
/// [`Format::Raw`] and [`Format::Qcow2`]. Written just above the function,
/// like an attribute; a body left out of it is dead code, which clippy
/// refuses. `cargo nextest run qcow2` runs the qcow2 half.
///
/// ```ignore
/// both_formats!(writes_read_back);
/// /// What the test shows.
/// fn writes_read_back(format: Format) {
///     let d = Daemon::start_nbd_in(format, &[("disk", 8 * MIB)]);
///     // ...
/// }
/// ```
#[allow(unused_macros)]
macro_rules! both_formats {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use super::Format;

            #[test]
            fn raw() {
                super::$name(Format::Raw)
            }

            #[test]
            fn qcow2() {
                super::$name(Format::Qcow2)
            }
        }
    )+};
}
#[allow(unused_imports)]
pub(crate) use both_formats;

/// A running NBD server in its own temp dir; killed on drop (its log is
/// printed when the test is failing).
pub struct Daemon {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    /// The NBD Unix socket.
    pub sock: PathBuf,
    /// The control socket (fleece only).
    pub control: PathBuf,
    pub state_dir: PathBuf,
    /// (export name, image path), in the order given.
    pub disks: Vec<(String, PathBuf)>,
    /// The format of the images made for the disks.
    pub format: Format,
    /// Extra arguments for `fleece serve`.
    pub extra_args: Vec<OsString>,
    /// `--nbd` listeners for fleece (default: `unix:SOCK`).
    pub listeners: Vec<String>,
    /// Run plain `fleece serve` in the temp dir, relying on every default
    /// (`./fleece-state/...`); `sock`, `control` and `state_dir` point there.
    pub bare: bool,
    starts: u32,
    /// Whether a run was ever ended by SIGKILL (qcow2 images may then
    /// have leaked clusters).
    killed: bool,
}

impl Daemon {
    /// Starts fleece serving sparse raw images of the given sizes.
    pub fn start(disks: &[(&str, u64)]) -> Daemon {
        Daemon::start_with(Server::Fleece, disks, &[])
    }

    /// Starts the server chosen by `FLEECE_TEST_SERVER` (fleece by default),
    /// for tests that only speak NBD.
    pub fn start_nbd(disks: &[(&str, u64)]) -> Daemon {
        Daemon::start_with(Server::from_env(), disks, &[])
    }

    /// Starts `server` on fresh sparse images; `extra_args` go to `fleece serve`.
    pub fn start_with(server: Server, disks: &[(&str, u64)], extra_args: &[&str]) -> Daemon {
        let mut d = Daemon::prepare(server, disks);
        d.extra_args = extra_args.iter().map(OsString::from).collect();
        d.spawn();
        d
    }

    /// Starts fleece serving fresh images of `format`.
    pub fn start_in(format: Format, disks: &[(&str, u64)]) -> Daemon {
        let mut d = Daemon::prepare_in(Server::Fleece, disks, format);
        d.spawn();
        d
    }

    /// Starts the server chosen by `FLEECE_TEST_SERVER` on fresh images of
    /// `format`, for tests that only speak NBD.
    pub fn start_nbd_in(format: Format, disks: &[(&str, u64)]) -> Daemon {
        let mut d = Daemon::prepare_in(Server::from_env(), disks, format);
        d.spawn();
        d
    }

    /// Creates the temp dir and the images without starting anything; fill the
    /// images, then call [`Daemon::spawn`].
    pub fn prepare(server: Server, disks: &[(&str, u64)]) -> Daemon {
        Daemon::prepare_in(server, disks, Format::Raw)
    }

    /// [`Daemon::prepare`] with images of `format` (qcow2: empty images made
    /// by `qemu-img create`, 64 KiB clusters).
    /// nbdkit's file plugin serves raw files only: with qcow2 images the
    /// reference server is qemu-storage-daemon.
    pub fn prepare_in(server: Server, disks: &[(&str, u64)], format: Format) -> Daemon {
        let server = match (server, format) {
            (Server::Nbdkit, Format::Qcow2) => Server::QemuStorageDaemon,
            _ => server,
        };
        let dir = tempfile::Builder::new().prefix("fleece-test-").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("disks")).unwrap();
        let disks = disks
            .iter()
            .map(|(name, size)| {
                let p = dir.path().join("disks").join(name);
                match format {
                    Format::Raw => File::create(&p).unwrap().set_len(*size).unwrap(),
                    Format::Qcow2 => {
                        run(
                            "qemu-img",
                            &[
                                "create",
                                "-q",
                                "-f",
                                "qcow2",
                                p.to_str().unwrap(),
                                &size.to_string(),
                            ],
                        );
                    }
                }
                (name.to_string(), p)
            })
            .collect();
        let dir_sock = dir.path().join("nbd.sock");
        Daemon {
            server,
            sock: dir.path().join("nbd.sock"),
            control: dir.path().join("control.sock"),
            state_dir: dir.path().join("state"),
            dir,
            child: None,
            disks,
            format,
            extra_args: Vec::new(),
            listeners: vec![format!("unix:{}", dir_sock.display())],
            bare: false,
            starts: 0,
            killed: false,
        }
    }

    /// Switches to plain `fleece serve` run in the temp dir with no
    /// arguments: the state dir is `./fleece-state` and no disk is given.
    pub fn bare(&mut self) {
        assert!(self.is_fleece() && self.disks.is_empty());
        self.bare = true;
        self.state_dir = self.dir.path().join("fleece-state");
        self.sock = self.state_dir.join("nbd.sock");
        self.control = self.state_dir.join("control.sock");
    }

    /// The daemon's stdout so far, for the current run.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("daemon.{}.out", self.starts.max(1))))
            .unwrap_or_default()
    }

    pub fn is_fleece(&self) -> bool {
        self.server == Server::Fleece
    }

    /// A path inside the test's temp dir.
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The image file behind a disk.
    pub fn image(&self, disk: &str) -> PathBuf {
        self.disks
            .iter()
            .find(|(n, _)| n == disk)
            .unwrap_or_else(|| panic!("no disk {disk}"))
            .1
            .clone()
    }

    /// `nbd+unix:///EXPORT?socket=SOCK`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn sock_str(&self) -> &str {
        self.sock.to_str().unwrap()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("daemon.{}.log", self.starts.max(1)))
    }

    /// The current run's stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server (again) on the same images and sockets and waits until
    /// it is ready: the control socket accepts a connection for fleece, the NBD
    /// socket for the reference servers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        if !self.is_fleece() {
            // fleece must cope with the sockets a killed run left behind;
            // the reference servers are only helped along.
            let _ = std::fs::remove_file(&self.sock);
        }
        let stderr = File::create(self.log_path()).unwrap();
        let stdout = File::create(self.dir.path().join(format!("daemon.{}.out", self.starts))).unwrap();
        let mut cmd = self.command();
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.server));
        self.child = Some(child);
        let ready_on = if self.is_fleece() {
            self.control.clone()
        } else {
            self.sock.clone()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&ready_on).is_ok() {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{:?} exited during start-up with {status}; stderr:\n{}",
                    self.server,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{:?} did not accept connections on {} within 20 s; stderr:\n{}",
                    self.server,
                    ready_on.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn command(&self) -> Command {
        let sock = self.sock.to_str().unwrap();
        match self.server {
            Server::Fleece if self.bare => {
                let mut cmd = Command::new(BIN);
                cmd.arg("serve")
                    .current_dir(self.dir.path())
                    .env_remove("RUST_LOG");
                cmd
            }
            Server::Fleece => {
                let mut cmd = Command::new(BIN);
                cmd.arg("serve").env_remove("RUST_LOG");
                for (n, p) in &self.disks {
                    cmd.arg("--disk").arg(format!("{n}={}", p.display()));
                }
                for l in &self.listeners {
                    cmd.arg("--nbd").arg(l);
                }
                cmd.arg("--control")
                    .arg(&self.control)
                    .arg("--state-dir")
                    .arg(&self.state_dir)
                    .args(&self.extra_args);
                cmd
            }
            Server::QemuNbd if self.disks.len() == 1 => {
                let (name, path) = &self.disks[0];
                let mut cmd = Command::new("qemu-nbd");
                cmd.args([
                    "-k",
                    sock,
                    "-x",
                    name,
                    "-f",
                    self.format.name(),
                    "--shared=0",
                    "--persistent",
                ])
                .args(["--discard=unmap"])
                .arg(path);
                cmd
            }
            Server::QemuNbd | Server::QemuStorageDaemon => {
                let mut cmd = Command::new("qemu-storage-daemon");
                cmd.arg("--nbd-server")
                    .arg(format!("addr.type=unix,addr.path={sock},max-connections=0"));
                for (i, (name, path)) in self.disks.iter().enumerate() {
                    cmd.arg("--blockdev").arg(format!(
                        "driver=file,node-name=f{i},filename={},discard=unmap",
                        path.display()
                    ));
                    cmd.arg("--blockdev").arg(format!(
                        "driver={},node-name=d{i},file=f{i},discard=unmap",
                        self.format.name()
                    ));
                    cmd.arg("--export")
                        .arg(format!("type=nbd,id=e{i},node-name=d{i},name={name},writable=on"));
                }
                cmd
            }
            Server::Nbdkit => {
                // The file plugin serves every file of the directory under its
                // file name; the policy filter advertises block sizes.
                let mut cmd = Command::new("nbdkit");
                cmd.args(["-f", "-U", sock, "--filter=blocksize-policy", "file"])
                    .arg(format!("dir={}", self.dir.path().join("disks").display()))
                    .args([
                        "blocksize-minimum=1",
                        "blocksize-preferred=4096",
                        "blocksize-maximum=33554432",
                    ]);
                cmd
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("not running").id() as i32
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.killed = true;
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal to the server without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child, which is not yet reaped.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the server to exit.
    pub fn sigterm(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits for the server to exit; SIGKILLs it and panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().expect("not running").try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "{:?} did not exit within {timeout:?}; stderr:\n{}",
                    self.server,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL and starts it again on the same images.
    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// True while the server process runs.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Panics (with the log) unless the server is still running.
    pub fn assert_alive(&mut self) {
        if !self.alive() {
            panic!("{:?} is no longer running; stderr:\n{}", self.server, self.log());
        }
    }

    // ---- the images, whatever their format ----

    /// Flushes a disk through NBD (a FLUSH on its export), so that what it
    /// holds is on the image file for other readers: a qcow2 server keeps
    /// metadata in memory until a flush. Nothing happens when no server runs.
    pub fn flush_disk(&self, disk: &str) {
        if self.child.is_none() {
            return;
        }
        // Through the first listener: a test may serve TCP only.
        let uri = match self.listeners.first().and_then(|l| l.strip_prefix("tcp:")) {
            Some(addr) if self.is_fleece() && !self.bare => format!("nbd://{addr}/{disk}"),
            _ => self.uri(disk),
        };
        qemu_io(&uri, &["flush"]);
    }

    /// A raw file with the disk's bytes as they are now: the image itself
    /// for a raw disk (so it follows later writes), for qcow2 a raw copy
    /// made by `qemu-img convert -U` after a flush (made anew on each call).
    pub fn image_as_raw(&self, disk: &str) -> PathBuf {
        let img = self.image(disk);
        if !is_qcow2(&img) {
            return img;
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.copy_image_as_raw(disk, &format!("{disk}.as-raw.{n}"))
    }

    /// A raw copy of the disk's bytes as they are now, at `path(name)`
    /// (qcow2: flushed, then `qemu-img convert -U`). No write may be running.
    pub fn copy_image_as_raw(&self, disk: &str, name: &str) -> PathBuf {
        let img = self.image(disk);
        let out = self.path(name);
        if is_qcow2(&img) {
            self.flush_disk(disk);
            let _ = std::fs::remove_file(&out);
            run(
                "qemu-img",
                &[
                    "convert",
                    "-U",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    img.to_str().unwrap(),
                    out.to_str().unwrap(),
                ],
            );
        } else {
            std::fs::copy(&img, &out).unwrap();
        }
        out
    }

    /// Writes `data` at `offset` of a disk's image while no server runs
    /// (raw: into the file; qcow2: with qemu-io).
    pub fn write_image(&self, disk: &str, offset: u64, data: &[u8]) {
        assert!(self.child.is_none(), "write_image while the server runs");
        let img = self.image(disk);
        if !is_qcow2(&img) {
            write_at(&img, offset, data);
            return;
        }
        let src = tempfile::NamedTempFile::new_in(self.dir.path()).unwrap();
        std::fs::write(src.path(), data).unwrap();
        let cmd = format!("write -s {} {offset} {}", src.path().display(), data.len());
        run("qemu-io", &["-f", "qcow2", "-c", &cmd, img.to_str().unwrap()]);
    }

    /// Asserts that the disk reads as the raw file `want` (`qemu-img compare`
    /// of the image as QEMU reads it, after a flush).
    pub fn assert_image_is(&self, disk: &str, want: &Path) {
        let img = self.image(disk);
        self.flush_disk(disk);
        let fmt = if is_qcow2(&img) { "qcow2" } else { "raw" };
        let out = run_any(
            "qemu-img",
            &[
                "compare",
                "-U",
                "-f",
                fmt,
                "-F",
                "raw",
                img.to_str().unwrap(),
                want.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "disk {disk} is not {}: {}{}",
            want.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    /// Stops the server if it runs and checks its qcow2 images, as every
    /// test that wrote one must (it runs when the `Daemon` is dropped): the
    /// server gets SIGTERM (it flushes) and must exit 0 (fleece), then
    /// `qemu-img check` must find no corruption, and no leaked cluster
    /// unless a run was ended by SIGKILL. Raw-only daemons are left to the
    /// SIGKILL of the drop. A second call checks again.
    pub fn stop_and_check_images(&mut self) {
        let images: Vec<PathBuf> = self
            .disks
            .iter()
            .map(|(_, p)| p.clone())
            .filter(|p| is_qcow2(p))
            .collect();
        if images.is_empty() {
            return;
        }
        if self.child.is_some() {
            let status = self.sigterm(Duration::from_secs(30));
            assert!(
                status.success() || !self.is_fleece(),
                "{:?} exited with {status} on SIGTERM; stderr:\n{}",
                self.server,
                self.log()
            );
        }
        for img in images {
            check_qcow2(&img, self.killed);
        }
    }

    // ---- fleece client subcommands and control API ----

    /// Runs `fleece ARGS --control SOCK` and returns its output, whatever the status.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .env_remove("FLEECE_CONTROL")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// Like [`Daemon::cli`], asserting exit code 0; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "fleece {args:?} failed with {}:\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout)
    }

    /// `cli_ok` with `--json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("fleece {a:?}: not JSON ({e}):\n{out}"))
    }

    /// Short for [`Daemon::cli_json`].
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.cli_json(args)
    }

    /// `fleece snapshot create DISKS --name NAME EXTRA`, asserting success.
    pub fn snapshot_create(&self, disks: &[&str], name: &str, extra: &[&str]) {
        let mut a = vec!["snapshot", "create"];
        a.extend_from_slice(disks);
        a.extend_from_slice(&["--name", name]);
        a.extend_from_slice(extra);
        self.cli_ok(&a);
    }

    /// One HTTP/1.1 request on the control socket (`Connection: close`).
    /// Returns the status and the JSON body (`Null` when the body is empty).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _headers, raw) = http(&self.control, method, path, body.as_bytes());
        let text = String::from_utf8_lossy(&raw);
        let json = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{method} {path}: {status} with a body that is not JSON ({e}): {text:?}")
            })
        };
        (status, json)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_and_check_images();
        }
        self.kill9();
        if std::thread::panicking() {
            for i in 1..=self.starts {
                let p = self.dir.path().join(format!("daemon.{i}.log"));
                let log = std::fs::read_to_string(&p).unwrap_or_default();
                eprintln!(
                    "---- {:?} stderr, run {i} ({}) ----\n{log}",
                    self.server,
                    p.display()
                );
            }
        }
    }
}

/// Sends one HTTP/1.1 request over a Unix socket; returns status, headers
/// (lower-case names) and the body (de-chunked).
pub fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: fleece\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    parse_http_response(&resp)
}

pub fn parse_http_response(resp: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", text(resp)));
    let head = text(&resp[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.split_whitespace();
    assert!(parts.next().unwrap().starts_with("HTTP/1."), "{status_line}");
    let status: u16 = parts.next().unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &resp[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        let mut p = rest;
        loop {
            let nl = p.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
            let size_str = text(&p[..nl]);
            let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap();
            p = &p[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&p[..size]);
            p = &p[size + 2..];
        }
        out
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().unwrap();
        assert!(rest.len() >= len, "short body: {} < {len}", rest.len());
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    (status, headers, body)
}

/// Asserts an API error body: `{"error": {"code": CODE, "message": "..."}}`.
pub fn assert_api_error(status: u16, body: &serde_json::Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "status; body: {body}");
    assert_eq!(body["error"]["code"], want_code, "error code; body: {body}");
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {body}"));
    assert!(!msg.trim().is_empty(), "empty error.message: {body}");
}

// ---- external commands ----

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(cmd: &str, args: &[&str], out: &Output) -> String {
    format!(
        "`{cmd} {}` exited with {}\n---- stdout ----\n{}\n---- stderr ----\n{}",
        args.join(" "),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs a command and returns its output whatever the status.
pub fn run_any(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command, asserting exit code 0; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = run_any(cmd, args);
    assert!(out.status.success(), "{}", describe(cmd, args, &out));
    text(&out.stdout)
}

/// Runs a command, asserting it fails; returns stdout + stderr.
pub fn run_fails(cmd: &str, args: &[&str]) -> String {
    let out = run_any(cmd, args);
    assert!(
        !out.status.success(),
        "expected a failure:\n{}",
        describe(cmd, args, &out)
    );
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// qemu-io on `target` (a URI, or `--image-opts` string when it starts with
/// `driver=`), asserting success and no failed command or pattern check.
pub fn qemu_io(target: &str, cmds: &[&str]) -> String {
    let mut a: Vec<&str> = if target.starts_with("driver=") {
        vec!["--image-opts"]
    } else {
        vec!["-f", "raw"]
    };
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(target);
    let out = run_any("qemu-io", &a);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && !all.contains("failed") && !all.contains("Pattern verification"),
        "{}",
        describe("qemu-io", &a, &out)
    );
    all
}

/// One qemu-io command on `target` (raw format) that must fail; returns
/// what qemu-io printed, for checking the error.
/// Reads open the target read-only. The command itself must fail (qemu-io
/// prints "... failed: REASON"), not the opening of the target.
pub fn qemu_io_fails(target: &str, cmd: &str) -> String {
    let mut a = vec!["-f", "raw", "-c", cmd, target];
    if cmd.starts_with("read") {
        a.insert(0, "-r");
    }
    let out = run_any("qemu-io", &a);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains(" failed: "),
        "expected qemu-io {cmd:?} on {target} to fail; {}",
        describe("qemu-io", &a, &out)
    );
    all
}

/// The python interpreter that can `import nbd` (python3-libnbd).
pub fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        for cand in ["/usr/bin/python3", "python3", "/usr/local/bin/python3"] {
            if let Ok(out) = Command::new(cand).args(["-c", "import nbd"]).output() {
                if out.status.success() {
                    return cand.to_string();
                }
            }
        }
        panic!("no python3 with the nbd module (apt-get install python3-libnbd)");
    })
}

/// Runs `tests/python/SCRIPT SOCK EXPORT` against a server, asserting success.
pub fn python_script(d: &Daemon, script: &str, export: &str) -> String {
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python())
        .arg(&path)
        .arg(&d.sock)
        .arg(export)
        .env("NBD_SOCKET", &d.sock)
        .env("NBD_EXPORT", export)
        .env("NBD_SERVER", format!("{:?}", d.server))
        .env("NBD_IMAGE", d.image(export))
        .env("NBD_IMAGE_FORMAT", d.format.name())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe(python(), &[&path, d.sock_str(), export], &out)
    );
    text(&out.stdout)
}

/// Spawns fio on an NBD URI in the background (stderr piped).
pub fn spawn_fio(uri: &str, args: &[&str]) -> Child {
    Command::new("fio")
        .args(["--name=job", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run fio")
}

/// Waits for a child, asserting success.
/// Starts fio 4 KiB random writes at QD16 on `uri` for `seconds`, over the
/// first `size` of the export, in the background.
pub fn fio_writer(uri: &str, seconds: u32, size: &str) -> Child {
    spawn_fio(
        uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={size}"),
            &format!("--runtime={seconds}"),
            "--time_based",
        ],
    )
}

/// True if two files have the same bytes.
pub fn same_file(a: &Path, b: &Path) -> bool {
    run_any("cmp", &["-s", a.to_str().unwrap(), b.to_str().unwrap()])
        .status
        .success()
}

pub fn wait_ok(child: Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} exited with {}\n---- stdout ----\n{}\n---- stderr ----\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

// ---- files ----

/// True if the file starts with the qcow2 magic (`QFI\xfb`).
pub fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb"
}

/// `qemu-img check -U` of a qcow2 image no one writes: clean (exit 0), or
/// only leaked clusters (exit 3) where `leaks_ok` (after a SIGKILL).
pub fn check_qcow2(path: &Path, leaks_ok: bool) {
    let out = run_any("qemu-img", &["check", "-U", path.to_str().unwrap()]);
    let code = out.status.code();
    assert!(
        code == Some(0) || (leaks_ok && code == Some(3)),
        "qemu-img check {} exited with {code:?}{}:\n{}{}",
        path.display(),
        if leaks_ok {
            ""
        } else {
            " (no kill -9: leaks are not allowed either)"
        },
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Writes `data` at `offset` of an existing file (without truncating it).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Asserts that `len` bytes at `offset` of a file all equal `byte`.
pub fn assert_file_bytes(path: &Path, offset: u64, len: usize, byte: u8) {
    let buf = read_at(path, offset, len);
    if let Some(i) = buf.iter().position(|&b| b != byte) {
        panic!(
            "{}: byte at {} is {:#04x}, expected {byte:#04x} over [{offset}, +{len})",
            path.display(),
            offset + i as u64,
            buf[i]
        );
    }
}

/// Deterministic non-repeating test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Asserts two files hold the same bytes (reporting the first difference).
pub fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i}: {:#04x} vs {:#04x}",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}

/// Data ranges of a file as the filesystem reports them (SEEK_DATA/SEEK_HOLE).
pub fn file_data_ranges(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no more data
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole > data);
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

// ---- raw NBD protocol, for robustness tests ----

pub mod raw {
    use super::*;

    pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
    pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const EINVAL: u32 = 22;

    /// Connects and reads the server greeting; answers with client flags
    /// FIXED_NEWSTYLE | NO_ZEROES.
    pub fn greet(sock: &Path) -> UnixStream {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], NBDMAGIC);
        assert_eq!(&g[8..16], IHAVEOPT, "server is not newstyle");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(
            flags & 3,
            3,
            "server flags {flags:#x}: want FIXED_NEWSTYLE | NO_ZEROES"
        );
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    }

    pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Reads one option reply: (option, reply type, payload).
    pub fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC,
            "option reply magic"
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert!(len < 1 << 20, "option reply of {len} bytes");
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            p,
        )
    }

    /// Handshake with NBD_OPT_GO (no structured replies): returns the stream in
    /// transmission phase and the export size.
    pub fn connect_export(sock: &Path, export: &str) -> (UnixStream, u64) {
        let mut s = greet(sock);
        let mut go = (export.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&option(OPT_GO, &go)).unwrap();
        let mut size = None;
        loop {
            let (opt, kind, p) = option_reply(&mut s);
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if u16::from_be_bytes([p[0], p[1]]) == 0 {
                        size = Some(u64::from_be_bytes(p[2..10].try_into().unwrap()));
                    }
                }
                other => panic!("NBD_OPT_GO {export:?}: reply {other:#x} {:?}", text(&p)),
            }
        }
        (s, size.expect("no NBD_INFO_EXPORT before ACK"))
    }

    pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    /// Reads a simple reply header: (error, cookie).
    pub fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC,
            "simple reply magic"
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Sends bytes and hangs up, reading (and ignoring) whatever comes back
    /// for a moment first.
    pub fn send_and_drop(sock: &Path, bytes: &[u8]) {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
    }
}

// ---- helpers for failure-mode tests (start-up refusals, mounts, child
// processes, block-status maps) ----

/// True when the test runs as root; otherwise prints a note that `test` is
/// skipped (it needs mounts) and returns false.
pub fn running_as_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("note: {test} needs root (it mounts a tmpfs); skipped");
    false
}

/// A tmpfs mounted for one test; unmounted (lazily, so that processes still
/// holding files there cannot keep it busy) on drop, also when the test panics.
pub struct TmpfsMount {
    pub dir: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (as `mount -o size=`, e.g. `4m`) on `dir`,
    /// creating the directory.
    pub fn mount(dir: &Path, size: &str) -> TmpfsMount {
        std::fs::create_dir_all(dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        TmpfsMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A child process that is killed (by its pid) and reaped on drop.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits up to `timeout` for the process to exit; `None` if it still runs.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What became of a `fleece serve` that is expected to refuse to start.
#[derive(Debug)]
pub struct ServeAttempt {
    /// Its exit status; `None` if it started serving (it was then killed).
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl ServeAttempt {
    /// Asserts the refusal the CLI convention asks for: exit code 1 and a
    /// one-line `fleece: error: MESSAGE` naming every needle.
    pub fn assert_refused(&self, needles: &[&str]) {
        let status = self.status.unwrap_or_else(|| {
            panic!(
                "fleece serve started serving instead of refusing; stderr:\n{}",
                self.stderr
            )
        });
        assert_eq!(
            status.code(),
            Some(1),
            "fleece serve exited with {status}, not 1; stderr:\n{}",
            self.stderr
        );
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("fleece: error: "))
            .unwrap_or_else(|| panic!("no `fleece: error: ...` line on stderr:\n{}", self.stderr));
        for n in needles {
            assert!(line.contains(n), "{line:?} does not mention {n:?}");
        }
    }
}

/// Runs `fleece serve ARGS` (ARGS must include `--control CONTROL`) and
/// waits until it exits, or until it accepts connections on `control` (it
/// started: it is killed) or 20 s pass (killed too).
pub fn serve_attempt(args: &[OsString], control: &Path) -> ServeAttempt {
    let errfile = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errfile.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break Some(st);
        }
        if UnixStream::connect(control).is_ok() || Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(child);
    ServeAttempt {
        status,
        stderr: std::fs::read_to_string(errfile.path()).unwrap_or_default(),
    }
}

impl Daemon {
    /// Runs `fleece ARGS --control SOCK`, asserting the CLI error convention:
    /// exit code 1 and one line `fleece: error: ...` on stderr that names
    /// every needle. Returns that line.
    pub fn cli_err(&self, args: &[&str], needles: &[&str]) -> String {
        let out = self.cli(args);
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "fleece {args:?}: {} (want exit code 1)\nstdout: {}\nstderr: {err}",
            out.status,
            text(&out.stdout)
        );
        let line = err.trim_end();
        assert!(
            line.starts_with("fleece: error: ") && line.lines().count() == 1,
            "fleece {args:?}: stderr is not one `fleece: error: ...` line: {err:?}"
        );
        for n in needles {
            assert!(
                line.contains(n),
                "fleece {args:?}: {line:?} does not mention {n:?}"
            );
        }
        line.to_string()
    }
}

/// One extent of `nbdinfo --map`: offset, length, type and description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapExtent {
    pub offset: u64,
    pub len: u64,
    pub kind: u32,
    pub desc: String,
}

/// `nbdinfo --map[=CONTEXT] URI`, parsed.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<MapExtent> {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    run("nbdinfo", &[&flag, uri])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "odd nbdinfo --map line {l:?}");
            MapExtent {
                offset: f[0].parse().unwrap(),
                len: f[1].parse().unwrap(),
                kind: f[2].parse().unwrap(),
                desc: f[3..].join(" "),
            }
        })
        .collect()
}

/// Asserts that the map covers `[offset, offset + len)` and that every
/// extent overlapping it has type `kind` (and description `desc`, if given).
pub fn assert_map_range(map: &[MapExtent], offset: u64, len: u64, kind: u32, desc: Option<&str>) {
    let end = offset + len;
    let mut covered = offset;
    for e in map.iter().filter(|e| e.offset < end && e.offset + e.len > offset) {
        assert!(
            e.kind == kind && desc.is_none_or(|d| e.desc == d),
            "[{offset}, {end}): extent {e:?} is not type {kind} {desc:?}; map: {map:#?}"
        );
        if e.offset <= covered {
            covered = covered.max(e.offset + e.len);
        }
    }
    assert!(
        covered >= end,
        "[{offset}, {end}) is not covered by the map: {map:#?}"
    );
}

/// Every file (not directory) under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Lines from a child's stdout, each awaited with a timeout (poll(2)), so a
/// silent child cannot hang the test. Dropping it closes the read end of
/// the pipe.
pub struct TimedLines {
    out: std::process::ChildStdout,
    buf: Vec<u8>,
}

impl TimedLines {
    pub fn new(out: std::process::ChildStdout) -> TimedLines {
        TimedLines { out, buf: Vec::new() }
    }

    /// The next line (without its newline), or `None` on EOF or when none
    /// came within `timeout`.
    pub fn line(&mut self, timeout: Duration) -> Option<String> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(text(&line[..i]));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.out.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own, for a bounded time.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
            if n <= 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            match self.out.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
    }
}
