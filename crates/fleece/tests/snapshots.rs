//! Live snapshots driven end to end: the real daemon, qemu-io, nbdcopy,
//! qemu-img and fio over Unix sockets, on raw and on qcow2 disks.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

both_formats!(image_fleecing_view_keeps_old_patterns_while_live_disk_changes);
/// QEMU's image-fleecing scenario: patterns, snapshot, overwrites that are
/// full, partial-left, partial-right and adjacent; the view keeps the old
/// patterns and zeroes, the live disk has the new data.
fn image_fleecing_view_keeps_old_patterns_while_live_disk_changes(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 64 * MIB)]);
    let live = d.uri("disk");
    qemu_io(
        &live,
        &[
            "write -P 0x5 0 64k",
            "write -P 0xd 1M 64k",
            "write -P 0x1 32M 64k",
            "write -P 0x3 67043328 64k",
        ],
    );
    d.snapshot_create(&["disk"], "fleece", &[]);
    let view = d.uri("disk@fleece");
    qemu_io(
        &live,
        &[
            "write -P 0xab 0 64k",        // full cluster
            "write -P 0xad 1015808 64k",  // partial-left: 1M-32K
            "write -P 0x1d 33587200 64k", // partial-right: 32M+32K
            "write -P 0xea 66977792 64k", // adjacent-left: 64M-128K
        ],
    );
    qemu_io(
        &view,
        &[
            "read -P 0x5 0 64k",
            "read -P 0xd 1M 64k",
            "read -P 0x1 32M 64k",
            "read -P 0x3 67043328 64k",
            "read -P 0 64k 32k",
            "read -P 0 1015808 32k",
            "read -P 0 33619968 32k",
            "read -P 0 66977792 64k",
        ],
    );
    qemu_io(
        &live,
        &[
            "read -P 0xab 0 64k",
            "read -P 0xad 1015808 64k",
            "read -P 0x1d 33587200 64k",
            "read -P 0xea 66977792 64k",
        ],
    );
    // Writes to the view are refused; the view is unchanged.
    qemu_io_fails(&view, "write -P 0x77 0 4k");
    qemu_io(&view, &["read -P 0x5 0 64k"]);
    d.cli_ok(&["snapshot", "delete", "disk@fleece"]);
    qemu_io(&live, &["read -P 0xab 0 64k", "read -P 0xd 1081344 32k"]);
    let gone = run_any("nbdinfo", &[&view]);
    assert!(!gone.status.success(), "deleted view is still served");
}

fn fill_random(d: &Daemon, disk: &str, size: &str) {
    run(
        "fio",
        &[
            "--name=fill",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri(disk)),
            "--rw=write",
            "--bs=1M",
            "--iodepth=4",
            &format!("--size={size}"),
            "--output=/dev/null",
        ],
    );
}

/// A raw copy of the disk as it is now (no writes may be running).
fn reference(d: &Daemon, disk: &str, name: &str) -> std::path::PathBuf {
    d.copy_image_as_raw(disk, name)
}

both_formats!(nbdcopy_pulls_during_random_writes_equal_the_image_at_the_instant);
fn nbdcopy_pulls_during_random_writes_equal_the_image_at_the_instant(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 64 * MIB)]);
    fill_random(&d, "disk", "48M");
    let at_instant = reference(&d, "disk", "instant.raw");
    d.snapshot_create(&["disk"], "s", &[]);
    let load = fio_writer(&d.uri("disk"), 6, "64M");
    for i in 0..3 {
        let pulled = d.path(&format!("pull{i}.raw"));
        run(
            "nbdcopy",
            &["--connections=2", &d.uri("disk@s"), pulled.to_str().unwrap()],
        );
        assert!(
            same_file(&pulled, &at_instant),
            "pull {i} differs from the image at the instant"
        );
    }
    // qemu-img reads it the same way.
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &d.uri("disk@s"),
            at_instant.to_str().unwrap(),
        ],
    );
    wait_ok(load, "fio during pulls");
    assert!(
        !same_file(&d.image_as_raw("disk"), &at_instant),
        "the load did not change the live disk"
    );
    let snap = d.json(&["snapshot", "show", "disk@s"]);
    assert_eq!(snap["state"], "active");
    assert!(snap["copied_clusters"].as_u64().unwrap() > 0);
    assert!(snap["store"]["used_bytes"].as_u64().unwrap() > 0);
}

both_formats!(block_status_of_the_view_is_true_to_the_instant);
fn block_status_of_the_view_is_true_to_the_instant(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 16 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x11 4M 1M"]);
    d.snapshot_create(&["disk"], "s", &[]);
    // After the instant: data written into a hole, and the old data trimmed.
    qemu_io(&d.uri("disk"), &["write -P 0x22 0 1M", "discard 4M 1M"]);
    let map = run("nbdinfo", &["--map", &d.uri("disk@s")]);
    let mut data_at_4m = false;
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let hole = f[2] == "3";
        if hole {
            assert!(
                off + len <= 4 * MIB || off >= 5 * MIB,
                "view reports a hole over the data at 4M: {map}"
            );
        } else if off <= 4 * MIB && off + len >= 5 * MIB {
            data_at_4m = true;
        }
    }
    assert!(data_at_4m, "view map misses the data at 4M: {map}");
    qemu_io(&d.uri("disk@s"), &["read -P 0 0 1M", "read -P 0x11 4M 1M"]);
}

both_formats!(consistency_group_snapshots_several_disks_at_one_instant);
fn consistency_group_snapshots_several_disks_at_one_instant(format: Format) {
    let d = Daemon::start_in(format, &[("a", 8 * MIB), ("b", 8 * MIB)]);
    qemu_io(&d.uri("a"), &["write -P 0xa1 0 1M"]);
    qemu_io(&d.uri("b"), &["write -P 0xb1 0 1M"]);
    d.snapshot_create(&["a", "b"], "group", &[]);
    qemu_io(&d.uri("a"), &["write -P 0xa2 0 1M"]);
    qemu_io(&d.uri("b"), &["write -P 0xb2 0 1M"]);
    qemu_io(&d.uri("a@group"), &["read -P 0xa1 0 1M"]);
    qemu_io(&d.uri("b@group"), &["read -P 0xb1 0 1M"]);
    let list = d.json(&["snapshot", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    // The same name again is refused, for both disks.
    let again = d.cli(&["snapshot", "create", "a", "--name", "group"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
}

both_formats!(several_snapshots_stay_exact_and_deleting_one_under_load_keeps_the_others);
fn several_snapshots_stay_exact_and_deleting_one_under_load_keeps_the_others(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 32 * MIB)]);
    fill_random(&d, "disk", "32M");
    let r1 = reference(&d, "disk", "r1.raw");
    d.snapshot_create(&["disk"], "one", &[]);
    qemu_io(&d.uri("disk"), &["write -P 0x42 0 8M"]);
    let r2 = reference(&d, "disk", "r2.raw");
    d.snapshot_create(&["disk"], "two", &["--store", "ram:4M"]);
    qemu_io(&d.uri("disk"), &["write -P 0x43 4M 8M"]);
    let r3 = reference(&d, "disk", "r3.raw");
    d.snapshot_create(&["disk"], "three", &["--cluster-size", "128K"]);
    let load = fio_writer(&d.uri("disk"), 5, "32M");
    d.cli_ok(&["snapshot", "delete", "disk@two"]);
    for (name, r) in [("one", &r1), ("three", &r3)] {
        let pulled = d.path(&format!("{name}.pull"));
        run(
            "nbdcopy",
            &[&d.uri(&format!("disk@{name}")), pulled.to_str().unwrap()],
        );
        assert!(same_file(&pulled, r), "snapshot {name} is not exact");
    }
    wait_ok(load, "fio while deleting a snapshot");
    assert!(!same_file(&r2, &r1));
    let left: Vec<String> = d
        .json(&["snapshot", "list", "disk"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec!["one", "three"]);
    assert_eq!(
        d.json(&["snapshot", "show", "disk@three"])["cluster_size"],
        128 * 1024
    );
}

both_formats!(full_store_fails_the_guest_write_and_keeps_the_view_exact_by_default);
fn full_store_fails_the_guest_write_and_keeps_the_view_exact_by_default(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 16 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x61 0 4M"]);
    d.snapshot_create(&["disk"], "s", &["--store-limit", "256K"]);
    // Fits: four 64 KiB clusters.
    qemu_io(&d.uri("disk"), &["write -P 0x62 0 256k"]);
    // Does not fit: the write fails and the live disk keeps the old data.
    qemu_io_fails(&d.uri("disk"), "write -P 0x63 1M 1M");
    qemu_io(&d.uri("disk"), &["read -P 0x61 1M 1M", "read -P 0x62 0 256k"]);
    qemu_io(&d.uri("disk@s"), &["read -P 0x61 0 4M"]);
    let s = d.json(&["snapshot", "show", "disk@s"]);
    assert_eq!(s["state"], "active");
    assert_eq!(s["store"]["used_bytes"], 256 * 1024);
}

/// Mounts a tmpfs of `size` at `dir` for the test; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
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
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

impl Tmpfs {
    /// Bytes in use on the mount.
    fn used(&self) -> u64 {
        let c = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: statvfs fills the zeroed struct we pass; the path is a
        // NUL-terminated string that outlives the call.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }
}

both_formats!(store_on_a_full_tmpfs_fails_the_guest_write_by_default_and_keeps_both_disks_right);
fn store_on_a_full_tmpfs_fails_the_guest_write_by_default_and_keeps_both_disks_right(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 16 * MIB)]);
    let tiny = Tmpfs::mount(&d.path("tiny"), "512k");
    qemu_io(&d.uri("disk"), &["write -P 0x71 0 8M"]);
    let store = format!("file:{}", tiny.0.join("store.raw").display());
    d.snapshot_create(&["disk"], "s", &["--store", &store]);
    // Four clusters fit (the store's parts share the 512 KiB).
    qemu_io(&d.uri("disk"), &["write -P 0x72 0 256k"]);
    // 4 MiB of copies do not: ENOSPC fails the write, and none of it lands.
    qemu_io_fails(&d.uri("disk"), "write -P 0x73 1M 4M");
    qemu_io(
        &d.uri("disk"),
        &["read -P 0x72 0 256k", "read -P 0x71 256k 7936k"],
    );
    // A saved cluster takes writes without copying; the view is the instant.
    qemu_io(&d.uri("disk"), &["write -P 0x74 0 64k", "read -P 0x74 0 64k"]);
    qemu_io(&d.uri("disk@s"), &["read -P 0x71 0 8M"]);
    let s = d.json(&["snapshot", "show", "disk@s"]);
    assert_eq!(s["state"], "active", "{s}");
    assert!(tiny.used() > 0);
    // Deleting the snapshot frees every part of the store, named or not.
    d.cli_ok(&["snapshot", "delete", "disk@s"]);
    assert!(!tiny.0.join("store.raw").exists());
    assert_eq!(tiny.used(), 0, "store space left behind");
}

both_formats!(store_on_a_full_tmpfs_breaks_the_snapshot_but_never_a_guest_write);
fn store_on_a_full_tmpfs_breaks_the_snapshot_but_never_a_guest_write(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 16 * MIB)]);
    let tiny = Tmpfs::mount(&d.path("tiny"), "512k");
    qemu_io(&d.uri("disk"), &["write -P 0x71 0 8M"]);
    let store = format!("file:{}", tiny.0.join("store.raw").display());
    d.snapshot_create(
        &["disk"],
        "s",
        &["--store", &store, "--on-cbw-error", "break-snapshot"],
    );
    let mut events = Command::new(BIN)
        .args(["events", "--json", "--control", d.control.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // 8 MiB of copies cannot fit in 512 KiB: the snapshot breaks, writes go on.
    qemu_io(&d.uri("disk"), &["write -P 0x72 0 8M"]);
    qemu_io(&d.uri("disk"), &["read -P 0x72 0 8M"]);
    let s = d.json(&["snapshot", "show", "disk@s"]);
    assert_eq!(s["state"], "broken", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("copy-before-write failed"),
        "{s}"
    );
    qemu_io_fails(&d.uri("disk@s"), "read 0 64k");
    d.cli_ok(&["snapshot", "delete", "disk@s"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = events.kill();
    let out = events.wait_with_output().unwrap();
    let lines = text(&out.stdout);
    assert!(lines.contains("\"snapshot_broken\""), "no broken event: {lines}");
    assert!(
        lines.contains("\"snapshot_deleted\""),
        "no deleted event: {lines}"
    );
    // The store file is gone with the snapshot.
    assert!(!tiny.0.join("store.raw").exists());
}

both_formats!(discard_on_the_view_frees_the_store_and_later_reads_fail);
fn discard_on_the_view_frees_the_store_and_later_reads_fail(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 8 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x31 0 2M"]);
    d.snapshot_create(&["disk"], "s", &[]);
    qemu_io(&d.uri("disk"), &["write -P 0x32 0 1M"]);
    assert_eq!(
        d.json(&["snapshot", "show", "disk@s"])["store"]["used_bytes"],
        MIB
    );
    qemu_io(&d.uri("disk@s"), &["discard 0 512k", "discard 1M 1M"]);
    let s = d.json(&["snapshot", "show", "disk@s"]);
    assert_eq!(s["store"]["used_bytes"], 512 * 1024, "{s}");
    assert_eq!(s["discarded_clusters"], 24);
    let read = qemu_io_fails(&d.uri("disk@s"), "read 0 4k");
    assert!(read.contains("Operation not permitted"), "{read}");
    qemu_io(&d.uri("disk@s"), &["read -P 0x31 512k 512k"]);
    // A live write to a discarded cluster copies nothing.
    qemu_io(&d.uri("disk"), &["write -P 0x33 1M 1M"]);
    assert_eq!(d.json(&["snapshot", "show", "disk@s"])["copied_clusters"], 16);
}

both_formats!(read_once_views_discard_what_each_read_returned);
fn read_once_views_discard_what_each_read_returned(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 8 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x41 0 8M"]);
    d.snapshot_create(&["disk"], "s", &["--read-once"]);
    qemu_io(&d.uri("disk"), &["write -P 0x42 0 1M"]);
    qemu_io(&d.uri("disk@s"), &["read -P 0x41 0 1M", "read -P 0x41 4M 1M"]);
    let s = d.json(&["snapshot", "show", "disk@s"]);
    assert_eq!(s["store"]["used_bytes"], 0, "{s}");
    assert_eq!(s["discarded_clusters"], 32);
    let again = qemu_io_fails(&d.uri("disk@s"), "read 0 64k");
    assert!(again.contains("Operation not permitted"), "{again}");
    // Writes to clusters already read copy nothing.
    qemu_io(&d.uri("disk"), &["write -P 0x43 4M 1M"]);
    assert_eq!(d.json(&["snapshot", "show", "disk@s"])["copied_clusters"], 16);
}

both_formats!(bad_snapshot_requests_get_clear_errors);
fn bad_snapshot_requests_get_clear_errors(format: Format) {
    let d = Daemon::start_in(format, &[("disk", MIB)]);
    for (args, needle) in [
        (
            vec!["snapshot", "create", "nope", "--name", "s"],
            "does not exist",
        ),
        (
            vec!["snapshot", "create", "disk", "--name", "a/b"],
            "invalid snapshot name",
        ),
        (
            vec![
                "snapshot",
                "create",
                "disk",
                "--name",
                "s",
                "--cluster-size",
                "3000",
            ],
            "power of two",
        ),
        (
            vec!["snapshot", "create", "disk", "--name", "s", "--store", "tape:1"],
            "file:PATH, qcow2:PATH or ram:SIZE",
        ),
        (
            vec![
                "snapshot",
                "create",
                "disk",
                "--name",
                "s",
                "--store-limit",
                "lots",
            ],
            "not a size",
        ),
        (
            vec!["snapshot", "create", "disk", "--name", "s", "--store-limit", "1K"],
            "smaller than one cluster",
        ),
        (
            vec!["snapshot", "create", "disk", "--name", "s", "--bitmap", "b0"],
            "bitmap 'b0' does not exist",
        ),
        (vec!["snapshot", "show", "disk@none"], "does not exist"),
        (vec!["snapshot", "delete", "nodisk"], "DISK@NAME"),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // The disk cannot be removed while it has snapshots, unless forced.
    d.snapshot_create(&["disk"], "s", &[]);
    let out = d.cli(&["disk", "remove", "disk"]);
    assert!(
        text(&out.stderr).contains("has snapshots"),
        "{}",
        text(&out.stderr)
    );
    d.cli_ok(&["disk", "remove", "disk", "--force"]);
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 0);
}

both_formats!(store_usage_events_warn_at_80_and_95_percent_and_a_restart_drops_snapshots);
fn store_usage_events_warn_at_80_and_95_percent_and_a_restart_drops_snapshots(format: Format) {
    let mut d = Daemon::start_in(format, &[("disk", 8 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x51 0 2M"]);
    d.snapshot_create(&["disk"], "s", &["--store-limit", "1M"]);
    let mut events = Command::new(BIN)
        .args(["events", "--json", "--control", d.control.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    qemu_io(&d.uri("disk"), &["write -P 0x52 0 832k"]); // 13 of 16 clusters: 81%
    qemu_io(&d.uri("disk"), &["write -P 0x52 832k 192k"]); // 16 of 16: 100%
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = events.kill();
    let lines = text(&events.wait_with_output().unwrap().stdout);
    let usage: Vec<serde_json::Value> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "store_usage")
        .collect();
    assert_eq!(usage.len(), 2, "{lines}");
    assert_eq!(usage[0]["data"]["percent"], 80);
    assert_eq!(usage[1]["data"]["percent"], 95);
    assert_eq!(usage[1]["data"]["limit_bytes"], MIB);
    let store_dir = d.path("state/snapshots");
    assert_eq!(std::fs::read_dir(&store_dir).unwrap().count(), 1);
    d.kill9();
    d.spawn();
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 0);
    assert_eq!(
        std::fs::read_dir(&store_dir).unwrap().count(),
        0,
        "stale store left behind"
    );
    qemu_io(&d.uri("disk"), &["read -P 0x52 0 1M", "read -P 0x51 1M 1M"]);
}
