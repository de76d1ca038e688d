//! Block status of snapshot views for ranges the view cannot read (trimmed
//! from the view, or outside an incremental snapshot's bitmap): a backup
//! tool must not take them for zeroes (`hole,zero`) nor for data.
//! Every test runs on raw and on qcow2 disks (`both_formats!`).

mod common;

use common::*;

both_formats!(a_range_trimmed_from_a_view_is_reported_as_a_hole_that_is_not_zero);
fn a_range_trimmed_from_a_view_is_reported_as_a_hole_that_is_not_zero(format: Format) {
    let d = Daemon::start_in(format, &[("vm", 16 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 4M"]);
    d.snapshot_create(&["vm"], "s", &[]);
    let view = d.uri("vm@s");
    qemu_io(&view, &["discard 1M 1M"]);
    let map = nbdinfo_map(&view, None);
    assert_map_range(&map, 0, MIB, 0, Some("data"));
    assert_map_range(&map, MIB, MIB, 1, Some("hole"));
    assert_map_range(&map, 2 * MIB, 2 * MIB, 0, Some("data"));
    qemu_io_fails(&view, "read 1M 4k");
    qemu_io(&view, &["read -P 0x11 0 1M", "read -P 0x11 2M 2M"]);
}

both_formats!(ranges_outside_an_incremental_snapshots_bitmap_are_reported_as_unreadable);
fn ranges_outside_an_incremental_snapshots_bitmap_are_reported_as_unreadable(format: Format) {
    let d = Daemon::start_in(format, &[("vm", 16 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 4M"]);
    d.cli_ok(&["bitmap", "add", "vm", "b0"]);
    qemu_io(&d.uri("vm"), &["write -P 0x22 8M 64k"]);
    d.snapshot_create(&["vm"], "inc", &["--bitmap", "b0"]);
    let view = d.uri("vm@inc");
    let map = nbdinfo_map(&view, None);
    assert_map_range(&map, 8 * MIB, 65536, 0, Some("data"));
    assert_map_range(&map, 0, 4 * MIB, 1, Some("hole"));
    qemu_io(&view, &["read -P 0x22 8M 64k"]);
    qemu_io_fails(&view, "read 0 4k");
}
