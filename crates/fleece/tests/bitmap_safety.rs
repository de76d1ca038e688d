//! Dirty bitmaps must never lose a change: a snapshot scoped to a bitmap
//! leaves it recording (only --rotate stops it), and a change whose mark
//! could not be saved is not forgotten.

mod common;

use std::io::Write;

use common::*;
use serde_json::Value;

fn bitmap(d: &Daemon, disk: &str, name: &str) -> Value {
    let list = d.json(&["bitmap", "list", disk]);
    let found: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "bitmap {name} not listed once: {list}");
    found[0].clone()
}

fn dirty(d: &Daemon, disk: &str, name: &str) -> u64 {
    bitmap(d, disk, name)["dirty_bytes"].as_u64().unwrap()
}

#[test]
fn a_snapshot_scoped_to_a_bitmap_leaves_the_bitmap_recording() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    d.cli_ok(&["bitmap", "add", "vm", "b0"]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 64k"]);
    d.snapshot_create(&["vm"], "inc1", &["--bitmap", "b0"]);
    d.cli_ok(&["snapshot", "delete", "vm@inc1"]);
    let b0 = bitmap(&d, "vm", "b0");
    assert_eq!(
        b0["recording"], true,
        "an incremental snapshot without --rotate stopped b0: {b0}"
    );
    let before = b0["dirty_bytes"].as_u64().unwrap();
    assert_eq!(before, 65536, "{b0}");
    // A write to a clean granule is recorded.
    qemu_io(&d.uri("vm"), &["write -P 0x12 8M 4k"]);
    assert_eq!(dirty(&d, "vm", "b0"), before + 65536);
}

#[test]
fn rotate_still_stops_the_scoping_bitmap_and_starts_the_new_one() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    d.cli_ok(&["bitmap", "add", "vm", "b0"]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 64k"]);
    d.snapshot_create(&["vm"], "inc1", &["--bitmap", "b0", "--rotate", "b1"]);
    d.cli_ok(&["snapshot", "delete", "vm@inc1"]);
    let (b0, b1) = (bitmap(&d, "vm", "b0"), bitmap(&d, "vm", "b1"));
    assert_eq!(b0["recording"], false, "{b0}");
    assert_eq!(b1["recording"], true, "{b1}");
    assert_eq!(b1["dirty_bytes"], 0, "{b1}");
    qemu_io(&d.uri("vm"), &["write -P 0x12 8M 4k"]);
    assert_eq!(dirty(&d, "vm", "b0"), 65536);
    assert_eq!(dirty(&d, "vm", "b1"), 65536);
}

/// Writes a file on a tmpfs until the tmpfs is full.
fn fill(path: &std::path::Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Page-sized leftovers too.
    while let Ok(n) = f.write(&chunk[..4096]) {
        if n == 0 {
            break;
        }
    }
}

#[test]
fn a_bitmap_mark_that_failed_on_a_full_disk_is_not_forgotten() {
    if !running_as_root("a_bitmap_mark_that_failed_on_a_full_disk_is_not_forgotten") {
        return;
    }
    let mut d = Daemon::prepare(Server::Fleece, &[]);
    let tmp = TmpfsMount::mount(&d.path("small"), "4m");
    let image = tmp.dir.join("vm.raw");
    std::fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    // The image's first pages exist before the daemon starts, so writes
    // there need no new space; only the bitmap's sidecar does.
    write_at(&image, 0, &pattern(MIB as usize, 7));
    d.disks = vec![("vm".to_string(), image.clone())];
    d.spawn();
    d.cli_ok(&["bitmap", "add", "vm", "b0"]);
    let filler = tmp.dir.join("filler");
    fill(&filler);

    // The sidecar cannot record the change, so the write fails...
    qemu_io_fails(&d.uri("vm"), "write -P 0x21 0 4k");
    // ... and so does the same write again, unless the bitmap now admits it
    // is no longer exact.
    let again = run_any(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x21 0 4k", &d.uri("vm")],
    );
    let again_out = format!("{}{}", text(&again.stdout), text(&again.stderr));
    let second_failed = again_out.contains(" failed: ");
    let b0 = bitmap(&d, "vm", "b0");
    assert!(
        second_failed || b0["exact"] == false,
        "the second write succeeded ({again_out:?}) and b0 still claims to be exact: {b0}"
    );
    assert!(
        b0.get("exact").is_some() && b0.get("inconsistent_reason").is_some(),
        "bitmap list lacks exact / inconsistent_reason: {b0}"
    );
    if b0["exact"] == false {
        assert!(b0["inconsistent_reason"].is_string(), "{b0}");
    }

    // With space again, writes succeed; after kill -9 b0 covers offset 0.
    std::fs::remove_file(&filler).unwrap();
    qemu_io(&d.uri("vm"), &["write -P 0x22 0 4k"]);
    d.restart_after_kill9();
    let map = nbdinfo_map(&d.uri("vm"), Some("qemu:dirty-bitmap:b0"));
    assert_map_range(&map, 0, 65536, 1, None);
    d.assert_alive();
}
