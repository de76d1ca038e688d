//! Snapshot stores are the daemon's own files: those a killed daemon left
//! behind are removed at the next start wherever they are, and files it did
//! not make are never removed.
//! Every test runs on raw and on qcow2 disks (`both_formats!`).

mod common;

use std::time::Duration;

use common::*;

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

both_formats!(a_store_outside_the_state_dir_is_removed_after_kill_9);
fn a_store_outside_the_state_dir_is_removed_after_kill_9(format: Format) {
    let mut d = Daemon::start_in(format, &[("vm", 16 * MIB)]);
    let other = d.path("elsewhere");
    std::fs::create_dir(&other).unwrap();
    let keep = other.join("notes.txt");
    std::fs::write(&keep, b"not fleece's").unwrap();
    let store = other.join("x.store");
    qemu_io(&d.uri("vm"), &["write -P 0x31 0 4M"]);
    d.snapshot_create(&["vm"], "s", &["--store", &format!("file:{}", store.display())]);
    qemu_io(&d.uri("vm"), &["write -P 0x32 0 4M"]);
    let s = d.json(&["snapshot", "show", "vm@s"]);
    assert_eq!(s["store"]["used_bytes"], 4 * MIB, "{s}");
    assert!(store.exists());

    d.kill9();
    d.spawn();
    assert!(
        wait_for(Duration::from_secs(5), || !store.exists()),
        "{} outlived the daemon that made it; log:\n{}",
        store.display(),
        d.log()
    );
    assert_eq!(names_in(&other), vec!["notes.txt".to_string()]);
    assert_eq!(std::fs::read(&keep).unwrap(), b"not fleece's");
    assert_eq!(d.json(&["snapshot", "list"]), serde_json::json!([]));
    qemu_io(&d.uri("vm"), &["read -P 0x32 0 4M"]);
}

both_formats!(a_user_file_at_the_store_path_is_refused_and_survives_a_restart);
fn a_user_file_at_the_store_path_is_refused_and_survives_a_restart(format: Format) {
    let mut d = Daemon::start_in(format, &[("vm", 16 * MIB)]);
    let other = d.path("elsewhere");
    std::fs::create_dir(&other).unwrap();
    let mine = other.join("mine.store");
    std::fs::write(&mine, b"the user's own data").unwrap();
    qemu_io(&d.uri("vm"), &["write -P 0x31 0 1M"]);
    d.cli_err(
        &[
            "snapshot",
            "create",
            "vm",
            "--name",
            "s",
            "--store",
            &format!("file:{}", mine.display()),
        ],
        &[],
    );
    assert_eq!(std::fs::read(&mine).unwrap(), b"the user's own data");
    // A snapshot with a store beside it, so the restart has something of
    // its own to clean up there.
    let store = other.join("real.store");
    d.snapshot_create(&["vm"], "t", &["--store", &format!("file:{}", store.display())]);
    qemu_io(&d.uri("vm"), &["write -P 0x32 0 1M"]);
    d.kill9();
    d.spawn();
    assert_eq!(std::fs::read(&mine).unwrap(), b"the user's own data");
    assert!(
        wait_for(Duration::from_secs(5), || !store.exists()),
        "{} outlived the daemon that made it",
        store.display()
    );
    assert_eq!(std::fs::read(&mine).unwrap(), b"the user's own data");
    assert_eq!(names_in(&other), vec!["mine.store".to_string()]);
}
