//! QEMU's NBD client (qemu-nbd -L, qemu-io, qemu-img 10) against the
//! export, on raw and on qcow2 disks; what the image holds is read back as
//! QEMU reads it.

mod common;

use common::*;

both_formats!(qemu_nbd_list_mode_shows_exports_and_base_allocation);
fn qemu_nbd_list_mode_shows_exports_and_base_allocation(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("first", 4 * MIB), ("second", 2 * MIB)]);
    let out = run("qemu-nbd", &["-L", "-k", d.sock_str()]);
    assert!(out.contains("exports available: 2"), "{out}");
    for (name, size) in [("first", 4 * MIB), ("second", 2 * MIB)] {
        let start = out
            .find(&format!("export: '{name}'"))
            .unwrap_or_else(|| panic!("no export {name}:\n{out}"));
        let section = &out[start..];
        let section = &section[..section[1..]
            .find("export: '")
            .map(|i| i + 1)
            .unwrap_or(section.len())];
        assert!(
            section.contains(&format!("size:  {size}")),
            "{name} size:\n{section}"
        );
        assert!(
            section.contains("base:allocation"),
            "{name} meta contexts:\n{section}"
        );
        for flag in ["multi", "flush", "fua", "trim", "zeroes", "df", "cache"] {
            let flags = section
                .lines()
                .find(|l| l.trim_start().starts_with("flags:"))
                .unwrap();
            assert!(
                flags.split_whitespace().any(|w| w == flag),
                "{name}: no {flag} in {flags}"
            );
        }
        assert!(!section.contains("readonly"), "{section}");
    }
}

both_formats!(qemu_io_pattern_writes_read_back);
fn qemu_io_pattern_writes_read_back(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 8 * MIB)]);
    let u = d.uri("disk");
    qemu_io(&u, &["write -P 0xab 0 64k", "read -P 0xab 0 64k"]);
    // A new connection reads what the earlier one wrote.
    qemu_io(&u, &["read -P 0xab 0 64k", "read -P 0 64k 64k"]);
    qemu_io(
        &u,
        &["write -P 0x11 3M 1M", "writev -P 0x12 4M 4k 8k 60k", "flush"],
    );
    qemu_io(
        &u,
        &[
            "read -P 0x11 3M 1M",
            "readv -P 0x12 4M 32k 40k",
            "read -P 0 4268032 64k",
        ],
    );
    let img = d.image_as_raw("disk");
    assert_file_bytes(&img, 0, 65536, 0xab);
    assert_file_bytes(&img, 3 * MIB, MIB as usize, 0x11);
    assert_file_bytes(&img, 4 * MIB, 72 * 1024, 0x12);
}

both_formats!(qemu_io_unaligned_writes_keep_the_bytes_around_them);
fn qemu_io_unaligned_writes_keep_the_bytes_around_them(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 4 * MIB)]);
    let u = d.uri("disk");
    qemu_io(
        &u,
        &[
            "write -P 0x11 0 8k",
            "write -P 0xcd 1000 3000",
            "write -P 0xef 8191 2",
        ],
    );
    qemu_io(
        &u,
        &[
            "read -P 0x11 0 1000",
            "read -P 0xcd 1000 3000",
            "read -P 0x11 4000 4191",
            "read -P 0xef 8191 2",
            "read -P 0 8193 4095",
        ],
    );
    let f = read_at(&d.image_as_raw("disk"), 0, 8193);
    assert!(f[..1000].iter().all(|&b| b == 0x11));
    assert!(f[1000..4000].iter().all(|&b| b == 0xcd));
    assert!(f[4000..8191].iter().all(|&b| b == 0x11));
    assert_eq!(&f[8191..], &[0xef, 0xef]);
}

both_formats!(qemu_io_write_zeroes_and_discard_read_back_as_zero);
fn qemu_io_write_zeroes_and_discard_read_back_as_zero(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 8 * MIB)]);
    let u = d.uri("disk");
    qemu_io(&u, &["write -P 0x55 1M 3M"]);
    qemu_io(
        &u,
        &[
            "write -z 1M 64k",
            "write -z -u 1536k 512k",
            "discard 2M 1M",
            "write -z 3145828 1000",
        ],
    );
    qemu_io(
        &u,
        &[
            "read -P 0 1M 64k",
            "read -P 0x55 1088k 448k",
            "read -P 0 1536k 1536k",
            "read -P 0x55 3M 100",
            "read -P 0 3145828 1000",
            "read -P 0x55 3146828 1047476",
        ],
    );
    let img = d.image_as_raw("disk");
    assert_file_bytes(&img, MIB, 65536, 0);
    assert_file_bytes(&img, MIB + 65536, 448 * 1024, 0x55);
    assert_file_bytes(&img, 1536 * 1024, 1536 * 1024, 0);
    assert_file_bytes(&img, 3 * MIB + 1100, 1047476, 0x55);
}

both_formats!(qemu_io_through_image_opts_driver_nbd);
fn qemu_io_through_image_opts_driver_nbd(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 4 * MIB)]);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk",
        d.sock_str()
    );
    qemu_io(
        &opts,
        &["write -P 0x77 512 4k", "aio_write -P 0x78 1M 64k", "aio_flush"],
    );
    qemu_io(
        &opts,
        &["read -P 0x77 512 4k", "read -P 0x78 1M 64k", "read -P 0 0 512"],
    );
    let raw = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export=disk",
        d.sock_str()
    );
    qemu_io(&raw, &["read -P 0x77 512 4k"]);
}

/// A local raw file with data, zeroes and holes.
fn make_source(d: &Daemon, name: &str, size: u64) -> std::path::PathBuf {
    let p = d.path(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    write_at(&p, 0, &pattern(300_000, 7));
    write_at(&p, 3 * MIB, &pattern(2 * MIB as usize, 8));
    write_at(&p, 7 * MIB + 12345, &pattern(54321, 9));
    write_at(&p, 10 * MIB, &vec![0u8; 1 << 20]); // allocated zeroes
    write_at(&p, size - 4096, &pattern(4096, 10));
    p
}

both_formats!(qemu_img_convert_to_the_export_then_compare_is_equal);
fn qemu_img_convert_to_the_export_then_compare_is_equal(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 16 * MIB)]);
    // Garbage first, so the convert must really write zeroes over it.
    qemu_io(&d.uri("disk"), &["write -P 0xff 0 16M"]);
    let src = make_source(&d, "src.raw", 16 * MIB);
    let s = src.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", s, &d.uri("disk")],
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, &d.uri("disk")],
    );
    assert!(out.contains("Images are identical"), "{out}");
    assert_same_file(&src, &d.image_as_raw("disk"));
    // compare notices a one-byte change.
    qemu_io(&d.uri("disk"), &["write -P 0x01 9437191 1"]);
    let out = run_any(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, &d.uri("disk")],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare after a change: {}",
        text(&out.stdout)
    );
    // qemu-img names the start of the 512-byte sector that differs.
    let msg = text(&out.stdout);
    let off: u64 = msg
        .split("offset ")
        .nth(1)
        .and_then(|t| t.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no offset in {msg:?}"));
    assert!((9 * MIB..=9 * MIB + 7).contains(&off), "{msg}");
}

both_formats!(qemu_img_convert_from_the_export_to_a_file_is_byte_equal);
fn qemu_img_convert_from_the_export_to_a_file_is_byte_equal(format: Format) {
    let mut d = Daemon::prepare_in(Server::from_env(), &[("disk", 16 * MIB)], format);
    d.write_image("disk", MIB, &pattern(3 * MIB as usize, 11));
    d.write_image("disk", 9 * MIB + 1, &pattern(70_000, 12));
    d.spawn();
    qemu_io(&d.uri("disk"), &["write -P 0x3c 14M 512k"]);
    let dst = d.path("dst.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &d.uri("disk"),
            dst.to_str().unwrap(),
        ],
    );
    assert_same_file(&d.image_as_raw("disk"), &dst);
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &d.uri("disk"),
            dst.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    // qcow2 as an intermediate keeps holes sparse and data equal.
    let q = d.path("dst.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &d.uri("disk"),
            q.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            q.to_str().unwrap(),
            &d.uri("disk"),
        ],
    );
}

both_formats!(qemu_img_map_reports_data_and_zero_extents);
fn qemu_img_map_reports_data_and_zero_extents(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 16 * MIB)]);
    qemu_io(
        &d.uri("disk"),
        &["write -P 1 1M 1M", "write -P 2 8M 2M", "discard 9M 1M"],
    );
    let out = run("qemu-img", &["map", "--output=json", "-f", "raw", &d.uri("disk")]);
    let map: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let map = map.as_array().unwrap();
    let mut pos = 0;
    for e in map {
        assert_eq!(e["start"].as_u64().unwrap(), pos, "{out}");
        pos += e["length"].as_u64().unwrap();
    }
    assert_eq!(pos, 16 * MIB, "{out}");
    let at = |off: u64| {
        map.iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .unwrap()
            .clone()
    };
    for off in [MIB, 2 * MIB - 1, 8 * MIB, 9 * MIB - 1] {
        let e = at(off);
        assert_eq!(
            (e["data"].as_bool(), e["zero"].as_bool()),
            (Some(true), Some(false)),
            "at {off}: {out}"
        );
    }
    for off in [64 * 1024, 3 * MIB, 9 * MIB, 10 * MIB - 1, 12 * MIB, 16 * MIB - 1] {
        let e = at(off);
        assert_eq!(
            (e["data"].as_bool(), e["zero"].as_bool()),
            (Some(false), Some(true)),
            "at {off}: {out}"
        );
    }
    let human = run("qemu-img", &["map", "-f", "raw", &d.uri("disk")]);
    assert!(
        human.contains("0x100000") && human.contains("0x800000"),
        "{human}"
    );
}
