//! qcow2-only behaviour end to end (what raw disks do too runs on qcow2 in
//! the other test files, through `both_formats!`): images QEMU wrote
//! (backing chains, compressed clusters, internal snapshots, zero clusters)
//! are served as QEMU reads them and take writes as QEMU would,
//! `qemu:allocation-depth`, qcow2 stores, `fleece image create`, formats
//! per disk, shared backing files, and the images fleece refuses. The
//! harness runs `qemu-img check` on every qcow2 image of a `Daemon` when it
//! is dropped.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// A fleece daemon serving qcow2 images made by `qemu-img create`.
fn start_qcow2(disks: &[(&str, u64)]) -> Daemon {
    Daemon::start_in(Format::Qcow2, disks)
}

/// Runs qemu-io commands on a qcow2 image file with QEMU itself.
fn qemu_io_file(img: &str, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.extend(["-c", *c]);
    }
    a.push(img);
    let out = run("qemu-io", &a);
    assert!(!out.contains("failed"), "qemu-io {cmds:?} on {img}: {out}");
}

/// `qemu-img compare` of two images (formats detected, `-U`), asserting
/// they read the same.
fn assert_same_image(a: &str, b: &str) {
    let out = run_any("qemu-img", &["compare", "-U", a, b]);
    assert!(
        out.status.success(),
        "{a} and {b} differ: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `qemu-img compare` of the export with the image file as qemu reads it
/// (`-U`: fleece holds the lock). Flush first: imago's metadata caches
/// must be on the file for qemu to see the writes.
fn compare_export_with_image(d: &Daemon, disk: &str) {
    qemu_io(&d.uri(disk), &["flush"]);
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &d.uri(disk),
            d.image(disk).to_str().unwrap(),
        ],
    );
}

/// A 3-deep chain with compressed clusters, an internal snapshot and zero
/// clusters, all made by qemu.
fn qemu_chain(d: &Daemon) -> (String, String, String) {
    let p = |n: &str| d.path(n).to_str().unwrap().to_string();
    let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
    let raw = p("base.raw");
    let mut data = vec![0u8; 16 * MIB as usize];
    data[..4 * MIB as usize].copy_from_slice(&pattern(4 * MIB as usize, 9));
    data[8 * MIB as usize..9 * MIB as usize].fill(0x5a);
    std::fs::write(&raw, &data).unwrap();
    run("qemu-img", &["convert", "-c", "-O", "qcow2", &raw, &base]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &mid,
        ],
    );
    let io = |img: &str, cmds: &[&str]| {
        let mut a = vec!["-f", "qcow2"];
        for c in cmds {
            a.extend(["-c", *c]);
        }
        a.push(img);
        run("qemu-io", &a);
    };
    io(&mid, &["write -P 0x22 1M 1M", "write -z 8M 512k"]);
    run("qemu-img", &["snapshot", "-c", "snap1", &mid]);
    io(&mid, &["write -P 0x23 1M 64k"]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &top,
        ],
    );
    io(&top, &["write -P 0x33 2M 64k", "write -z 3M 64k"]);
    (base, mid, top)
}

#[test]
fn images_qemu_wrote_are_served_as_qemu_reads_them_with_allocation_depth() {
    let mut d = Daemon::prepare(Server::Fleece, &[]);
    let (base, mid, top) = qemu_chain(&d);
    let sum = |p: &str| std::fs::read(p).unwrap();
    let (base0, mid0) = (sum(&base), sum(&mid));
    let want = d.path("want.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", &top, want.to_str().unwrap()],
    );
    // QEMU's own writes to a copy of the top are what fleece's must equal.
    let oracle = d.path("top-qemu.qcow2").to_str().unwrap().to_string();
    std::fs::copy(&top, &oracle).unwrap();
    d.spawn();
    d.cli_ok(&["disk", "add", "vm", &top]);
    d.disks.push(("vm".into(), top.clone().into()));
    let got = d.path("got.raw");
    run("nbdcopy", &[&d.uri("vm"), got.to_str().unwrap()]);
    assert_same_file(&want, &got);
    // allocation depth, as qemu-nbd counts it.
    let map = run("nbdinfo", &["--map=qemu:allocation-depth", &d.uri("vm")]);
    let depth_at = |off: u64| -> u64 {
        for line in map.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (start, len, v): (u64, u64, u64) = (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            );
            if (start..start + len).contains(&off) {
                return v;
            }
        }
        panic!("{off} not in {map}");
    };
    assert_eq!(depth_at(0), 3, "{map}");
    assert_eq!(depth_at(MIB), 2, "{map}");
    assert_eq!(depth_at(2 * MIB), 1, "{map}");
    assert_eq!(depth_at(3 * MIB), 1, "zero cluster of the top: {map}");
    assert_eq!(depth_at(8 * MIB), 2, "zero clusters of the middle: {map}");
    assert_eq!(depth_at(12 * MIB), 0, "unallocated: {map}");
    // The same as qemu-nbd serves for the same chain.
    let mut q = Daemon::prepare(Server::QemuNbd, &[]);
    q.disks.push(("vm".into(), top.clone().into()));
    q.format = Format::Qcow2;
    let qmap = {
        let mut cmd = std::process::Command::new("qemu-nbd");
        // fleece holds the top's lock: qemu-nbd opens it without locking.
        let opts = format!("driver=qcow2,file.driver=file,file.filename={top},file.locking=off");
        cmd.args([
            "-r",
            "-k",
            q.sock_str(),
            "-x",
            "vm",
            "--persistent",
            "-A",
            "--image-opts",
            &opts,
        ]);
        cmd.stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&q.sock).is_err() {
            assert!(std::time::Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let m = run("nbdinfo", &["--map=qemu:allocation-depth", &q.uri("vm")]);
        let _ = child.kill();
        let _ = child.wait();
        m
    };
    let norm = |m: &str| -> Vec<String> {
        m.lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(norm(&map), norm(&qmap), "fleece vs qemu-nbd");
    // base:allocation: the data of the whole chain.
    let alloc = run("nbdinfo", &["--map", &d.uri("vm")]);
    assert!(alloc.contains("data") && alloc.contains("hole"), "{alloc}");
    // Writes land in the top only: over compressed clusters of the base,
    // data and zero clusters of the middle, data and zero clusters of the
    // top, and where nothing is allocated; QEMU does the same to its copy.
    let writes = [
        "write -P 0x44 100k 8k",
        "discard 1M 64k",
        "write -P 0x45 8200k 4k",
        "write -z 2M 64k",
        "write -P 0x46 3M 4k",
        "write -P 0x47 12M 70000",
        "write -z -u 512k 128k",
        "write -P 0x48 1048000 2000",
    ];
    qemu_io(&d.uri("vm"), &writes);
    qemu_io(&d.uri("vm"), &["read -P 0 2M 64k", "read -P 0x46 3M 4k"]);
    qemu_io_file(&oracle, &writes);
    compare_export_with_image(&d, "vm");
    assert_same_image(&top, &oracle);
    // Backing files are locked against writers, and never written.
    let busy = run_any("qemu-io", &["-f", "qcow2", "-c", "write 0 512", &mid]);
    assert!(!busy.status.success(), "a backing file is locked against writers");
    compare_export_with_image(&d, "vm");
    d.cli_ok(&["disk", "remove", "vm"]);
    assert!(
        sum(&base) == base0 && sum(&mid) == mid0,
        "backing files unchanged"
    );
    check_qcow2(Path::new(&top), false);
    // The internal snapshot of the middle image is intact.
    run("qemu-img", &["snapshot", "-l", &mid]);
    check_qcow2(Path::new(&mid), false);
    d.sigterm(Duration::from_secs(20));
}

#[test]
fn a_compressed_image_with_an_internal_snapshot_is_served_and_written_as_qemu_does_and_keeps_its_snapshot() {
    let mut d = Daemon::prepare(Server::Fleece, &[]);
    let dir = d.dir.path().to_path_buf();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    // 16 MiB of data, zeroes and a run of one byte, compressed by qemu.
    let src = p("src.raw");
    let mut data = vec![0u8; 16 * MIB as usize];
    data[..6 * MIB as usize].copy_from_slice(&pattern(6 * MIB as usize, 41));
    data[10 * MIB as usize..11 * MIB as usize].fill(0x5a);
    std::fs::write(&src, &data).unwrap();
    let img = p("vm.qcow2");
    run(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", &src, &img],
    );
    let map = run("qemu-img", &["map", "--output=json", &img]);
    assert!(
        map.contains("\"compressed\": true"),
        "no compressed cluster: {map}"
    );
    // QEMU adds zero clusters over compressed ones and a plain cluster, then
    // takes an internal snapshot: every cluster is shared with it.
    qemu_io_file(&img, &["write -z 4M 1M", "write -P 0x21 6M 64k"]);
    run("qemu-img", &["snapshot", "-c", "snap1", &img]);
    let at_snap = p("at-snap1.raw");
    run("qemu-img", &["convert", "-O", "raw", &img, &at_snap]);
    let oracle = p("qemu.qcow2");
    std::fs::copy(&img, &oracle).unwrap();
    d.disks.push(("vm".into(), img.clone().into()));
    d.spawn();
    // Served as QEMU reads it.
    let got = p("got.raw");
    run("nbdcopy", &["--connections=2", &d.uri("vm"), &got]);
    assert_same_file(Path::new(&at_snap), Path::new(&got));
    // Writes: partial and whole compressed clusters, zeroes and a discard
    // over them, a zero cluster, clusters shared with the snapshot,
    // unallocated ones; QEMU does the same to its copy.
    let writes = [
        "write -P 0x31 100k 4k",
        "write -P 0x32 1M 64k",
        "write -P 0x33 4100k 4k",
        "write -z 2M 128k",
        "write -z 2200k 10k",
        "discard 3M 128k",
        "write -P 0x34 196600 20000",
        "write -P 0x35 6M 4k",
        "write -P 0x36 10M 1M",
        "write -P 0x37 14M 64k",
    ];
    qemu_io(&d.uri("vm"), &writes);
    qemu_io_file(&oracle, &writes);
    compare_export_with_image(&d, "vm");
    assert_same_image(&img, &oracle);
    // Clean (the harness checks too), and the snapshot is what it was.
    d.stop_and_check_images();
    let list = run("qemu-img", &["snapshot", "-l", &img]);
    assert!(list.contains("snap1"), "{list}");
    let snap_now = p("snap-now.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=snap1",
            "-O",
            "raw",
            &img,
            &snap_now,
        ],
    );
    assert_same_file(Path::new(&at_snap), Path::new(&snap_now));
    // Served again after a clean stop, with what was written.
    d.spawn();
    qemu_io(&d.uri("vm"), &["read -P 0x35 6M 4k", "read -P 0x36 10M 1M"]);
}

#[test]
fn a_snapshot_store_in_qcow2_holds_the_old_clusters_and_goes_with_the_snapshot() {
    let mut d = start_qcow2(&[("vm", 32 * MIB)]);
    qemu_io(&d.uri("vm"), &["write -P 0x61 0 8M"]);
    let store = d.path("store.qcow2");
    d.snapshot_create(
        &["vm"],
        "s",
        &[
            "--store",
            &format!("qcow2:{}", store.display()),
            "--cluster-size",
            "256k",
        ],
    );
    let snap = d.json(&["snapshot", "show", "vm@s"]);
    assert_eq!(snap["store"]["kind"], "qcow2", "{snap}");
    qemu_io(&d.uri("vm"), &["write -P 0x62 0 4M"]);
    qemu_io(&d.uri("vm@s"), &["read -P 0x61 0 8M", "read -P 0 8M 24M"]);
    let info = run(
        "qemu-img",
        &["info", "-U", "--output=json", store.to_str().unwrap()],
    );
    assert!(
        info.contains("\"format\": \"qcow2\"") && info.contains("\"cluster-size\": 262144"),
        "{info}"
    );
    let records = d.state_dir.join("stores");
    assert!(std::fs::read_dir(&records).unwrap().count() >= 1);
    d.cli_ok(&["snapshot", "delete", "vm@s"]);
    assert!(!store.exists(), "the store goes with the snapshot");
    // A store path that exists is refused.
    std::fs::write(&store, b"mine").unwrap();
    let out = d.cli(&[
        "snapshot",
        "create",
        "vm",
        "--name",
        "t",
        "--store",
        &format!("qcow2:{}", store.display()),
    ]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&store).unwrap(), b"mine");
    // After kill -9 the recorded qcow2 store is removed at the next start.
    let store2 = d.path("store2.qcow2");
    d.snapshot_create(&["vm"], "u", &["--store", &format!("qcow2:{}", store2.display())]);
    qemu_io(&d.uri("vm"), &["write -P 0x63 0 1M"]);
    d.kill9();
    assert!(store2.exists());
    d.restart_after_kill9();
    assert!(!store2.exists(), "recorded store removed at start");
    d.stop_and_check_images();
}

#[test]
fn image_create_makes_raw_and_qcow2_images_and_refuses_an_existing_path() {
    let d = Daemon::prepare(Server::Fleece, &[]);
    let cli = |args: &[&str]| run_any(BIN, args);
    let p = d.path("new.qcow2");
    let ps = p.to_str().unwrap();
    let out = cli(&["image", "create", ps, "--size", "1G"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("created qcow2 image"),
        "{}",
        text(&out.stdout)
    );
    let info = run("qemu-img", &["info", "--output=json", ps]);
    assert!(
        info.contains("\"virtual-size\": 1073741824") && info.contains("\"cluster-size\": 65536"),
        "{info}"
    );
    check_qcow2(&p, false);
    let again = cli(&["image", "create", ps, "--size", "1G"]);
    assert!(
        !again.status.success() && text(&again.stderr).contains("exists"),
        "{}",
        text(&again.stderr)
    );
    // Over a backing file (its size by default), with another cluster size.
    let top = d.path("top.qcow2");
    let out = cli(&[
        "image",
        "create",
        top.to_str().unwrap(),
        "--backing",
        "new.qcow2",
        "--cluster-size",
        "4k",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (j["size"].as_u64(), j["cluster_size"].as_u64()),
        (Some(1 << 30), Some(4096)),
        "{j}"
    );
    let info = run("qemu-img", &["info", "--output=json", top.to_str().unwrap()]);
    assert!(
        info.contains("\"backing-filename\": \"new.qcow2\"")
            && info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );
    // Raw.
    let r = d.path("r.img");
    let out = cli(&[
        "image",
        "create",
        r.to_str().unwrap(),
        "--size",
        "10M",
        "--format",
        "raw",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 10 * MIB);
    let bad = cli(&[
        "image",
        "create",
        d.path("x").to_str().unwrap(),
        "--size",
        "1M",
        "--format",
        "raw",
        "--backing",
        "r.img",
    ]);
    assert!(!bad.status.success());
    let bad = cli(&[
        "image",
        "create",
        d.path("y").to_str().unwrap(),
        "--size",
        "1M",
        "--cluster-size",
        "3k",
    ]);
    assert!(
        !bad.status.success() && text(&bad.stderr).contains("power of two"),
        "{}",
        text(&bad.stderr)
    );
    assert!(!d.path("y").exists());
}

#[test]
fn dirty_images_and_images_with_qemu_bitmaps_are_refused_with_what_to_do() {
    let d = Daemon::start(&[]);
    let p = |n: &str| d.path(n).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &p("dirty.qcow2"), "16M"],
    );
    let mut h = std::fs::read(p("dirty.qcow2")).unwrap();
    h[79] |= 1; // incompatible feature bit 0: dirty
    std::fs::write(p("dirty.qcow2"), &h).unwrap();
    let out = d.cli(&["disk", "add", "a", &p("dirty.qcow2")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("qemu-img check -r all"),
        "{}",
        text(&out.stderr)
    );
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &p("bm.qcow2"), "16M"],
    );
    run("qemu-img", &["bitmap", "--add", &p("bm.qcow2"), "nightly"]);
    let out = d.cli(&["disk", "add", "b", &p("bm.qcow2")]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("qemu-img bitmap --remove") && e.contains("nightly"),
        "{e}"
    );
    // Untouched: QEMU still has a consistent bitmap.
    let info = run("qemu-img", &["info", &p("bm.qcow2")]);
    assert!(info.contains("nightly") && !info.contains("in-use"), "{info}");
    // The advice works.
    run("qemu-img", &["bitmap", "--remove", &p("bm.qcow2"), "nightly"]);
    d.cli_ok(&["disk", "add", "b", &p("bm.qcow2")]);
    // An explicit format: a qcow2 file served as raw bytes, if asked.
    d.cli_ok(&["disk", "add", "c", &p("dirty.qcow2"), "--format", "raw"]);
    let disks = d.json(&["disk", "list"]);
    let fmt = |n: &str| {
        disks.as_array().unwrap().iter().find(|x| x["name"] == n).unwrap()["format"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!((fmt("b"), fmt("c")), ("qcow2".to_string(), "raw".to_string()));
    let out = d.cli(&["disk", "add", "e", &p("bm.qcow2"), "--format", "vmdk"]);
    assert!(!out.status.success() && text(&out.stderr).contains("raw or qcow2"));
    // Shrinking a qcow2 disk is refused with the way to do it; growing works.
    let out = d.cli(&["disk", "resize", "b", "8M", "--shrink"]);
    assert!(
        text(&out.stderr).contains("qemu-img resize --shrink"),
        "{}",
        text(&out.stderr)
    );
    d.cli_ok(&["disk", "resize", "b", "32M"]);
    qemu_io(&d.uri("b"), &["read -P 0 16M 16M", "write -P 1 31M 1M"]);
    d.cli_ok(&["disk", "remove", "b"]);
    check_qcow2(Path::new(&p("bm.qcow2")), false);
}

#[test]
fn serve_takes_a_format_per_disk() {
    let mut d = Daemon::prepare_in(Server::Fleece, &[("q", 8 * MIB)], Format::Qcow2);
    let q = d.image("q");
    d.disks.clear();
    d.extra_args = vec![
        "--disk".into(),
        format!("q={},format=qcow2", q.display()).into(),
        "--disk".into(),
        format!("r={},format=raw", q.display()).into(),
    ];
    // One file under two names is refused, whatever the formats.
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("serve")
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--control")
        .arg(&d.control);
    cmd.args(&d.extra_args);
    cmd.arg("--nbd").arg(format!("unix:{}", d.sock.display()));
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    d.extra_args.truncate(2);
    d.spawn();
    let disks = d.json(&["disk", "list"]);
    assert_eq!(disks[0]["format"], "qcow2", "{disks}");
    qemu_io(&d.uri("q"), &["write -P 7 0 64k", "read -P 7 0 64k"]);
    stop_and_check_file(&mut d, &q);
}

/// For disks the harness does not know of (given in `extra_args`).
fn stop_and_check_file(d: &mut Daemon, p: &Path) {
    assert!(d.sigterm(Duration::from_secs(20)).success(), "{}", d.log());
    check_qcow2(p, false);
}

#[test]
fn two_disks_over_one_backing_file_share_it_read_only() {
    let mut d = Daemon::prepare(Server::Fleece, &[]);
    let dir = d.dir.path().to_path_buf();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &p("base.qcow2"), "16M"],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 9 0 1M", &p("base.qcow2")],
    );
    for top in ["a.qcow2", "b.qcow2"] {
        let out = run_any(BIN, &["image", "create", &p(top), "--backing", "base.qcow2"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let base0 = std::fs::read(p("base.qcow2")).unwrap();
    d.disks = vec![
        ("a".into(), p("a.qcow2").into()),
        ("b".into(), p("b.qcow2").into()),
    ];
    d.spawn();
    qemu_io(&d.uri("a"), &["write -P 1 0 64k", "read -P 9 64k 960k"]);
    qemu_io(&d.uri("b"), &["read -P 9 0 1M", "discard 0 1M", "read -P 0 0 1M"]);
    let busy = run_any("qemu-io", &["-f", "qcow2", "-c", "write 0 512", &p("base.qcow2")]);
    assert!(
        !busy.status.success(),
        "the shared backing file is locked against writers"
    );
    d.stop_and_check_images();
    assert!(
        std::fs::read(p("base.qcow2")).unwrap() == base0,
        "the backing file is unchanged"
    );
}
