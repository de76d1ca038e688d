//! The image file changes size underneath the daemon (someone truncates or
//! grows it), and `fleece disk resize` changes it on purpose.

mod common;

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn nbd_size(uri: &str) -> u64 {
    run("nbdinfo", &["--size", uri]).trim().parse().unwrap()
}

/// A 512 MiB disk with 1 MiB of 0x5a at 200 MiB, snapshot `s1` (with the
/// extra snapshot options), then the image truncated to 100 MiB.
fn truncated_under_a_snapshot(extra: &[&str]) -> Daemon {
    let d = Daemon::start(&[("vm", 512 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 200M 1M"]);
    d.snapshot_create(&["vm"], "s1", extra);
    set_len(&d.image("vm"), 100 * MIB);
    d
}

#[test]
fn a_truncated_image_fails_io_past_its_end_and_the_view_never_reads_zeroes() {
    let mut d = truncated_under_a_snapshot(&[]);
    qemu_io_fails(&d.uri("vm"), "read 200M 4k");
    qemu_io_fails(&d.uri("vm@s1"), "read 200M 4k");
    // The old data cannot be read for the copy-before-write, so by default
    // the write fails.
    qemu_io_fails(&d.uri("vm"), "write -P 0x66 200M 4k");
    qemu_io_fails(&d.uri("vm@s1"), "read 200M 4k");
    assert!(
        wait_for(Duration::from_secs(5), || d.log().contains("truncated")),
        "the daemon log does not mention the truncation:\n{}",
        d.log()
    );
    // What is left of the image still works.
    qemu_io(&d.uri("vm"), &["write -P 0x67 1M 4k", "read -P 0x67 1M 4k"]);
    d.assert_alive();
}

#[test]
fn with_break_snapshot_a_truncated_image_breaks_the_snapshot_and_writes_go_on() {
    let mut d = truncated_under_a_snapshot(&["--on-cbw-error", "break-snapshot"]);
    // The copy fails, which breaks the snapshot; the write itself then
    // fails too, as it lies past the truncated file's end (it would leave
    // a gap that reads as zeroes).
    qemu_io_fails(&d.uri("vm"), "write -P 0x66 200M 4k");
    let s = d.json(&["snapshot", "show", "vm@s1"]);
    assert_eq!(s["state"], "broken", "{s}");
    // Writes go on where the image still is: the broken snapshot copies nothing.
    qemu_io(&d.uri("vm"), &["write -P 0x67 1M 64k", "read -P 0x67 1M 64k"]);
    qemu_io_fails(&d.uri("vm@s1"), "read 200M 4k");
    qemu_io_fails(&d.uri("vm@s1"), "read 0 4k");
    d.assert_alive();
}

#[test]
fn an_image_grown_underneath_keeps_its_served_size_and_the_change_is_logged() {
    let d = Daemon::start(&[("vm", 512 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 200M 64k"]);
    let image = d.image("vm");
    let logged_before = d.log().len();
    set_len(&image, GIB);
    assert_eq!(nbd_size(&d.uri("vm")), 512 * MIB);
    let path = image.to_str().unwrap().to_string();
    let mentions = || {
        d.log()[logged_before..]
            .lines()
            .any(|l| l.contains("size") && l.contains(&path))
    };
    assert!(
        wait_for(Duration::from_secs(10), mentions),
        "no log line mentions the size change of {path}:\n{}",
        d.log()
    );
    assert_eq!(nbd_size(&d.uri("vm")), 512 * MIB);
    qemu_io(&d.uri("vm"), &["read -P 0x5a 200M 64k"]);
}

#[test]
fn disk_resize_grows_an_idle_disk_and_keeps_its_data() {
    let d = Daemon::start(&[("vm", 512 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 200M 1M", "write -P 0x5b 511M 1M"]);
    d.cli_ok(&["disk", "resize", "vm", "1G"]);
    assert_eq!(nbd_size(&d.uri("vm")), GIB);
    assert_eq!(file_len(&d.image("vm")), GIB);
    assert_eq!(d.json(&["disk", "list"])[0]["size"], GIB);
    qemu_io(
        &d.uri("vm"),
        &[
            "read -P 0x5a 200M 1M",
            "read -P 0x5b 511M 1M",
            "read -P 0 512M 1M",
            "write -P 0x5c 1000M 1M",
            "read -P 0x5c 1000M 1M",
        ],
    );
}

#[test]
fn disk_resize_is_refused_with_a_snapshot_and_shrinking_needs_shrink() {
    let d = Daemon::start(&[("vm", 512 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 100M 1M"]);
    d.snapshot_create(&["vm"], "s", &[]);
    d.cli_err(&["disk", "resize", "vm", "1G"], &[]);
    let (status, body) = d.api("POST", "/v1/disks/vm/resize", Some(&json!({"size": "1G"})));
    assert_api_error(status, &body, 409, "busy");
    assert_eq!(nbd_size(&d.uri("vm")), 512 * MIB);
    assert_eq!(file_len(&d.image("vm")), 512 * MIB);
    d.cli_ok(&["snapshot", "delete", "vm@s"]);

    d.cli_err(&["disk", "resize", "vm", "256M"], &[]);
    let (status, body) = d.api("POST", "/v1/disks/vm/resize", Some(&json!({"size": "256M"})));
    assert_api_error(status, &body, 400, "invalid_argument");
    assert_eq!(file_len(&d.image("vm")), 512 * MIB);
    d.cli_ok(&["disk", "resize", "vm", "256M", "--shrink"]);
    assert_eq!(nbd_size(&d.uri("vm")), 256 * MIB);
    assert_eq!(file_len(&d.image("vm")), 256 * MIB);
    qemu_io(&d.uri("vm"), &["read -P 0x5a 100M 1M"]);
    qemu_io_fails(&d.uri("vm"), "read 300M 4k");
}

#[test]
fn a_persistent_bitmap_survives_a_resize_and_records_the_grown_range() {
    let mut d = Daemon::start(&[("vm", 512 * MIB)]);
    d.cli_ok(&["bitmap", "add", "vm", "b0"]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 0 64k"]);
    d.cli_ok(&["disk", "resize", "vm", "1G"]);
    qemu_io(&d.uri("vm"), &["write -P 0x5b 768M 64k"]);
    let check = |d: &Daemon| {
        let list = d.json(&["bitmap", "list", "vm"]);
        let b0 = &list[0];
        assert_eq!(b0["name"], "b0", "{list}");
        assert_eq!(b0["recording"], true, "{list}");
        let map = nbdinfo_map(&d.uri("vm"), Some("qemu:dirty-bitmap:b0"));
        assert_map_range(&map, 0, 65536, 1, Some("dirty"));
        assert_map_range(&map, 768 * MIB, 65536, 1, Some("dirty"));
        assert_eq!(map.iter().map(|e| e.len).sum::<u64>(), GIB, "{map:?}");
    };
    check(&d);
    // Its sidecar matches the new size: it loads after a restart.
    d.restart_after_kill9();
    check(&d);
    qemu_io(&d.uri("vm"), &["read -P 0x5b 768M 64k"]);
}

#[test]
fn shrinking_a_disk_with_a_connected_client_is_busy_but_growing_is_not() {
    let d = Daemon::start(&[("vm", 512 * MIB)]);
    // A client that stays connected (qemu-nbd -L lists, so use libnbd).
    let mut client = KillOnDrop(
        std::process::Command::new(python())
            .args([
                "-c",
                "import sys, nbd\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint('up', flush=True)\nsys.stdin.read()\n",
                &d.uri("vm"),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = TimedLines::new(client.0.stdout.take().unwrap());
    assert_eq!(lines.line(Duration::from_secs(10)).as_deref(), Some("up"));
    let (status, body) = d.api(
        "POST",
        "/v1/disks/vm/resize",
        Some(&json!({"size": "256M", "shrink": true})),
    );
    assert_api_error(status, &body, 409, "busy");
    assert_eq!(file_len(&d.image("vm")), 512 * MIB);
    d.cli_ok(&["disk", "resize", "vm", "1G"]);
    assert_eq!(file_len(&d.image("vm")), GIB);
    drop(client);
    // Once the client has gone, shrinking works.
    d.cli_ok(&["disk", "resize", "vm", "512M", "--shrink"]);
    assert_eq!(nbd_size(&d.uri("vm")), 512 * MIB);
}

#[test]
fn an_image_replaced_underneath_is_logged_and_fleece_keeps_its_file() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 0 64k"]);
    let img = d.image("vm");
    let other = d.path("other.raw");
    std::fs::File::create(&other).unwrap().set_len(16 * MIB).unwrap();
    std::fs::rename(&other, &img).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || d
            .log()
            .contains("deleted or replaced")),
        "no log line about the replaced image:\n{}",
        d.log()
    );
    // The export still serves the file it opened.
    qemu_io(&d.uri("vm"), &["read -P 0x5a 0 64k"]);
}

#[test]
fn once_a_truncation_is_seen_a_write_past_the_end_cannot_hide_it_behind_zeroes() {
    // No snapshot: nothing copies, so only the file's end protects the data.
    let d = Daemon::start(&[("vm", 512 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x5a 200M 1M"]);
    set_len(&d.image("vm"), 100 * MIB);
    assert!(
        wait_for(Duration::from_secs(10), || d.log().contains("truncated")),
        "the watcher did not notice:\n{}",
        d.log()
    );
    // A write past the end would extend the file and make [100M, 300M)
    // read as zeroes, silently: it fails instead, and reads keep failing.
    qemu_io_fails(&d.uri("vm"), "write -P 0x66 300M 4k");
    assert_eq!(file_len(&d.image("vm")), 100 * MIB);
    qemu_io_fails(&d.uri("vm"), "read 200M 4k");
    // Writes at the end of what is left still work, and may extend it.
    qemu_io(&d.uri("vm"), &["write -P 0x67 100M 4k", "read -P 0x67 100M 4k"]);
}

#[test]
fn a_resize_past_what_can_be_meant_is_invalid_input() {
    let mut d = Daemon::start(&[("vm", 16 * MIB)]);
    d.cli_err(&["disk", "resize", "vm", "131072T"], &["at most"]);
    let (status, body) = d.api("POST", "/v1/disks/vm/resize", Some(&json!({"size": 1u64 << 62})));
    assert_api_error(status, &body, 400, "invalid_argument");
    let (status, body) = d.api("POST", "/v1/disks/vm/resize", Some(&json!({"size": 1000})));
    assert_api_error(status, &body, 400, "invalid_argument");
    assert_eq!(file_len(&d.image("vm")), 16 * MIB);
    d.assert_alive();
}
