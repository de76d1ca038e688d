//! Bad input gets a clear refusal (exit code 1, a 4xx), never a crash, a
//! silent acceptance or a message that blames the wrong thing: numbers out
//! of range, a closed stdout, percent-encoded API paths, failed
//! transactions and broken snapshots.

mod common;

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ---- numbers out of range ----

/// `fleece serve` of one small disk in `d`'s temp dir, with its own
/// sockets and state dir (named after `tag`), plus `extra` arguments.
fn serve_with(d: &Daemon, tag: &str, extra: &[&str]) -> ServeAttempt {
    let control = d.path(&format!("control-{tag}.sock"));
    let mut args: Vec<OsString> = vec![
        "--disk".into(),
        format!("vm={}", d.image("vm").display()).into(),
        "--nbd".into(),
        format!("unix:{}", d.path(&format!("nbd-{tag}.sock")).display()).into(),
        "--control".into(),
        control.clone().into(),
        "--state-dir".into(),
        d.path(&format!("state-{tag}")).into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    serve_attempt(&args, &control)
}

#[test]
fn io_threads_out_of_range_is_refused_with_exit_code_1() {
    let d = Daemon::prepare(Server::Fleece, &[("vm", 4 * MIB)]);
    for n in ["100000", "0"] {
        let a = serve_with(&d, n, &["--io-threads", n]);
        eprintln!("--io-threads {n}: {a:?}");
        a.assert_refused(&["io-threads", "1 to 1024"]);
    }
    let config = d.path("fleece.toml");
    std::fs::write(&config, "io_threads = 5000\n").unwrap();
    let a = serve_with(&d, "toml", &["--config", config.to_str().unwrap()]);
    eprintln!("io_threads = 5000 in {}: {a:?}", config.display());
    a.assert_refused(&["1 to 1024"]);
    assert!(
        a.stderr.contains("io-threads") || a.stderr.contains("io_threads"),
        "{a:?}"
    );
    // In range is fine.
    let ok = serve_with(&d, "ok", &["--io-threads", "4"]);
    assert!(ok.status.is_none(), "--io-threads 4 did not start: {ok:?}");
}

#[test]
fn a_cbw_timeout_that_is_not_a_sane_number_of_seconds_is_refused() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    for x in ["NaN", "inf", "-1", "1e9"] {
        let out = d.cli(&[
            "snapshot",
            "create",
            "vm",
            "--name",
            "s",
            &format!("--cbw-timeout={x}"),
        ]);
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "--cbw-timeout={x}: {}; stderr: {err}",
            out.status
        );
        assert!(err.starts_with("fleece: error: "), "--cbw-timeout={x}: {err:?}");
        assert_eq!(
            d.json(&["snapshot", "list"]),
            json!([]),
            "--cbw-timeout={x} made a snapshot"
        );
    }
    let s = d.json(&["snapshot", "create", "vm", "--name", "s", "--cbw-timeout", "30"]);
    assert_eq!(s[0]["cbw_timeout_secs"], 30.0, "{s}");
    let (status, body) = d.api(
        "POST",
        "/v1/snapshots",
        Some(&json!({"disks": ["vm"], "name": "t", "cbw_timeout_secs": 1e9})),
    );
    assert_api_error(status, &body, 400, "invalid_argument");
}

fn mem_total() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = info.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn ram_store_sizes_are_checked_and_capped_at_the_disk_size() {
    let d = Daemon::start(&[("vm", 256 * MIB), ("big", 2 << 40)]);
    d.cli_err(
        &["snapshot", "create", "vm", "--name", "s0", "--store", "ram:0"],
        &[],
    );
    d.snapshot_create(&["vm"], "s", &["--store", "ram:1T"]);
    let s = d.json(&["snapshot", "show", "vm@s"]);
    assert_eq!(s["store"]["memory_limit_bytes"], 256 * MIB, "{s}");
    d.cli_ok(&["snapshot", "delete", "vm@s"]);
    // On a 2 TiB disk, 1 TiB of memory is only promised if the host has it.
    let args = ["snapshot", "create", "big", "--name", "s", "--store", "ram:1T"];
    if mem_total() < 1 << 40 {
        d.cli_err(&args, &["memory"]);
        assert_eq!(d.json(&["snapshot", "list"]), json!([]));
    } else {
        d.cli_ok(&args);
    }
}

// ---- a closed stdout ----

/// A pipe whose read end is already closed: writes to the returned write
/// end fail with EPIPE (or raise SIGPIPE).
fn widowed_pipe() -> OwnedFd {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and ours.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(r);
    w
}

#[test]
fn client_commands_on_a_closed_stdout_exit_quietly() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    for args in [
        vec!["disk", "list"],
        vec!["disk", "list", "--json"],
        vec!["status"],
        vec!["snapshot", "list"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .arg("--control")
            .arg(&d.control)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(widowed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(
            out.status.code() == Some(0) || out.status.signal() == Some(libc::SIGPIPE),
            "fleece {args:?} > closed pipe: {}; stderr: {err}",
            out.status
        );
        assert!(!err.contains("panicked"), "fleece {args:?} > closed pipe: {err}");
    }
    // The shell way: `| true`.
    let errfile = d.path("pipe.err");
    let script = format!(
        "'{}' disk list --control '{}' 2>'{}' | true; echo \"rc=${{PIPESTATUS[0]}}\"",
        BIN,
        d.control.display(),
        errfile.display()
    );
    let out = run("bash", &["-c", &script]);
    let err = std::fs::read_to_string(&errfile).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.trim() == "rc=0" || out.trim() == "rc=141",
        "{out} / stderr: {err}"
    );
}

#[test]
fn events_says_it_is_connected_and_exits_when_its_reader_goes_away() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    let errfile = d.path("events.err");
    let child = Command::new(BIN)
        .args(["events", "--control"])
        .arg(&d.control)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&errfile).unwrap())
        .spawn()
        .unwrap();
    let mut events = KillOnDrop(child);
    let mut lines = TimedLines::new(events.0.stdout.take().unwrap());
    // Make events until one is printed (the subscription may take a moment).
    let stop = Arc::new(AtomicBool::new(false));
    let maker = {
        let (stop, control) = (stop.clone(), d.control.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 100 {
                let body = json!({"disks": ["vm"], "name": format!("e{i}")}).to_string();
                http(&control, "POST", "/v1/snapshots", body.as_bytes());
                http(&control, "DELETE", &format!("/v1/snapshots/vm@e{i}"), b"");
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let first = lines.line(Duration::from_secs(10));
    stop.store(true, Ordering::SeqCst);
    maker.join().unwrap();
    let first = first.expect("fleece events printed nothing within 10 s");
    assert!(first.contains("snapshot_"), "{first}");
    let err = std::fs::read_to_string(&errfile).unwrap();
    assert!(
        !err.trim().is_empty(),
        "fleece events said nothing on stderr about being connected"
    );
    // The reader goes away; no further event comes. It must notice anyway.
    drop(lines);
    let t = Instant::now();
    let status = events.exited_within(Duration::from_secs(5));
    let err = std::fs::read_to_string(&errfile).unwrap();
    assert!(
        status.is_some(),
        "fleece events still runs {:?} after its stdout was closed; stderr: {err}",
        t.elapsed()
    );
    assert!(!err.contains("panicked"), "{err}");
}

// ---- percent-encoded API paths ----

#[test]
fn percent_encoded_api_paths_are_decoded() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    d.snapshot_create(&["vm"], "s1", &[]);
    let (status, body) = d.api("GET", "/v1/snapshots/vm%40s1", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["export"], "vm@s1", "{body}");
    let (status, body) = d.api("GET", "/v1/disks/v%6D", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "vm", "{body}");
    let (status, body) = d.api("GET", "/v1/disks/%zz", None);
    assert_api_error(status, &body, 400, "invalid_argument");
    let (status, body) = d.api("DELETE", "/v1/snapshots/vm%40s1", None);
    assert_eq!(status, 204, "{body}");
    assert_eq!(d.json(&["snapshot", "list"]), json!([]));
}

// ---- errors that say what failed ----

#[test]
fn a_failed_transaction_names_the_failing_action_and_applies_nothing() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    let tx = json!({"actions": [
        {"action": "bitmap-add", "disk": "vm", "name": "ok1"},
        {"action": "bitmap-clear", "disk": "vm", "name": "nosuch"},
    ]});
    let (status, body) = d.api("POST", "/v1/transactions", Some(&tx));
    assert_api_error(status, &body, 404, "not_found");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("action 2") && msg.contains("bitmap-clear"),
        "{msg:?}"
    );
    assert_eq!(d.json(&["bitmap", "list", "vm"]), json!([]));
    let sidecar = format!("{}.fleece-bitmap-ok1", d.image("vm").display());
    assert!(
        !std::path::Path::new(&sidecar).exists(),
        "{sidecar} was left behind"
    );
}

#[test]
fn two_creates_of_one_snapshot_in_a_transaction_clash_on_the_name_not_the_store() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    let tx = json!({"actions": [
        {"action": "snapshot-create", "disks": ["vm"], "name": "s1"},
        {"action": "snapshot-create", "disks": ["vm"], "name": "s1"},
    ]});
    let (status, body) = d.api("POST", "/v1/transactions", Some(&tx));
    assert_api_error(status, &body, 409, "exists");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("vm@s1") && !msg.contains("store"), "{msg:?}");
    assert_eq!(d.json(&["snapshot", "list"]), json!([]));
    let stores: Vec<_> = files_under(&d.state_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".store"))
        .collect();
    assert!(stores.is_empty(), "{stores:?}");
}

#[test]
fn listing_the_snapshots_of_a_missing_disk_says_it_does_not_exist() {
    let d = Daemon::start(&[("vm", 4 * MIB)]);
    d.cli_err(&["snapshot", "list", "nosuchdisk"], &["does not exist"]);
    let (status, body) = d.api("GET", "/v1/snapshots?disk=nosuchdisk", None);
    assert_api_error(status, &body, 404, "not_found");
    let (status, body) = d.api("GET", "/v1/snapshots?disk=vm", None);
    assert_eq!((status, body), (200, json!([])));
}

#[test]
fn the_log_line_about_a_broken_snapshot_names_it() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 2M"]);
    d.snapshot_create(
        &["vm"],
        "s1",
        &["--store-limit", "64K", "--on-cbw-error", "break-snapshot"],
    );
    qemu_io(&d.uri("vm"), &["write -P 0x22 0 1M"]);
    let s: Value = d.json(&["snapshot", "show", "vm@s1"]);
    assert_eq!(s["state"], "broken", "{s}");
    let log = d.log();
    let about: Vec<&str> = log
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("broken"))
        .collect();
    assert!(!about.is_empty(), "nothing in the log about the break:\n{log}");
    for l in &about {
        assert!(
            l.contains("vm@s1"),
            "a log line about the break does not name vm@s1: {l}"
        );
    }
}

#[test]
fn a_request_too_large_for_the_daemon_is_refused_by_the_cli_with_the_reason() {
    let d = Daemon::start(&[("vm", 16 * MIB)]);
    let actions: Vec<serde_json::Value> = (0..40_000)
        .map(|i| serde_json::json!({"action": "bitmap-add", "disk": "vm", "name": format!("b{i}")}))
        .collect();
    let file = d.path("big.json");
    std::fs::write(&file, serde_json::json!({ "actions": actions }).to_string()).unwrap();
    let out = d.cli(&["transaction", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("at most"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
}
