//! A client that sends requests and never reads its replies must cost only
//! itself: other clients' requests, on the same disk or another, go on.
//! Every test runs on raw and on qcow2 disks (`both_formats!`).

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::raw::*;
use common::*;

/// Writes `len` bytes of data at the start of a disk's image (the server
/// not running), then drops them from the page cache, so that reads of it
/// wait for the disk (and go to the daemon's worker threads, not the
/// connection's own).
fn uncached_data(d: &Daemon, disk: &str, len: usize) {
    d.write_image(disk, 0, &pattern(len, 3));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.image(disk))
        .unwrap();
    f.sync_all().unwrap();
    // SAFETY: fadvise on a descriptor we own; no memory is passed.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Runs qemu-io commands within `secs` seconds (killed after), asserting
/// they all succeeded in time.
fn qemu_io_within(secs: u32, target: &str, cmds: &[&str]) {
    let mut args = vec![secs.to_string(), "qemu-io".into(), "-f".into(), "raw".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(target.into());
    let out = Command::new("timeout")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && !all.contains("failed"),
        "qemu-io {cmds:?} on {target} did not finish within {secs} s (exit {}): {all}",
        out.status
    );
}

both_formats!(a_client_that_never_reads_its_replies_does_not_hold_up_other_clients);
fn a_client_that_never_reads_its_replies_does_not_hold_up_other_clients(format: Format) {
    let mut d = Daemon::prepare_in(Server::from_env(), &[("a", 64 * MIB), ("b", 16 * MIB)], format);
    uncached_data(&d, "a", 16 << 20);
    d.spawn();

    // 128 reads of 1 MiB, far more than the workers and the socket buffers
    // hold, and not one reply read.
    let (mut stuck, _) = connect_export(&d.sock, "a");
    let mut reqs = Vec::new();
    for i in 0..128u64 {
        reqs.extend_from_slice(&request(0, CMD_READ, i, (i % 16) << 20, 1 << 20));
    }
    stuck.write_all(&reqs).unwrap();
    // Wait until the replies have filled whatever buffers they can: what
    // the client could read stops growing. Other clients must not wait.
    let unread = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD stores one int into a local.
        unsafe { libc::ioctl(stuck.as_raw_fd(), libc::FIONREAD, &mut n) };
        n
    };
    let mut last = (-1, 0);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let n = unread();
            last = if n == last.0 { (n, last.1 + 1) } else { (n, 0) };
            n > 0 && last.1 >= 4
        }),
        "no replies reached the client"
    );
    qemu_io_within(
        20,
        &d.uri("b"),
        &["write -P 0x42 0 64k", "flush", "read -P 0x42 0 64k"],
    );
    qemu_io_within(
        20,
        &d.uri("a"),
        &[
            "write -P 0x43 32M 64k",
            "flush",
            "read -P 0x43 32M 64k",
            "read 0 1M",
        ],
    );
    if d.is_fleece() {
        // It is still one open connection, and the daemon reports it.
        let (status, body) = d.api("GET", "/v1/status", None);
        assert_eq!(status, 200, "{body}");
        assert!(body["connections"].as_u64().unwrap() >= 1, "{body}");
    }
    drop(stuck);
    d.assert_alive();
    qemu_io_within(20, &d.uri("a"), &["read -P 0x43 32M 64k"]);
}
