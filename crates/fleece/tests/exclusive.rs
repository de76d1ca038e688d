//! One image, one owner: fleece refuses to serve an image twice (under two
//! names, through a symlink or a hard link), a second daemon on the same
//! state dir or the same image refuses to start before touching anything,
//! and fleece and QEMU's tools keep out of each other's images.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

/// `serve` arguments for a daemon in `d`'s temp dir with its own sockets
/// (named after `tag`), state dir `state` and the given disks.
fn serve_args(d: &Daemon, tag: &str, state: &Path, disks: &[(&str, &Path)]) -> (Vec<OsString>, PathBuf) {
    let control = d.path(&format!("control-{tag}.sock"));
    let mut a: Vec<OsString> = Vec::new();
    for (n, p) in disks {
        a.push("--disk".into());
        a.push(format!("{n}={}", p.display()).into());
    }
    a.push("--nbd".into());
    a.push(format!("unix:{}", d.path(&format!("nbd-{tag}.sock")).display()).into());
    a.push("--control".into());
    a.push(control.clone().into());
    a.push("--state-dir".into());
    a.push(state.into());
    (a, control)
}

/// A symlink and a hard link to `image`, in `d`'s temp dir.
fn links(d: &Daemon, image: &Path) -> (PathBuf, PathBuf) {
    let sym = d.path("via-symlink.raw");
    let hard = d.path("via-hardlink.raw");
    std::os::unix::fs::symlink(image, &sym).unwrap();
    std::fs::hard_link(image, &hard).unwrap();
    (sym, hard)
}

#[test]
fn the_same_image_under_two_names_at_start_up_is_refused_naming_the_first() {
    let d = Daemon::prepare(Server::Fleece, &[("a", 4 * MIB)]);
    let image = d.image("a");
    let (sym, hard) = links(&d, &image);
    for (i, (what, second)) in [
        ("the same path", &image),
        ("a symlink", &sym),
        ("a hard link", &hard),
    ]
    .into_iter()
    .enumerate()
    {
        let state = d.path(&format!("state{i}"));
        let (args, control) = serve_args(&d, &i.to_string(), &state, &[("a", &image), ("b", second)]);
        let attempt = serve_attempt(&args, &control);
        eprintln!("b = {what}: {attempt:?}");
        attempt.assert_refused(&["'a'"]);
    }
    // The image itself is untouched and still servable on its own.
    let state = d.path("state-ok");
    let (args, control) = serve_args(&d, "ok", &state, &[("a", &image)]);
    let ok = serve_attempt(&args, &control);
    assert!(ok.status.is_none(), "a lone disk did not start: {ok:?}");
}

#[test]
fn adding_an_image_already_served_under_another_name_is_refused_and_the_first_keeps_working() {
    let mut d = Daemon::start(&[("a", 4 * MIB)]);
    qemu_io(&d.uri("a"), &["write -P 0x5a 0 64k"]);
    let image = d.image("a");
    let (sym, hard) = links(&d, &image);
    for (what, path) in [
        ("the same path", &image),
        ("a symlink", &sym),
        ("a hard link", &hard),
    ] {
        let (status, body) = d.api("POST", "/v1/disks", Some(&json!({"name": "b", "path": path})));
        assert_api_error(status, &body, 409, "exists");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("'a'"), "b = {what}: {msg:?} does not name disk 'a'");
        d.cli_err(&["disk", "add", "b", path.to_str().unwrap()], &["'a'"]);
        d.assert_alive();
    }
    let list = d.cli_json(&["disk", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    run_fails("nbdinfo", &[&d.uri("b")]);
    qemu_io(&d.uri("a"), &["read -P 0x5a 0 64k", "write -P 0x5b 64k 64k"]);
    assert_file_bytes(&image, 65536, 65536, 0x5b);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused_and_touches_nothing() {
    let mut d = Daemon::start(&[("vm", 16 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 1M"]);
    d.snapshot_create(&["vm"], "s", &[]);
    qemu_io(&d.uri("vm"), &["write -P 0x22 0 1M"]);
    let before = d.json(&["snapshot", "show", "vm@s"]);
    let store = PathBuf::from(before["store"]["path"].as_str().expect("a file store has a path"));
    assert!(
        store.exists() && before["store"]["used_bytes"].as_u64().unwrap() > 0,
        "{before}"
    );

    let other = d.path("other.raw");
    std::fs::File::create(&other).unwrap().set_len(4 * MIB).unwrap();
    let (args, control) = serve_args(&d, "second", &d.state_dir, &[("other", &other)]);
    let attempt = serve_attempt(&args, &control);
    attempt.assert_refused(&[&d.pid().to_string(), "in use"]);
    // It touched nothing: no sockets of its own, the first daemon's
    // snapshot, store and data are as they were.
    assert!(!control.exists(), "the refused daemon left {}", control.display());
    assert!(
        !d.path("nbd-second.sock").exists(),
        "the refused daemon left its NBD socket"
    );
    d.assert_alive();
    assert!(
        store.exists(),
        "the running daemon's store {} was removed",
        store.display()
    );
    let after = d.json(&["snapshot", "show", "vm@s"]);
    assert_eq!(after["state"], "active", "{after}");
    assert_eq!(
        after["store"]["used_bytes"], before["store"]["used_bytes"],
        "{after}"
    );
    let names: Vec<String> = d
        .json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["export"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["vm@s".to_string()]);
    qemu_io(&d.uri("vm@s"), &["read -P 0x11 0 1M"]);
    qemu_io(&d.uri("vm"), &["read -P 0x22 0 1M"]);
}

#[test]
fn a_second_daemon_on_the_same_image_is_refused_as_in_use_by_another_program() {
    let mut d = Daemon::start(&[("vm", 4 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x33 0 64k"]);
    let state = d.path("state2");
    let (args, control) = serve_args(&d, "second", &state, &[("vm", &d.image("vm"))]);
    serve_attempt(&args, &control).assert_refused(&["in use by another program"]);
    d.assert_alive();
    qemu_io(&d.uri("vm"), &["read -P 0x33 0 64k", "write -P 0x34 64k 4k"]);
}

#[test]
fn qemu_tools_cannot_write_an_image_fleece_serves_until_it_is_removed() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    let image = d.image("vm");
    let img = image.to_str().unwrap();
    let out = run_fails("qemu-io", &["-f", "raw", "-c", "write 0 4k", img]);
    assert!(
        out.contains("lock"),
        "qemu-io's refusal does not mention a lock: {out}"
    );
    // Looking without locks is fine.
    let info = run("qemu-img", &["info", "-U", img]);
    assert!(info.contains("4 MiB") || info.contains("4194304"), "{info}");
    d.cli_ok(&["disk", "remove", "vm"]);
    qemu_io(img, &["write -P 1 0 4k"]);
    assert_file_bytes(&image, 0, 4096, 1);
}

#[test]
fn fleece_refuses_an_image_qemu_nbd_is_serving() {
    let d = Daemon::prepare(Server::Fleece, &[("a", 4 * MIB)]);
    let image = d.image("a");
    let qsock = d.path("qemu-nbd.sock");
    let qemu = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "-k"])
        .arg(&qsock)
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _qemu = KillOnDrop(qemu);
    assert!(
        wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&qsock).is_ok()
        }),
        "qemu-nbd did not listen on {}",
        qsock.display()
    );
    let state = d.path("state2");
    let (args, control) = serve_args(&d, "f", &state, &[("a", &image)]);
    serve_attempt(&args, &control).assert_refused(&["in use by another program"]);
    // qemu-nbd still serves it.
    run("nbdinfo", &[&format!("nbd+unix:///?socket={}", qsock.display())]);
}
