//! NBD protocol details checked with python3-libnbd: one Rust test per
//! script in tests/python (see the docstring at the top of each script).

mod common;

use common::*;

/// Runs `tests/python/SCRIPT` against a fresh 64 MiB export.
fn script(name: &str) {
    let d = Daemon::start_nbd(&[("disk", 64 * MIB)]);
    let out = python_script(&d, name, "disk");
    assert!(out.trim_end().ends_with("ok"), "{name} did not finish: {out}");
}

#[test]
fn libnbd_option_haggling_list_info_go_abort_and_meta_contexts() {
    script("opt_haggling.py");
}

#[test]
fn libnbd_unknown_export_name_fails_and_the_connection_stays_usable() {
    script("unknown_export.py");
}

#[test]
fn libnbd_structured_replies_on_and_off_both_work() {
    script("structured_replies.py");
}

#[test]
fn libnbd_df_reads_come_in_one_chunk() {
    script("df_flag.py");
}

#[test]
fn libnbd_zero_length_requests_do_not_disconnect() {
    script("zero_length.py");
}

#[test]
fn libnbd_out_of_range_requests_fail_and_change_nothing() {
    script("out_of_range.py");
}

#[test]
fn libnbd_block_status_req_one_and_trimmed_holes() {
    script("block_status.py");
}

#[test]
fn libnbd_write_zeroes_fast_zero_and_no_hole_never_lose_data() {
    script("fast_zero.py");
}

#[test]
fn libnbd_fua_writes_are_in_the_file_when_acknowledged() {
    script("fua.py");
}

#[test]
fn libnbd_pread_structured_chunks_tile_the_request() {
    script("pread_structured.py");
}

#[test]
fn libnbd_many_requests_in_flight_complete_in_any_order_with_correct_data() {
    script("aio_in_flight.py");
}

#[test]
fn libnbd_multi_conn_handles_see_each_others_flushed_writes() {
    script("multi_conn.py");
}

#[test]
fn libnbd_strict_mode_off_bad_flags_get_einval_and_fua_is_accepted_everywhere() {
    script("strict_mode.py");
}
