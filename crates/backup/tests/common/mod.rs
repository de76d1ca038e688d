//! Real NBD servers for the client to push to, each on a private Unix
//! socket in its own temporary directory, killed by pid when dropped; and
//! the checks that look at what arrived with other programs.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleece_backup::{ConnectOptions, NbdTarget};
use tempfile::TempDir;

pub const MIB: u64 = 1 << 20;

/// A server process and the files it serves.
pub struct Server {
    child: Child,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub export: String,
    /// The TCP port it listens on instead of `socket`, if any.
    pub port: Option<u16>,
    name: &'static str,
}

/// How a qemu-nbd with TLS is set up.
pub struct QemuTls<'a> {
    /// Its credentials directory (`ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`).
    pub creds: &'a Path,
    /// Client certificates are required (`verify-peer=on`).
    pub verify_peer: bool,
    /// The one client identity `--tls-authz` lets in, a certificate's DN.
    pub authz: Option<&'a str>,
    /// Listen on 127.0.0.1 at this port, not on a Unix socket.
    pub tcp_port: Option<u16>,
}

impl Server {
    /// `qemu-nbd` on a raw image; `shared` allows that many clients (and
    /// makes it advertise multi-conn). Trims punch holes.
    pub fn qemu_nbd(dir: TempDir, image: &Path, shared: Option<u32>) -> Server {
        let socket = dir.path().join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        // Persistent: the readiness probe is a client too, and without -t
        // qemu-nbd exits when its last client leaves.
        cmd.args(["-t", "-f", "raw", "--discard=unmap", "--cache=writeback", "-k"])
            .arg(&socket);
        if let Some(n) = shared {
            cmd.arg(format!("--shared={n}"));
        }
        cmd.arg(image);
        Server::start("qemu-nbd", cmd, dir, socket, "")
    }

    /// `qemu-nbd` on a raw image with TLS (`--tls-creds`, and `--tls-authz`
    /// when `tls.authz` says who may connect), several clients at once.
    pub fn qemu_nbd_tls(dir: TempDir, image: &Path, tls: &QemuTls) -> Server {
        let socket = dir.path().join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "-t",
            "-f",
            "raw",
            "--discard=unmap",
            "--cache=writeback",
            "--shared=4",
        ]);
        match tls.tcp_port {
            Some(port) => cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
            None => cmd.arg("-k").arg(&socket),
        };
        cmd.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={}",
            tls.creds.display(),
            if tls.verify_peer { "on" } else { "off" }
        ));
        cmd.args(["--tls-creds", "tls0"]);
        if let Some(identity) = tls.authz {
            // QEMU's option syntax: a comma in a value is written twice.
            cmd.arg("--object")
                .arg(format!(
                    "authz-simple,id=authz0,identity={}",
                    identity.replace(',', ",,")
                ))
                .args(["--tls-authz", "authz0"]);
        }
        cmd.arg(image);
        let mut s = Server::spawn("qemu-nbd", cmd, dir, socket, "", tls.tcp_port);
        s.wait_until_accepting();
        s
    }

    /// `qemu-storage-daemon` exporting a raw image as `export`, writable.
    pub fn qsd(dir: TempDir, image: &Path, export: &str) -> Server {
        let socket = dir.path().join("qsd.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file,discard=unmap",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,file=file,node-name=disk,discard=unmap"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .arg("--export")
            .arg(format!("type=nbd,id=e0,node-name=disk,name={export},writable=on"));
        Server::start("qemu-storage-daemon", cmd, dir, socket, export)
    }

    /// `nbdkit` with `args` (filters, plugin and its parameters).
    pub fn nbdkit(dir: TempDir, args: &[&str]) -> Server {
        let socket = dir.path().join("nbdkit.sock");
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(args);
        Server::start("nbdkit", cmd, dir, socket, "")
    }

    fn start(name: &'static str, cmd: Command, dir: TempDir, socket: PathBuf, export: &str) -> Server {
        let mut server = Server::spawn(name, cmd, dir, socket, export, None);
        server.wait_until_accepting();
        server
    }

    fn spawn(
        name: &'static str,
        mut cmd: Command,
        dir: TempDir,
        socket: PathBuf,
        export: &str,
        port: Option<u16>,
    ) -> Server {
        let log = File::create(dir.path().join("server.log")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Server {
            child,
            dir,
            socket,
            export: export.to_string(),
            port,
            name,
        }
    }

    /// Polls the socket until the server accepts (or dies, or 30 s pass).
    fn wait_until_accepting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = match self.port {
                Some(port) => TcpStream::connect(("127.0.0.1", port)).is_ok(),
                None => UnixStream::connect(&self.socket).is_ok(),
            };
            if up {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}: {}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} does not accept: {}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.export, self.socket.display())
    }

    /// The TLS URI with the client credentials in `creds`: `nbds://` to
    /// `localhost` for a TCP server, else `nbds+unix://`.
    pub fn tls_uri(&self, creds: &Path) -> String {
        match self.port {
            Some(port) => format!(
                "nbds://localhost:{port}/{}?tls-certificates={}",
                self.export,
                creds.display()
            ),
            None => format!(
                "nbds+unix:///{}?socket={}&tls-certificates={}",
                self.export,
                self.socket.display(),
                creds.display()
            ),
        }
    }

    pub fn connect(&self, options: &ConnectOptions) -> NbdTarget {
        NbdTarget::connect(&self.uri(), options).unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    /// Kills the server now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A sparse raw image of `size` bytes in a fresh temporary directory.
pub fn image(size: u64) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    File::create(&path).unwrap().set_len(size).unwrap();
    (dir, path)
}

/// Bytes that differ from block to block, so a misplaced write shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7 + i as u64 / 4096)) as u8)
        .collect()
}

/// Runs a program and fails the test with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

/// `qemu-img compare -U` of two raw images (files or NBD URIs).
pub fn compare(a: &str, b: &str) {
    run("qemu-img", &["compare", "-U", "-f", "raw", "-F", "raw", a, b]);
}

/// A raw file holding `content`, to compare against.
pub fn expected_file(dir: &Path, content: &[u8]) -> PathBuf {
    let path = dir.join("expected.raw");
    std::fs::write(&path, content).unwrap();
    path
}

pub fn one_connection() -> ConnectOptions {
    ConnectOptions {
        connections: 1,
        ..ConnectOptions::default()
    }
}

/// A push as a job would do it, on an export of at least 8 MiB: pipelined
/// 64 KiB writes, one large write (split by the client), zeroes, a trim
/// where offered, a flush; then a verify pass through the client. Returns
/// what the first 8 MiB must hold, for a check by another program.
pub fn push(target: &NbdTarget) -> Vec<u8> {
    let mut expected = vec![0u8; 8 * MIB as usize];
    let block = 64 * 1024;
    let mut pending = Vec::new();
    for i in 0..64u64 {
        let data = pattern(i, block);
        let at = i * block as u64;
        expected[at as usize..at as usize + block].copy_from_slice(&data);
        pending.push(target.submit_write(at, &data).unwrap());
    }
    for p in pending {
        p.wait().unwrap();
    }
    let big = pattern(99, 3 * MIB as usize);
    target.write(5 * MIB, &big).unwrap();
    expected[5 * MIB as usize..8 * MIB as usize].copy_from_slice(&big);
    target.write_zeroes(MIB, MIB).unwrap();
    expected[MIB as usize..2 * MIB as usize].fill(0);
    if target.info().can_trim() {
        // What a trimmed range reads is up to the server; every server
        // tested here reads zeroes there, so it is checked too.
        target.trim(3 * MIB, MIB / 2).unwrap();
        expected[3 * MIB as usize..3 * MIB as usize + MIB as usize / 2].fill(0);
    }
    target.flush().unwrap();

    let mut back = vec![0u8; expected.len()];
    target.read(0, &mut back).unwrap();
    assert!(back == expected, "read back differs from what was written");
    if target.info().block_status {
        check_block_status(target, &expected);
    }
    expected
}

/// Extents cover the export from the start without gaps, and what they
/// call zero reads as zero.
fn check_block_status(target: &NbdTarget, content: &[u8]) {
    let mut at = 0u64;
    while at < content.len() as u64 {
        let extents = target.block_status(at, content.len() as u64 - at).unwrap();
        assert!(!extents.is_empty());
        for e in extents {
            assert!(e.length > 0);
            let end = (at + e.length) as usize;
            if e.flags & fleece_nbd::consts::STATE_ZERO as u64 != 0 {
                assert!(
                    content[at as usize..end].iter().all(|&b| b == 0),
                    "{at}+{} reported zero but holds data",
                    e.length
                );
            }
            at += e.length;
        }
    }
}
