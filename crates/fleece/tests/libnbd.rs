//! NBD protocol details checked with python3-libnbd: one Rust test per
//! script in tests/python (see the docstring at the top of each script),
//! on raw and on qcow2 disks.

mod common;

use common::*;

/// Runs `tests/python/SCRIPT` against a fresh 64 MiB export on an image
/// of `format`.
fn script(name: &str, format: Format) {
    let d = Daemon::start_nbd_in(format, &[("disk", 64 * MIB)]);
    let out = python_script(&d, name, "disk");
    assert!(out.trim_end().ends_with("ok"), "{name} did not finish: {out}");
}

both_formats!(libnbd_option_haggling_list_info_go_abort_and_meta_contexts);
fn libnbd_option_haggling_list_info_go_abort_and_meta_contexts(format: Format) {
    script("opt_haggling.py", format);
}

both_formats!(libnbd_unknown_export_name_fails_and_the_connection_stays_usable);
fn libnbd_unknown_export_name_fails_and_the_connection_stays_usable(format: Format) {
    script("unknown_export.py", format);
}

both_formats!(libnbd_structured_replies_on_and_off_both_work);
fn libnbd_structured_replies_on_and_off_both_work(format: Format) {
    script("structured_replies.py", format);
}

both_formats!(libnbd_df_reads_come_in_one_chunk);
fn libnbd_df_reads_come_in_one_chunk(format: Format) {
    script("df_flag.py", format);
}

both_formats!(libnbd_zero_length_requests_do_not_disconnect);
fn libnbd_zero_length_requests_do_not_disconnect(format: Format) {
    script("zero_length.py", format);
}

both_formats!(libnbd_out_of_range_requests_fail_and_change_nothing);
fn libnbd_out_of_range_requests_fail_and_change_nothing(format: Format) {
    script("out_of_range.py", format);
}

both_formats!(libnbd_block_status_req_one_and_trimmed_holes);
fn libnbd_block_status_req_one_and_trimmed_holes(format: Format) {
    script("block_status.py", format);
}

both_formats!(libnbd_write_zeroes_fast_zero_and_no_hole_never_lose_data);
fn libnbd_write_zeroes_fast_zero_and_no_hole_never_lose_data(format: Format) {
    script("fast_zero.py", format);
}

both_formats!(libnbd_fua_writes_are_in_the_file_when_acknowledged);
fn libnbd_fua_writes_are_in_the_file_when_acknowledged(format: Format) {
    script("fua.py", format);
}

both_formats!(libnbd_pread_structured_chunks_tile_the_request);
fn libnbd_pread_structured_chunks_tile_the_request(format: Format) {
    script("pread_structured.py", format);
}

both_formats!(libnbd_many_requests_in_flight_complete_in_any_order_with_correct_data);
fn libnbd_many_requests_in_flight_complete_in_any_order_with_correct_data(format: Format) {
    script("aio_in_flight.py", format);
}

both_formats!(libnbd_multi_conn_handles_see_each_others_flushed_writes);
fn libnbd_multi_conn_handles_see_each_others_flushed_writes(format: Format) {
    script("multi_conn.py", format);
}

both_formats!(libnbd_strict_mode_off_bad_flags_get_einval_and_fua_is_accepted_everywhere);
fn libnbd_strict_mode_off_bad_flags_get_einval_and_fua_is_accepted_everywhere(format: Format) {
    script("strict_mode.py", format);
}
