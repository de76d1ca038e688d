//! Pushing to qemu-nbd: one connection, then four with `--shared=4`, in
//! every reply mode; the image file checked with `qemu-img compare`.

mod common;

use common::*;
use fleece_backup::{ConnectOptions, ErrorKind};
use fleece_nbd::ReplyMode;

#[test]
fn qemu_nbd_negotiates_extended_headers_and_takes_a_push() {
    let (dir, img) = image(16 * MIB);
    let server = Server::qemu_nbd(dir, &img, None);
    let target = server.connect(&ConnectOptions::default());
    let info = target.info().clone();
    assert_eq!(info.mode, ReplyMode::Extended);
    // Without --shared it allows one client and does not offer multi-conn.
    assert_eq!((info.connections, info.can_multi_conn()), (1, false));
    assert!(info.block_status && info.can_trim() && info.can_fast_zero());
    assert_eq!((target.size(), target.preferred_block_size()), (16 * MIB, 4096));
    let expected = push(&target);
    target.close().unwrap();
    let want = expected_file(server.dir.path(), &expected);
    run("truncate", &["-s", "16M", want.to_str().unwrap()]);
    compare(img.to_str().unwrap(), want.to_str().unwrap());
}

#[test]
fn with_shared_4_requests_spread_over_four_connections() {
    let (dir, img) = image(16 * MIB);
    let server = Server::qemu_nbd(dir, &img, Some(4));
    let target = server.connect(&ConnectOptions::default());
    assert!(target.info().can_multi_conn());
    assert_eq!(target.info().connections, 4);
    // Four writers at once, each on its own quarter.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let target = &target;
            s.spawn(move || {
                for i in 0..16u64 {
                    let at = t * 4 * MIB + i * 256 * 1024;
                    target.write(at, &pattern(t * 100 + i, 256 * 1024)).unwrap();
                }
            });
        }
    });
    target.flush().unwrap();
    let mut want = Vec::new();
    for t in 0..4u64 {
        for i in 0..16u64 {
            want.extend(pattern(t * 100 + i, 256 * 1024));
        }
    }
    target.close().unwrap();
    let want = expected_file(server.dir.path(), &want);
    compare(img.to_str().unwrap(), want.to_str().unwrap());
}

#[test]
fn every_reply_mode_takes_the_same_push() {
    for (extended, structured, mode) in [
        (true, true, ReplyMode::Extended),
        (false, true, ReplyMode::Structured),
        (false, false, ReplyMode::Simple),
    ] {
        let (dir, img) = image(8 * MIB);
        let server = Server::qemu_nbd(dir, &img, None);
        let options = ConnectOptions {
            extended_headers: extended,
            structured_replies: structured,
            ..ConnectOptions::default()
        };
        let target = server.connect(&options);
        assert_eq!(target.info().mode, mode);
        // Block status needs structured replies.
        assert_eq!(target.info().block_status, mode != ReplyMode::Simple);
        let expected = push(&target);
        target.close().unwrap();
        let want = expected_file(server.dir.path(), &expected);
        compare(img.to_str().unwrap(), want.to_str().unwrap());
    }
}

#[test]
fn requests_outside_the_export_are_refused_before_they_are_sent() {
    let (dir, img) = image(MIB);
    let server = Server::qemu_nbd(dir, &img, None);
    let target = server.connect(&one_connection());
    let e = target.write(MIB - 512, &[0; 1024]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    assert!(e.to_string().contains("beyond the end of the export"), "{e}");
    let e = target.submit_read(u64::MAX - 10, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    // Nothing was sent, so the connection is as good as before.
    assert!(target.is_connected());
    target.write(0, b"fine").unwrap();
    let mut b = [0; 4];
    target.read(0, &mut b).unwrap();
    assert_eq!(&b, b"fine");
    // A zero-length request needs no round trip and cannot fail.
    target.write(MIB, &[]).unwrap();
}
