//! The daemon as NBD clients and operators see it: real clients (nbdinfo,
//! qemu-nbd, qemu-io, qemu-img, nbdcopy, fio, python3-libnbd) over real
//! sockets, the control API and CLI, signals and crashes.

mod harness;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::*;

const MIB: u64 = 1 << 20;

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

#[test]
fn libnbd_protocol_checks_pass() {
    let d = Daemon::start(&[("disk", 64 * MIB)]);
    let script = format!("{}/tests/python/protocol.py", env!("CARGO_MANIFEST_DIR"));
    let out = run(python(), &[&script, d.sock.to_str().unwrap(), "disk"]);
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn nbdinfo_lists_exports_and_maps_holes_true_to_the_file() {
    let d = Daemon::start(&[("a", 16 * MIB), ("b", 8 * MIB)]);
    let list = run("nbdinfo", &["--list", &d.uri("a")]);
    assert!(
        list.contains("export=\"a\"") && list.contains("export=\"b\""),
        "{list}"
    );
    let info: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &d.uri("a")])).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB);
    for flag in [
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fua",
        "can_df",
        "can_cache",
        "can_flush",
        "can_fast_zero",
    ] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_preferred"], 4096);
    qemu_io(&d.uri("a"), &["write -P 1 1M 64k", "write -P 2 8M 1M"]);
    let map = run("nbdinfo", &["--map", &d.uri("a")]);
    let lines: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    let kind = |off: u64| {
        lines
            .iter()
            .find(|f| {
                let (s, l): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
                s <= off && off < s + l
            })
            .map(|f| f[2].clone())
            .unwrap()
    };
    assert_eq!(kind(0), "3", "{map}");
    assert_eq!(kind(MIB), "0", "{map}");
    assert_eq!(kind(8 * MIB + 4096), "0", "{map}");
    assert_eq!(kind(12 * MIB), "3", "{map}");
}

#[test]
fn qemu_nbd_lists_base_allocation_and_64_bit_transactions() {
    let d = Daemon::start(&[("disk", 4 * MIB)]);
    let out = run("qemu-nbd", &["-L", "-k", d.sock.to_str().unwrap()]);
    assert!(out.contains("export: 'disk'"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("64-bit"), "{out}");
}

#[test]
fn qemu_io_patterns_including_unaligned_and_zeroes_read_back() {
    let d = Daemon::start(&[("disk", 16 * MIB)]);
    let u = d.uri("disk");
    qemu_io(
        &u,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1000 3000",
            "write -z 2M 1M",
            "discard 4M 64k",
        ],
    );
    qemu_io(
        &u,
        &[
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 3000",
            "read -P 0xab 4000 61536",
            "read -P 0 2M 1M",
            "read -P 0 4M 64k",
        ],
    );
}

#[test]
fn qemu_img_convert_map_and_compare_agree_with_the_export() {
    let d = Daemon::start(&[("disk", 16 * MIB)]);
    let src = d.path("src.raw");
    run("qemu-img", &["create", "-f", "raw", src.to_str().unwrap(), "16M"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 3M 2M", src.to_str().unwrap()],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &d.uri("disk"),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &d.uri("disk"),
        ],
    );
    let back = d.path("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &d.uri("disk"),
            back.to_str().unwrap(),
        ],
    );
    assert!(same_file(&src, &back));
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &d.uri("disk")]);
    assert!(map.contains("\"start\": 3145728, \"length\": 2097152, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{map}");
}

#[test]
fn nbdcopy_both_ways_with_two_connections() {
    let d = Daemon::start(&[("disk", 32 * MIB)]);
    let src = d.path("src.raw");
    std::fs::write(
        &src,
        (0..32 * MIB).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    run(
        "nbdcopy",
        &[
            "--connections=2",
            "--requests=64",
            src.to_str().unwrap(),
            &d.uri("disk"),
        ],
    );
    let back = d.path("back.raw");
    run(
        "nbdcopy",
        &["--connections=2", &d.uri("disk"), back.to_str().unwrap()],
    );
    assert!(same_file(&src, &back));
    assert!(same_file(&src, &d.image("disk")));
    run("nbdcopy", &[&d.uri("disk"), "null:"]);
}

#[test]
fn fio_random_read_write_with_crc32c_verify() {
    let d = Daemon::start(&[("disk", 64 * MIB)]);
    run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("disk")),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output=/dev/null",
        ],
    );
}

#[test]
fn flushed_writes_survive_kill_9_and_a_restart_serves_them() {
    let mut d = Daemon::start(&[("disk", 8 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x6b 1M 128k", "flush"]);
    d.kill9();
    let data = std::fs::read(d.image("disk")).unwrap();
    assert!(data[MIB as usize..MIB as usize + 131072]
        .iter()
        .all(|&b| b == 0x6b));
    d.spawn();
    qemu_io(&d.uri("disk"), &["read -P 0x6b 1M 128k"]);
}

#[test]
fn sigterm_under_load_finishes_requests_and_exits_zero() {
    let mut d = Daemon::start(&[("disk", 32 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x3c 0 1M"]);
    let load = fio_writer(&d.uri("disk"), 10, "16M");
    std::thread::sleep(Duration::from_millis(700));
    let mut child = d.child.take().unwrap();
    run("kill", &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon exited with {status}: {}", d.log());
    let _ = load.wait_with_output();
    let data = std::fs::read(d.image("disk")).unwrap();
    assert!(data[16 * MIB as usize..17 * MIB as usize].iter().all(|&b| b == 0));
    assert!(!d.control.exists(), "control socket left behind");
}

/// Sends raw bytes as a client, then drops the connection.
fn raw_client(sock: &std::path::Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
}

fn handshake_to_transmission(export: &str) -> Vec<u8> {
    // Client flags (fixed newstyle, no zeroes), then NBD_OPT_EXPORT_NAME.
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend_from_slice(b"IHAVEOPT");
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v
}

#[test]
fn garbage_and_broken_clients_do_not_hurt_the_daemon_or_others() {
    let d = Daemon::start(&[("disk", 8 * MIB)]);
    let sock = d.sock.clone();
    raw_client(&sock, b"GET / HTTP/1.1\r\n\r\n");
    raw_client(&sock, &[0xff; 3]);
    raw_client(&sock, &3u32.to_be_bytes());
    // Option with a 4 GiB length, then hang up.
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend_from_slice(b"IHAVEOPT");
    v.extend_from_slice(&7u32.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    raw_client(&sock, &v);
    // Transmission: a write claiming 1 GiB of payload, an unknown command, bad magic.
    for tail in [
        [
            &0x25609513u32.to_be_bytes()[..],
            &0u16.to_be_bytes(),
            &1u16.to_be_bytes(),
            &[0; 16],
            &(1u32 << 30).to_be_bytes(),
        ]
        .concat(),
        [
            &0x25609513u32.to_be_bytes()[..],
            &0u16.to_be_bytes(),
            &99u16.to_be_bytes(),
            &[0; 16],
            &0u32.to_be_bytes(),
        ]
        .concat(),
        vec![0xde; 28],
        [
            &0x25609513u32.to_be_bytes()[..],
            &0u16.to_be_bytes(),
            &1u16.to_be_bytes(),
            &[0; 16],
            &4096u32.to_be_bytes(),
            &[1; 100],
        ]
        .concat(),
    ] {
        let mut v = handshake_to_transmission("disk");
        v.extend_from_slice(&tail);
        raw_client(&sock, &v);
    }
    // A client that stops mid-request while others work.
    let load = fio_writer(&d.uri("disk"), 2, "8M");
    raw_client(&sock, &handshake_to_transmission("disk"));
    wait_ok(load, "fio next to broken clients");
    run("nbdinfo", &[&d.uri("disk")]);
    qemu_io(&d.uri("disk"), &["write -P 9 0 4k", "read -P 9 0 4k"]);
}

#[test]
fn control_api_and_cli_manage_disks_with_clear_errors() {
    let d = Daemon::start(&[("disk", 4 * MIB)]);
    let st = d.json(&["status"]);
    assert_eq!(st["disks"], 1);
    assert!(st["version"].is_string());
    let list = d.json(&["disk", "list"]);
    assert_eq!(list[0]["name"], "disk");
    assert_eq!(list[0]["size"], 4 * MIB);
    let table = d.cli_ok(&["disk", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    let extra = d.path("extra.raw");
    std::fs::File::create(&extra).unwrap().set_len(2 * MIB).unwrap();
    d.cli_ok(&["disk", "add", "extra", extra.to_str().unwrap()]);
    run("nbdinfo", &[&d.uri("extra")]);
    for (args, needle) in [
        (
            vec!["disk", "add", "extra", extra.to_str().unwrap()],
            "already exists",
        ),
        (
            vec!["disk", "add", "ghost", "/nonexistent/ghost.raw"],
            "cannot open",
        ),
        (
            vec!["disk", "add", "bad@name", extra.to_str().unwrap()],
            "invalid disk name",
        ),
        (vec!["disk", "remove", "ghost"], "does not exist"),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    d.cli_ok(&["disk", "remove", "extra"]);
    assert!(!run_any("nbdinfo", &[&d.uri("extra")]).status.success());
    // Raw API: JSON errors for unknown routes, bad bodies and bad methods.
    for (req, status, code) in [
        ("GET /v1/nope HTTP/1.0\r\n\r\n", "404", "not_found"),
        (
            "POST /v1/disks HTTP/1.0\r\nContent-Length: 5\r\n\r\n{bad}",
            "400",
            "invalid_argument",
        ),
        ("PUT /v1/status HTTP/1.0\r\n\r\n", "405", "invalid_argument"),
    ] {
        let mut s = UnixStream::connect(&d.control).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.lines().next().unwrap().contains(status), "{req}: {resp}");
        let body: serde_json::Value = serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], code, "{resp}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 10);
    }
    // A client with no daemon behind it says so.
    let out = Command::new(BIN)
        .args(["status", "--control", "/nonexistent.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the fleece daemon"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn built_in_default_serves_a_sparse_one_gib_demo_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let control = dir.path().join("fleece-state/control.sock");
    for _ in 0..500 {
        if UnixStream::connect(&control).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let demo = dir.path().join("fleece-state/demo.raw");
    let meta = std::fs::metadata(&demo).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) < 1024,
        "demo disk is not sparse"
    );
    let sock = dir.path().join("fleece-state/nbd.sock");
    let uri = format!("nbd+unix:///demo?socket={}", sock.display());
    qemu_io(&uri, &["write -P 0xab 0 64k", "read -P 0xab 0 64k"]);
    run("kill", &["-INT", &child.id().to_string()]);
    assert!(child.wait().unwrap().success());
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains("nbd+unix:///demo?socket="), "{out}");
    assert!(out.contains("control socket"), "{out}");
}

#[test]
fn tcp_listener_serves_nbd_uris() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.raw");
    std::fs::File::create(&img).unwrap().set_len(4 * MIB).unwrap();
    let control = dir.path().join("c.sock");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--disk",
            &format!("t={}", img.display()),
            "--nbd",
            &format!("tcp:127.0.0.1:{port}"),
        ])
        .arg("--control")
        .arg(&control)
        .arg("--state-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if UnixStream::connect(&control).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd://127.0.0.1:{port}/t");
    qemu_io(&uri, &["write -P 7 0 4k", "read -P 7 0 4k"]);
    let info = run("nbdinfo", &[&uri]);
    assert!(info.contains("export-size: 4194304"), "{info}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads one option reply: (option, reply type, payload).
fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        &h[..8],
        &0x0003_e889_0455_65a9u64.to_be_bytes(),
        "bad option reply magic"
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        p,
    )
}

fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

#[test]
fn unknown_options_get_err_unsup_and_haggling_goes_on_to_a_working_export() {
    let d = Daemon::start(&[("disk", MIB)]);
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([greeting[16], greeting[17]]) & 3,
        3,
        "fixed newstyle + no zeroes"
    );
    s.write_all(&3u32.to_be_bytes()).unwrap();
    // Unknown option with a payload: refused, payload consumed, no disconnect.
    send_option(&mut s, 0x4242, b"whatever the client says");
    let (opt, kind, msg) = option_reply(&mut s);
    assert_eq!((opt, kind), (0x4242, (1 << 31) + 1), "expected NBD_REP_ERR_UNSUP");
    assert!(!msg.is_empty());
    // STARTTLS without TLS configured: refused too.
    send_option(&mut s, 5, b"");
    assert_eq!(option_reply(&mut s).1, (1 << 31) + 1);
    // LIST with data is invalid, LIST without works.
    send_option(&mut s, 3, b"x");
    assert_eq!(option_reply(&mut s).1, (1 << 31) + 3);
    send_option(&mut s, 3, b"");
    let (_, kind, p) = option_reply(&mut s);
    assert_eq!(kind, 2, "NBD_REP_SERVER");
    assert_eq!(&p[4..8], b"disk");
    assert_eq!(option_reply(&mut s).1, 1, "NBD_REP_ACK");
    // Extended headers, then GO: the transmission phase works with 64-bit headers.
    send_option(&mut s, 11, b"");
    assert_eq!(option_reply(&mut s).1, 1);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, 7, &go);
    loop {
        let (_, kind, p) = option_reply(&mut s);
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 3, "NBD_REP_INFO");
        if u16::from_be_bytes([p[0], p[1]]) == 0 {
            assert_eq!(u64::from_be_bytes(p[2..10].try_into().unwrap()), MIB);
        }
    }
    // NBD_CMD_READ of 512 bytes at 0 with an extended header.
    let mut req = 0x21e4_1c71u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&77u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u64.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut hdr = [0u8; 32];
    s.read_exact(&mut hdr).unwrap();
    assert_eq!(&hdr[..4], &0x6e8a_278cu32.to_be_bytes(), "extended reply magic");
    assert_eq!(u64::from_be_bytes(hdr[8..16].try_into().unwrap()), 77, "cookie");
    assert_eq!(
        u16::from_be_bytes([hdr[6], hdr[7]]),
        1,
        "NBD_REPLY_TYPE_OFFSET_DATA"
    );
    let len = u64::from_be_bytes(hdr[24..32].try_into().unwrap());
    assert_eq!(len, 8 + 512);
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).unwrap();
    assert!(body[8..].iter().all(|&b| b == 0));
}
