//! nbdinfo (libnbd 1.14) sees every export, its size, flags and block sizes,
//! and a map of holes and data that is true to the image file, on raw and
//! on qcow2 disks.

mod common;

use common::*;

/// The data ranges of a disk's image: of the file (`SEEK_DATA`) for raw,
/// of `qemu-img map` (after a flush) for qcow2.
fn image_data_ranges(d: &Daemon, disk: &str) -> Vec<(u64, u64)> {
    let img = d.image(disk);
    if !is_qcow2(&img) {
        return file_data_ranges(&img);
    }
    d.flush_disk(disk);
    let out = run(
        "qemu-img",
        &["map", "-U", "--output=json", "-f", "qcow2", img.to_str().unwrap()],
    );
    let map: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// The size QEMU gives an image: its length for raw, its virtual size for
/// qcow2.
fn image_size(img: &std::path::Path) -> u64 {
    let out = run(
        "qemu-img",
        &["info", "-U", "--output=json", img.to_str().unwrap()],
    );
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

fn info_json(uri: &str) -> serde_json::Value {
    let out = run("nbdinfo", &["--json", uri]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}:\n{out}"))
}

both_formats!(nbdinfo_list_shows_every_disk);
fn nbdinfo_list_shows_every_disk(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("alpha", 8 * MIB), ("beta", 4 * MIB), ("gamma", MIB)]);
    let text = run("nbdinfo", &["--list", &d.uri("alpha")]);
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            text.contains(&format!("export=\"{name}\"")),
            "--list misses {name}:\n{text}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--list", "--json", &d.uri("")])).unwrap();
    let mut got: Vec<(String, u64)> = json["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("alpha".into(), 8 * MIB),
            ("beta".into(), 4 * MIB),
            ("gamma".into(), MIB)
        ],
        "{json}"
    );
}

both_formats!(nbdinfo_json_reports_size_flags_and_block_sizes);
fn nbdinfo_json_reports_size_flags_and_block_sizes(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 24 * MIB + 4096)]);
    let info = info_json(&d.uri("disk"));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
    assert_eq!(info["structured"], true, "{info}");
    let e = &info["exports"][0];
    assert_eq!(e["export-name"], "disk", "{e}");
    assert_eq!(e["export-size"], 24 * MIB + 4096, "{e}");
    assert_eq!(e["is_read_only"], false, "{e}");
    for flag in [
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fua",
        "can_df",
        "can_cache",
        "can_flush",
    ] {
        assert_eq!(e[flag], true, "{flag} is not true: {e}");
    }
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{e}");
    let min = e["block_size_minimum"]
        .as_u64()
        .unwrap_or_else(|| panic!("no block sizes: {e}"));
    let pref = e["block_size_preferred"].as_u64().unwrap();
    let max = e["block_size_maximum"].as_u64().unwrap();
    assert!(min.is_power_of_two() && min <= 4096, "minimum {min}");
    assert!(
        pref.is_power_of_two() && (512..=2 * MIB).contains(&pref) && pref >= min,
        "preferred {pref}"
    );
    assert!(
        max >= 32 * MIB && max.is_multiple_of(min) && max >= pref,
        "maximum {max}"
    );
}

both_formats!(nbdinfo_map_reports_holes_and_data_true_to_the_file);
fn nbdinfo_map_reports_holes_and_data_true_to_the_file(format: Format) {
    let size = 32 * MIB;
    let mut d = Daemon::prepare_in(Server::from_env(), &[("disk", size)], format);
    // Data put in the image before the server starts, and through NBD after.
    d.write_image("disk", 2 * MIB, &pattern(64 * 1024, 1));
    d.write_image("disk", 5 * MIB, &pattern(MIB as usize, 2));
    d.spawn();
    qemu_io(
        &d.uri("disk"),
        &["write -P 0x5a 20M 128k", "write -P 0x5b 31M 1M", "flush"],
    );
    let map = run("nbdinfo", &["--map", &d.uri("disk")]);
    // "offset length type description", type bit 0 = hole, bit 1 = zero.
    let extents: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let mut pos = 0;
    for &(off, len, _) in &extents {
        assert_eq!(off, pos, "extents not contiguous:\n{map}");
        pos += len;
    }
    assert_eq!(pos, size, "extents do not cover the disk:\n{map}");
    let at = |off: u64| {
        extents
            .iter()
            .find(|(o, l, _)| *o <= off && off < o + l)
            .unwrap()
            .2
    };
    for off in [
        2 * MIB,
        2 * MIB + 65535,
        5 * MIB,
        6 * MIB - 1,
        20 * MIB,
        20 * MIB + 131071,
        31 * MIB,
        size - 1,
    ] {
        assert_eq!(
            at(off),
            0,
            "offset {off} holds data but the map says otherwise:\n{map}"
        );
    }
    // Never-written ranges (qemu always calls the first 4 KiB data: start at 64K).
    for off in [
        64 * 1024,
        MIB,
        3 * MIB,
        7 * MIB,
        12 * MIB,
        19 * MIB,
        21 * MIB,
        30 * MIB,
    ] {
        assert_eq!(
            at(off),
            3,
            "offset {off} is a hole in the file but the map says otherwise:\n{map}"
        );
    }
    // True to the image: nothing called a hole is data in the image, and
    // everything called zero reads as zero.
    let file_data = image_data_ranges(&d, "disk");
    let bytes = std::fs::read(d.image_as_raw("disk")).unwrap();
    for &(off, len, kind) in &extents {
        if kind & 1 != 0 {
            for &(doff, dlen) in &file_data {
                assert!(
                    doff + dlen <= off || off + len <= doff,
                    "map calls [{off}, +{len}) a hole but the file has data at [{doff}, +{dlen}):\n{map}"
                );
            }
        }
        if kind & 2 != 0 {
            let r = &bytes[off as usize..(off + len) as usize];
            assert!(
                r.iter().all(|&b| b == 0),
                "map calls [{off}, +{len}) zero but it is not:\n{map}"
            );
        } else {
            assert!(
                file_data
                    .iter()
                    .any(|&(doff, dlen)| doff < off + len && off < doff + dlen),
                "map calls [{off}, +{len}) data but the file has none there:\n{map}"
            );
        }
    }
}

both_formats!(odd_sized_image_is_exported_at_its_size_and_its_last_bytes_work);
fn odd_sized_image_is_exported_at_its_size_and_its_last_bytes_work(format: Format) {
    // qcow2 rounds sizes up to 512 bytes: its image is 1 MiB + 512.
    let mut d = Daemon::prepare_in(Server::from_env(), &[("odd", MIB + 100)], format);
    let file_size = image_size(&d.image("odd"));
    d.write_image("odd", file_size - 10, &[0x4f; 10]);
    d.spawn();
    let info = info_json(&d.uri("odd"));
    let size = info["exports"][0]["export-size"].as_u64().unwrap();
    // QEMU's raw driver rounds the size up to a 512-byte sector; fleece and
    // nbdkit export the file's exact size.
    let want = match d.server {
        Server::QemuNbd | Server::QemuStorageDaemon => file_size.div_ceil(512) * 512,
        _ => file_size,
    };
    assert_eq!(size, want, "{info}");
    let last = file_size - 10;
    qemu_io(
        &d.uri("odd"),
        &[
            &format!("read -P 0x4f {last} 10"),
            &format!("write -P 0x50 {} 5", file_size - 5),
            &format!("read -P 0x50 {} 5", file_size - 5),
        ],
    );
    assert_eq!(
        read_at(&d.image_as_raw("odd"), last, 10),
        [0x4f, 0x4f, 0x4f, 0x4f, 0x4f, 0x50, 0x50, 0x50, 0x50, 0x50]
    );
    assert_eq!(image_size(&d.image("odd")), file_size, "the image grew");
    let out = run_any(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 1 {} 512", size - 256),
            &d.uri("odd"),
        ],
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains("failed") || all.contains("out of range") || !out.status.success(),
        "write past the end: {all}"
    );
    let map = run("nbdinfo", &["--map", &d.uri("odd")]);
    let end: u64 = map
        .lines()
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().take(2).map(|x| x.parse().unwrap()).collect();
            f[0] + f[1]
        })
        .max()
        .unwrap();
    assert_eq!(end, size, "map does not end at the export size:\n{map}");
}
