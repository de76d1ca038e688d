//! Pushing to qemu-storage-daemon: extended headers, multi-conn, and what
//! it says about an export it does not have.

mod common;

use common::*;
use fleece_backup::{ConnectOptions, ErrorKind, NbdTarget};
use fleece_nbd::ReplyMode;

#[test]
fn qsd_negotiates_extended_headers_and_multi_conn_and_takes_a_push() {
    let (dir, img) = image(8 * MIB);
    let server = Server::qsd(dir, &img, "disk");
    let target = server.connect(&ConnectOptions::default());
    let info = target.info().clone();
    assert_eq!(info.mode, ReplyMode::Extended);
    assert!(info.can_multi_conn());
    assert_eq!(info.connections, 4);
    assert!(!info.used_export_name);
    let expected = push(&target);
    target.close().unwrap();
    let want = expected_file(server.dir.path(), &expected);
    compare(img.to_str().unwrap(), want.to_str().unwrap());
}

#[test]
fn an_unknown_export_is_refused_with_its_name() {
    let (dir, img) = image(MIB);
    let server = Server::qsd(dir, &img, "disk");
    let uri = format!("nbd+unix:///nope?socket={}", server.socket.display());
    let e = NbdTarget::connect(&uri, &ConnectOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert!(e.to_string().contains("the server has no export 'nope'"), "{e}");
}
