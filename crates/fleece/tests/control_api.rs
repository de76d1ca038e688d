//! The control API (HTTP/1.1 + JSON on the control socket) and the CLI client
//! subcommands, as docs/CONTRACT.md and docs/openapi.json describe them.
//! These only make sense against fleece.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn assert_disk(v: &Value, d: &Daemon, name: &str, path: &std::path::Path, size: u64) {
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["path"], path.to_str().unwrap(), "{v}");
    assert_eq!(v["size"], size, "{v}");
    assert_eq!(v["export"], name, "{v}");
    assert_eq!(v["uri"], d.uri(name), "{v}");
    assert!(v["connections"].is_u64(), "{v}");
    assert_eq!(v["snapshots"], json!([]), "{v}");
}

/// A CLI failure: exit code 1 and one line `fleece: error: ...` on stderr.
fn assert_cli_error(d: &Daemon, args: &[&str], needles: &[&str]) {
    let out = d.cli(args);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "fleece {args:?}: {}\nstderr: {err}",
        out.status
    );
    let line = err.trim_end();
    assert!(
        line.starts_with("fleece: error: "),
        "fleece {args:?}: stderr is not `fleece: error: ...`: {err:?}"
    );
    assert_eq!(
        line.lines().count(),
        1,
        "fleece {args:?}: more than one line on stderr: {err:?}"
    );
    for n in needles {
        assert!(
            line.contains(n),
            "fleece {args:?}: {line:?} does not mention {n:?}"
        );
    }
}

#[test]
fn status_reports_version_sockets_disks_and_connections() {
    let d = Daemon::start(&[("a", 4 * MIB), ("b", 2 * MIB)]);
    let st = d.cli_json(&["status"]);
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"), "{st}");
    assert!(st["uptime_secs"].is_u64(), "{st}");
    assert_eq!(st["state_dir"], d.state_dir.to_str().unwrap(), "{st}");
    assert_eq!(st["control"], d.control.to_str().unwrap(), "{st}");
    let nbd = st["nbd"]
        .as_array()
        .unwrap_or_else(|| panic!("nbd is not a list: {st}"));
    assert_eq!(nbd.len(), 1, "{st}");
    assert!(nbd[0].as_str().unwrap().contains(d.sock_str()), "{st}");
    assert_eq!(st["disks"], 2, "{st}");
    assert_eq!(st["connections"], 0, "{st}");
    let (status, api) = d.api("GET", "/v1/status", None);
    assert_eq!(status, 200);
    assert_eq!(api["disks"], 2);
    // Connections are counted while a client is connected.
    let (s, _) = raw::connect_export(&d.sock, "a");
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.api("GET", "/v1/status", None).1["connections"] != 1 {
        assert!(
            Instant::now() < deadline,
            "open connection not counted: {}",
            d.api("GET", "/v1/status", None).1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, disk) = d.api("GET", "/v1/disks/a", None);
    assert_eq!(disk["connections"], 1, "{disk}");
    drop(s);
    // The human form names the version and the sockets too.
    let human = d.cli_ok(&["status"]);
    assert!(
        human.contains(env!("CARGO_PKG_VERSION")) && human.contains(d.control.to_str().unwrap()),
        "{human}"
    );
}

#[test]
fn disk_list_json_describes_every_disk() {
    let d = Daemon::start(&[("a", 4 * MIB), ("b", 2 * MIB + 512)]);
    let list = d.cli_json(&["disk", "list"]);
    let list = list.as_array().unwrap_or_else(|| panic!("not a list: {list}"));
    assert_eq!(list.len(), 2, "{list:?}");
    let by = |n: &str| {
        list.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no {n}: {list:?}"))
    };
    assert_disk(by("a"), &d, "a", &d.image("a"), 4 * MIB);
    assert_disk(by("b"), &d, "b", &d.image("b"), 2 * MIB + 512);
    let (status, api) = d.api("GET", "/v1/disks", None);
    assert_eq!(status, 200);
    assert_eq!(api.as_array().unwrap().len(), 2);
    let (status, one) = d.api("GET", "/v1/disks/b", None);
    assert_eq!(status, 200, "{one}");
    assert_disk(&one, &d, "b", &d.image("b"), 2 * MIB + 512);
    let table = d.cli_ok(&["disk", "list"]);
    assert!(table.contains('a') && table.contains(&d.uri("b")), "{table}");
}

#[test]
fn disk_add_makes_a_new_image_exportable() {
    let d = Daemon::start(&[("a", 4 * MIB)]);
    let extra = d.path("extra.raw");
    std::fs::File::create(&extra).unwrap().set_len(6 * MIB).unwrap();
    write_at(&extra, MIB, &[0x7e; 4096]);
    d.cli_ok(&["disk", "add", "extra", extra.to_str().unwrap()]);
    let info: Value = serde_json::from_str(&run("nbdinfo", &["--json", &d.uri("extra")])).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 6 * MIB, "{info}");
    assert_eq!(info["exports"][0]["is_read_only"], false, "{info}");
    qemu_io(&d.uri("extra"), &["read -P 0x7e 1M 4k", "write -P 0x7f 2M 64k"]);
    assert_file_bytes(&extra, 2 * MIB, 65536, 0x7f);
    let list = run("nbdinfo", &["--list", &d.uri("a")]);
    assert!(
        list.contains("export=\"extra\"") && list.contains("export=\"a\""),
        "{list}"
    );
    assert_eq!(d.cli_json(&["status"])["disks"], 2);
    // Through the API: 201 with the disk.
    let other = d.path("other.raw");
    std::fs::File::create(&other).unwrap().set_len(MIB).unwrap();
    let (status, body) = d.api(
        "POST",
        "/v1/disks",
        Some(&json!({"name": "other", "path": other})),
    );
    assert_eq!(status, 201, "{body}");
    assert_disk(&body, &d, "other", &other, MIB);
    run("nbdinfo", &[&d.uri("other")]);
    // --json on add prints the disk.
    let third = d.path("third.raw");
    std::fs::File::create(&third).unwrap().set_len(MIB).unwrap();
    let v = d.cli_json(&["disk", "add", "third", third.to_str().unwrap()]);
    assert_disk(&v, &d, "third", &third, MIB);
}

#[test]
fn disk_remove_makes_the_export_disappear() {
    let d = Daemon::start(&[("a", 4 * MIB), ("b", 2 * MIB)]);
    qemu_io(&d.uri("b"), &["write -P 0x12 0 64k"]);
    d.cli_ok(&["disk", "remove", "b"]);
    run_fails("nbdinfo", &[&d.uri("b")]);
    let list = run("nbdinfo", &["--list", &d.uri("a")]);
    assert!(!list.contains("export=\"b\""), "{list}");
    let names: Vec<Value> = d
        .cli_json(&["disk", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("a")]);
    let (status, body) = d.api("GET", "/v1/disks/b", None);
    assert_api_error(status, &body, 404, "not_found");
    // The image itself is left alone, and it can be added back.
    assert_file_bytes(&d.image("b"), 0, 65536, 0x12);
    d.cli_ok(&["disk", "add", "b", d.image("b").to_str().unwrap()]);
    qemu_io(&d.uri("b"), &["read -P 0x12 0 64k"]);
    // Through the API: 204, empty body.
    let (status, body) = d.api("DELETE", "/v1/disks/b", None);
    assert_eq!(status, 204, "{body}");
    assert_eq!(body, Value::Null);
    let (status, body) = d.api("DELETE", "/v1/disks/b", None);
    assert_api_error(status, &body, 404, "not_found");
}

#[test]
fn disk_remove_of_a_connected_disk_is_busy_unless_forced() {
    let d = Daemon::start(&[("a", 4 * MIB)]);
    let (mut s, _) = raw::connect_export(&d.sock, "a");
    s.write_all(&raw::request(0, raw::CMD_READ, 1, 0, 512)).unwrap();
    assert_eq!(raw::simple_reply(&mut s).0, 0);
    let mut buf = [0u8; 512];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    let (status, body) = d.api("DELETE", "/v1/disks/a", None);
    assert_api_error(status, &body, 409, "busy");
    assert_cli_error(&d, &["disk", "remove", "a"], &["a"]);
    run("nbdinfo", &[&d.uri("a")]);
    d.cli_ok(&["disk", "remove", "a", "--force"]);
    // The forced removal closed our connection.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&raw::request(0, raw::CMD_READ, 2, 0, 512));
    let mut b = [0u8; 16];
    match std::io::Read::read(&mut s, &mut b) {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            // An error reply is acceptable too (e.g. ESHUTDOWN), but no data.
            assert!(
                n >= 8 && u32::from_be_bytes(b[4..8].try_into().unwrap()) != 0,
                "read on a removed disk succeeded"
            );
        }
    }
    run_fails("nbdinfo", &[&d.uri("a")]);
}

#[test]
fn disk_add_of_a_missing_path_fails_with_exit_code_1_and_a_clear_message() {
    let d = Daemon::start(&[("a", MIB)]);
    let missing = d.path("no/such/image.raw");
    let m = missing.to_str().unwrap();
    assert_cli_error(&d, &["disk", "add", "ghost", m], &[m]);
    let (status, body) = d.api("POST", "/v1/disks", Some(&json!({"name": "ghost", "path": m})));
    assert_api_error(status, &body, 400, "invalid_argument");
    assert!(body["error"]["message"].as_str().unwrap().contains(m), "{body}");
    // A directory is not an image either.
    let dir = d.dir.path().to_str().unwrap();
    assert_cli_error(&d, &["disk", "add", "ghost", dir], &[]);
    // Nothing was added.
    assert_eq!(d.cli_json(&["disk", "list"]).as_array().unwrap().len(), 1);
    run_fails("nbdinfo", &[&d.uri("ghost")]);
}

#[test]
fn disk_add_of_a_duplicate_name_fails_with_exit_code_1_and_a_clear_message() {
    let d = Daemon::start(&[("a", MIB)]);
    qemu_io(&d.uri("a"), &["write -P 0x61 0 4k"]);
    let other = d.path("other.raw");
    std::fs::File::create(&other).unwrap().set_len(2 * MIB).unwrap();
    assert_cli_error(&d, &["disk", "add", "a", other.to_str().unwrap()], &["a"]);
    let (status, body) = d.api("POST", "/v1/disks", Some(&json!({"name": "a", "path": other})));
    assert_api_error(status, &body, 409, "exists");
    // The original disk is untouched.
    let v = d.cli_json(&["disk", "list"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_disk(&v[0], &d, "a", &d.image("a"), MIB);
    qemu_io(&d.uri("a"), &["read -P 0x61 0 4k"]);
}

#[test]
fn bad_disk_names_and_bodies_are_invalid_arguments() {
    let d = Daemon::start(&[("a", MIB)]);
    let img = d.path("x.raw");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    for name in [
        "bad@name",
        "",
        "../escape",
        ".hidden",
        "has space",
        &"n".repeat(200),
    ] {
        let (status, body) = d.api("POST", "/v1/disks", Some(&json!({"name": name, "path": img})));
        assert_api_error(status, &body, 400, "invalid_argument");
    }
    assert_cli_error(
        &d,
        &["disk", "add", "bad@name", img.to_str().unwrap()],
        &["bad@name"],
    );
    for raw_body in [
        "{bad json",
        "[]",
        "{\"name\": \"x\"}",
        "{\"name\": 5, \"path\": \"/x\"}",
        "{\"name\": \"x\", \"path\": \"/x\", \"extra\": 1}",
    ] {
        let (status, _, b) = http(&d.control, "POST", "/v1/disks", raw_body.as_bytes());
        let body: Value =
            serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{raw_body}: not JSON ({e}): {}", text(&b)));
        assert_api_error(status, &body, 400, "invalid_argument");
    }
    assert_eq!(d.cli_json(&["disk", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn unknown_routes_and_disks_get_404_json_errors() {
    let d = Daemon::start(&[("a", MIB)]);
    for path in [
        "/v1/nope",
        "/",
        "/v2/status",
        "/v1/disks/a/nope/deeper",
        "/v1/disks/zzz",
    ] {
        let (status, body) = d.api("GET", path, None);
        assert_api_error(status, &body, 404, "not_found");
    }
    let (status, body) = d.api("DELETE", "/v1/disks/zzz", None);
    assert_api_error(status, &body, 404, "not_found");
    // A wrong method on a known route is an error with a JSON body too.
    let (status, _, b) = http(&d.control, "PUT", "/v1/status", b"{}");
    assert!((400..500).contains(&status), "PUT /v1/status: {status}");
    let body: Value = serde_json::from_slice(&b).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&b)));
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{body}"
    );
    let (status, h, _) = http(&d.control, "GET", "/v1/nope", b"");
    assert_eq!(status, 404);
    assert!(
        h.iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/json")),
        "{h:?}"
    );
}

#[test]
fn cli_without_a_daemon_fails_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = Command::new(BIN)
        .args(["status", "--control", sock.to_str().unwrap()])
        .env_remove("FLEECE_CONTROL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("fleece: error: ") && err.trim_end().lines().count() == 1,
        "{err:?}"
    );
    assert!(
        err.contains(sock.to_str().unwrap()),
        "does not name the socket: {err:?}"
    );
    // FLEECE_CONTROL is honoured.
    let d = Daemon::start(&[("a", MIB)]);
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .env("FLEECE_CONTROL", &d.control)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["disks"], 1);
}

#[test]
fn control_and_json_go_before_or_after_the_subcommand() {
    let d = Daemon::start(&[("a", MIB)]);
    let ctl = d.control.to_str().unwrap();
    for args in [
        &["--control", ctl, "--json", "disk", "list"][..],
        &["--json", "disk", "list", "--control", ctl],
        &["disk", "--json", "list", "--control", ctl],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("FLEECE_CONTROL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&out.stdout)));
        assert_eq!(v[0]["name"], "a", "{args:?}: {v}");
    }
    // The flag wins over the environment.
    let out = Command::new(BIN)
        .args(["--control", ctl, "status"])
        .env("FLEECE_CONTROL", d.path("elsewhere.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The daemon prints logs, not JSON: refused before anything starts.
    let out = Command::new(BIN)
        .args(["serve", "--json", "--state-dir"])
        .arg(d.path("other-state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--json"), "{}", text(&out.stderr));
    assert!(!d.path("other-state").exists());
}

#[test]
fn events_stream_reports_disk_added_and_removed() {
    let d = Daemon::start(&[("a", MIB)]);
    let mut s = UnixStream::connect(&d.control).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: fleece\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.contains(" 200"), "{status}");
    let mut headers = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" {
            break;
        }
        headers.push_str(&l);
    }
    assert!(headers.to_lowercase().contains("text/event-stream"), "{headers}");
    let img = d.path("e.raw");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    d.cli_ok(&["disk", "add", "e", img.to_str().unwrap()]);
    d.cli_ok(&["disk", "remove", "e"]);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(seen.contains("event: disk_added") && seen.contains("event: disk_removed")) {
        assert!(Instant::now() < deadline, "events not seen:\n{seen}");
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            panic!("event stream ended:\n{seen}");
        }
        seen.push_str(&l);
    }
    let data = seen
        .lines()
        .skip_while(|l| !l.contains("event: disk_added"))
        .find(|l| l.contains("data:"))
        .unwrap();
    assert!(
        data.contains("\"e\""),
        "disk_added data does not name the disk: {data}"
    );
}

#[test]
fn an_invalid_log_level_is_an_error_and_logs_to_a_file_have_no_colour_codes() {
    let out = Command::new(BIN)
        .args(["--log-level", "bogus[", "status"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("fleece: error: log level \"bogus[\"") && err.contains("is not valid"),
        "{err:?}"
    );
    // The harness sends the daemon's stderr to a file: plain text there.
    let d = Daemon::start(&[("disk", MIB)]);
    d.snapshot_create(&["disk"], "s", &[]);
    let log = d.log();
    assert!(log.contains("snapshot_created"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log:?}");
}
