//! Data survives the server: flushed writes are in the image file after
//! kill -9 and are served after a restart; SIGTERM under load exits 0 with
//! every acknowledged write in the file. On raw and on qcow2 disks (read
//! back as QEMU reads the image; the harness then runs `qemu-img check`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

both_formats!(flushed_writes_are_in_the_file_after_kill_9_and_served_after_restart);
fn flushed_writes_are_in_the_file_after_kill_9_and_served_after_restart(format: Format) {
    let mut d = Daemon::start_nbd_in(format, &[("disk", 8 * MIB)]);
    qemu_io(
        &d.uri("disk"),
        &[
            "write -P 0x6b 1M 128k",
            "write -P 0x6c 5000 3000",
            "write -z 1052672 4k",
            "flush",
        ],
    );
    d.kill9();
    let img = d.image_as_raw("disk");
    assert_file_bytes(&img, MIB, 4096, 0x6b);
    assert_file_bytes(&img, MIB + 4096, 4096, 0);
    assert_file_bytes(&img, MIB + 8192, 128 * 1024 - 8192, 0x6b);
    assert_file_bytes(&img, 5000, 3000, 0x6c);
    assert_file_bytes(&img, 0, 5000, 0);
    // Restart on the same image (and, for fleece, the sockets left behind).
    d.spawn();
    qemu_io(
        &d.uri("disk"),
        &[
            "read -P 0x6b 1M 4k",
            "read -P 0 1052672 4k",
            "read -P 0x6b 1056768 120k",
            "read -P 0x6c 5000 3000",
        ],
    );
    // It takes writes again, and a second crash keeps them too.
    qemu_io(&d.uri("disk"), &["write -P 0x6d 7M 1M", "flush"]);
    d.restart_after_kill9();
    qemu_io(&d.uri("disk"), &["read -P 0x6d 7M 1M", "read -P 0x6c 5000 3000"]);
    d.kill9();
    assert_file_bytes(&d.image_as_raw("disk"), 7 * MIB, MIB as usize, 0x6d);
}

both_formats!(kill_9_with_clients_connected_then_restart_serves_them_again);
fn kill_9_with_clients_connected_then_restart_serves_them_again(format: Format) {
    let mut d = Daemon::start_nbd_in(format, &[("disk", 16 * MIB)]);
    let fio = spawn_fio(
        &d.uri("disk"),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--offset=8M",
            "--runtime=20",
            "--time_based",
        ],
    );
    std::thread::sleep(Duration::from_millis(800));
    d.kill9();
    let _ = fio.wait_with_output();
    d.spawn();
    qemu_io(&d.uri("disk"), &["write -P 0x44 0 64k", "read -P 0x44 0 64k"]);
    run("nbdinfo", &[&d.uri("disk")]);
}

both_formats!(sigterm_under_load_exits_zero_with_acknowledged_writes_in_the_file);
fn sigterm_under_load_exits_zero_with_acknowledged_writes_in_the_file(format: Format) {
    let mut d = Daemon::start_nbd_in(format, &[("disk", 32 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x3c 0 1M", "flush"]);
    // Load: fio on one range, two writers that report each acknowledged block.
    let fio = spawn_fio(
        &d.uri("disk"),
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--offset=16M",
            "--runtime=30",
            "--time_based",
        ],
    );
    let script = format!("{}/tests/python/acked_writes.py", env!("CARGO_MANIFEST_DIR"));
    let writers: Vec<_> = [(512u64, 1024u64), (2048, 1024)]
        .iter()
        .map(|(first, n)| {
            Command::new(python())
                .arg(&script)
                .arg(&d.sock)
                .arg("disk")
                .arg(first.to_string())
                .arg(n.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let status = d.sigterm(Duration::from_secs(20));
    assert!(
        status.success(),
        "{:?} exited with {status} on SIGTERM; stderr:\n{}",
        d.server,
        d.log()
    );
    let _ = fio.wait_with_output();
    let img = d.image_as_raw("disk");
    assert_file_bytes(&img, 0, MIB as usize, 0x3c);
    let data = std::fs::read(&img).unwrap();
    let mut acked = 0;
    for w in writers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success(), "writer failed: {}", text(&out.stderr));
        for line in BufReader::new(&out.stdout[..]).lines() {
            let i: usize = line.unwrap().trim().parse().unwrap();
            let block = &data[i * 4096..(i + 1) * 4096];
            let want = format!("{i:08}").repeat(512);
            assert!(
                block == want.as_bytes(),
                "block {i} was acknowledged before SIGTERM but is not in the file"
            );
            acked += 1;
        }
    }
    assert!(acked > 50, "only {acked} writes were acknowledged under load");
    // The same image serves again after a restart.
    d.spawn();
    qemu_io(&d.uri("disk"), &["read -P 0x3c 0 1M"]);
}

both_formats!(sigint_while_idle_exits_zero);
fn sigint_while_idle_exits_zero(format: Format) {
    let mut d = Daemon::start_nbd_in(format, &[("disk", MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x21 0 4k"]);
    d.signal(libc::SIGINT);
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exited with {status} on SIGINT; stderr:\n{}",
        d.log()
    );
    assert_file_bytes(&d.image_as_raw("disk"), 0, 4096, 0x21);
}
