//! nbdcopy (libnbd 1.14): whole-disk copies in both directions with two
//! connections (only used when the export advertises CAN_MULTI_CONN), to
//! stdout and to null:, on raw and on qcow2 disks.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// 32 MiB of data with holes and allocated zeroes.
fn source(d: &Daemon) -> std::path::PathBuf {
    let p = d.path("src.raw");
    std::fs::File::create(&p).unwrap().set_len(32 * MIB).unwrap();
    write_at(&p, 0, &pattern(5 * MIB as usize, 21));
    write_at(&p, 9 * MIB + 777, &pattern(3 * MIB as usize, 22));
    write_at(&p, 16 * MIB, &vec![0u8; MIB as usize]);
    write_at(&p, 20 * MIB, &pattern(8 * MIB as usize, 23));
    write_at(&p, 32 * MIB - 1000, &pattern(1000, 24));
    p
}

/// Runs nbdcopy with --verbose and checks it really opened two connections.
fn nbdcopy_two_connections(from: &str, to: &str, nbd_side: &str) {
    let args = ["--verbose", "--connections=2", "--requests=16", from, to];
    let out = run_any("nbdcopy", &args);
    let err = text(&out.stderr);
    assert!(
        out.status.success(),
        "nbdcopy {args:?} failed:\n{}",
        err.lines()
            .filter(|l| !l.contains("debug"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        err.contains("connections=2"),
        "nbdcopy fell back to one connection (no CAN_MULTI_CONN?): {}",
        err.lines()
            .filter(|l| l.starts_with("nbdcopy:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for h in [
        format!("{nbd_side}0: nbd_connect_uri: enter"),
        format!("{nbd_side}1: nbd_connect_uri: enter"),
    ] {
        assert!(err.contains(&h), "no {h} in nbdcopy's debug output");
    }
}

both_formats!(nbdcopy_file_to_export_and_back_with_two_connections_is_byte_equal);
fn nbdcopy_file_to_export_and_back_with_two_connections_is_byte_equal(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 32 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0xee 0 32M"]);
    let src = source(&d);
    nbdcopy_two_connections(src.to_str().unwrap(), &d.uri("disk"), "dst");
    assert_same_file(&src, &d.image_as_raw("disk"));
    let back = d.path("back.raw");
    nbdcopy_two_connections(&d.uri("disk"), back.to_str().unwrap(), "src");
    assert_same_file(&src, &back);
    // Export to export on the same server.
    let out = run(
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
    assert!(out.contains("Images are identical"), "{out}");
}

both_formats!(nbdcopy_between_two_exports_of_one_server);
fn nbdcopy_between_two_exports_of_one_server(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("a", 16 * MIB), ("b", 16 * MIB)]);
    qemu_io(&d.uri("a"), &["write -P 0x31 0 5M", "write -P 0x32 11M 3M"]);
    qemu_io(&d.uri("b"), &["write -P 0xff 0 16M"]);
    run("nbdcopy", &["--connections=2", &d.uri("a"), &d.uri("b")]);
    assert_same_file(&d.image_as_raw("a"), &d.image_as_raw("b"));
}

both_formats!(nbdcopy_export_to_stdout_matches_the_image);
fn nbdcopy_export_to_stdout_matches_the_image(format: Format) {
    let mut d = Daemon::prepare_in(Server::from_env(), &[("disk", 8 * MIB)], format);
    d.write_image("disk", 100, &pattern(3 * MIB as usize, 31));
    d.write_image("disk", 7 * MIB, &pattern(MIB as usize, 32));
    d.spawn();
    let out = Command::new("nbdcopy")
        .args([&d.uri("disk"), "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdcopy URI -: {}", text(&out.stderr));
    let want = std::fs::read(d.image_as_raw("disk")).unwrap();
    assert_eq!(out.stdout.len(), want.len(), "bytes on stdout");
    assert!(out.stdout == want, "stdout differs from the image");
}

both_formats!(nbdcopy_export_to_null_reads_everything);
fn nbdcopy_export_to_null_reads_everything(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 64 * MIB)]);
    qemu_io(&d.uri("disk"), &["write -P 0x42 0 16M", "write -P 0x43 40M 8M"]);
    let out = run_any(
        "nbdcopy",
        &[
            "--verbose",
            "--connections=2",
            "--requests=64",
            &d.uri("disk"),
            "null:",
        ],
    );
    assert!(
        out.status.success(),
        "nbdcopy to null: failed: {}",
        text(&out.stderr)
            .lines()
            .filter(|l| !l.contains("debug"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And from a source of zeroes into the export, which then reads as zero.
    run(
        "nbdcopy",
        &[
            "--connections=2",
            "--",
            "[",
            "nbdkit",
            "--exit-with-parent",
            "null",
            "size=64M",
            "]",
            &d.uri("disk"),
        ],
    );
    qemu_io(&d.uri("disk"), &["read -P 0 0 64M"]);
}
