//! With no disk configured, `fleece serve` creates and serves a sparse
//! 1 GiB demo disk and tells the user how to reach it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;

fn wait_for_stdout(d: &Daemon, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = d.stdout();
        if out.contains(needle) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "stdout does not mention {needle:?} once ready:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_without_disks_creates_a_sparse_one_gib_demo_disk_and_serves_it() {
    let d = Daemon::start(&[]);
    let demo = d.state_dir.join("demo.raw");
    let meta = std::fs::metadata(&demo).unwrap_or_else(|e| panic!("{}: {e}", demo.display()));
    assert_eq!(meta.len(), GIB);
    assert!(
        meta.blocks() * 512 < 4 * MIB,
        "demo disk is not sparse: {} blocks",
        meta.blocks()
    );
    let out = wait_for_stdout(&d, "nbd+unix:///demo");
    assert!(
        out.contains(&d.uri("demo")),
        "stdout lacks the full URI {}:\n{out}",
        d.uri("demo")
    );
    assert!(
        out.contains(d.control.to_str().unwrap()),
        "stdout lacks the control socket:\n{out}"
    );
    let info: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &d.uri("demo")])).unwrap();
    assert_eq!(info["exports"][0]["export-size"], GIB, "{info}");
    qemu_io(
        &d.uri("demo"),
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0xac 1023M 1M",
        ],
    );
    assert_file_bytes(&demo, 0, 65536, 0xab);
    let list = d.cli_json(&["disk", "list"]);
    assert_eq!(list[0]["name"], "demo", "{list}");
    assert_eq!(list[0]["path"], demo.to_str().unwrap(), "{list}");
}

#[test]
fn serve_with_no_arguments_uses_fleece_state_in_the_working_directory_and_keeps_the_demo_disk() {
    let mut d = Daemon::prepare(Server::Fleece, &[]);
    d.bare();
    d.spawn();
    let demo = d.dir.path().join("fleece-state/demo.raw");
    assert_eq!(std::fs::metadata(&demo).unwrap().len(), GIB);
    assert!(d.sock.exists(), "no {}", d.sock.display());
    let out = wait_for_stdout(&d, "nbd+unix:///demo?socket=");
    // The printed socket path is absolute.
    assert!(
        out.contains(&d.uri("demo")),
        "stdout lacks {}:\n{out}",
        d.uri("demo")
    );
    qemu_io(&d.uri("demo"), &["write -P 0x5e 512M 64k"]);
    // The client finds the daemon through the default control path too.
    let st = std::process::Command::new(BIN)
        .args(["status", "--json"])
        .current_dir(d.dir.path())
        .env_remove("FLEECE_CONTROL")
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", text(&st.stderr));
    let status = d.sigterm(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM: {status}\n{}", d.log());
    // A second start keeps the existing demo disk and its data.
    d.spawn();
    qemu_io(&d.uri("demo"), &["read -P 0x5e 512M 64k"]);
    assert!(std::fs::metadata(&demo).unwrap().blocks() * 512 < 8 * MIB);
}
