//! Hostile and broken clients on the raw NBD socket: garbage, truncated
//! handshakes, huge lengths, unknown commands, abrupt disconnects. The
//! server survives each, and other clients keep working.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

/// The server is alive and serves a fresh client correctly.
fn still_serves(d: &mut Daemon) {
    d.assert_alive();
    let info = run("nbdinfo", &[&d.uri("disk")]);
    assert!(info.contains("export-size"), "{info}");
    qemu_io(&d.uri("disk"), &["write -P 0x9d 12k 4k", "read -P 0x9d 12k 4k"]);
}

/// For fleece: the daemon's connection count drops back to zero once the
/// broken clients are gone (no leaked connection state).
fn connections_drain(d: &Daemon) {
    if !d.is_fleece() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = d.api("GET", "/v1/status", None);
        assert_eq!(status, 200, "{body}");
        if body["connections"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "connections never drained: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads until EOF or error; true if the server closed the connection (as
/// opposed to leaving it hanging past `timeout`).
fn server_hangs_up(s: &mut UnixStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn garbage_instead_of_a_handshake_leaves_the_server_serving() {
    let mut d = Daemon::start_nbd(&[("disk", 4 * MIB)]);
    let sock = d.sock.clone();
    raw::send_and_drop(&sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    raw::send_and_drop(&sock, &[0xff; 3]);
    raw::send_and_drop(&sock, &pattern(64 * 1024, 99));
    raw::send_and_drop(&sock, b"");
    // Bad client flags (unknown bits): the server may refuse, must not die.
    raw::send_and_drop(&sock, &0xffff_ffffu32.to_be_bytes());
    // Client flags then something that is not IHAVEOPT.
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend_from_slice(b"NOTANOPTxxxxxxxxxxxxxxxxxxxxxxxxxx");
    raw::send_and_drop(&sock, &v);
    // A client that connects and says nothing, left open while others work.
    let idle = UnixStream::connect(&sock).unwrap();
    still_serves(&mut d);
    drop(idle);
    connections_drain(&d);
    still_serves(&mut d);
}

#[test]
fn truncated_handshakes_leave_the_server_serving() {
    let mut d = Daemon::start_nbd(&[("disk", 4 * MIB)]);
    let sock = d.sock.clone();
    let go = {
        let mut g = 4u32.to_be_bytes().to_vec();
        g.extend_from_slice(b"disk");
        g.extend_from_slice(&0u16.to_be_bytes());
        option(OPT_GO, &g)
    };
    let flags_then = |tail: &[u8]| {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend_from_slice(tail);
        raw::send_and_drop(&sock, &v);
    };
    flags_then(b"");
    flags_then(b"IHAV");
    flags_then(&go[..10]);
    flags_then(&go[..go.len() - 3]);
    flags_then(&option(0x4242, b"abc")[..18]);
    raw::send_and_drop(&sock, &3u32.to_be_bytes()[..2]);
    // GO whose name length runs past the option: an error reply, not a crash.
    let mut s = greet(&sock);
    let mut bad = 1000u32.to_be_bytes().to_vec();
    bad.extend_from_slice(b"disk");
    s.write_all(&option(OPT_GO, &bad)).unwrap();
    let (opt, kind, _) = option_reply(&mut s);
    assert_eq!(opt, OPT_GO);
    assert!(kind >= 1 << 31, "malformed GO got reply {kind:#x}, not an error");
    // The same connection can still list and go.
    s.write_all(&option(OPT_LIST, b"")).unwrap();
    let (_, kind, p) = option_reply(&mut s);
    assert_eq!(kind, REP_SERVER);
    assert_eq!(&p[4..8], b"disk");
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    drop(s);
    // A GO, then hang up before reading the replies.
    let mut s = greet(&sock);
    s.write_all(&go).unwrap();
    drop(s);
    let (mut s, size) = connect_export(&sock, "disk");
    assert_eq!(size, 4 * MIB);
    s.write_all(&request(0, CMD_READ, 1, 0, 512)).unwrap();
    let (err, cookie) = simple_reply(&mut s);
    assert_eq!((err, cookie), (0, 1));
    connections_drain_after(&d, s);
    still_serves(&mut d);
}

fn connections_drain_after(d: &Daemon, s: UnixStream) {
    drop(s);
    connections_drain(d);
}

#[test]
fn huge_lengths_are_refused_without_harm() {
    let mut d = Daemon::start_nbd(&[("disk", 4 * MIB)]);
    let sock = d.sock.clone();
    // Options claiming 4 GiB and 64 MiB of payload, then hang-ups.
    for len in [u32::MAX, 64 << 20] {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend_from_slice(IHAVEOPT);
        v.extend_from_slice(&7u32.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&[0u8; 4096]);
        raw::send_and_drop(&sock, &v);
    }
    let mut s = greet(&sock);
    let _ = s.write_all(&option(0x7777, &vec![0x41; 1 << 20]));
    // An unknown option with 1 MiB of payload: refused, either with
    // ERR_UNSUP once its payload is consumed (haggling goes on), or with
    // ERR_TOO_BIG from its header alone, after which fleece hangs up (the
    // stream cannot be resynchronised without the bytes; see front_door.rs).
    let (opt, kind, _) = option_reply(&mut s);
    assert_eq!(opt, 0x7777);
    assert!(
        kind == REP_ERR_UNSUP || kind == REP_ERR_TOO_BIG,
        "reply {kind:#x}"
    );
    if kind == REP_ERR_TOO_BIG {
        s = greet(&sock);
    }
    s.write_all(&option(OPT_LIST, b"")).unwrap();
    let (opt, kind, p) = option_reply(&mut s);
    assert_eq!(
        (opt, kind),
        (OPT_LIST, REP_SERVER),
        "out of sync after a big option"
    );
    assert_eq!(&p[4..8], b"disk");
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    s.write_all(&option(OPT_ABORT, b"")).unwrap();
    drop(s);
    // Transmission: a write announcing 1 GiB and a read of 4 GiB - 1. The
    // server answers with an error or hangs up; it never sends data.
    let (mut s, _) = connect_export(&sock, "disk");
    s.write_all(&request(0, CMD_READ, 7, 0, u32::MAX)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut h = [0u8; 16];
    match s.read_exact(&mut h) {
        Ok(()) => {
            assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
            let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
            assert_ne!(err, 0, "a 4 GiB read past the end succeeded");
        }
        Err(e) => assert!(
            e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut,
            "no reply to a 4 GiB read"
        ),
    }
    drop(s);
    let (mut s, _) = connect_export(&sock, "disk");
    s.write_all(&request(0, CMD_WRITE, 8, 0, 1 << 30)).unwrap();
    let _ = s.write_all(&vec![0x5a; 1 << 20]);
    drop(s);
    still_serves(&mut d);
    // The partial 1 GiB write did not land.
    qemu_io(&d.uri("disk"), &["read -P 0 0 12k"]);
    connections_drain(&d);
}

#[test]
fn unknown_commands_and_bad_flags_get_einval_and_the_connection_goes_on() {
    let mut d = Daemon::start_nbd(&[("disk", 4 * MIB)]);
    let (mut s, size) = connect_export(&d.sock, "disk");
    assert_eq!(size, 4 * MIB);
    // Unknown command types (no payload).
    for (cookie, cmd) in [(100u64, 99u16), (101, 0x7fff), (102, 12)] {
        s.write_all(&request(0, cmd, cookie, 0, 0)).unwrap();
        let (err, c) = simple_reply(&mut s);
        assert_eq!(c, cookie);
        assert_eq!(err, EINVAL, "unknown command {cmd}: error {err}");
    }
    // Unknown flag on a read.
    s.write_all(&request(0x8000, CMD_READ, 103, 0, 512)).unwrap();
    let (err, c) = simple_reply(&mut s);
    assert_eq!((err, c), (EINVAL, 103));
    // A write with a bad flag: refused, its payload consumed, nothing written.
    let mut w = request(0x4000, CMD_WRITE, 104, 4096, 4096);
    w.extend_from_slice(&[0x77; 4096]);
    s.write_all(&w).unwrap();
    let (err, c) = simple_reply(&mut s);
    assert_eq!((err, c), (EINVAL, 104));
    // The stream is still in sync: a write and a read work.
    let mut w = request(0, CMD_WRITE, 105, 8192, 4096);
    w.extend_from_slice(&[0x66; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 105));
    s.write_all(&request(0, CMD_READ, 106, 4096, 8192)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 106));
    let mut data = vec![0u8; 8192];
    s.read_exact(&mut data).unwrap();
    assert!(
        data[..4096].iter().all(|&b| b == 0),
        "a refused write changed data"
    );
    assert!(data[4096..].iter().all(|&b| b == 0x66));
    s.write_all(&request(0, CMD_FLUSH, 107, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 107));
    // A bad request magic cannot be resynchronised: the server hangs up.
    let mut bad = request(0, CMD_READ, 108, 0, 512);
    bad[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    s.write_all(&bad).unwrap();
    assert!(
        server_hangs_up(&mut s, Duration::from_secs(10)),
        "no hang-up after a bad request magic"
    );
    // NBD_CMD_DISC ends a connection cleanly.
    let (mut s, _) = connect_export(&d.sock, "disk");
    s.write_all(&request(0, CMD_DISC, 109, 0, 0)).unwrap();
    assert!(
        server_hangs_up(&mut s, Duration::from_secs(10)),
        "no hang-up after NBD_CMD_DISC"
    );
    still_serves(&mut d);
    connections_drain(&d);
}

#[test]
fn abrupt_disconnects_mid_request_leave_the_server_serving() {
    let mut d = Daemon::start_nbd(&[("disk", 16 * MIB)]);
    let sock = d.sock.clone();
    let fio = spawn_fio(
        &d.uri("disk"),
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=4M",
            "--offset=8M",
            "--runtime=3",
            "--time_based",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    );
    for round in 0..6u64 {
        // Half a write payload, then gone.
        let (mut s, _) = connect_export(&sock, "disk");
        let mut w = request(0, CMD_WRITE, round, MIB, 65536);
        w.extend_from_slice(&[0xab; 1000]);
        s.write_all(&w).unwrap();
        drop(s);
        // Half a request header, then gone.
        let (mut s, _) = connect_export(&sock, "disk");
        s.write_all(&request(0, CMD_READ, round, 0, 4096)[..13]).unwrap();
        drop(s);
        // Big reads in flight, then gone without reading the replies.
        let (mut s, _) = connect_export(&sock, "disk");
        for i in 0..16 {
            s.write_all(&request(0, CMD_READ, i, (i % 4) * 2 * MIB, 2 << 20))
                .unwrap();
        }
        drop(s);
        // Writes in flight, reset by shutting down both directions.
        let (mut s, _) = connect_export(&sock, "disk");
        for i in 0..8 {
            let mut w = request(0, CMD_WRITE, i, 4 * MIB + i * 65536, 65536);
            w.extend_from_slice(&[0xcd; 65536]);
            s.write_all(&w).unwrap();
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    wait_ok(fio, "fio next to the broken clients");
    still_serves(&mut d);
    // The half-sent write never landed.
    qemu_io(&d.uri("disk"), &["read -P 0 1M 64k"]);
    connections_drain(&d);
}

#[test]
fn many_short_lived_connections_do_not_exhaust_the_server() {
    let mut d = Daemon::start_nbd(&[("disk", MIB)]);
    for i in 0..200u64 {
        let (mut s, _) = connect_export(&d.sock, "disk");
        if i % 2 == 0 {
            s.write_all(&request(0, CMD_READ, i, 0, 512)).unwrap();
            assert_eq!(simple_reply(&mut s), (0, i));
        }
    }
    let open: Vec<_> = (0..32).map(|_| connect_export(&d.sock, "disk").0).collect();
    still_serves(&mut d);
    drop(open);
    connections_drain(&d);
}

/// NBD_OPT_EXPORT_NAME handshake with the given client flags; returns the
/// stream in transmission phase, the size and the transmission flags.
fn export_name_handshake(sock: &std::path::Path, client_flags: u32, export: &str) -> (UnixStream, u64, u16) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&client_flags.to_be_bytes()).unwrap();
    s.write_all(&option(OPT_EXPORT_NAME, export.as_bytes())).unwrap();
    let mut h = [0u8; 10];
    s.read_exact(&mut h).unwrap();
    if client_flags & 2 == 0 {
        let mut zeroes = [0xffu8; 124];
        s.read_exact(&mut zeroes).unwrap();
        assert!(
            zeroes.iter().all(|&b| b == 0),
            "the 124 bytes of padding are not zero"
        );
    }
    (
        s,
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        u16::from_be_bytes(h[8..].try_into().unwrap()),
    )
}

#[test]
fn export_name_option_works_with_and_without_no_zeroes() {
    let mut d = Daemon::start_nbd(&[("disk", 2 * MIB)]);
    for flags in [1u32, 3] {
        let (mut s, size, tflags) = export_name_handshake(&d.sock, flags, "disk");
        assert_eq!(size, 2 * MIB, "client flags {flags}");
        assert_eq!(tflags & 1, 1, "NBD_FLAG_HAS_FLAGS missing: {tflags:#x}");
        assert_eq!(tflags & 2, 0, "read-only: {tflags:#x}");
        for bit in [1 << 2, 1 << 3, 1 << 5, 1 << 6, 1 << 8] {
            assert!(
                tflags & bit != 0,
                "flush/fua/trim/zeroes/multi-conn bit {bit:#x} missing: {tflags:#x}"
            );
        }
        // Exactly in sync: the next bytes are the reply to our read.
        let mut w = request(0, CMD_WRITE, 1, 4096, 512);
        w.extend_from_slice(&[flags as u8; 512]);
        s.write_all(&w).unwrap();
        assert_eq!(simple_reply(&mut s), (0, 1));
        s.write_all(&request(0, CMD_READ, 2, 4096, 512)).unwrap();
        assert_eq!(simple_reply(&mut s), (0, 2));
        let mut b = [0u8; 512];
        s.read_exact(&mut b).unwrap();
        assert!(b.iter().all(|&x| x == flags as u8));
        s.write_all(&request(0, CMD_DISC, 3, 0, 0)).unwrap();
    }
    // EXPORT_NAME of an unknown export: the server hangs up (no error reply
    // is possible for this option).
    let mut s = greet(&d.sock);
    s.write_all(&option(OPT_EXPORT_NAME, b"nope")).unwrap();
    assert!(
        server_hangs_up(&mut s, Duration::from_secs(10)),
        "no hang-up after EXPORT_NAME of an unknown export"
    );
    still_serves(&mut d);
}

#[test]
fn unknown_options_get_err_unsup_and_haggling_goes_on_to_a_working_export() {
    let d = Daemon::start_nbd(&[("disk", MIB)]);
    let mut s = greet(&d.sock);
    // Unknown option with a payload: refused, payload consumed, no disconnect.
    s.write_all(&option(0x4242, b"whatever the client says")).unwrap();
    let (opt, kind, msg) = option_reply(&mut s);
    assert_eq!((opt, kind), (0x4242, REP_ERR_UNSUP));
    assert!(!msg.is_empty(), "an error reply says why");
    // STARTTLS without TLS configured: refused too.
    s.write_all(&option(5, b"")).unwrap();
    assert_eq!(option_reply(&mut s).1, REP_ERR_UNSUP);
    // LIST with data is invalid, LIST without works.
    s.write_all(&option(OPT_LIST, b"x")).unwrap();
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID);
    s.write_all(&option(OPT_LIST, b"")).unwrap();
    let (_, kind, p) = option_reply(&mut s);
    assert_eq!(kind, REP_SERVER);
    assert_eq!(&p[4..8], b"disk");
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    // Extended headers, then GO: transmission works with 64-bit headers.
    s.write_all(&option(11, b"")).unwrap();
    assert_eq!(option_reply(&mut s).1, REP_ACK, "NBD_OPT_EXTENDED_HEADERS");
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&option(OPT_GO, &go)).unwrap();
    loop {
        let (_, kind, p) = option_reply(&mut s);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        if u16::from_be_bytes([p[0], p[1]]) == 0 {
            assert_eq!(u64::from_be_bytes(p[2..10].try_into().unwrap()), MIB);
        }
    }
    // NBD_CMD_READ of 512 bytes at 0 with an extended request header.
    let mut req = 0x21e4_1c71u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
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
