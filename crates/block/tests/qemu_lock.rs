//! fleece's image locks against real QEMU tools: a QEMU process must not
//! write an image fleece serves, and fleece must not serve one that a QEMU
//! process writes. Skipped (with a note) where the tools are not installed.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleece_block::{ErrorKind, LockMode, RawFile};

fn have(tool: &str) -> bool {
    Command::new("which")
        .arg(tool)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_all(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        eprintln!("skipping: {} not installed", missing.join(", "));
    }
    missing.is_empty()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("cannot run a QEMU tool")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn qemu_io_write(image: &Path) -> Output {
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(image))
}

/// True if the file system under the test's directory has OFD locks (our
/// `lock` then warns and succeeds without locking, and there is nothing to test).
fn locks_work(dir: &Path) -> bool {
    let p = dir.join("probe");
    let a = RawFile::create(&p, 4096).unwrap();
    let b = RawFile::open(&p, false).unwrap();
    a.lock(LockMode::ReadWrite).unwrap();
    let works = b.lock(LockMode::ReadWrite).is_err();
    if !works {
        eprintln!("skipping: no open file description locks on {}", dir.display());
    }
    works
}

#[test]
fn qemu_tools_cannot_write_an_image_fleece_locked() {
    if !have_all(&["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !locks_work(dir.path()) {
        return;
    }
    let image = dir.path().join("disk.raw");
    let f = RawFile::create(&image, 1 << 20).unwrap();
    f.lock(LockMode::ReadWrite).unwrap();

    let o = qemu_io_write(&image);
    let out = text(&o);
    assert!(!o.status.success(), "qemu-io wrote an image fleece serves: {out}");
    assert!(out.contains("lock"), "{out}");

    let o = run(Command::new("qemu-img").args(["info", "-U"]).arg(&image));
    assert!(o.status.success(), "qemu-img info -U: {}", text(&o));

    f.unlock();
    let o = qemu_io_write(&image);
    assert!(o.status.success(), "qemu-io after unlock: {}", text(&o));
    assert!(!text(&o).contains("lock"), "{}", text(&o));
}

/// Kills the server on the way out, even if the test fails.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fleece_cannot_lock_an_image_qemu_nbd_serves() {
    if !have_all(&["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !locks_work(dir.path()) {
        return;
    }
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("nbd.sock");
    drop(RawFile::create(&image, 1 << 20).unwrap());
    let mut server = Server(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "--persistent", "-k"])
            .arg(&sock)
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start qemu-nbd"),
    );
    // qemu-nbd listens before it opens (and locks) the image, but greets a
    // client only once its export is up: wait until it takes a connection
    // (the socket may exist a moment before it listens), then for the
    // greeting.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                if let Some(status) = server.0.try_wait().unwrap() {
                    panic!("qemu-nbd exited early: {status}");
                }
                assert!(Instant::now() < deadline, "qemu-nbd does not listen: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("cannot connect to qemu-nbd: {e}"),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 8];
    conn.read_exact(&mut greeting).expect("no greeting from qemu-nbd");
    assert_eq!(&greeting, b"NBDMAGIC");
    drop(conn);

    let f = RawFile::open(&image, false).unwrap();
    let e = f.lock(LockMode::ReadWrite).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    // qemu-nbd holds "write" (which fleece does not share) and refuses to
    // share "resize" (which fleece holds); either is named.
    let msg = e.to_string();
    assert!(
        msg.contains("holds the \"write\" permission")
            || msg.contains("refuses to share the \"resize\" permission"),
        "{msg}"
    );
    // A failed lock leaves nothing behind: once qemu-nbd is gone, it works.
    drop(server);
    f.lock(LockMode::ReadWrite).unwrap();
}
