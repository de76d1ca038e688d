//! Push backups (`fleece backup ...`) against real targets: raw files,
//! qemu-nbd, nbdkit (memory, file, and its error filter as a failing
//! target) and another fleece; with fio and qemu-io writing meanwhile.
//! Every restore is compared byte for byte with the disk at the instant,
//! which each test fixes by stopping its writers, copying the image, and
//! starting the job before writing again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::jobs::*;
use common::*;
use serde_json::Value;

/// An NBD server used as a backup target, on a private Unix socket; killed
/// on drop.
struct Target {
    child: Option<Child>,
    sock: PathBuf,
    cmd: Vec<String>,
}

impl Target {
    fn spawn(cmd: Vec<String>, sock: PathBuf) -> Target {
        let mut t = Target {
            child: None,
            sock,
            cmd,
        };
        t.start();
        t
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.cmd[0]));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(Instant::now() < deadline, "{} did not start", self.cmd[0]);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// qemu-nbd serving a raw file (which must exist), several clients at once.
    fn qemu_nbd(image: &Path) -> Target {
        let sock = image.with_extension("sock");
        Target::spawn(
            vec![
                "qemu-nbd".into(),
                "-t".into(),
                "-f".into(),
                "raw".into(),
                "--cache=writeback".into(),
                "--shared=16".into(),
                "-k".into(),
                sock.display().to_string(),
                image.display().to_string(),
            ],
            sock,
        )
    }

    /// nbdkit with `args` (filters, plugin and its parameters).
    fn nbdkit(dir: &Path, args: &[&str]) -> Target {
        let sock = dir.join(format!("nbdkit-{}.sock", std::process::id()));
        let mut cmd: Vec<String> = vec![
            "nbdkit".into(),
            "-f".into(),
            "-U".into(),
            sock.display().to_string(),
        ];
        cmd.extend(args.iter().map(|s| s.to_string()));
        Target::spawn(cmd, sock)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill();
    }
}

fn disk_uri(d: &Daemon, disk: &str) -> String {
    d.uri(disk)
}

fn assert_same(a: &Path, b: &Path) {
    assert!(same_file(a, b), "{} and {} differ", a.display(), b.display());
}

fn dirty_bytes(d: &Daemon, disk: &str, bitmap: &str) -> u64 {
    let list = d.json(&["bitmap", "list", disk]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == bitmap)
        .unwrap_or_else(|| panic!("no bitmap {bitmap} in {list}"))["dirty_bytes"]
        .as_u64()
        .unwrap()
}

fn write(d: &Daemon, disk: &str, cmds: &[&str]) {
    qemu_io(&disk_uri(d, disk), cmds);
}

fn file_arg(p: &Path) -> String {
    format!("file:{}", p.display())
}

#[test]
fn a_full_backup_and_three_incrementals_to_files_restore_each_instant() {
    for format in [Format::Raw, Format::Qcow2] {
        let mut d = Daemon::prepare_in(Server::Fleece, &[("vm", 32 * MIB)], format);
        d.spawn();
        write(
            &d,
            "vm",
            &["write -P 0x11 0 4M", "write -P 0x22 20M 1M", "write -z 8M 1M"],
        );
        let full = d.path("full.raw");
        let want = d.copy_image_as_raw("vm", "at0.raw");
        let j = backup(&d, &["vm", "--target", &file_arg(&full), "--bitmap", "b"]);
        assert_eq!(j["sync"], "full");
        assert_same(&full, &want);
        // The full backup kept holes as holes.
        let data: u64 = file_data_ranges(&full).iter().map(|r| r.1).sum();
        assert!(
            data <= 5 * MIB,
            "{format:?}: {data} bytes of data in {:?}",
            file_data_ranges(&full)
        );
        assert_eq!(dirty_bytes(&d, "vm", "b"), 0);
        let mut prev = full;
        for round in 1..=3u64 {
            write(
                &d,
                "vm",
                &[
                    &format!("write -P {} {}M 192k", round, round * 3),
                    &format!("write -z {}M 64k", 20 + round),
                    &format!("discard {}k 64k", round * 128),
                ],
            );
            let inc = d.path(&format!("inc{round}.raw"));
            std::fs::copy(&prev, &inc).unwrap();
            let want = d.copy_image_as_raw("vm", &format!("at{round}.raw"));
            let j = backup(
                &d,
                &[
                    "vm",
                    "--target",
                    &file_arg(&inc),
                    "--sync",
                    "incremental",
                    "--bitmap",
                    "b",
                ],
            );
            assert_same(&inc, &want);
            let disk = &j["disks"][0];
            assert!(disk["skipped_clusters"].as_u64().unwrap() > 400, "{j}");
            assert_eq!(dirty_bytes(&d, "vm", "b"), 0, "{format:?} round {round}");
            prev = inc;
        }
        // The job's snapshots are gone, and its bitmap is the only one.
        assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 0);
        assert_eq!(d.json(&["bitmap", "list", "vm"]).as_array().unwrap().len(), 1);
    }
}

#[test]
fn a_push_while_fio_writes_is_the_disk_at_the_instant() {
    let d = Daemon::start(&[("vm", 64 * MIB)]);
    let uri = disk_uri(&d, "vm");
    wait_ok(fio_writer(&uri, 1, "64M"), "fio");
    let want = d.copy_image_as_raw("vm", "at.raw");
    let target = d.path("b.raw");
    // Slow enough that fio writes all through it.
    let job = start(
        &d,
        &[
            "vm",
            "--target",
            &file_arg(&target),
            "--speed",
            "16M",
            "--chunk-size",
            "256K",
        ],
    );
    let fio = fio_writer(&uri, 30, "64M");
    let j = wait_job(&d, &job);
    let mut fio = fio;
    let _ = fio.kill();
    let _ = fio.wait();
    assert_eq!(j["state"], "completed", "{j}");
    assert_same(&target, &want);
}

#[test]
fn pushes_to_qemu_nbd_nbdkit_and_another_fleece_are_exact() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    write(&d, "vm", &["write -P 0x5a 1M 3M", "write -P 0x6b 12M 64k"]);
    let want = d.copy_image_as_raw("vm", "at.raw");

    // qemu-nbd over a raw file.
    let img = d.path("qnbd.raw");
    std::fs::File::create(&img).unwrap().set_len(16 * MIB).unwrap();
    let q = Target::qemu_nbd(&img);
    backup(&d, &["vm", "--target", &q.uri(), "--name", "to-qemu"]);
    assert_same(&img, &want);

    // nbdkit's memory plugin: read it back with nbdcopy.
    let m = Target::nbdkit(d.dir.path(), &["memory", "16M"]);
    backup(
        &d,
        &["vm", "--target", &m.uri(), "--name", "to-nbdkit", "--verify"],
    );
    let back = d.path("back.raw");
    run("nbdcopy", &[&m.uri(), back.to_str().unwrap()]);
    assert_same(&back, &want);

    // Another fleece serving an empty disk.
    let other = Daemon::start(&[("copy", 16 * MIB)]);
    backup(&d, &["vm", "--target", &other.uri("copy"), "--name", "to-fleece"]);
    assert_same(&other.image("copy"), &want);
}

#[test]
fn a_target_killed_mid_job_and_restarted_is_resumed_and_exact() {
    let d = Daemon::start(&[("vm", 32 * MIB)]);
    write(&d, "vm", &["write -P 0x33 0 24M"]);
    let want = d.copy_image_as_raw("vm", "at.raw");
    let img = d.path("t.raw");
    std::fs::File::create(&img).unwrap().set_len(32 * MIB).unwrap();
    let mut q = Target::qemu_nbd(&img);
    let job = start(
        &d,
        &[
            "vm",
            "--target",
            &q.uri(),
            "--speed",
            "8M",
            "--chunk-size",
            "256K",
        ],
    );
    wait_job_for(&d, &job, "some progress", |j| {
        j["done_bytes"].as_u64().unwrap() > 2 * MIB
    });
    q.kill();
    let j = wait_job_for(&d, &job, "retrying", |j| j["state"] == "retrying");
    assert!(j["retrying"].as_str().unwrap().contains("reconnect"), "{j}");
    // The guest does not notice: writes go on meanwhile.
    write(&d, "vm", &["write -P 0x44 4M 1M"]);
    q.start();
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "completed", "{j}");
    assert_same(&img, &want);
}

#[test]
fn pause_resume_speed_and_cancel() {
    let d = Daemon::start(&[("vm", 32 * MIB)]);
    write(&d, "vm", &["write -P 0x77 0 16M"]);
    let target = d.path("b.raw");
    let job = start(
        &d,
        &[
            "vm",
            "--target",
            &file_arg(&target),
            "--speed",
            "4M",
            "--chunk-size",
            "256K",
            "--name",
            "slow",
        ],
    );
    wait_job_for(&d, &job, "progress", |j| j["done_bytes"].as_u64().unwrap() > 0);
    let j = d.json(&["backup", "pause", &job]);
    assert_eq!(j["state"], "paused");
    let held = wait_job_for(&d, &job, "a settled pause", |j| j["state"] == "paused")["done_bytes"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let later = d.json(&["backup", "show", &job])["done_bytes"].as_u64().unwrap();
    // At most the requests in flight at the pause complete.
    assert!(later <= held + 8 * 256 * KIB, "{held} then {later}");
    d.cli_ok(&["backup", "resume", &job]);
    d.cli_ok(&["backup", "set-speed", &job, "0"]);
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "completed");
    assert_eq!(j["speed"], 0);

    // Speed: 8 MiB at 4 MiB/s takes about 2 s, never much less.
    let t2 = d.path("c.raw");
    let begin = Instant::now();
    let j = backup(
        &d,
        &[
            "--target",
            &file_arg(&t2),
            "--speed",
            "4M",
            "--chunk-size",
            "256K",
            "vm",
            "--min-cluster-size",
            "64K",
        ],
    );
    let secs = begin.elapsed().as_secs_f64();
    let rate = j["done_bytes"].as_u64().unwrap() as f64 / secs;
    assert!(rate <= 4.0 * MIB as f64 * 1.1, "{rate} B/s over a 4 MiB/s limit");

    // Cancel: the job ends as cancelled, its snapshot and target file go.
    let t3 = d.path("d.raw");
    let job = start(&d, &["vm", "--target", &file_arg(&t3), "--speed", "1M"]);
    wait_job_for(&d, &job, "progress", |j| j["done_bytes"].as_u64().unwrap() > 0);
    d.cli_ok(&["backup", "cancel", &job]);
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "cancelled");
    assert!(!t3.exists(), "a partial backup file was left behind");
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 0);
    // Finished jobs stay listed until dismissed.
    assert_eq!(d.json(&["backup", "list"]).as_array().unwrap().len(), 3);
    d.cli_ok(&["backup", "dismiss", &job]);
    assert_eq!(d.json(&["backup", "list"]).as_array().unwrap().len(), 2);
    let out = d.cli(&["backup", "cancel", "slow"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("ended"),
        "{}",
        text(&out.stderr)
    );
}

/// Outcome of the middle job of the bitmap matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Success,
    Cancel,
    TargetError,
}

/// QEMU's iotest 257, on fleece: for each bitmap mode and each way an
/// incremental job can end, the bitmap's dirty count afterwards, and that
/// the next incremental backup (into the same target) restores the disk.
#[test]
fn the_bitmap_modes_follow_qemus_test_matrix() {
    for mode in ["on-success", "never", "always"] {
        for outcome in [Outcome::Success, Outcome::Cancel, Outcome::TargetError] {
            bitmap_case(mode, outcome);
        }
    }
}

fn bitmap_case(mode: &str, outcome: Outcome) {
    let what = format!("mode {mode}, {outcome:?}");
    let d = Daemon::start(&[("vm", 32 * MIB)]);
    write(&d, "vm", &["write -P 1 0 8M"]);
    let img = d.path("t.raw");
    backup(&d, &["vm", "--target", &file_arg(&img), "--bitmap", "b"]);
    assert_eq!(dirty_bytes(&d, "vm", "b"), 0);
    // Region A: 4 MiB changed before the incremental job.
    write(&d, "vm", &["write -P 2 8M 4M"]);
    let a = 4 * MIB;
    assert_eq!(dirty_bytes(&d, "vm", "b"), a);
    // The target is served by nbdkit (file plugin) behind its error filter,
    // which fails every request while the trigger file exists.
    let trigger = d.path("trigger");
    let t = Target::nbdkit(
        d.dir.path(),
        &[
            "--filter=error",
            "file",
            img.to_str().unwrap(),
            "error-rate=100%",
            &format!("error-file={}", trigger.display()),
        ],
    );
    let args = [
        "vm",
        "--target",
        &t.uri(),
        "--sync",
        "incremental",
        "--bitmap",
        "b",
        "--bitmap-mode",
        mode,
        "--on-target-error",
        "report",
        "--speed",
        "4M",
        "--chunk-size",
        "64K",
        "--workers",
        "1",
    ];
    let job = start(&d, &args);
    wait_job_for(&d, &job, "progress", |j| j["done_bytes"].as_u64().unwrap() >= MIB);
    // Region N: 2 MiB written during the job, half inside A.
    write(&d, "vm", &["write -P 3 11M 2M"]);
    let n_new = MIB; // the part of N outside A
    match outcome {
        Outcome::Success => {
            d.cli_ok(&["backup", "set-speed", &job, "0"]);
        }
        Outcome::Cancel => {
            d.cli_ok(&["backup", "cancel", &job]);
        }
        Outcome::TargetError => {
            std::fs::write(&trigger, b"").unwrap();
        }
    }
    let j = wait_job(&d, &job);
    let done = j["done_bytes"].as_u64().unwrap();
    let want_state = match outcome {
        Outcome::Success => "completed",
        Outcome::Cancel => "cancelled",
        Outcome::TargetError => "failed",
    };
    assert_eq!(j["state"], want_state, "{what}: {j}");
    let dirty = dirty_bytes(&d, "vm", "b");
    let n = 2 * MIB;
    let want = match (mode, outcome) {
        ("never", _) => a + n_new,
        (_, Outcome::Success) => n,
        ("on-success", _) => a + n_new,
        // always: what the target acknowledged is dropped, unless written
        // again since (N's first half, inside A, stays dirty).
        _ => {
            let acked_outside_n = done.min(3 * MIB); // A's first 3 MiB precede N
            a + n_new - acked_outside_n
        }
    };
    assert_eq!(dirty, want, "{what}: dirty bytes (done {done})");
    let _ = std::fs::remove_file(&trigger);
    // Whatever happened, the next incremental backup restores the disk.
    let now = d.copy_image_as_raw("vm", "now.raw");
    backup(
        &d,
        &[
            "vm",
            "--target",
            &t.uri(),
            "--sync",
            "incremental",
            "--bitmap",
            "b",
            "--name",
            "next",
        ],
    );
    assert_same(&img, &now);
    assert_eq!(dirty_bytes(&d, "vm", "b"), 0, "{what}");
}

#[test]
fn a_group_fails_together_and_no_bitmap_advances() {
    let d = Daemon::start(&[("a", 8 * MIB), ("b", 8 * MIB)]);
    write(&d, "a", &["write -P 1 0 2M"]);
    write(&d, "b", &["write -P 2 0 2M"]);
    let ta = d.path("a.raw");
    let tb = d.path("b.raw");
    backup(
        &d,
        &[
            "a",
            "b",
            "--target",
            &file_arg(&ta),
            "--target",
            &file_arg(&tb),
            "--bitmap",
            "inc",
        ],
    );
    write(&d, "a", &["write -P 3 4M 1M"]);
    write(&d, "b", &["write -P 4 4M 1M"]);
    let bad = Target::nbdkit(
        d.dir.path(),
        &["--filter=error", "memory", "8M", "error-rate=100%"],
    );
    let ta2 = d.path("a2.raw");
    std::fs::copy(&ta, &ta2).unwrap();
    let job = start(
        &d,
        &[
            "a",
            "b",
            "--target",
            &file_arg(&ta2),
            "--target",
            &bad.uri(),
            "--sync",
            "incremental",
            "--bitmap",
            "inc",
            "--on-target-error",
            "report",
        ],
    );
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "failed", "{j}");
    let err = j["error"].as_str().unwrap();
    assert!(err.contains("disk 'b'") && err.contains("EIO"), "{err}");
    assert_eq!(dirty_bytes(&d, "a", "inc"), MIB);
    assert_eq!(dirty_bytes(&d, "b", "inc"), MIB);
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 0);
}

#[test]
fn after_kill_9_during_a_job_the_next_incremental_is_exact() {
    let mut d = Daemon::start(&[("vm", 32 * MIB)]);
    write(&d, "vm", &["write -P 1 0 16M"]);
    let img = d.path("t.raw");
    backup(&d, &["vm", "--target", &file_arg(&img), "--bitmap", "b"]);
    write(&d, "vm", &["write -P 2 2M 6M"]);
    let partial = d.path("p.raw");
    std::fs::copy(&img, &partial).unwrap();
    let job = start(
        &d,
        &[
            "vm",
            "--target",
            &file_arg(&partial),
            "--sync",
            "incremental",
            "--bitmap",
            "b",
            "--speed",
            "2M",
        ],
    );
    wait_job_for(&d, &job, "progress", |j| j["done_bytes"].as_u64().unwrap() > 0);
    write(&d, "vm", &["write -P 3 20M 1M"]);
    d.kill9();
    d.restart_after_kill9();
    // The job is gone with the daemon; its bitmap kept everything.
    assert_eq!(d.json(&["backup", "list"]).as_array().unwrap().len(), 0);
    assert_eq!(dirty_bytes(&d, "vm", "b"), 7 * MIB);
    let now = d.copy_image_as_raw("vm", "now.raw");
    backup(
        &d,
        &[
            "vm",
            "--target",
            &file_arg(&img),
            "--sync",
            "incremental",
            "--bitmap",
            "b",
        ],
    );
    assert_same(&img, &now);
}

#[test]
fn bad_requests_are_refused_with_what_to_do() {
    let d = Daemon::start(&[("vm", 8 * MIB), ("db", 8 * MIB)]);
    let t = file_arg(&d.path("x.raw"));
    let fails = |args: &[&str], want: &str| {
        let mut a = vec!["backup", "start"];
        a.extend_from_slice(args);
        let out = d.cli(&a);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{args:?}: {err}");
    };
    fails(&["vm", "db", "--target", &t], "give one --target per disk");
    fails(&["nope", "--target", &t], "does not exist");
    fails(
        &["vm", "--target", &t, "--sync", "differential"],
        "full or incremental",
    );
    fails(&["vm", "--target", &t, "--sync", "incremental"], "needs --bitmap");
    fails(
        &["vm", "--target", &t, "--sync", "incremental", "--bitmap", "b"],
        "does not exist",
    );
    fails(
        &["vm", "--target", &t, "--bitmap-mode", "always"],
        "needs --bitmap",
    );
    fails(
        &[
            "vm",
            "--target",
            &t,
            "--bitmap",
            "b",
            "--bitmap-mode",
            "sometimes",
        ],
        "on-success, never or always",
    );
    fails(&["vm", "--target", "s3://bucket/x"], "must be file:PATH");
    fails(&["vm", "--target", "nbds://localhost/x"], "TLS");
    fails(
        &[
            "vm",
            "--target",
            &format!("nbd+unix:///x?socket={}", d.path("none.sock").display()),
        ],
        "none.sock",
    );
    fails(
        &["vm", "--target", &file_arg(&d.image("db"))],
        "an image fleece serves",
    );
    fails(&["vm", "--target", &t, "--workers", "0"], "workers");
    fails(&["vm", "--target", &t, "--chunk-size", "1"], "chunk size");
    std::fs::write(d.path("small.raw"), [0u8; 4096]).unwrap();
    fails(
        &["vm", "--target", &file_arg(&d.path("small.raw"))],
        "has 4096 bytes",
    );
    fails(&["vm", "--target", &t, "--snapshot", "vm@x"], "not both");
    // One running job per bitmap and disk.
    write(&d, "vm", &["write -P 1 0 4M"]);
    let slow = start(
        &d,
        &[
            "vm",
            "--target",
            &file_arg(&d.path("slow.raw")),
            "--bitmap",
            "b",
            "--speed",
            "64K",
        ],
    );
    fails(
        &[
            "vm",
            "--target",
            &file_arg(&d.path("second.raw")),
            "--bitmap",
            "b",
        ],
        "in use by backup job",
    );
    d.cli_ok(&["backup", "cancel", &slow]);
    assert_eq!(wait_job(&d, &slow)["state"], "cancelled");
    d.cli_ok(&["backup", "dismiss", &slow]);
    d.cli_ok(&["bitmap", "remove", "vm", "b"]);
    // Nothing was left behind: no snapshot, no job, no target file.
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 0);
    assert_eq!(d.json(&["backup", "list"]).as_array().unwrap().len(), 0);
    assert!(!d.path("x.raw").exists());
    let out = d.cli(&["backup", "show", "nope"]);
    assert!(text(&out.stderr).contains("does not exist"));
}

#[test]
fn an_existing_snapshot_is_pushed_and_left_in_place() {
    let d = Daemon::start(&[("vm", 8 * MIB)]);
    write(&d, "vm", &["write -P 9 0 1M"]);
    d.snapshot_create(&["vm"], "s1", &[]);
    let want = d.copy_image_as_raw("vm", "at.raw");
    write(&d, "vm", &["write -P 8 0 512k"]);
    let t = d.path("b.raw");
    backup(
        &d,
        &["--snapshot", "vm@s1", "--target", &file_arg(&t), "--verify"],
    );
    assert_same(&t, &want);
    assert_eq!(d.json(&["snapshot", "list"]).as_array().unwrap().len(), 1);
    // Its view still reads (nothing was discarded).
    let back = d.path("back.raw");
    run("nbdcopy", &[&d.uri("vm@s1"), back.to_str().unwrap()]);
    assert_same(&back, &want);
}

#[test]
fn watch_and_wait_show_progress_and_fail_with_the_job() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    write(&d, "vm", &["write -P 1 0 8M"]);
    let t = d.path("b.raw");
    let out = d.cli(&[
        "backup",
        "start",
        "vm",
        "--target",
        &file_arg(&t),
        "--wait",
        "--speed",
        "4M",
        "--chunk-size",
        "256K",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    // Not a terminal: a line per 10%, then the result.
    assert!(
        stdout.lines().filter(|l| l.contains('%')).count() >= 3,
        "{stdout}"
    );
    assert!(stdout.contains("completed"), "{stdout}");
    let bad = Target::nbdkit(
        d.dir.path(),
        &["--filter=error", "memory", "16M", "error-rate=100%"],
    );
    let out = d.cli(&[
        "backup",
        "start",
        "vm",
        "--target",
        &bad.uri(),
        "--on-target-error",
        "report",
        "--wait",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("failed"), "{}", text(&out.stderr));
}

#[test]
fn views_offer_the_copy_order_context() {
    let d = Daemon::start(&[("vm", 8 * MIB)]);
    write(&d, "vm", &["write -P 1 0 2M"]);
    d.snapshot_create(&["vm"], "s", &["--store", "ram:8M"]);
    // Saved in memory by this write: first.
    write(&d, "vm", &["write -P 2 1M 64k"]);
    let map = run("nbdinfo", &["--map=fleece:copy-order", &d.uri("vm@s")]);
    let rows: Vec<(u64, u64, u64)> = map
        .lines()
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().take(3).map(|x| x.parse().unwrap()).collect();
            (f[0], f[1], f[2])
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, MIB, 1),
            (MIB, 64 * KIB, 0),
            (MIB + 64 * KIB, MIB - 64 * KIB, 1),
            (2 * MIB, 6 * MIB, 3)
        ],
        "{map}"
    );
    // Live disks do not offer it.
    let list = run("nbdinfo", &["--list", &d.uri("vm")]);
    assert_eq!(list.matches("fleece:copy-order").count(), 1, "{list}");
}

#[test]
fn a_qcow2_chain_of_a_full_and_three_incrementals_restores_each_instant() {
    for format in [Format::Raw, Format::Qcow2] {
        let mut d = Daemon::prepare_in(Server::Fleece, &[("vm", 32 * MIB)], format);
        d.spawn();
        write(
            &d,
            "vm",
            &["write -P 0x11 0 4M", "write -P 0x22 20M 1M", "write -z 8M 1M"],
        );
        let mut wants = vec![d.copy_image_as_raw("vm", "at0.raw")];
        let full = d.path("b0.qcow2");
        let j = backup(
            &d,
            &[
                "vm",
                "--target",
                &format!("qcow2:{},cluster-size=128K", full.display()),
                "--bitmap",
                "b",
            ],
        );
        // The copy unit is at least the target's cluster.
        assert_eq!(j["disks"][0]["cluster_size"], 128 * KIB);
        let mut chain = vec![full];
        for round in 1..=3u64 {
            write(
                &d,
                "vm",
                &[
                    &format!("write -P {} {}M 192k", round + 0x40, round * 3),
                    // Zeroes over data the previous backup holds.
                    &format!("write -z {}k 64k", round * 128),
                    &format!("discard {}M 128k", 20),
                ],
            );
            wants.push(d.copy_image_as_raw("vm", &format!("at{round}.raw")));
            let inc = d.path(&format!("b{round}.qcow2"));
            let prev = chain
                .last()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            backup(
                &d,
                &[
                    "vm",
                    "--target",
                    &format!("qcow2:{},backing={prev}", inc.display()),
                    "--sync",
                    "incremental",
                    "--bitmap",
                    "b",
                ],
            );
            chain.push(inc);
        }
        for (i, img) in chain.iter().enumerate() {
            let p = img.to_str().unwrap();
            let check = run_any("qemu-img", &["check", p]);
            assert!(check.status.success(), "{format:?} {p}: {}", text(&check.stdout));
            let restored = d.path(&format!("restored{i}.raw"));
            run(
                "qemu-img",
                &["convert", "-O", "raw", p, restored.to_str().unwrap()],
            );
            assert_same(&restored, &wants[i]);
        }
        let info = run(
            "qemu-img",
            &["info", "--backing-chain", chain[3].to_str().unwrap()],
        );
        assert_eq!(
            info.lines()
                .filter(|l| l.starts_with("file format: qcow2"))
                .count(),
            4,
            "{info}"
        );
        // An incremental one writes only what changed.
        let map = run("qemu-img", &["map", "--output=json", chain[2].to_str().unwrap()]);
        let top: u64 = serde_json::from_str::<Value>(&map)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert!(top <= MIB, "{format:?}: {top} bytes of data in the top image");
        // A qcow2 target is always new.
        let out = d.cli(&[
            "backup",
            "start",
            "vm",
            "--target",
            &format!("qcow2:{}", chain[0].display()),
        ]);
        assert!(
            text(&out.stderr).contains("always a new image"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn with_bitmap_mode_always_a_cancelled_job_keeps_its_target_for_the_next_incremental() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    write(&d, "vm", &["write -P 7 0 12M"]);
    let t = d.path("b.raw");
    let job = start(
        &d,
        &[
            "vm",
            "--target",
            &file_arg(&t),
            "--bitmap",
            "b",
            "--bitmap-mode",
            "always",
            "--speed",
            "2M",
        ],
    );
    wait_job_for(&d, &job, "progress", |j| j["done_bytes"].as_u64().unwrap() >= MIB);
    write(&d, "vm", &["write -P 8 14M 1M"]);
    d.cli_ok(&["backup", "cancel", &job]);
    let j = wait_job(&d, &job);
    assert_eq!(j["state"], "cancelled");
    let done = j["done_bytes"].as_u64().unwrap();
    // The bitmap dropped what the target holds (the data acknowledged, and
    // the holes a new file reads as already, but not the 1 MiB written
    // since); the target it went to stays.
    assert!(t.exists(), "the partial target of an `always` job was removed");
    assert_eq!(
        dirty_bytes(&d, "vm", "b"),
        16 * MIB - done - 3 * MIB,
        "done {done}"
    );
    let now = d.copy_image_as_raw("vm", "now.raw");
    backup(
        &d,
        &[
            "vm",
            "--target",
            &file_arg(&t),
            "--sync",
            "incremental",
            "--bitmap",
            "b",
        ],
    );
    assert_same(&t, &now);
}

#[test]
fn a_finished_job_lets_go_of_its_disk_target_and_snapshot() {
    let d = Daemon::start(&[("vm", 8 * MIB)]);
    write(&d, "vm", &["write -P 3 0 1M"]);
    let t = d.path("b.qcow2");
    backup(
        &d,
        &[
            "vm",
            "--target",
            &format!("qcow2:{}", t.display()),
            "--bitmap",
            "b",
        ],
    );
    // Still listed, but the target image is unlocked (qemu-img without -U),
    // and a removed disk's image can be served again at once.
    assert_eq!(d.json(&["backup", "list"]).as_array().unwrap().len(), 1);
    run("qemu-img", &["check", t.to_str().unwrap()]);
    d.cli_ok(&["disk", "remove", "vm"]);
    // Nothing keeps the removed disk's image (or the target) open.
    let open: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p == d.image("vm").to_str().unwrap() || p == t.to_str().unwrap())
        .collect();
    assert!(open.is_empty(), "still open: {open:?}");
    run("qemu-img", &["info", d.image("vm").to_str().unwrap()]);
    d.cli_ok(&["disk", "add", "again", d.image("vm").to_str().unwrap()]);
}
