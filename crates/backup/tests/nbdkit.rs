//! Pushing to nbdkit: the memory and file plugins, and filters that make
//! the server fail (error), slow (delay), without zeroing (nozero), or gone.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fleece_backup::{ConnectOptions, ErrorKind};
use fleece_nbd::ReplyMode;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn nbdkit_memory_negotiates_structured_replies_and_takes_a_push() {
    let server = Server::nbdkit(dir(), &["memory", "16M"]);
    let target = server.connect(&ConnectOptions::default());
    let info = target.info().clone();
    // nbdkit 1.32 knows no extended headers: the client falls back.
    assert_eq!(info.mode, ReplyMode::Structured);
    assert!(info.can_multi_conn() && info.block_status && info.can_fast_zero());
    assert_eq!(info.connections, 4);
    let mut expected = push(&target);
    target.close().unwrap();
    // Checked through another client while nbdkit still holds the data.
    expected.resize(16 * MIB as usize, 0);
    let want = expected_file(server.dir.path(), &expected);
    compare(want.to_str().unwrap(), &server.uri());
}

#[test]
fn nbdkit_file_takes_a_push() {
    let (dir, img) = image(8 * MIB);
    let server = Server::nbdkit(dir, &["file", img.to_str().unwrap()]);
    let target = server.connect(&ConnectOptions::default());
    assert_eq!(target.info().mode, ReplyMode::Structured);
    let expected = push(&target);
    target.close().unwrap();
    let want = expected_file(server.dir.path(), &expected);
    run("cmp", &[img.to_str().unwrap(), want.to_str().unwrap()]);
}

#[test]
fn an_injected_write_error_comes_back_with_the_servers_code_and_the_connection_goes_on() {
    let server = Server::nbdkit(
        dir(),
        &[
            "--filter=error",
            "memory",
            "1M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
        ],
    );
    let target = server.connect(&one_connection());
    let e = target.write(4096, &[1; 4096]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server);
    assert_eq!(e.errno(), Some(fleece_nbd::consts::EIO));
    assert!(
        e.to_string().contains("WRITE of 4096 bytes at offset 4096"),
        "{e}"
    );
    assert!(e.to_string().contains("EIO"), "{e}");
    // Only that request failed: the connection serves the next ones.
    assert!(target.is_connected());
    let mut b = [9; 4096];
    target.read(4096, &mut b).unwrap();
    assert_eq!(b, [0; 4096]);
    target.write_zeroes(0, 4096).unwrap();
    target.close().unwrap();
}

#[test]
fn slow_replies_with_many_in_flight_complete_out_of_order() {
    let server = Server::nbdkit(dir(), &["--filter=delay", "memory", "64M", "delay-write=200ms"]);
    let options = ConnectOptions {
        connections: 1,
        window: 64,
        ..ConnectOptions::default()
    };
    let target = server.connect(&options);
    let start = Instant::now();
    let writes: Vec<_> = (0..64u64)
        .map(|i| target.submit_write(i * 65536, &pattern(i, 65536)).unwrap())
        .collect();
    // Reads are not delayed: one sent after all the writes is answered first.
    let read = target.submit_read(0, 4096).unwrap();
    let read_done = read.wait().unwrap();
    assert!(
        writes.iter().any(|w| !w.is_ready()),
        "the read should overtake the slow writes"
    );
    assert_eq!(read_done.len(), 4096);
    for w in writes {
        w.wait().unwrap();
    }
    // One at a time they would take 64 × 200 ms.
    let took = start.elapsed();
    assert!(took < Duration::from_millis(64 * 200 / 4), "{took:?}");
    let mut back = vec![0; 64 * 65536];
    target.read(0, &mut back).unwrap();
    let want: Vec<u8> = (0..64u64).flat_map(|i| pattern(i, 65536)).collect();
    assert!(back == want);
}

#[test]
fn without_write_zeroes_zeroes_are_written_as_data_and_fast_zeroes_refused() {
    let server = Server::nbdkit(dir(), &["--filter=nozero", "memory", "8M"]);
    let target = server.connect(&one_connection());
    assert!(!target.info().can_write_zeroes());
    target.write(0, &[0xee; 3 << 20]).unwrap();
    target.write_zeroes(4096, (2 << 20) + 8192).unwrap();
    let e = target.write_zeroes_fast(0, 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let mut back = vec![1; 3 << 20];
    target.read(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0xee));
    assert!(back[4096..(2 << 20) + 12288].iter().all(|&b| b == 0));
    assert!(back[(2 << 20) + 12288..].iter().all(|&b| b == 0xee));
}

#[test]
fn a_fast_zero_the_server_cannot_do_fast_is_unsupported_not_failed() {
    let server = Server::nbdkit(
        dir(),
        &[
            "--filter=nozero",
            "memory",
            "8M",
            "zeromode=plugin",
            "fastzeromode=slow",
        ],
    );
    let target = server.connect(&one_connection());
    assert!(target.info().can_fast_zero());
    let e = target.write_zeroes_fast(0, 1 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(e.errno(), Some(fleece_nbd::consts::ENOTSUP));
    target.write_zeroes(0, 1 << 20).unwrap();
}

#[test]
fn a_dropped_connection_fails_what_was_not_acknowledged_and_everything_after() {
    let mut server = Server::nbdkit(dir(), &["--filter=delay", "memory", "8M", "delay-write=10000ms"]);
    let options = ConnectOptions {
        connections: 1,
        ..ConnectOptions::default()
    };
    let target = server.connect(&options);
    target.write_zeroes(0, 4096).unwrap();
    let writes: Vec<_> = (0..8u64)
        .map(|i| target.submit_write(i * 4096, &[7; 4096]).unwrap())
        .collect();
    server.kill();
    for w in writes {
        let e = w.wait().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Disconnected);
        assert!(e.to_string().contains("may or may not"), "{e}");
    }
    assert!(!target.is_connected());
    let e = target.flush().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Disconnected);
    assert!(e.to_string().contains("not sent"), "{e}");
    assert_eq!(target.close().unwrap_err().kind(), ErrorKind::Disconnected);
}
