#!/usr/bin/env python3
"""Push-backup benchmark: fleece's backup jobs against qemu-storage-daemon's
blockdev-backup, in one run, on the same 1 GiB image in /dev/shm.

  guest under a slow target   fio 4 KiB random writes QD16 on the live disk
                              while a full backup pushes to an NBD target that
                              nbdkit's rate filter throttles (rate=50M, bits/s):
                              fleece (default copy order, and --order offset),
                              qemu straight from the disk ("direct"), qemu
                              from a snapshot-access node over a local
                              copy-before-write store (Proxmox's fleecing),
                              and both with no backup running (the baseline)
  full push to a file         a whole 1 GiB disk of random data to a raw file
                              on /dev/shm, nothing else running: MiB/s

Ratios: guest IOPS during the push against the same server with no backup
(target: fleece at least 0.8x, p99 at most 3 ms); full push fleece/qemu
(target: at least 1.5x).

usage: python3 bench/push.py [--rounds N] [--seconds S] [--size-mib M]
                             [--fleece-bin PATH] [--update-benchmarks]
Also run by `python3 bench/run.py --push`.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as common  # noqa: E402  (the helpers of bench/run.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench/push.py: begin generated -->", "<!-- bench/push.py: end generated -->"
GUEST_KINDS = ["fleece-none", "fleece-push", "fleece-push-offset", "qemu-none", "qemu-direct", "qemu-fleecing"]


class Qmp:
    def __init__(self, path, timeout=30):
        end = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise common.StepError("no QMP socket at %s" % path)
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "error" in r:
                raise common.StepError("QMP %s: %s" % (name, r["error"]))
            if "return" in r:
                return r["return"]

    def close(self):
        self.s.close()


class Push:
    def __init__(self, opts):
        self.opts = opts
        self.size = opts.size_mib << 20
        self.dir = tempfile.mkdtemp(prefix="fleece-push-bench-", dir="/dev/shm")
        self.n = 0
        self.golden = self.path("golden.raw")
        with open("/dev/urandom", "rb") as src, open(self.golden, "wb") as dst:
            left = self.size
            while left:
                chunk = src.read(min(left, 8 << 20))
                dst.write(chunk)
                left -= len(chunk)
        self.image = self.path("disk.raw")

    def path(self, name):
        return os.path.join(self.dir, name)

    def fresh_image(self):
        shutil.copyfile(self.golden, self.image)

    def counter(self):
        self.n += 1
        return self.n

    def slow_target(self):
        sock = self.path("tgt%d.sock" % self.counter())
        log = self.path("nbdkit%d.log" % self.n)
        p = common.spawn(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--filter=rate", "memory",
                          str(self.size), "rate=%s" % self.opts.rate], log)
        common.wait_socket(sock, p, log, 30)
        return p, "nbd+unix:///?socket=%s" % sock

    def fleece(self):
        n = self.counter()
        ctl, sock = self.path("f%d-ctl.sock" % n), self.path("f%d.sock" % n)
        log = self.path("fleece%d.log" % n)
        p = common.spawn([self.opts.fleece_bin, "serve", "--disk", "disk=" + self.image, "--nbd", "unix:" + sock,
                          "--control", ctl, "--state-dir", self.path("f%d-state" % n), "--log-level", "warn"], log)
        common.wait_socket(ctl, p, log, 30)
        return p, ctl, "nbd+unix:///disk?socket=%s" % sock

    def fcli(self, ctl, *args, timeout=120):
        _, out, _ = common.run([self.opts.fleece_bin, *args, "--control", ctl], timeout=timeout)
        return out

    def qsd(self, extra=()):
        n = self.counter()
        sock, qmp = self.path("q%d.sock" % n), self.path("q%d-qmp.sock" % n)
        log = self.path("qsd%d.log" % n)
        p = common.spawn(["qemu-storage-daemon",
                          "--blockdev", "file,node-name=f,filename=%s,aio=threads" % self.image,
                          "--blockdev", "raw,node-name=disk,file=f",
                          "--nbd-server", "addr.type=unix,addr.path=%s,max-connections=0" % sock,
                          "--chardev", "socket,id=qmp,path=%s,server=on,wait=off" % qmp,
                          "--monitor", "chardev=qmp", *extra], log)
        common.wait_socket(sock, p, log, 30)
        return p, Qmp(qmp), "nbd+unix:///disk?socket=%s" % sock

    def fio(self, uri):
        _, out, _ = common.run(["fio", "--name=g", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bs=4k",
                                "--iodepth=16", "--size=%d" % self.size, "--runtime=%d" % self.opts.seconds,
                                "--time_based", "--output-format=json"], timeout=self.opts.seconds + 120)
        return common.parse_fio(out, "randwrite")

    def guest(self, kind):
        """Guest write numbers while `kind` runs."""
        self.fresh_image()
        procs = []
        try:
            if kind.startswith("fleece"):
                p, ctl, uri = self.fleece()
                procs.append(p)
                if kind != "fleece-none":
                    t, turi = self.slow_target()
                    procs.append(t)
                    order = "offset" if kind.endswith("offset") else "hinted"
                    self.fcli(ctl, "backup", "start", "disk", "--target", turi, "--name", "j", "--order", order)
                peak = [0]

                def sample():
                    if kind == "fleece-none":
                        return
                    j = json.loads(self.fcli(ctl, "backup", "show", "j", "--json"))
                    peak[0] = max(peak[0], j["disks"][0]["store_used_bytes"])
                r = self.fio_sampling(uri, sample)
                r["store_peak_mib"] = peak[0] / 2**20 if kind != "fleece-none" else None
                if kind != "fleece-none":
                    j = json.loads(self.fcli(ctl, "backup", "show", "j", "--json"))
                    r["pushed_mib"] = j["done_bytes"] / 2**20
                    if j["state"] in ("failed",):
                        raise common.StepError("fleece job failed: %s" % j.get("error"))
                    self.fcli(ctl, "backup", "cancel", "j", timeout=60)
                return r
            extra = []
            if kind == "qemu-fleecing":
                tmp = self.path("tmp%d.raw" % self.counter())
                with open(tmp, "wb") as f:
                    f.truncate(self.size)
                extra = ["--blockdev", "file,node-name=tf,filename=%s" % tmp,
                         "--blockdev", "raw,node-name=tmp,file=tf",
                         "--blockdev", "copy-before-write,node-name=cbw,file=disk,target=tmp",
                         "--blockdev", "snapshot-access,node-name=snap,file=cbw",
                         "--export", "nbd,id=e,node-name=cbw,name=disk,writable=on"]
            else:
                extra = ["--export", "nbd,id=e,node-name=disk,name=disk,writable=on"]
            p, q, uri = self.qsd(extra)
            procs.append(p)
            if kind != "qemu-none":
                t, turi = self.slow_target()
                procs.append(t)
                sock = turi.split("socket=")[1]
                q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
                      server={"type": "unix", "path": sock})
                q.cmd("blockdev-backup", **{"job-id": "j"}, device="snap" if kind == "qemu-fleecing" else "disk",
                      target="tgt", sync="full")
            peak = [0]
            tmpfile = extra[1].split("filename=")[1] if kind == "qemu-fleecing" else None

            def sample():
                if tmpfile:
                    peak[0] = max(peak[0], os.stat(tmpfile).st_blocks * 512)
            r = self.fio_sampling(uri, sample)
            r["store_peak_mib"] = peak[0] / 2**20 if tmpfile else None
            if kind != "qemu-none":
                jobs = q.cmd("query-block-jobs")
                r["pushed_mib"] = jobs[0]["offset"] / 2**20 if jobs else None
            q.close()
            return r
        finally:
            for p in procs:
                common.stop(p, timeout=20)

    def fio_sampling(self, uri, sample):
        """fio in the foreground; `sample` called twice a second meanwhile."""
        import threading
        done = threading.Event()
        errs = []

        def loop():
            while not done.wait(0.5):
                try:
                    sample()
                except Exception as e:  # noqa: BLE001  (reported with the result)
                    errs.append(str(e))
        th = threading.Thread(target=loop)
        th.start()
        try:
            r = self.fio(uri)
        finally:
            done.set()
            th.join()
        if errs:
            r["sample_errors"] = errs[:3]
        return r

    def full_push(self, kind):
        """Seconds to push the whole disk to a new raw file."""
        self.fresh_image()
        target = self.path("target%d.raw" % self.counter())
        if kind == "fleece":
            p, ctl, _ = self.fleece()
            try:
                self.fcli(ctl, "backup", "start", "disk", "--target", "file:" + target, "--name", "full", "--wait",
                          timeout=600)
                # The job's own clock, from just after its instant to its end
                # (planning and the final flush included; not the CLI's
                # polling, nor starting the CLI).
                secs = json.loads(self.fcli(ctl, "backup", "show", "full", "--json"))["elapsed_secs"]
            finally:
                common.stop(p)
        else:
            with open(target, "wb") as f:
                f.truncate(self.size)
            p, q, _ = self.qsd(["--blockdev", "file,node-name=tf,filename=%s,aio=threads" % target,
                                "--blockdev", "raw,node-name=tgt,file=tf"])
            try:
                t = time.time()
                q.cmd("blockdev-backup", **{"job-id": "j"}, device="disk", target="tgt", sync="full")
                while any(j.get("device") == "j" or j.get("id") == "j" for j in q.cmd("query-block-jobs")):
                    time.sleep(0.01)
                secs = time.time() - t
                q.close()
            finally:
                common.stop(p)
        equal, detail = common.same_file(target, self.golden, 120)
        os.unlink(target)
        if not equal:
            raise common.StepError("%s's full push differs from the disk: %s" % (kind, detail))
        return {"secs": secs, "mib_s": self.size / 2**20 / secs}

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(opts):
    rounds = []
    for i in range(opts.rounds):
        b = Push(opts)
        try:
            r = {"guest": {}, "full": {}}
            kinds = GUEST_KINDS if i % 2 == 0 else list(reversed(GUEST_KINDS))
            for k in kinds:
                common.log("round %d: guest writes, %s" % (i + 1, k))
                try:
                    r["guest"][k] = b.guest(k)
                except common.StepError as e:
                    r["guest"][k] = {"error": str(e)}
            for k in ("fleece", "qemu") if i % 2 == 0 else ("qemu", "fleece"):
                common.log("round %d: full push, %s" % (i + 1, k))
                try:
                    r["full"][k] = b.full_push(k)
                except common.StepError as e:
                    r["full"][k] = {"error": str(e)}
            rounds.append(r)
        finally:
            b.close()
    return rounds


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def report(rounds, opts):
    def g(kind, key):
        return med([r["guest"].get(kind, {}).get(key) for r in rounds])

    def fmt(v, f="%.0f"):
        return "n/a" if v is None else f % v
    lines = ["### Push backup (bench/push.py)", "",
             "%d round(s), %d MiB disk in /dev/shm, guest fio 4 KiB random writes QD16 for %d s; "
             "target NBD behind nbdkit rate=%s (bits/s). Medians." % (len(rounds), opts.size_mib, opts.seconds,
                                                                       opts.rate), "",
             "| scenario | guest IOPS | vs same server, no backup | p99 µs | store peak MiB | pushed MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for k in GUEST_KINDS:
        base = g("fleece-none" if k.startswith("fleece") else "qemu-none", "iops")
        iops = g(k, "iops")
        ratio = iops / base if iops and base else None
        lines.append("| %s | %s | %s | %s | %s | %s |" % (k, fmt(iops), fmt(ratio, "%.2fx"), fmt(g(k, "p99_us")),
                                                       fmt(g(k, "store_peak_mib"), "%.1f"),
                                                       fmt(g(k, "pushed_mib"), "%.1f")))
    ff = med([r["full"].get("fleece", {}).get("mib_s") for r in rounds])
    fq = med([r["full"].get("qemu", {}).get("mib_s") for r in rounds])
    lines += ["", "| full push of the disk to a raw file | MiB/s |", "| --- | ---: |",
              "| fleece | %s |" % fmt(ff), "| qemu blockdev-backup | %s |" % fmt(fq),
              "| ratio fleece/qemu | %s |" % fmt(ff / fq if ff and fq else None, "%.2fx"), ""]
    fp, fn = g("fleece-push", "iops"), g("fleece-none", "iops")
    p99 = g("fleece-push", "p99_us")
    targets = [("guest IOPS during a push to a 50 Mbit/s target >= 0.8x no backup",
                fp and fn and fp / fn >= 0.8),
               ("p99 during that push <= 3 ms", p99 is not None and p99 <= 3000),
               ("full push >= 1.5x qemu", ff and fq and ff / fq >= 1.5)]
    for what, ok in targets:
        lines.append("- %s: %s" % (what, "PASS" if ok else "FAIL"))
    errs = [(i + 1, sec, k, v["error"]) for i, r in enumerate(rounds) for sec in ("guest", "full")
            for k, v in r[sec].items() if "error" in v]
    for i, sec, k, e in errs:
        lines.append("- round %d %s %s: n/a (%s)" % (i, sec, k, e))
    per = ["- per round, fleece-push/fleece-none IOPS: " + ", ".join(
        fmt((r["guest"].get("fleece-push", {}).get("iops") or 0) / (r["guest"].get("fleece-none", {}).get("iops") or 1),
            "%.2fx") for r in rounds),
           "- per round, full push fleece/qemu: " + ", ".join(
        fmt((r["full"].get("fleece", {}).get("mib_s") or 0) / (r["full"].get("qemu", {}).get("mib_s") or 1), "%.2fx")
        for r in rounds)]
    return "\n".join(lines + per) + "\n"


def update_benchmarks(text):
    path = os.path.join(ROOT, "BENCHMARKS.md")
    with open(path) as f:
        doc = f.read()
    block = BEGIN + "\n" + text + END
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rate", default="50M")
    ap.add_argument("--fleece-bin", default=os.path.join(ROOT, "target", "release", "fleece"))
    ap.add_argument("--update-benchmarks", action="store_true")
    opts = ap.parse_args(argv)
    if not os.path.exists(opts.fleece_bin):
        common.run(["cargo", "build", "--release", "--bin", "fleece"], timeout=1800, cwd=ROOT)
    try:
        rounds = measure(opts)
    finally:
        common.stop_all()
    text = report(rounds, opts)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "push-latest.json"), "w") as f:
        json.dump({"rounds": rounds, "opts": vars(opts)}, f, indent=1)
    if opts.update_benchmarks:
        update_benchmarks(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
