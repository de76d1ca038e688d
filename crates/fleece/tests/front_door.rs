//! The front door: clients that connect and never finish negotiating are
//! disconnected at the handshake deadline, connections beyond the cap on
//! those still negotiating are closed at once, an option announcing more
//! than the server takes is answered from its header alone, and the
//! control socket and state dir are owner-only. Real clients keep working
//! meanwhile.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

/// Reads until the server closes the connection; false if it was still
/// open after `limit`.
fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn three_hundred_half_open_connections_are_closed_at_the_deadline_while_nbdinfo_works() {
    let timeout = 3;
    let d = Daemon::start_with(
        Server::Fleece,
        &[("disk", 4 * MIB)],
        &[
            "--handshake-timeout",
            &timeout.to_string(),
            "--max-handshakes",
            "400",
        ],
    );
    let started = Instant::now();
    // Silent ones, ones stuck after the client flags, ones half way into an
    // option header.
    let mut conns: Vec<(UnixStream, Instant)> = (0..300)
        .map(|i| {
            let mut s = UnixStream::connect(&d.sock).unwrap();
            let at = Instant::now();
            match i % 3 {
                0 => {}
                1 => s.write_all(&3u32.to_be_bytes()).unwrap(),
                _ => {
                    s.write_all(&3u32.to_be_bytes()).unwrap();
                    s.write_all(&IHAVEOPT[..5]).unwrap();
                }
            }
            (s, at)
        })
        .collect();
    // One more trickles a byte every 300 ms: a timeout per read would never
    // fire for it, the deadline does.
    let sock = d.sock.clone();
    let trickler = std::thread::spawn(move || {
        let mut s = greet(&sock);
        let at = Instant::now();
        let mut header = IHAVEOPT.to_vec();
        header.extend_from_slice(&[0u8; 8]);
        for b in header.iter().cycle().take(100) {
            if s.write_all(&[*b]).is_err() {
                return at.elapsed();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("a client trickling bytes stayed connected for 30 s");
    });
    // Meanwhile a real client is served.
    let info = run("nbdinfo", &[&d.uri("disk")]);
    assert!(info.contains("export-size"), "{info}");
    assert!(
        started.elapsed() < Duration::from_secs(timeout),
        "the test was too slow to check anything before the deadline"
    );
    for (i, (s, at)) in conns.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(timeout + 10)),
            "half-open connection {i} still open {:?} after it connected",
            at.elapsed()
        );
        let lived = at.elapsed();
        assert!(
            lived >= Duration::from_millis(timeout * 1000 - 200),
            "connection {i} was closed after {lived:?}, before the {timeout} s deadline"
        );
    }
    let trickled = trickler.join().unwrap();
    assert!(
        trickled < Duration::from_secs(timeout + 5),
        "the trickling client lasted {trickled:?}"
    );
    let info = run("nbdinfo", &[&d.uri("disk")]);
    assert!(info.contains("export-size"), "{info}");
}

#[test]
fn beyond_the_cap_on_negotiating_connections_new_ones_are_closed_at_once() {
    let d = Daemon::start_with(
        Server::Fleece,
        &[("disk", 4 * MIB)],
        &["--handshake-timeout", "60", "--max-handshakes", "4"],
    );
    // Four that got their greeting are surely counted.
    let held: Vec<UnixStream> = (0..4).map(|_| greet(&d.sock)).collect();
    for _ in 0..3 {
        let mut s = UnixStream::connect(&d.sock).unwrap();
        let t = Instant::now();
        assert!(
            closed_within(&mut s, Duration::from_secs(10)),
            "a connection beyond the cap was kept"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "closed only after {:?}",
            t.elapsed()
        );
    }
    assert!(
        wait_for(Duration::from_secs(5), || d
            .log()
            .contains("too many connections still negotiating")),
        "refusals were not logged:\n{}",
        d.log()
    );
    // Refusals are rate-limited: three at once make one line.
    assert_eq!(
        d.log().matches("too many connections still negotiating").count(),
        1,
        "{}",
        d.log()
    );
    // Once the holders leave, clients get in again.
    drop(held);
    assert!(
        wait_for(Duration::from_secs(10), || run_any("nbdinfo", &[&d.uri("disk")])
            .status
            .success()),
        "nbdinfo was still refused after the negotiating clients left"
    );
}

#[test]
fn an_option_announcing_too_many_bytes_is_answered_from_its_header_alone() {
    let d = Daemon::start_nbd(&[("disk", 4 * MIB)]);
    for len in [u32::MAX, 64 << 20, (64 << 10) + 1] {
        let mut s = greet(&d.sock);
        let mut header = IHAVEOPT.to_vec();
        header.extend_from_slice(&OPT_LIST.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        // The header only: no payload follows.
        s.write_all(&header).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        let (opt, kind, msg) = option_reply(&mut s);
        assert_eq!((opt, kind), (OPT_LIST, REP_ERR_TOO_BIG), "{}", text(&msg));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "answered after {:?}",
            t.elapsed()
        );
        assert!(
            closed_within(&mut s, Duration::from_secs(5)),
            "still open after ERR_TOO_BIG"
        );
    }
    let info = run("nbdinfo", &[&d.uri("disk")]);
    assert!(info.contains("export-size"), "{info}");
}

#[test]
fn the_control_socket_and_a_new_state_dir_are_owner_only() {
    let d = Daemon::start(&[("disk", MIB)]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.control), 0o600, "control socket");
    assert_eq!(mode(&d.state_dir), 0o700, "state dir");
    // A client of the same user still talks to it.
    d.cli_ok(&["status"]);
}

#[test]
fn front_door_limits_are_checked_at_start_and_read_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--handshake-timeout", "0"),
        ("--handshake-timeout", "99999"),
        ("--max-handshakes", "0"),
    ] {
        let args: Vec<std::ffi::OsString> = vec![
            "--state-dir".into(),
            dir.path().join("s").into(),
            "--control".into(),
            dir.path().join("c.sock").into(),
            flag.into(),
            value.into(),
        ];
        serve_attempt(&args, &dir.path().join("c.sock")).assert_refused(&["out of range"]);
    }
    // From the config file: a 1 s deadline.
    let mut d = Daemon::prepare(Server::Fleece, &[("disk", MIB)]);
    let cfg = d.path("fleece.toml");
    std::fs::write(&cfg, "handshake_timeout = 1\nmax_handshakes = 8\n").unwrap();
    d.extra_args = vec!["--config".into(), cfg.into()];
    d.spawn();
    let mut s = greet(&d.sock);
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "handshake_timeout = 1 in the config file: closed after {:?}",
        t.elapsed()
    );
}
