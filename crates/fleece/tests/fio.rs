//! fio's nbd engine: mixed random I/O at queue depth 16 with data
//! verification, on raw and on qcow2 disks.

mod common;

use common::*;

both_formats!(fio_randrw_4k_iodepth_16_with_crc32c_verify_has_no_errors);
fn fio_randrw_4k_iodepth_16_with_crc32c_verify_has_no_errors(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 32 * MIB)]);
    let child = spawn_fio(
        &d.uri("disk"),
        &[
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--offset=4M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_backlog=256",
            "--verify_state_save=0",
            "--runtime=4",
            "--time_based",
            "--output-format=json",
        ],
    );
    let out = wait_ok(child, "fio");
    let json_start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio:\n{out}"));
    let v: serde_json::Value =
        serde_json::from_str(&out[json_start..]).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error: {job}");
    let reads = job["read"]["io_bytes"].as_u64().unwrap();
    let writes = job["write"]["io_bytes"].as_u64().unwrap();
    assert!(writes > MIB, "fio wrote only {writes} bytes");
    assert!(reads > MIB, "fio read only {reads} bytes");
    // The image now holds fio's data in its range and nothing outside it.
    let img = std::fs::read(d.image_as_raw("disk")).unwrap();
    assert!(
        img[..4 * MIB as usize].iter().all(|&b| b == 0),
        "fio wrote before its offset"
    );
    assert!(
        img[20 * MIB as usize..].iter().all(|&b| b == 0),
        "fio wrote past its range"
    );
}

both_formats!(fio_sequential_write_then_verify_pass_reads_back_every_block);
fn fio_sequential_write_then_verify_pass_reads_back_every_block(format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 16 * MIB)]);
    let child = spawn_fio(
        &d.uri("disk"),
        &[
            "--rw=write",
            "--bs=64k",
            "--iodepth=8",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let out = wait_ok(child, "fio");
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(v["jobs"][0]["error"], 0, "{out}");
    assert_eq!(v["jobs"][0]["write"]["io_bytes"], 16 * MIB, "{out}");
    assert_eq!(
        v["jobs"][0]["read"]["io_bytes"],
        16 * MIB,
        "verify pass did not read everything: {out}"
    );
}
