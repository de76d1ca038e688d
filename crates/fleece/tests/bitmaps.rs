//! Dirty bitmaps end to end: incremental backups over several rounds,
//! kill -9 under write load, and qemu/libnbd reading the bitmaps over NBD,
//! on raw and on qcow2 disks.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn python() -> &'static str {
    // The Debian python has the nbd module; a pyenv one on PATH may not.
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn bitmap<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name}: {list}"))
}

/// Writes `count` 64 KiB patterns at pseudo-random offsets.
fn scribble(d: &Daemon, seed: u64, count: u64) {
    let mut x = seed;
    let cmds: Vec<String> = (0..count)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 33) % (31 * MIB) + 1000;
            format!(
                "write -P {} {off} {}",
                (seed * 7 + i) % 250 + 1,
                4096 + (x >> 50) % 70000
            )
        })
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&d.uri("disk"), &refs);
}

both_formats!(incremental_snapshots_rebuild_the_disk_at_each_instant);
fn incremental_snapshots_rebuild_the_disk_at_each_instant(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 32 * MIB)]);
    scribble(&d, 1, 40);
    // Full backup, and b0 starts recording at its instant.
    d.snapshot_create(&["disk"], "full", &["--rotate", "b0"]);
    let at_full = d.path("at-full.raw");
    let backup = d.path("backup.raw");
    run("nbdcopy", &[&d.uri("disk@full"), backup.to_str().unwrap()]);
    std::fs::copy(&backup, &at_full).unwrap();
    scribble(&d, 2, 5); // after the instant: must not leak into the full backup
    d.cli_ok(&["snapshot", "delete", "disk@full"]);
    let mut current = "b0";
    for round in 0..3u64 {
        scribble(&d, 10 + round, 12);
        let reference = d.copy_image_as_raw("disk", &format!("ref{round}.raw"));
        let next = if current == "b0" { "b1" } else { "b0" };
        let name = format!("inc{round}");
        d.snapshot_create(&["disk"], &name, &["--bitmap", current, "--rotate", next]);
        let bitmaps = d.json(&["bitmap", "list", "disk"]);
        assert_eq!(bitmap(&bitmaps, current)["recording"], false);
        assert_eq!(bitmap(&bitmaps, next)["recording"], true);
        assert_eq!(bitmap(&bitmaps, next)["dirty_bytes"], 0);
        // Writes after the instant must not leak into the incremental.
        scribble(&d, 100 + round, 8);
        let view = d.uri(&format!("disk@{name}"));
        let copied: u64 = run(
            python(),
            &[
                &script("apply_incremental.py"),
                &view,
                current,
                backup.to_str().unwrap(),
            ],
        )
        .trim()
        .parse()
        .unwrap();
        assert!(
            copied > 0 && copied < 32 * MIB,
            "round {round} copied {copied} bytes"
        );
        assert!(
            same_file(&backup, &reference),
            "round {round}: backup differs from the disk at the instant"
        );
        // Only bitmap clusters were ever saved, and reads outside fail.
        let snap = d.json(&["snapshot", "show", &format!("disk@{name}")]);
        assert!(
            snap["store"]["used_bytes"].as_u64().unwrap() <= copied + 64 * 1024,
            "{snap}"
        );
        d.cli_ok(&["snapshot", "delete", &format!("disk@{name}")]);
        current = next;
    }
    assert!(!same_file(&backup, &at_full));
}

both_formats!(reads_outside_the_bitmap_of_an_incremental_snapshot_fail);
fn reads_outside_the_bitmap_of_an_incremental_snapshot_fail(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 8 * MIB)]);
    d.cli_ok(&["bitmap", "add", "disk", "b0"]);
    qemu_io(&d.uri("disk"), &["write -P 0x11 1M 64k"]);
    d.snapshot_create(&["disk"], "inc", &["--bitmap", "b0"]);
    qemu_io(&d.uri("disk"), &["write -P 0x12 0 4M"]);
    qemu_io(&d.uri("disk@inc"), &["read -P 0x11 1M 64k"]);
    let out = qemu_io_fails(&d.uri("disk@inc"), "read 2M 4k");
    assert!(out.contains("Operation not permitted"), "{out}");
    // Only the one dirty cluster was saved, although 4 MiB were rewritten.
    assert_eq!(d.json(&["snapshot", "show", "disk@inc"])["copied_clusters"], 1);
}

both_formats!(qemu_img_and_nbdinfo_read_dirty_bitmaps_over_nbd);
fn qemu_img_and_nbdinfo_read_dirty_bitmaps_over_nbd(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 16 * MIB)]);
    d.cli_ok(&["bitmap", "add", "disk", "b0", "--granularity", "128K"]);
    qemu_io(&d.uri("disk"), &["write -P 1 4M 4k", "write -z 8M 256k"]);
    let map = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &d.uri("disk")]);
    assert!(map.contains("4194304      131072    1  dirty"), "{map}");
    assert!(map.contains("8388608      262144    1  dirty"), "{map}");
    let list = run("nbdinfo", &["--list", "--content", &d.uri("disk")]);
    assert!(list.contains("qemu:dirty-bitmap:b0"), "{list}");
    let opts = format!(
        "driver=nbd,export=disk,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
        d.sock.display()
    );
    let qmap = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    // qemu reports dirty areas as not present.
    assert!(
        qmap.contains("\"start\": 4194304, \"length\": 131072, \"depth\": 0, \"present\": false"),
        "{qmap}"
    );
}

both_formats!(bitmap_commands_merge_clear_disable_and_remove);
fn bitmap_commands_merge_clear_disable_and_remove(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 8 * MIB)]);
    d.cli_ok(&["bitmap", "add", "disk", "a"]);
    d.cli_ok(&["bitmap", "add", "disk", "b", "--disabled"]);
    d.cli_ok(&["bitmap", "add", "disk", "t", "--transient"]);
    qemu_io(&d.uri("disk"), &["write 0 64k"]);
    let l = d.json(&["bitmap", "list", "disk"]);
    assert_eq!(bitmap(&l, "a")["dirty_bytes"], 65536);
    assert_eq!(bitmap(&l, "b")["dirty_bytes"], 0);
    assert_eq!(bitmap(&l, "t")["persistent"], false);
    d.cli_ok(&["bitmap", "enable", "disk", "b"]);
    qemu_io(&d.uri("disk"), &["write 1M 64k"]);
    d.cli_ok(&["bitmap", "merge", "disk", "b", "a"]);
    assert_eq!(
        bitmap(&d.json(&["bitmap", "list", "disk"]), "b")["dirty_bytes"],
        131072
    );
    d.cli_ok(&["bitmap", "disable", "disk", "a"]);
    d.cli_ok(&["bitmap", "clear", "disk", "a"]);
    qemu_io(&d.uri("disk"), &["write 2M 64k"]);
    assert_eq!(
        bitmap(&d.json(&["bitmap", "list", "disk"]), "a")["dirty_bytes"],
        0
    );
    d.cli_ok(&["bitmap", "remove", "disk", "a"]);
    let sidecar =
        |b: &str| std::path::PathBuf::from(format!("{}.fleece-bitmap-{b}", d.image("disk").display()));
    assert!(sidecar("b").exists(), "no sidecar {}", sidecar("b").display());
    assert!(!sidecar("a").exists(), "the removed bitmap's sidecar is left");
    for (args, needle) in [
        (vec!["bitmap", "add", "disk", "b"], "already exists"),
        (
            vec!["bitmap", "add", "disk", "x", "--granularity", "1000"],
            "power of two",
        ),
        (vec!["bitmap", "clear", "disk", "nope"], "does not exist"),
        (vec!["bitmap", "merge", "disk", "b", "nope"], "does not exist"),
        (vec!["bitmap", "list", "nodisk"], "does not exist"),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

both_formats!(a_transaction_with_a_bad_action_applies_nothing);
fn a_transaction_with_a_bad_action_applies_nothing(format: Format) {
    let d = Daemon::start_in(format, &[("disk", 8 * MIB)]);
    let tx = d.path("tx.json");
    std::fs::write(
        &tx,
        r#"{"actions": [
            {"action": "bitmap-add", "disk": "disk", "name": "new"},
            {"action": "snapshot-create", "disks": ["disk"], "name": "s"},
            {"action": "bitmap-clear", "disk": "disk", "name": "missing"}
        ]}"#,
    )
    .unwrap();
    let out = d.cli(&["transaction", tx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("'missing' does not exist"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(d.json(&["bitmap", "list", "disk"]).as_array().unwrap().len(), 0);
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 0);
    let sidecar = format!("{}.fleece-bitmap-new", d.image("disk").display());
    assert!(!std::path::Path::new(&sidecar).exists(), "{sidecar} was made");
    // Without the bad action it all happens at once.
    std::fs::write(
        &tx,
        r#"{"actions": [
            {"action": "bitmap-add", "disk": "disk", "name": "new"},
            {"action": "snapshot-create", "disks": ["disk"], "name": "s", "bitmap": "new"}
        ]}"#,
    )
    .unwrap();
    d.cli_ok(&["transaction", tx.to_str().unwrap()]);
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 1);
}

both_formats!(kill_9_under_write_load_never_loses_an_acknowledged_write_from_a_bitmap);
fn kill_9_under_write_load_never_loses_an_acknowledged_write_from_a_bitmap(format: Format) {
    let mut d = Daemon::start_in(format, &[("disk", 64 * MIB)]);
    d.cli_ok(&["bitmap", "add", "disk", "b0", "--granularity", "64K"]);
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..4u64 {
        let mut writers: Vec<_> = (0..3)
            .map(|i| {
                Command::new(python())
                    .args([
                        &script("ack_writer.py"),
                        &d.uri("disk"),
                        &(round * 10 + i).to_string(),
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        d.kill9();
        for w in writers.iter_mut() {
            let out = BufReader::new(w.stdout.take().unwrap());
            acked.extend(
                out.lines()
                    .map_while(Result::ok)
                    .filter_map(|l| l.trim().parse::<u64>().ok()),
            );
            let _ = w.wait();
        }
        d.spawn();
        let list = d.json(&["bitmap", "list", "disk"]);
        let b0 = bitmap(&list, "b0");
        assert_eq!(b0["recording"], true, "{list}");
        assert_eq!(b0["exact"], true);
        let map = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &d.uri("disk")]);
        let dirty: Vec<(u64, u64)> = map
            .lines()
            .filter(|l| l.ends_with("dirty"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].parse().unwrap(), f[1].parse().unwrap())
            })
            .collect();
        for off in &acked {
            assert!(
                dirty.iter().any(|(s, l)| s <= off && off + 4096 <= s + l),
                "round {round}: acknowledged write at {off} is missing from the bitmap"
            );
        }
    }
    assert!(
        acked.len() > 100,
        "the writers made too little progress: {}",
        acked.len()
    );
}

both_formats!(pull_incremental_applies_only_the_dirty_extents_to_the_previous_backup);
fn pull_incremental_applies_only_the_dirty_extents_to_the_previous_backup(format: Format) {
    let d = Daemon::start_in(format, &[("vm", 64 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 16M", "write -P 0x12 40M 4M"]);
    d.snapshot_create(&["vm"], "full", &["--rotate", "b0"]);
    let full = d.path("full.raw");
    run("nbdcopy", &[&d.uri("vm@full"), full.to_str().unwrap()]);
    d.cli_ok(&["snapshot", "delete", "vm@full"]);
    // Changes: inside old data, in a hole, and a discard of old data.
    qemu_io(
        &d.uri("vm"),
        &["write -P 0x21 1M 64k", "write -P 0x22 30M 100k", "discard 40M 1M"],
    );
    d.snapshot_create(&["vm"], "inc1", &["--bitmap", "b0", "--rotate", "b1"]);
    // What the disk held at inc1's instant, and later writes that must not show.
    let expected = d.copy_image_as_raw("vm", "expected.raw");
    qemu_io(&d.uri("vm"), &["write -P 0x33 0 16M"]);
    // A plain copy of the incremental view cannot work...
    let out = run_any("nbdcopy", &[&d.uri("vm@inc1"), d.path("x.raw").to_str().unwrap()]);
    assert!(!out.status.success(), "nbdcopy of an incremental view succeeded");
    // ...the documented recipe does.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pull-incremental");
    let out = run(
        python(),
        &[script, &d.uri("vm@inc1"), "b0", full.to_str().unwrap()],
    );
    assert!(out.contains("copied"), "{out}");
    assert_same_file(&expected, &full);
}

both_formats!(removing_and_adding_one_bitmap_in_a_transaction_is_refused_and_deletes_nothing);
fn removing_and_adding_one_bitmap_in_a_transaction_is_refused_and_deletes_nothing(format: Format) {
    let mut d = Daemon::start_in(format, &[("vm", 16 * MIB)]);
    d.cli_ok(&["bitmap", "add", "vm", "b0"]);
    qemu_io(&d.uri("vm"), &["write 0 4k"]);
    let sidecar = format!("{}.fleece-bitmap-b0", d.image("vm").display());
    let body = serde_json::json!({"actions": [
        {"action": "bitmap-remove", "disk": "vm", "name": "b0"},
        {"action": "bitmap-add", "disk": "vm", "name": "b0"},
    ]});
    let (status, v) = d.api("POST", "/v1/transactions", Some(&body));
    assert_api_error(status, &v, 409, "exists");
    assert!(
        std::path::Path::new(&sidecar).exists(),
        "the check deleted b0's file"
    );
    d.restart_after_kill9();
    let list = d.json(&["bitmap", "list", "vm"]);
    assert_eq!(list[0]["name"], "b0", "{list}");
    assert_eq!(list[0]["dirty_bytes"], 65536, "{list}");
}

both_formats!(a_copied_sidecar_file_does_not_come_back_as_a_second_bitmap);
fn a_copied_sidecar_file_does_not_come_back_as_a_second_bitmap(format: Format) {
    let mut d = Daemon::start_in(format, &[("vm", 16 * MIB)]);
    d.cli_ok(&["bitmap", "add", "vm", "b2"]);
    let sidecar = format!("{}.fleece-bitmap-b2", d.image("vm").display());
    std::fs::copy(&sidecar, format!("{sidecar}.bak")).unwrap();
    d.restart_after_kill9();
    let list = d.json(&["bitmap", "list", "vm"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    d.cli_ok(&["bitmap", "remove", "vm", "b2"]);
    d.restart_after_kill9();
    assert_eq!(d.json(&["bitmap", "list", "vm"]), serde_json::json!([]));
}
