//! The qcow2 device (imago through the image factory) against images it
//! made and images QEMU made: round trips, zeroes, trim, block status with
//! depth on a backing chain, concurrency, flush, refusals, creation.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use fleece_block::image::{self, CreateOptions, Format, ImageOptions};
use fleece_block::{BlockDev, ErrorKind, Extent, IoFlags, LockMode, Mapping, ZeroFlags};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` finds no corruption and no leak.
fn check_clean(p: &Path) {
    run("qemu-img", &["check", "-U", p.to_str().unwrap()]);
}

fn new_image(dir: &Path, name: &str, size: u64, cluster: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    image::create(
        &p,
        &CreateOptions {
            format: Format::Qcow2,
            size: Some(size),
            cluster_size: Some(cluster),
            backing: None,
        },
    )
    .unwrap();
    p
}

fn open_rw(p: &Path) -> image::Image {
    image::open(p, &ImageOptions::default()).unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn round_trips_at_odd_offsets_and_across_clusters_match_a_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let p = new_image(dir.path(), "a.qcow2", size, 4096);
    let img = open_rw(&p);
    assert_eq!(img.format(), Format::Qcow2);
    let dev = img.device();
    assert_eq!(dev.size(), size);
    let caps = dev.capabilities();
    assert_eq!(caps.preferred_io, 4096);
    assert!(caps.fua && caps.trim && caps.fast_zero && caps.allocation_depth);
    let mut shadow = vec![0u8; size as usize];
    let writes: [(u64, usize); 6] = [
        (1, 10),
        (4095, 2),
        (4097, 9000),
        (65535, 70000),
        (size - 3, 3),
        (300_001, 1),
    ];
    for (i, &(at, len)) in writes.iter().enumerate() {
        let data = pattern(len, i as u64 + 1);
        dev.write_at(&data, at, IoFlags::NONE).unwrap();
        shadow[at as usize..at as usize + len].copy_from_slice(&data);
    }
    for &(at, len) in &[
        (0u64, 5000usize),
        (4090, 20),
        (60_000, 100_000),
        (size - 10, 10),
        (0, size as usize),
    ] {
        let mut buf = vec![0xAAu8; len];
        dev.read_at(&mut buf, at, IoFlags::NONE).unwrap();
        assert!(buf == shadow[at as usize..at as usize + len], "read {at}+{len}");
    }
    assert_eq!(
        dev.read_at(&mut [0u8; 2], size - 1, IoFlags::NONE)
            .unwrap_err()
            .kind(),
        ErrorKind::OutOfRange
    );
    dev.flush().unwrap();
    drop(img);
    check_clean(&p);
    // What qemu reads is what was written.
    let raw = dir.path().join("a.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", p.to_str().unwrap(), raw.to_str().unwrap()],
    );
    assert!(std::fs::read(&raw).unwrap() == shadow);
}

#[test]
fn zeroes_make_zero_clusters_and_fill_partial_ones_and_fast_zero_needs_whole_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let c = 4096u64;
    let p = new_image(dir.path(), "z.qcow2", 64 * c, c);
    let img = open_rw(&p);
    let dev = img.device();
    dev.write_at(&vec![7u8; 16 * c as usize], 0, IoFlags::NONE)
        .unwrap();
    // Whole clusters, keeping the allocation.
    dev.write_zeroes(c, 2 * c, ZeroFlags::default()).unwrap();
    // Whole clusters, deallocated, with partial clusters at both ends.
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };
    dev.write_zeroes(4 * c + 100, 3 * c, unmap).unwrap();
    let fast = ZeroFlags {
        fast_only: true,
        ..ZeroFlags::default()
    };
    assert_eq!(
        dev.write_zeroes(10 * c + 1, c, fast).unwrap_err().kind(),
        ErrorKind::NotSupported
    );
    dev.write_zeroes(10 * c, c, fast).unwrap();
    let mut buf = vec![0u8; 16 * c as usize];
    dev.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    for (i, b) in buf.iter().enumerate() {
        let i = i as u64;
        let zero = (c..3 * c).contains(&i)
            || (4 * c + 100..7 * c + 100).contains(&i)
            || (10 * c..11 * c).contains(&i);
        assert_eq!(*b, if zero { 0 } else { 7 }, "byte {i}");
    }
    let st = dev.block_status(0, 16 * c).unwrap();
    let at = |off: u64| {
        let mut pos = 0;
        st.iter()
            .find(|e| {
                pos += e.length;
                off < pos
            })
            .unwrap()
            .mapping
    };
    assert_eq!(at(0), Mapping::Data);
    // Zero clusters: holes (no data), as qemu-nbd reports them.
    assert_eq!(at(c), Mapping::Hole);
    assert_eq!(at(5 * c), Mapping::Hole);
    assert_eq!(at(10 * c), Mapping::Hole);
    assert_eq!(at(12 * c), Mapping::Data);
    // Zeroes where nothing is allocated allocate nothing.
    dev.write_zeroes(32 * c, 32 * c, unmap).unwrap();
    assert_eq!(
        dev.block_status(32 * c, 32 * c).unwrap(),
        vec![Extent {
            length: 32 * c,
            mapping: Mapping::Hole,
            depth: Some(0)
        }]
    );
    dev.flush().unwrap();
    drop(img);
    check_clean(&p);
}

#[test]
fn trim_reads_as_zeroes_with_and_without_a_backing_file_as_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let c = 65536u64;
    let base = new_image(dir.path(), "base.qcow2", 8 * c, c);
    {
        let img = open_rw(&base);
        img.device()
            .write_at(&vec![1u8; 8 * c as usize], 0, IoFlags::NONE)
            .unwrap();
        img.device().flush().unwrap();
    }
    let top = dir.path().join("top.qcow2");
    image::create(
        &top,
        &CreateOptions {
            format: Format::Qcow2,
            size: None,
            cluster_size: Some(c),
            backing: Some("base.qcow2".into()),
        },
    )
    .unwrap();
    let img = open_rw(&top);
    let dev = img.device();
    assert_eq!(dev.size(), 8 * c);
    dev.write_at(&vec![2u8; c as usize], 2 * c, IoFlags::NONE)
        .unwrap();
    // A cluster of the top's own, one of the backing file's, and partial
    // clusters at the ends, which stay.
    dev.trim(c + 10, 2 * c + c - 10 + 5).unwrap();
    let mut buf = vec![0u8; 4 * c as usize];
    dev.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    assert!(
        buf[..2 * c as usize].iter().all(|&b| b == 1),
        "partial head keeps the backing data"
    );
    assert!(
        buf[2 * c as usize..].iter().all(|&b| b == 0),
        "whole clusters read as zeroes"
    );
    dev.read_at(&mut buf[..10], 4 * c, IoFlags::NONE).unwrap();
    assert!(
        buf[..10].iter().all(|&b| b == 1),
        "partial tail keeps the backing data"
    );
    dev.trim(4 * c, 2 * c).unwrap();
    dev.read_at(&mut buf[..2 * c as usize], 4 * c, IoFlags::NONE)
        .unwrap();
    assert!(
        buf[..2 * c as usize].iter().all(|&b| b == 0),
        "no backing data comes back"
    );
    let st = dev.block_status(4 * c, 2 * c).unwrap();
    assert_eq!(st[0].mapping, Mapping::Hole);
    assert_eq!(
        st[0].depth,
        Some(1),
        "a zero cluster of the top hides the backing file"
    );
    dev.flush().unwrap();
    drop(img);
    check_clean(&top);

    // Without a backing file the space goes back.
    let img = open_rw(&base);
    let before = std::fs::metadata(&base).unwrap();
    img.device().trim(0, 8 * c).unwrap();
    img.device().flush().unwrap();
    let mut b = vec![9u8; c as usize];
    img.device().read_at(&mut b, 0, IoFlags::NONE).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(img
        .device()
        .block_status(0, 8 * c)
        .unwrap()
        .iter()
        .all(|e| e.mapping.reads_as_zeroes()));
    drop(img);
    check_clean(&base);
    let _ = before;
}

#[test]
fn block_status_gives_the_depth_of_each_range_on_a_three_deep_chain_made_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let io = |img: &str, cmd: &str| run("qemu-io", &["-f", "qcow2", "-c", cmd, &d(img)]);
    run("qemu-img", &["create", "-f", "qcow2", &d("base.qcow2"), "1M"]);
    io("base.qcow2", "write -P 1 0 64k");
    io("base.qcow2", "write -P 1 128k 64k");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &d("mid.qcow2"),
        ],
    );
    io("mid.qcow2", "write -P 2 64k 64k");
    io("mid.qcow2", "write -z 128k 64k");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &d("top.qcow2"),
        ],
    );
    io("top.qcow2", "write -P 3 192k 64k");
    let img = open_rw(Path::new(&d("top.qcow2")));
    assert_eq!(img.backing_files().len(), 2);
    let dev = img.device();
    let k = 65536u64;
    let e = |length, mapping, depth| Extent {
        length,
        mapping,
        depth: Some(depth),
    };
    assert_eq!(
        dev.block_status(0, 1 << 20).unwrap(),
        vec![
            e(k, Mapping::Data, 3),
            e(k, Mapping::Data, 2),
            e(k, Mapping::Hole, 2),
            e(k, Mapping::Data, 1),
            e((1 << 20) - 4 * k, Mapping::Hole, 0),
        ]
    );
    // Part of a cluster, and a range that starts in the middle.
    assert_eq!(dev.block_status(100, 10).unwrap(), vec![e(10, Mapping::Data, 3)]);
    assert_eq!(
        dev.block_status(k + 5, k).unwrap(),
        vec![e(k - 5, Mapping::Data, 2), e(5, Mapping::Hole, 2)]
    );
    assert_eq!(dev.next_data(128 * 1024, 1 << 20).unwrap(), Some(192 * 1024));
    assert_eq!(dev.next_data(256 * 1024, 1 << 20).unwrap(), None);
    let mut buf = vec![0u8; 4 * k as usize];
    dev.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    for (i, want) in [1u8, 2, 0, 3].iter().enumerate() {
        assert!(
            buf[i * k as usize..(i + 1) * k as usize]
                .iter()
                .all(|b| b == want),
            "cluster {i}"
        );
    }
    // The chain is locked the QEMU way: the top for writing, the backing
    // files read-only (others may read them, nobody may write them).
    img.lock(LockMode::ReadWrite).unwrap();
    let busy = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", &d("base.qcow2")])
        .output()
        .unwrap();
    assert!(!busy.status.success(), "a backing file is locked against writers");
    run("qemu-img", &["info", &d("base.qcow2")]);
    img.unlock();
    // A partial write into a cluster of the backing file copies the rest.
    dev.write_at(&[9u8; 100], 1000, IoFlags::NONE).unwrap();
    dev.read_at(&mut buf[..k as usize], 0, IoFlags::NONE).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 1) && buf[1000..1100].iter().all(|&b| b == 9));
    assert!(buf[1100..k as usize].iter().all(|&b| b == 1));
    assert_eq!(dev.block_status(0, k).unwrap(), vec![e(k, Mapping::Data, 1)]);
    dev.flush().unwrap();
    drop(img);
    for f in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        check_clean(Path::new(&d(f)));
    }
    // The backing files were never written.
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            &d("mid.qcow2"),
            &d("mid.qcow2"),
        ],
    );
}

#[test]
fn concurrent_writers_and_readers_on_different_clusters_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = 4096u64;
    let clusters = 2048u64;
    let p = new_image(dir.path(), "c.qcow2", clusters * c, c);
    let img = open_rw(&p);
    let dev: Arc<dyn BlockDev> = img.device().clone();
    let threads = 8u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let dev = dev.clone();
            s.spawn(move || {
                // Thread t owns clusters i with i % threads == t, written in
                // a scrambled order, partly in pieces, with trims and reads.
                let mine: Vec<u64> = (0..clusters).filter(|i| i % threads == t).collect();
                for (n, &i) in mine.iter().enumerate().rev() {
                    let data = pattern(c as usize, i);
                    if n % 3 == 0 {
                        dev.write_at(&data[..1000], i * c, IoFlags::NONE).unwrap();
                        dev.write_at(&data[1000..], i * c + 1000, IoFlags::NONE).unwrap();
                    } else {
                        dev.write_at(&data, i * c, IoFlags::NONE).unwrap();
                    }
                    if n % 7 == 0 {
                        dev.trim(i * c, c).unwrap();
                        dev.write_at(&data, i * c, IoFlags::NONE).unwrap();
                    }
                    let mut back = vec![0u8; c as usize];
                    dev.read_at(&mut back, i * c, IoFlags::NONE).unwrap();
                    assert!(back == data, "cluster {i} right after its write");
                    if n % 50 == 0 {
                        dev.flush().unwrap();
                    }
                }
            });
        }
    });
    for i in 0..clusters {
        let mut back = vec![0u8; c as usize];
        dev.read_at(&mut back, i * c, IoFlags::NONE).unwrap();
        assert!(back == pattern(c as usize, i), "cluster {i}");
    }
    dev.flush().unwrap();
    drop(dev);
    drop(img);
    check_clean(&p);
}

#[test]
fn a_flush_puts_metadata_on_disk_where_another_open_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(dir.path(), "f.qcow2", 1 << 20, 65536);
    let img = open_rw(&p);
    img.device().write_at(&[5u8; 4096], 70000, IoFlags::NONE).unwrap();
    img.device().write_at(&[6u8; 512], 0, IoFlags::FUA).unwrap();
    img.device().flush().unwrap();
    // A second, read-only open reads what the first wrote.
    let ro = image::open(
        &p,
        &ImageOptions {
            read_only: true,
            format: Some(Format::Qcow2),
        },
    )
    .unwrap();
    let mut b = [0u8; 4096];
    ro.device().read_at(&mut b, 70000, IoFlags::NONE).unwrap();
    assert_eq!(b, [5u8; 4096]);
    ro.device().read_at(&mut b[..512], 0, IoFlags::NONE).unwrap();
    assert_eq!(b[..512], [6u8; 512]);
    assert!(ro.device().capabilities().read_only);
    assert_eq!(
        ro.device().write_at(&[1], 0, IoFlags::NONE).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    check_clean(&p);
}

#[test]
fn images_qemu_wrote_with_compressed_clusters_and_internal_snapshots_are_served_and_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let raw = pattern(1 << 20, 42);
    std::fs::write(d("src.raw"), &raw).unwrap();
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", &d("src.raw"), &d("c.qcow2")],
    );
    run("qemu-img", &["snapshot", "-c", "snap1", &d("c.qcow2")]);
    let img = open_rw(Path::new(&d("c.qcow2")));
    let dev = img.device();
    let mut buf = vec![0u8; 1 << 20];
    dev.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    assert!(buf == raw, "compressed clusters read back");
    // Over a compressed, snapshotted cluster: a new cluster, the snapshot
    // keeps the old one.
    dev.write_at(&[0xEE; 300], 65536 + 17, IoFlags::NONE).unwrap();
    let mut want = raw.clone();
    want[65536 + 17..65536 + 317].fill(0xEE);
    dev.read_at(&mut buf, 0, IoFlags::NONE).unwrap();
    assert!(buf == want);
    dev.flush().unwrap();
    drop(img);
    check_clean(Path::new(&d("c.qcow2")));
    // The internal snapshot still holds the old data.
    run("qemu-img", &["snapshot", "-a", "snap1", &d("c.qcow2")]);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &d("c.qcow2"),
            &d("src.raw"),
        ],
    );
}

#[test]
fn images_imago_cannot_serve_safely_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let err = |p: &str| {
        image::open(Path::new(&d(p)), &ImageOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{p} opened"))
            .to_string()
    };
    // Dirty: the dirty bit set by hand, as a crash with lazy refcounts leaves it.
    run("qemu-img", &["create", "-f", "qcow2", &d("dirty.qcow2"), "1M"]);
    let mut h = std::fs::read(d("dirty.qcow2")).unwrap();
    h[79] |= 1;
    std::fs::write(d("dirty.qcow2"), &h).unwrap();
    let e = err("dirty.qcow2");
    assert!(e.contains("qemu-img check -r all"), "{e}");
    // QEMU's persistent bitmaps: refused, and the header is not touched.
    run("qemu-img", &["create", "-f", "qcow2", &d("bm.qcow2"), "1M"]);
    run("qemu-img", &["bitmap", "--add", &d("bm.qcow2"), "b0"]);
    let before = std::fs::read(d("bm.qcow2")).unwrap();
    let e = err("bm.qcow2");
    assert!(e.contains("qemu-img bitmap --remove") && e.contains("b0"), "{e}");
    assert!(
        std::fs::read(d("bm.qcow2")).unwrap() == before,
        "the image is untouched"
    );
    run("qemu-img", &["check", &d("bm.qcow2")]);
    let info = run("qemu-img", &["info", &d("bm.qcow2")]);
    assert!(info.contains("b0") && !info.contains("in-use"), "{info}");
    // Read-only opens do not touch bitmaps: allowed.
    image::open(
        Path::new(&d("bm.qcow2")),
        &ImageOptions {
            read_only: true,
            format: None,
        },
    )
    .unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            &d("x.qcow2"),
            "1M",
        ],
    );
    assert!(err("x.qcow2").contains("extended L2"));
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            &d("zstd.qcow2"),
            "1M",
        ],
    );
    assert!(err("zstd.qcow2").contains("zstd"));
    // A dirty backing file is refused too, by name.
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "dirty.qcow2",
            "-F",
            "qcow2",
            &d("over.qcow2"),
        ],
    );
    let e = err("over.qcow2");
    assert!(e.contains("dirty.qcow2") && e.contains("qemu-img check"), "{e}");
}

#[test]
fn created_images_are_what_qemu_expects_and_grow_but_do_not_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(dir.path(), "g.qcow2", 1 << 20, 65536);
    let info = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    assert!(
        info.contains("\"cluster-size\": 65536") && info.contains("\"virtual-size\": 1048576"),
        "{info}"
    );
    assert!(
        image::create(
            &p,
            &CreateOptions {
                format: Format::Qcow2,
                size: Some(1 << 20),
                cluster_size: None,
                backing: None
            }
        )
        .is_err(),
        "an existing file is never overwritten"
    );
    let img = open_rw(&p);
    img.device()
        .write_at(&[3u8; 512], (1 << 20) - 512, IoFlags::NONE)
        .unwrap();
    img.resize(4 << 20).unwrap();
    assert_eq!(img.size(), 4 << 20);
    let mut b = vec![1u8; 4096];
    img.device().read_at(&mut b, 3 << 20, IoFlags::NONE).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let e = img.resize(1 << 20).unwrap_err();
    assert!(e.to_string().contains("qemu-img resize --shrink"), "{e}");
    drop(img);
    check_clean(&p);
    let info = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    assert!(info.contains("\"virtual-size\": 4194304"), "{info}");
    // A raw image is raw, and detection says so.
    let r = dir.path().join("r.raw");
    image::create(
        &r,
        &CreateOptions {
            format: Format::Raw,
            size: Some(1 << 20),
            cluster_size: None,
            backing: None,
        },
    )
    .unwrap();
    assert_eq!(image::detect_path(&r).unwrap(), Format::Raw);
    assert_eq!(image::detect_path(&p).unwrap(), Format::Qcow2);
}

#[test]
fn no_wait_requests_run_only_in_memory() {
    let on_disk = tempfile::tempdir().unwrap();
    let p = new_image(on_disk.path(), "d.qcow2", 1 << 20, 65536);
    let img = open_rw(&p);
    let in_memory = img.device().hints().in_memory;
    let r = img.device().write_at(&[1u8; 512], 0, IoFlags::NO_WAIT);
    let mut b = [0u8; 512];
    let rr = img.device().read_at(&mut b, 0, IoFlags::NO_WAIT);
    if in_memory {
        r.unwrap();
        rr.unwrap();
    } else {
        assert_eq!(r.unwrap_err().kind(), ErrorKind::WouldBlock);
        assert_eq!(rr.unwrap_err().kind(), ErrorKind::WouldBlock);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let p = new_image(dir.path(), "m.qcow2", 1 << 20, 65536);
        let img = open_rw(&p);
        assert!(img.device().hints().in_memory);
        img.device().write_at(&[1u8; 512], 0, IoFlags::NO_WAIT).unwrap();
        img.device().read_at(&mut b, 0, IoFlags::NO_WAIT).unwrap();
        assert_eq!(b, [1u8; 512]);
        assert_eq!(
            img.device()
                .write_at(
                    &[1u8; 512],
                    0,
                    IoFlags {
                        fua: true,
                        no_wait: true
                    }
                )
                .unwrap_err()
                .kind(),
            ErrorKind::WouldBlock
        );
    }
}

#[test]
fn v2_images_zero_by_writing_and_trim_as_qemu_does_without_a_zero_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &d("base.qcow2"),
            "1M",
        ],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 1M", &d("base.qcow2")],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &d("top.qcow2"),
        ],
    );
    let img = open_rw(Path::new(&d("top.qcow2")));
    let dev = img.device();
    assert!(!dev.capabilities().fast_zero, "no zero flag in v2");
    let k = 65536u64;
    dev.write_at(&vec![2u8; 2 * k as usize], 0, IoFlags::NONE)
        .unwrap();
    let fast = ZeroFlags {
        fast_only: true,
        ..ZeroFlags::default()
    };
    assert_eq!(
        dev.write_zeroes(0, k, fast).unwrap_err().kind(),
        ErrorKind::NotSupported
    );
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };
    dev.write_zeroes(0, k, unmap).unwrap();
    // v2 trim: the cluster is unallocated again, the backing data shows.
    dev.trim(k, k).unwrap();
    let mut b = vec![9u8; 2 * k as usize];
    dev.read_at(&mut b, 0, IoFlags::NONE).unwrap();
    assert!(b[..k as usize].iter().all(|&x| x == 0), "zeroes written");
    assert!(
        b[k as usize..].iter().all(|&x| x == 1),
        "backing data after a v2 trim"
    );
    dev.flush().unwrap();
    drop(img);
    check_clean(Path::new(&d("top.qcow2")));
}

#[test]
fn missing_l2_tables_are_made_before_serving_without_changing_what_the_disk_reads() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB clusters: one L2 table per 512 MiB; 2 GiB + 1 cluster: five tables.
    let base = new_image(dir.path(), "base.qcow2", (2 << 30) + 65536, 65536);
    {
        let b = open_rw(&base);
        b.device()
            .write_at(&pattern(65536, 1), 600 << 20, IoFlags::NONE)
            .unwrap();
        b.device().flush().unwrap();
    }
    let top = dir.path().join("top.qcow2");
    image::create(
        &top,
        &CreateOptions {
            format: Format::Qcow2,
            size: None,
            cluster_size: Some(65536),
            backing: Some("base.qcow2".into()),
        },
    )
    .unwrap();
    let img = open_rw(&top);
    img.lock(LockMode::ReadWrite).unwrap();
    img.device()
        .write_at(&pattern(4096, 2), 4096, IoFlags::NONE)
        .unwrap();
    img.device().flush().unwrap();
    let len = || std::fs::metadata(&top).unwrap().len();
    let before = len();
    assert_eq!(img.prepare_for_serving().unwrap(), 4, "four ranges had no table");
    // Four new L2 tables of one cluster each at the end of the file.
    assert_eq!(len() - before, 4 * 65536);
    let after = len();
    assert_eq!(img.prepare_for_serving().unwrap(), 0);
    assert_eq!(len(), after, "tables are made once");
    // The backing data still shows through, the top's own write stays.
    let mut buf = vec![0u8; 65536];
    img.device().read_at(&mut buf, 600 << 20, IoFlags::NONE).unwrap();
    assert_eq!(buf, pattern(65536, 1));
    let mut small = vec![0u8; 4096];
    img.device().read_at(&mut small, 4096, IoFlags::NONE).unwrap();
    assert_eq!(small, pattern(4096, 2));
    let st = img.device().block_status(600 << 20, 65536).unwrap();
    assert_eq!(st[0].depth, Some(2), "{st:?}");
    drop(img);
    check_clean(&top);
}
