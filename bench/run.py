#!/usr/bin/env python3
"""fleece benchmark: the same workloads, in one run, against fleece,
qemu-storage-daemon (copy-before-write + snapshot-access), nbdkit's file
plugin, and fio straight on the image file (the machine's limit).

Images live in /dev/shm so that writeback noise does not hide software
costs. Results: a table on stdout, bench/results/latest.json, and (with
--markdown FILE) the table in Markdown. Never used as a test.

usage: python3 bench/run.py [--quick] [--only fleece,qemu,nbdkit,limit]
                            [--fleece-bin PATH] [--markdown FILE]
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHM = "/dev/shm"
TICK = os.sysconf("SC_CLK_TCK")

WORKLOADS = [
    # name, fio rw, block size, queue depth
    ("randwrite-4k-qd16", "randwrite", "4k", 16),
    ("seqwrite-1m-qd4", "write", "1M", 4),
    ("randread-4k-qd16", "randread", "4k", 16),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, timeout=600, **kw):
    return subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_socket(path, proc, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("server exited: %s" % (proc.stderr.read() if proc.stderr else proc.returncode))
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("server did not listen on " + path)


def proc_stats(pid):
    """(peak RSS bytes, CPU seconds) of a live process."""
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    return rss, cpu


class Server:
    """A server process serving `live` (read-write) and maybe `view`."""

    def __init__(self, kind, args, sock, live, view=None, setup=None, env=None):
        self.kind, self.sock, self.live_name, self.view_name = kind, sock, live, view
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        wait_socket(setup["wait"] if setup else sock, self.proc)
        if setup and setup.get("after"):
            setup["after"]()

    def uri(self, name):
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)

    @property
    def live(self):
        return self.uri(self.live_name)

    @property
    def view(self):
        return self.uri(self.view_name) if self.view_name else None

    def stats(self):
        return proc_stats(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    def __init__(self, opts):
        self.opts = opts
        self.tmp = tempfile.mkdtemp(prefix="fleece-bench-", dir=SHM)
        self.image = os.path.join(self.tmp, "disk.raw")
        self.size = opts.size
        self.results = {}
        self.servers = []

    def path(self, name):
        return os.path.join(self.tmp, name)

    def cleanup(self):
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- servers -------------------------------------------------------
    def fleece(self, snapshot):
        sock, ctl = self.path("f.sock"), self.path("f-ctl.sock")
        state = self.path("f-state")
        args = [self.opts.fleece_bin, "serve", "--disk", "disk=" + self.image, "--nbd", "unix:" + sock,
                "--control", ctl, "--state-dir", state, "--log-level", "warn"]
        srv = Server("fleece", args, sock, "disk", setup={"wait": ctl})
        self.servers.append(srv)
        if snapshot:
            self.reference()
            run([self.opts.fleece_bin, "snapshot", "create", "disk", "--name", "s", "--control", ctl,
                 "--store", "file:" + self.path("f-store.raw")])
            srv.view_name = "disk@s"
        return srv

    def qemu(self, snapshot):
        sock = self.path("q.sock")
        args = ["qemu-storage-daemon",
                "--blockdev", "file,node-name=f,filename=%s,aio=threads" % self.image,
                "--blockdev", "raw,node-name=d,file=f",
                "--nbd-server", "addr.type=unix,addr.path=%s,max-connections=0" % sock]
        if snapshot:
            self.reference()
            store = self.path("q-store.raw")
            with open(store, "wb") as f:
                f.truncate(self.size)
            args += ["--blockdev", "file,node-name=tf,filename=%s,aio=threads" % store,
                     "--blockdev", "raw,node-name=t,file=tf",
                     "--blockdev", "copy-before-write,node-name=cbw,file=d,target=t",
                     "--blockdev", "snapshot-access,node-name=snap,file=cbw",
                     "--export", "nbd,id=e0,node-name=cbw,name=disk,writable=on",
                     "--export", "nbd,id=e1,node-name=snap,name=snap"]
        else:
            args += ["--export", "nbd,id=e0,node-name=d,name=disk,writable=on"]
        srv = Server("qemu", args, sock, "disk", "snap" if snapshot else None)
        self.servers.append(srv)
        return srv

    def nbdkit(self, snapshot):
        assert not snapshot
        sock = self.path("k.sock")
        if os.path.exists(sock):
            os.unlink(sock)  # nbdkit leaves its socket behind
        srv = Server("nbdkit", ["nbdkit", "-f", "-U", sock, "file", self.image], sock, "")
        self.servers.append(srv)
        return srv

    def reference(self):
        """The image at the instant: copied while nothing writes."""
        shutil.copyfile(self.image, self.path("reference.raw"))

    # ---- workloads -----------------------------------------------------
    def fio(self, target, rw, bs, qd, runtime, nbd=True, extra=(), ramp=True):
        # A fresh snapshot is measured from its first write: no ramp there,
        # or the copy-before-write cost would hide in it.
        args = ["fio", "--name=job", "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % qd,
                "--size=%d" % self.size, "--runtime=%d" % runtime, "--time_based",
                "--randrepeat=0", "--norandommap", "--output-format=json"]
        if ramp:
            args.append("--ramp_time=2")
        if nbd:
            args += ["--ioengine=nbd", "--uri=" + target]
        else:
            args += ["--ioengine=" + self.opts.limit_engine, "--filename=" + target, "--direct=0"]
        args += list(extra)
        out = run(args, timeout=runtime + 120).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        side = job["write"] if "write" in rw else job["read"]
        pct = side["clat_ns"].get("percentile", {})
        return {"iops": side["iops"], "mib_s": side["bw_bytes"] / 2**20,
                "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}

    def fill(self):
        log("filling a %d MiB image with random data" % (self.size >> 20))
        with open(self.image, "wb") as f:
            left = self.size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n

    def measure(self, kind, snapshot, workload):
        name, rw, bs, qd = workload
        if kind == "limit":
            return self.fio(self.image, rw, bs, qd, self.opts.runtime, nbd=False)
        srv = getattr(self, kind)(snapshot)
        try:
            cpu0 = srv.stats()[1]
            r = self.fio(srv.live, rw, bs, qd, self.opts.runtime, ramp=not snapshot)
            rss, cpu1 = srv.stats()
            r["rss_mib"], r["cpu_s"] = rss / 2**20, cpu1 - cpu0
            return r
        finally:
            srv.stop()
            self.servers.remove(srv)

    def live_pull(self, kind):
        """nbdcopy read of the live export, no snapshot."""
        srv = getattr(self, kind)(False)
        try:
            out = self.path("pulled.raw")
            times = []
            for _ in range(self.opts.repeat):
                t0 = time.time()
                run(["nbdcopy", "--connections=2", srv.live, out], timeout=600)
                times.append(time.time() - t0)
            secs = sorted(times)[len(times) // 2]
            r = {"seconds": secs, "all_seconds": times, "mib_s": self.size / 2**20 / secs,
                 "exact": subprocess.run(["cmp", "-s", out, self.image]).returncode == 0}
            os.unlink(out)
            return r
        finally:
            srv.stop()
            self.servers.remove(srv)

    def pull(self, kind, under_writes):
        srv = getattr(self, kind)(True)
        try:
            out = self.path("pulled.raw")
            writer = None
            if under_writes:
                writer = subprocess.Popen(
                    ["fio", "--name=load", "--ioengine=nbd", "--uri=" + srv.live, "--rw=randwrite", "--bs=4k",
                     "--iodepth=16", "--size=%d" % self.size, "--runtime=600", "--time_based",
                     "--randrepeat=0", "--norandommap", "--output-format=json"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                time.sleep(1)
            times = []
            # Idle pulls are short and noisy here: take the median of a few.
            for _ in range(1 if under_writes else self.opts.repeat):
                t0 = time.time()
                run(["nbdcopy", "--connections=2", srv.view, out], timeout=600)
                times.append(time.time() - t0)
            secs = sorted(times)[len(times) // 2]
            rss, cpu = srv.stats()
            r = {"seconds": secs, "all_seconds": times, "mib_s": self.size / 2**20 / secs, "rss_mib": rss / 2**20}
            if writer:
                writer.send_signal(signal.SIGINT)
                o, _ = writer.communicate(timeout=60)
                try:
                    job = json.loads(o[o.index("{"):])["jobs"][0]["write"]
                    r["write_iops"] = job["iops"]
                except (ValueError, KeyError):
                    r["write_iops"] = None
            r["exact"] = subprocess.run(["cmp", "-s", out, self.path("reference.raw")]).returncode == 0
            os.unlink(out)
            return r
        finally:
            srv.stop()
            self.servers.remove(srv)

    def go(self):
        self.fill()
        kinds = self.opts.only
        R = self.results
        for kind in kinds:
            for snapshot in (False, True):
                if snapshot and kind in ("nbdkit", "limit"):
                    continue
                for w in WORKLOADS:
                    key = "%s/%s/%s" % (kind, "snapshot" if snapshot else "plain", w[0])
                    log("running", key)
                    try:
                        R[key] = self.measure(kind, snapshot, w)
                    except Exception as e:  # keep going: report what failed
                        R[key] = {"error": str(e)[:300]}
                    log("  ", R[key])
            if kind in ("fleece", "qemu", "nbdkit"):
                key = "%s/pull/live" % kind
                log("running", key)
                try:
                    R[key] = self.live_pull(kind)
                except Exception as e:
                    R[key] = {"error": str(e)[:300]}
                log("  ", R[key])
            if kind in ("fleece", "qemu"):
                for under in (False, True):
                    key = "%s/pull/%s" % (kind, "under-writes" if under else "idle")
                    log("running", key)
                    try:
                        R[key] = self.pull(kind, under)
                    except Exception as e:
                        R[key] = {"error": str(e)[:300]}
                    log("  ", R[key])


def ratio(a, b):
    return a / b if a and b else None


def report(R, opts):
    def g(key, field):
        v = R.get(key, {})
        return v.get(field) if isinstance(v, dict) else None

    lines = []
    hdr = "| workload | fleece | qemu-storage-daemon | nbdkit | limit (fio %s) | fleece/qemu | fleece/nbdkit | fleece/limit |" % opts.limit_engine
    lines += [hdr, "|" + "---|" * 8]
    for mode in ("plain", "snapshot"):
        for w in WORKLOADS:
            f = g("fleece/%s/%s" % (mode, w[0]), "iops")
            q = g("qemu/%s/%s" % (mode, w[0]), "iops")
            k = g("nbdkit/plain/%s" % w[0], "iops") if mode == "plain" else None
            l = g("limit/plain/%s" % w[0], "iops") if mode == "plain" else None
            fmt = lambda v: "%.0f" % v if v else "-"
            rf = lambda v: "%.2fx" % v if v else "-"
            lines.append("| %s %s (IOPS) | %s | %s | %s | %s | %s | %s | %s |" % (
                w[0], "during fresh snapshot" if mode == "snapshot" else "", fmt(f), fmt(q), fmt(k), fmt(l),
                rf(ratio(f, q)), rf(ratio(f, k)), rf(ratio(f, l))))
    for mode in ("plain", "snapshot"):
        f = g("fleece/%s/randwrite-4k-qd16" % mode, "p99_us")
        q = g("qemu/%s/randwrite-4k-qd16" % mode, "p99_us")
        k = g("nbdkit/plain/randwrite-4k-qd16", "p99_us") if mode == "plain" else None
        lines.append("| p99 latency 4k randwrite %s (µs) | %s | %s | %s | - | %s | %s | - |" % (
            mode, "%.0f" % f if f else "-", "%.0f" % q if q else "-", "%.0f" % k if k else "-",
            "%.2fx" % ratio(f, q) if ratio(f, q) else "-", "%.2fx" % ratio(f, k) if ratio(f, k) else "-"))
    f, q, k = (g("%s/pull/live" % x, "mib_s") for x in ("fleece", "qemu", "nbdkit"))
    lines.append("| nbdcopy read of the live disk (MiB/s) | %s | %s | %s | - | %s | %s | - |" % (
        "%.0f" % f if f else "-", "%.0f" % q if q else "-", "%.0f" % k if k else "-",
        "%.2fx" % ratio(f, q) if ratio(f, q) else "-", "%.2fx" % ratio(f, k) if ratio(f, k) else "-"))
    for under in ("idle", "under-writes"):
        f = g("fleece/pull/" + under, "mib_s")
        q = g("qemu/pull/" + under, "mib_s")
        lines.append("| nbdcopy pull of the view, %s (MiB/s) | %s | %s | - | - | %s | - | - |" % (
            under, "%.0f" % f if f else "-", "%.0f" % q if q else "-", "%.2fx" % ratio(f, q) if ratio(f, q) else "-"))
        if under == "under-writes":
            fw, qw = g("fleece/pull/" + under, "write_iops"), g("qemu/pull/" + under, "write_iops")
            lines.append("| 4k randwrite IOPS during that pull | %s | %s | - | - | %s | - | - |" % (
                "%.0f" % fw if fw else "-", "%.0f" % qw if qw else "-", "%.2fx" % ratio(fw, qw) if ratio(fw, qw) else "-"))
    rss = [g(k, "rss_mib") for k in R if k.startswith("fleece/")]
    rss = [r for r in rss if r]
    qrss = [g(k, "rss_mib") for k in R if k.startswith("qemu/")]
    qrss = [r for r in qrss if r]
    lines.append("| peak RSS (MiB, max over runs) | %s | %s | - | - | - | - | - |" % (
        "%.1f" % max(rss) if rss else "-", "%.1f" % max(qrss) if qrss else "-"))
    cpu = lambda kind: g("%s/plain/randwrite-4k-qd16" % kind, "cpu_s")
    lines.append("| server CPU s during plain 4k randwrite | %s | %s | %s | - | - | - | - |" % tuple(
        "%.1f" % cpu(k) if cpu(k) else "-" for k in ("fleece", "qemu", "nbdkit")))
    exact = {k: R[k].get("exact") for k in R if "/pull/" in k and isinstance(R[k], dict)}
    lines.append("")
    lines.append("Every pull equal to the image at the instant: %s" % (
        "yes" if exact and all(exact.values()) else "NO: %s" % exact))

    t = []
    def target(desc, value, ok):
        t.append("- [%s] %s: %s" % ("x" if ok else " ", desc, value))
    r = ratio(g("fleece/plain/randwrite-4k-qd16", "iops"), g("nbdkit/plain/randwrite-4k-qd16", "iops"))
    target("plain 4k random writes >= 1.0x nbdkit", "%.2fx" % r if r else "n/a", bool(r and r >= 1.0))
    r = ratio(g("fleece/pull/live", "mib_s"), g("qemu/pull/live", "mib_s"))
    target("nbdcopy read of the live disk >= 1.0x qemu", "%.2fx" % r if r else "n/a", bool(r and r >= 1.0))
    r = ratio(g("fleece/snapshot/randwrite-4k-qd16", "iops"), g("qemu/snapshot/randwrite-4k-qd16", "iops"))
    target("4k random writes during a fresh snapshot >= 2x qemu", "%.2fx" % r if r else "n/a", bool(r and r >= 2))
    r = ratio(g("fleece/snapshot/randwrite-4k-qd16", "iops"), g("fleece/plain/randwrite-4k-qd16", "iops"))
    target("... and >= 0.5x fleece's own plain speed", "%.2fx" % r if r else "n/a", bool(r and r >= 0.5))
    for under in ("idle", "under-writes"):
        r = ratio(g("fleece/pull/" + under, "mib_s"), g("qemu/pull/" + under, "mib_s"))
        target("view pull %s >= 1.2x qemu" % under, "%.2fx" % r if r else "n/a", bool(r and r >= 1.2))
    r = ratio(g("fleece/snapshot/randwrite-4k-qd16", "p99_us"), g("qemu/snapshot/randwrite-4k-qd16", "p99_us"))
    target("p99 write latency during a snapshot <= 0.5x qemu", "%.2fx" % r if r else "n/a", bool(r and r <= 0.5))
    m = max(rss) if rss else None
    target("peak RSS <= 64 MiB serving a 1 GiB disk with a file store", "%.1f MiB" % m if m else "n/a", bool(m and m <= 64))
    return "\n".join(lines), "\n".join(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs on a 256 MiB image (smoke check)")
    ap.add_argument("--only", default="fleece,qemu,nbdkit,limit")
    ap.add_argument("--fleece-bin", default=os.path.join(ROOT, "target", "release", "fleece"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--markdown", help="also write the table and targets to this file")
    ap.add_argument("--repeat", type=int, default=3, help="idle pulls per measurement (median is kept)")
    opts = ap.parse_args()
    opts.only = [k.strip() for k in opts.only.split(",") if k.strip()]
    opts.size = (256 << 20) if opts.quick else (1 << 30)
    opts.runtime = 3 if opts.quick else 10
    probe = subprocess.run(["fio", "--name=p", "--ioengine=io_uring", "--filename=/dev/shm/.fleece-probe", "--size=4k",
                            "--rw=read", "--output=/dev/null"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.unlink("/dev/shm/.fleece-probe")
    except OSError:
        pass
    opts.limit_engine = "io_uring" if probe.returncode == 0 else "psync"
    if not opts.no_build and "fleece" in opts.only:
        log("building fleece (release)")
        run(["cargo", "build", "--release", "-p", "fleece"], timeout=1800, cwd=ROOT)
    b = Bench(opts)

    def on_signal(*_):
        b.cleanup()
        sys.exit(130)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        b.go()
    finally:
        b.cleanup()
    table, targets = report(b.results, opts)
    machine = "%s, %d CPUs, %s, kernel %s" % (platform.machine(), os.cpu_count(), "quick" if opts.quick else "full",
                                              platform.release())
    print(table)
    print()
    print(targets)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "latest.json"), "w") as f:
        json.dump({"machine": machine, "image_bytes": opts.size, "runtime_s": opts.runtime,
                   "limit_engine": opts.limit_engine, "results": b.results}, f, indent=2)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write("Machine: %s; image %d MiB in /dev/shm; fio runs of %d s.\n\n%s\n\n%s\n" % (
                machine, opts.size >> 20, opts.runtime, table, targets))


if __name__ == "__main__":
    main()
