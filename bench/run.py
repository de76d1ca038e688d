#!/usr/bin/env python3
"""fleece benchmark: identical workloads, in one run, against

  fleece              fleece serve + fleece snapshot create (file store)
  qemu                qemu-storage-daemon: copy-before-write + snapshot-access
                      for snapshots, a plain raw export otherwise
  nbdkit              nbdkit's file plugin (plain export only)
  null                nbdkit's null plugin (plain fio steps only): writes are
                      dropped, reads return zeroes, no I/O at all: nbdkit's
                      request handling without storage, the "client limit"
                      column (a server cheaper per request can beat it)
  limit               fio straight on the image file (io_uring, else libaio,
                      else psync) and nbdcopy from the file: the machine's limit

and, over TLS (TCP on 127.0.0.1, certificates made with the openssl CLI),
fleece against qemu-nbd with --tls-creds.

Images, stores, pulled copies and Unix sockets live in one temp dir under
/dev/shm, removed at the end (also on Ctrl-C and errors). Every measurement
starts a fresh server process. A step that fails is reported as "n/a" with
its reason and the run goes on.

Sections: "raw" (everything above, on a raw image), "push" (bench/push.py:
push backups against qemu-storage-daemon's blockdev-backup) and "qcow2" (fleece
and qemu-storage-daemon serving the same qcow2 image, 64 KiB clusters: 4 KiB
random writes and reads on an allocated image, allocating writes on a fresh
one, writes during a fresh snapshot). --sections picks them (default all).

Output: the report (Markdown tables, ratios, pass/fail targets) on stdout,
bench/results/latest.json, and optionally --markdown FILE and
--update-benchmarks (rewrites the generated parts of BENCHMARKS.md: one per
section that ran).

usage: python3 bench/run.py [--quick] [--only fleece,qemu,nbdkit,null,limit]
                            [--sections raw,qcow2,push] [--fleece-bin PATH]
                            [--rounds N] [--markdown FILE] [--update-benchmarks]
"""
import argparse
import ctypes
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHM = "/dev/shm"
TICK = os.sysconf("SC_CLK_TCK")
KINDS = ("fleece", "qemu", "nbdkit", "null", "limit")
LABEL = {"fleece": "fleece", "qemu": "qemu-storage-daemon", "nbdkit": "nbdkit", "null": "nbdkit null (client limit)",
         "limit": "limit"}
SNAPSHOT_KINDS = ("fleece", "qemu")
# nbdkit null serves no data (reads are zeroes): the plain fio steps only, no pulls
PULL_KINDS = ("fleece", "qemu", "nbdkit", "limit")
BEGIN, END = "<!-- bench/run.py: begin generated -->", "<!-- bench/run.py: end generated -->"
SECTIONS = ("raw", "qcow2", "push")
# generated blocks of BENCHMARKS.md, per section
MARKERS = {"raw": (BEGIN, END),
           "qcow2": ("<!-- bench/run.py: begin generated qcow2 -->", "<!-- bench/run.py: end generated qcow2 -->")}
QCOW2_KINDS = ("fleece", "qemu")
QCOW2_CLUSTER = 65536

# key, fio rw, block size, queue depth, headline unit, description
FIO = [
    ("randwrite-4k-qd16", "randwrite", "4k", 16, "IOPS", "4 KiB random writes QD16"),
    ("seqwrite-1m-qd4", "write", "1M", 4, "MiB/s", "1 MiB sequential writes QD4"),
    ("randread-4k-qd16", "randread", "4k", 16, "IOPS", "4 KiB random reads QD16"),
]
RANDWRITE, RANDREAD = FIO[0], FIO[2]
# qcow2 section: (key, image state, snapshot, workload, description)
QCOW2 = [
    ("qcow2-allocated/randwrite-4k-qd16", "allocated", False, RANDWRITE,
     "4 KiB random writes QD16, allocated image"),
    ("qcow2-allocated/randread-4k-qd16", "allocated", False, RANDREAD, "4 KiB random reads QD16, allocated image"),
    ("qcow2-fresh/randwrite-4k-qd16", "fresh", False, RANDWRITE,
     "4 KiB random writes QD16, fresh image (allocating)"),
    ("qcow2-snapshot/randwrite-4k-qd16", "allocated", True, RANDWRITE,
     "4 KiB random writes QD16, allocated image, fresh snapshot"),
]


# Over TLS: fleece and qemu-nbd, fio's nbd engine on nbds:// (TCP loopback).
TLS_KINDS = ("fleece", "qemu")
TLS_FIO = [
    ("tls-seqread-1m-qd4", "read", "1M", 4, "MiB/s", "1 MiB sequential reads QD4 over TLS"),
    ("tls-randwrite-4k-qd16", "randwrite", "4k", 16, "IOPS", "4 KiB random writes QD16 over TLS"),
]


class StepError(Exception):
    """A measurement step failed; the message is the reason shown in the report."""


def log(msg):
    print("[%6.1fs] %s" % (time.time() - T0, msg), file=sys.stderr, flush=True)


T0 = time.time()

# ---------------------------------------------------------------- processes
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _LIBC = None
CHILDREN = []  # every long-lived process we started and have not reaped


def _child_setup():
    # Die with us even if we are SIGKILLed (PR_SET_PDEATHSIG = 1).
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM, 0, 0, 0)


def tail(text, n=400):
    text = (text or "").strip().replace("\n", " | ")
    return text[-n:]


def file_tail(path, n=400):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            return tail(f.read().decode(errors="replace"), n)
    except OSError:
        return ""


def run(cmd, timeout, ok=(0,), cwd=None, env=None):
    """Run cmd to completion in its own process group, killing the whole group
    on timeout or on any exception (Ctrl-C). Returns (rc, stdout, stderr)."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=cwd, env=env, start_new_session=True, preexec_fn=_child_setup)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(p)
        p.communicate()
        raise StepError("%s timed out after %d s" % (os.path.basename(cmd[0]), timeout))
    except BaseException:
        _killpg(p)
        p.wait()
        raise
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    if ok is not None and p.returncode not in ok:
        raise StepError("%s exited %d: %s" % (os.path.basename(cmd[0]), p.returncode, tail(err or out)))
    return p.returncode, out, err


def spawn(cmd, log_path, stdout_path=None):
    """Start a long-lived process (server, background writer) with its output in files."""
    lf = open(log_path, "ab")
    of = open(stdout_path, "wb") if stdout_path else lf
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=of, stderr=lf,
                             start_new_session=True, preexec_fn=_child_setup)
    finally:
        lf.close()
        if stdout_path:
            of.close()
    CHILDREN.append(p)
    return p


def _killpg(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass


def stop(p, sig=signal.SIGTERM, timeout=20):
    """Stop a spawned process: sig, then SIGKILL to its group. Returns its exit code."""
    if getattr(p, "bench_stopped", False):
        return p.returncode
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(p)
            p.wait(timeout=10)
    _killpg(p)  # helpers it may have forked (fio's job processes)
    p.bench_stopped = True
    if p in CHILDREN:
        CHILDREN.remove(p)
    return p.returncode


def stop_all():
    for p in list(CHILDREN):
        try:
            stop(p, timeout=5)
        except Exception:
            _killpg(p)


def proc_stats(pid):
    """(peak RSS bytes, CPU seconds) of a live process: VmHWM, utime+stime."""
    rss = None
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) * 1024
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError as e:
        raise StepError("server process %d is gone (%s)" % (pid, e))
    return rss, (int(fields[11]) + int(fields[12])) / TICK


def server_said(log_path, n=300):
    """The tail of a server's log, without the command line written at its top."""
    try:
        with open(log_path, errors="replace") as f:
            return tail(f.read().partition("\n")[2], n)
    except OSError:
        return ""


def wait_socket(path, proc, log_path, timeout):
    """Waits until the server accepts on path: a Unix socket, or (host, port)."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise StepError("the server exited with %s at start: %s" % (proc.returncode,
                                                                       server_said(log_path) or "(no output)"))
        s = socket.socket(socket.AF_INET if isinstance(path, tuple) else socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise StepError("the server did not listen on %s within %d s: %s" % (
        path if isinstance(path, tuple) else os.path.basename(path), timeout, server_said(log_path) or "(no output)"))


def same_file(a, b, timeout):
    """(equal, detail) using cmp."""
    rc, out, err = run(["cmp", a, b], timeout=timeout, ok=None)
    if rc == 0:
        return True, "equal"
    if rc == 1:
        return False, tail(out, 200)
    raise StepError("cmp failed: " + tail(err))


def allocated(path, pid=None):
    """Bytes that the file at path takes, plus (with pid) those of the
    unnamed files that process holds open in the same directory (fleece's
    file store spreads over the named file and unnamed parts)."""
    try:
        total = os.stat(path).st_blocks * 512
    except OSError:
        return None
    if pid is not None:
        fd_dir = "/proc/%d/fd" % pid
        prefix = os.path.dirname(os.path.abspath(path)) + "/#"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(os.path.join(fd_dir, fd)).startswith(prefix):
                        total += os.stat(os.path.join(fd_dir, fd)).st_blocks * 512
                except OSError:
                    pass
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- servers
class Server:
    def __init__(self, bench, kind, cmd, sock, ready_path, live):
        self.bench, self.kind, self.sock, self.live_name = bench, kind, sock, live
        self.view_name = None
        self.info = {}
        self.log = bench.path("%s-%d.log" % (kind, bench.counter()))
        with open(self.log, "w") as f:
            f.write("$ %s\n" % " ".join(shlex.quote(c) for c in cmd))
        self.proc = spawn(cmd, self.log)
        try:
            wait_socket(ready_path, self.proc, self.log, bench.opts.ready_timeout)
        except BaseException:
            self.stop()
            raise

    def uri(self, name):
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)

    @property
    def live(self):
        return self.uri(self.live_name)

    @property
    def view(self):
        return self.uri(self.view_name)

    def stats(self):
        if self.proc.poll() is not None:
            raise StepError("server died (exit %s): %s" % (self.proc.returncode, server_said(self.log)))
        return proc_stats(self.proc.pid)

    def before_stop(self):
        pass

    def explain(self, err):
        """err with what the server said (and whether it died), for the report."""
        msg = str(err)
        if "the server exited" in msg or "did not listen" in msg:
            return err
        if self.proc.poll() is not None and "server died" not in msg:
            msg += "; the server exited with %s" % self.proc.returncode
        said = server_said(self.log)
        if said:
            msg += "; server log: " + said
        return StepError(msg)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.before_stop()
            except StepError as e:
                self.bench.note("%s: %s" % (self.kind, e))
        graceful = self.proc.poll() is None
        rc = stop(self.proc)
        ok = (0,) if self.kind == "fleece" else (0, -signal.SIGTERM)  # fleece: exit 0 (CONTRACT.md)
        if graceful and rc not in ok:
            self.bench.note("%s exited with %s on SIGTERM%s: %s" % (
                self.kind, rc, " (killed after 20 s)" if rc == -signal.SIGKILL else "", server_said(self.log, 200)))
        return rc


class FleeceServer(Server):
    def __init__(self, bench, store_path=None, image=None):
        n = bench.counter()
        self.bin = bench.fleece_bin
        self.ctl = bench.path("f%d-ctl.sock" % n)
        sock = bench.path("f%d.sock" % n)
        # the format (raw or qcow2) is detected
        cmd = [self.bin, "serve", "--disk", "disk=" + (image or bench.image), "--nbd", "unix:" + sock,
               "--control", self.ctl, "--state-dir", bench.path("f%d-state" % n), "--log-level", "warn"]
        super().__init__(bench, "fleece", cmd, sock, self.ctl, "disk")
        self.store = store_path

    def snapshot(self):
        t = time.time()
        run([self.bin, "snapshot", "create", "disk", "--name", "s", "--control", self.ctl,
             "--store", "file:" + self.store, "--json"], timeout=60)
        self.info["snapshot_create_s"] = time.time() - t
        self.view_name = "disk@s"

    def snapshot_state(self):
        """Copied clusters and store use; raises if the snapshot broke."""
        _, out, _ = run([self.bin, "snapshot", "show", "disk@s", "--control", self.ctl, "--json"], timeout=30)
        s = json.loads(out)
        self.info.update({"copied_clusters": s.get("copied_clusters"), "cluster_size": s.get("cluster_size"),
                          "store_used_bytes": (s.get("store") or {}).get("used_bytes"),
                          "snapshot_state": s.get("state")})
        if s.get("state") != "active":
            raise StepError("fleece snapshot state %s: %s" % (s.get("state"), s.get("error")))

    def before_stop(self):
        if self.view_name:
            run([self.bin, "snapshot", "delete", "disk@s", "--control", self.ctl], timeout=60)


def qemu_server(bench, snapshot, store_path=None, image=None, fmt="raw"):
    n = bench.counter()
    sock = bench.path("q%d.sock" % n)
    aio = bench.opts.qemu_aio
    cmd = ["qemu-storage-daemon",
           "--blockdev", "file,node-name=f,filename=%s,aio=%s" % (image or bench.image, aio),
           "--blockdev", "%s,node-name=d,file=f" % fmt,
           "--nbd-server", "addr.type=unix,addr.path=%s,max-connections=0" % sock]
    if snapshot:
        with open(store_path, "wb") as f:  # the store must exist with the disk's size
            f.truncate(bench.size)
        cmd += ["--blockdev", "file,node-name=tf,filename=%s,aio=%s" % (store_path, aio),
                "--blockdev", "raw,node-name=t,file=tf",
                "--blockdev", "copy-before-write,node-name=cbw,file=d,target=t",
                "--blockdev", "snapshot-access,node-name=snap,file=cbw",
                "--export", "nbd,id=e0,node-name=cbw,name=disk,writable=on",
                "--export", "nbd,id=e1,node-name=snap,name=snap"]
    else:
        cmd += ["--export", "nbd,id=e0,node-name=d,name=disk,writable=on"]
    srv = Server(bench, "qemu", cmd, sock, sock, "disk")
    if snapshot:
        srv.view_name = "snap"
    return srv


def free_port():
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def tls_server(bench, kind):
    """fleece or qemu-nbd serving the image over TLS on 127.0.0.1 (server
    certificate only: fio's nbd engine cannot point libnbd at a client
    certificate directory)."""
    pki = bench.pki()
    port = free_port()
    n = bench.counter()
    if kind == "fleece":
        ctl = bench.path("tf%d-ctl.sock" % n)
        cmd = [bench.fleece_bin, "serve", "--disk", "disk=" + bench.image, "--nbd", "tcp:127.0.0.1:%d" % port,
               "--control", ctl, "--state-dir", bench.path("tf%d-state" % n), "--log-level", "warn",
               "--tls-cert", os.path.join(pki, "server-cert.pem"), "--tls-key", os.path.join(pki, "server-key.pem")]
        ready = ctl
    else:
        cmd = ["qemu-nbd", "--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=server,verify-peer=off" % pki,
               "--tls-creds", "tls0", "-b", "127.0.0.1", "-p", str(port), "-x", "disk", "-f", "raw",
               "--shared=0", "--persistent", bench.image]
        ready = ("127.0.0.1", port)
    srv = Server(bench, kind, cmd, None, ready, "disk")
    srv.uri = lambda name: "nbds://localhost:%d/%s" % (port, name)
    return srv


def make_pki(d):
    """A CA, and a server certificate for localhost signed by it, with the
    key usages qemu wants: d/ca-cert.pem, server-cert.pem, server-key.pem."""
    os.makedirs(d)
    ossl = lambda *a: run(["openssl"] + list(a), timeout=60, cwd=d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30",
         "-subj", "/O=fleece bench/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ossl("req", *ec, "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/O=fleece bench/CN=localhost")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
         "-out", "server-cert.pem", "-days", "30", "-extfile", "server.ext")
    return d


def nbdkit_server(bench):
    sock = bench.path("k%d.sock" % bench.counter())
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "file", "file=" + bench.image]
    return Server(bench, "nbdkit", cmd, sock, sock, "")


def null_server(bench):
    """nbdkit's null plugin: accepts every write and drops it, reads return
    zeroes; no I/O at all: what fio's nbd engine gets from nbdkit's request
    handling alone."""
    sock = bench.path("z%d.sock" % bench.counter())
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "null", "size=%d" % bench.size]
    return Server(bench, "null", cmd, sock, sock, "")


# ---------------------------------------------------------------- fio
def parse_fio(out, rw):
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise StepError("fio printed no JSON: " + tail(out))
    if job.get("error"):
        raise StepError("fio job error %s" % job.get("error"))
    side = job["write"] if "write" in rw else job["read"]
    if not side.get("total_ios"):
        raise StepError("fio did no I/O")
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / 2**20, "ios": side["total_ios"],
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "p999_us": pct.get("99.900000", 0) / 1000,
            "client_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0)}


def read_iops_log(prefix):
    """[(t_ms, iops)] from fio's averaged IOPS log (PREFIX_iops.1.log)."""
    rows = []
    path = prefix + "_iops.1.log"
    try:
        with open(path) as f:
            for line in f:
                parts = [x.strip() for x in line.split(",")]
                if len(parts) >= 2:
                    rows.append((int(parts[0]), float(parts[1])))
    except (OSError, ValueError):
        pass
    return rows


def window_rate(rows, t0_ms, t1_ms, avg_ms):
    """Mean IOPS of the log windows inside [t0, t1] (each row closes a window of avg_ms)."""
    vals = [v for t, v in rows if t - avg_ms >= t0_ms - avg_ms / 2 and t <= t1_ms + avg_ms / 2]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------- the bench
class Bench:
    def __init__(self, opts):
        self.opts = opts
        self.size = opts.size
        self.tmp = tempfile.mkdtemp(prefix="fleece-bench-%d-" % os.getpid(), dir=SHM)
        self.image = self.path("disk.raw")
        self.reference = self.path("reference.raw")
        self.pulled = self.path("pulled.raw")
        self.fleece_bin = opts.fleece_bin
        self.results = {}  # key -> list of per-round dicts
        self.skip = {}  # kind -> reason every remaining step of that kind is n/a
        self.start_failures = {}
        self.notes = []  # things that went wrong without spoiling a measurement
        self._n = 0

    def counter(self):
        self._n += 1
        return self._n

    def note(self, text):
        if text not in self.notes:
            self.notes.append(text)
            log("note: " + text)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def pki(self):
        """The TLS credentials, made on first use."""
        d = self.path("pki")
        if not os.path.exists(os.path.join(d, "server-cert.pem")):
            if not shutil.which("openssl"):
                raise StepError("openssl is not installed (it makes the TLS certificates)")
            shutil.rmtree(d, ignore_errors=True)
            make_pki(d)
        return d

    def cleanup(self):
        stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- helpers
    def fill(self):
        log("filling a %d MiB image in %s with random data" % (self.size >> 20, self.tmp))
        with open(self.image, "wb") as f:
            left = self.size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n

    def take_reference(self):
        """The image at the instant: copied while nothing writes."""
        shutil.copyfile(self.image, self.reference)

    def server(self, kind, snapshot=False, reference=False, image=None, fmt="raw"):
        if kind in self.skip:
            raise StepError(self.skip[kind])
        store = self.path("%s-store.raw" % kind)
        for p in (store,):
            if os.path.exists(p):
                os.unlink(p)
        try:
            if kind == "fleece":
                srv = FleeceServer(self, store, image)
            elif kind == "qemu":
                if reference:
                    self.take_reference()
                srv = qemu_server(self, snapshot, store, image, fmt)
            elif kind == "nbdkit":
                srv = nbdkit_server(self)
            elif kind == "null":
                srv = null_server(self)
            else:
                raise StepError("no server for " + kind)
        except StepError as e:
            if "the server exited" in str(e) or "did not listen" in str(e):
                self.start_failures[kind] = self.start_failures.get(kind, 0) + 1
                if "the server exited" in str(e) or self.start_failures[kind] >= 2:
                    self.skip[kind] = str(e)  # the same reason (one footnote) for the steps left
                    log("%s failed to start: its remaining steps are skipped" % kind)
            raise
        srv.store = store
        if snapshot and kind == "fleece":
            try:
                if reference:
                    self.take_reference()
                srv.snapshot()
            except BaseException:
                srv.stop()
                raise
        return srv

    def fio(self, target, w, runtime, ramp, nbd=True, iops_log=None, avg_ms=250):
        key, rw, bs, qd = w[:4]
        cmd = ["fio", "--name=job", "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % qd,
               "--size=%d" % self.size, "--runtime=%d" % runtime, "--time_based",
               "--randrepeat=0", "--norandommap", "--output-format=json"]
        if ramp:
            cmd.append("--ramp_time=%d" % ramp)
        if nbd:
            cmd += ["--ioengine=nbd", "--uri=" + target]
        else:
            cmd += ["--ioengine=" + self.opts.limit_engine, "--filename=" + target]
        if iops_log:
            cmd += ["--write_iops_log=" + iops_log, "--log_avg_msec=%d" % avg_ms]
        _, out, err = run(cmd, timeout=runtime + ramp + 90)
        r = parse_fio(out, rw)
        if iops_log:
            rows = read_iops_log(iops_log)
            r["iops_series"] = [round(v) for _, v in rows]
            first = [v for t, v in rows if t <= self.opts.first_window * 1000]
            if first:
                r["first_iops"] = sum(first) / len(first)
        return r

    # ---- steps: each returns a result dict or raises StepError
    def step_fio(self, kind, snapshot, w):
        runtime, ramp = self.opts.runtime, 0 if snapshot else self.opts.ramp
        # A fresh snapshot is measured from its first write: no ramp, or the
        # copy-before-write of the first write to each cluster would hide in it.
        log_prefix = self.path("iops-%d" % self.counter()) if snapshot and w[1] != "randread" else None
        if kind == "limit":
            return self.fio(self.image, w, runtime, ramp, nbd=False)
        srv = self.server(kind, snapshot)
        try:
            _, cpu0 = srv.stats()
            r = self.fio(srv.live, w, runtime, ramp, iops_log=log_prefix)
            rss, cpu1 = srv.stats()
            r["server_rss_mib"], r["server_cpu_s"] = rss / 2**20, cpu1 - cpu0
            if snapshot:
                if kind == "fleece":
                    srv.snapshot_state()
                r["store_allocated_mib"] = (allocated(srv.store, srv.proc.pid) or 0) / 2**20
            r.update(srv.info)
            return r
        except StepError as e:
            raise srv.explain(e)
        finally:
            srv.stop()

    def step_tls(self, kind, w):
        if kind in self.skip:
            raise StepError(self.skip[kind])
        srv = tls_server(self, kind)
        try:
            _, cpu0 = srv.stats()
            r = self.fio(srv.live, w, self.opts.runtime, self.opts.ramp)
            rss, cpu1 = srv.stats()
            r["server_rss_mib"], r["server_cpu_s"] = rss / 2**20, cpu1 - cpu0
            return r
        except StepError as e:
            raise srv.explain(e)
        finally:
            srv.stop()

    def qcow2_image(self, state):
        """The qcow2 image for a step: "allocated" (every cluster allocated:
        qemu-img convert of the random raw image, made once and reused, as
        4 KiB writes allocate nothing in it), or "fresh" (qemu-img create,
        made anew for every measurement). 64 KiB clusters."""
        opts = ["-o", "cluster_size=%d" % QCOW2_CLUSTER]
        if state == "fresh":
            p = self.path("fresh.qcow2")
            if os.path.exists(p):
                os.unlink(p)
            run(["qemu-img", "create", "-q", "-f", "qcow2"] + opts + [p, str(self.size)], timeout=60)
            return p
        p = self.path("allocated.qcow2")
        if not os.path.exists(p):
            log("making the allocated qcow2 image: qemu-img convert of the random raw image")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2"] + opts + [self.image, p], timeout=600)
        return p

    def check_qcow2(self, kind, image):
        """qemu-img check after a server let go of the image: a note if not clean."""
        rc, out, err = run(["qemu-img", "check", image], timeout=120, ok=None)
        if rc != 0:
            self.note("%s: qemu-img check of %s exited %d: %s" % (kind, os.path.basename(image), rc,
                                                                 tail(out + err, 300)))
        return rc == 0

    def step_qcow2(self, kind, state, snapshot, w):
        """fio on a qcow2 image served by fleece or qemu-storage-daemon. Fresh
        images and fresh snapshots are measured from the first write (no ramp,
        which would hide the allocations or copies), with an IOPS log."""
        image = self.qcow2_image(state)
        fresh = state == "fresh" or snapshot
        runtime, ramp = self.opts.runtime, 0 if fresh else self.opts.ramp
        log_prefix = self.path("iops-%d" % self.counter()) if fresh else None
        srv = self.server(kind, snapshot, image=image, fmt="qcow2")
        try:
            _, cpu0 = srv.stats()
            r = self.fio(srv.live, w, runtime, ramp, iops_log=log_prefix)
            rss, cpu1 = srv.stats()
            r["server_rss_mib"], r["server_cpu_s"] = rss / 2**20, cpu1 - cpu0
            if snapshot and kind == "fleece":
                srv.snapshot_state()
            r.update(srv.info)
        except StepError as e:
            raise srv.explain(e)
        finally:
            srv.stop()
        r["qemu_img_check_clean"] = self.check_qcow2(kind, image)
        return r

    def nbdcopy(self, src, dst):
        t = time.time()
        run(["nbdcopy", src, dst], timeout=self.opts.pull_timeout)
        return time.time() - t

    def pulls(self, src, r, reference, repeat):
        """repeat timed pulls to null:, then one to a file compared with reference."""
        times = [self.nbdcopy(src, "null:") for _ in range(repeat)]
        r["null_all_s"] = times
        r["seconds"] = statistics.median(times)
        r["mib_s"] = self.size / 2**20 / r["seconds"]
        if os.path.exists(self.pulled):
            os.unlink(self.pulled)
        s = self.nbdcopy(src, self.pulled)
        r["file_seconds"], r["file_mib_s"] = s, self.size / 2**20 / s
        r["exact"], r["cmp"] = same_file(self.pulled, reference, self.opts.pull_timeout)
        os.unlink(self.pulled)
        return r

    def step_live_pull(self, kind):
        if kind == "limit":
            return self.pulls(self.image, {}, self.image, self.opts.repeat)
        srv = self.server(kind)
        try:
            _, cpu0 = srv.stats()
            r = self.pulls(srv.live, {}, self.image, self.opts.repeat)
            rss, cpu1 = srv.stats()
            r["server_rss_mib"], r["server_cpu_s"] = rss / 2**20, cpu1 - cpu0
            return r
        except StepError as e:
            raise srv.explain(e)
        finally:
            srv.stop()

    def step_view_idle(self, kind):
        srv = self.server(kind, snapshot=True, reference=True)
        try:
            _, cpu0 = srv.stats()
            r = self.pulls(srv.view, {}, self.reference, self.opts.repeat)
            rss, cpu1 = srv.stats()
            r["server_rss_mib"], r["server_cpu_s"] = rss / 2**20, cpu1 - cpu0
            if kind == "fleece":
                srv.snapshot_state()
            r.update(srv.info)
            return r
        except StepError as e:
            raise srv.explain(e)
        finally:
            srv.stop()

    def step_view_writes(self, kind, to_file, rate=None):
        """Fresh snapshot, 4k random writes QD16 on the live disk, one pull of
        the view while they run (to null: for speed, or to a file for the check).
        With `rate`, the writer is held to that many IOPS (fio --rate_iops), so
        both servers serve the same write load and the pull speeds compare."""
        srv = self.server(kind, snapshot=True, reference=True)
        writer = None
        try:
            _, cpu0 = srv.stats()
            prefix = self.path("wlog-%d" % self.counter())
            avg_ms = 100
            n = self.counter()
            wout, wlog = self.path("writer-%d.json" % n), self.path("writer-%d.log" % n)
            writer = spawn(["fio", "--name=load", "--ioengine=nbd", "--uri=" + srv.live, "--rw=randwrite",
                            "--bs=4k", "--iodepth=16", "--size=%d" % self.size, "--runtime=3600", "--time_based",
                            "--randrepeat=0", "--norandommap", "--output-format=json",
                            "--write_iops_log=" + prefix, "--log_avg_msec=%d" % avg_ms, "--log_unix_epoch=1"]
                           + (["--rate_iops=%d" % rate] if rate else []),
                           wlog, stdout_path=wout)
            time.sleep(self.opts.writer_lead)  # the writer is connected and writing
            if writer.poll() is not None:
                raise StepError("the fio writer exited early: " + file_tail(wlog))
            dst = self.pulled if to_file else "null:"
            if to_file and os.path.exists(self.pulled):
                os.unlink(self.pulled)
            t0 = time.time()
            self.nbdcopy(srv.view, dst)
            t1 = time.time()
            rss, cpu1 = srv.stats()
            alive = writer.poll() is None
            stop(writer, sig=signal.SIGINT, timeout=30)
            r = {"seconds": t1 - t0, "mib_s": self.size / 2**20 / (t1 - t0),
                 "server_rss_mib": rss / 2**20, "server_cpu_s": cpu1 - cpu0}
            rows = read_iops_log(prefix)
            r["write_iops"] = window_rate(rows, t0 * 1000, t1 * 1000, avg_ms)
            try:
                with open(wout) as f:
                    wj = parse_fio(f.read(), "randwrite")
                r["writer_total_ios"], r["writer_p99_us"] = wj["ios"], wj["p99_us"]
                if r["write_iops"] is None:
                    r["write_iops"] = wj["iops"]
            except (OSError, StepError) as e:
                r["writer_error"] = str(e)
            if not alive:
                raise StepError("the fio writer died during the pull: " + file_tail(wlog))
            if kind == "fleece":
                srv.snapshot_state()
            r.update(srv.info)
            if to_file:
                r["exact"], r["cmp"] = same_file(self.pulled, self.reference, self.opts.pull_timeout)
                os.unlink(self.pulled)
                # the check means something only if the live disk really moved on
                r["live_changed"] = not same_file(self.image, self.reference, self.opts.pull_timeout)[0]
            return r
        except StepError as e:
            raise srv.explain(e)
        finally:
            if writer is not None:
                stop(writer, sig=signal.SIGINT, timeout=30)
            srv.stop()

    # ---- the plan
    def plan(self):
        """[(key, kind, callable)] in run order: per workload, every server back
        to back, so that the machine's background noise hits them alike."""
        kinds = self.opts.only
        steps = []
        if "qcow2" in self.opts.sections:
            for key, state, snapshot, w, _ in QCOW2:
                for k in kinds:
                    if k in QCOW2_KINDS:
                        steps.append(("%s/%s" % (k, key), k,
                                      lambda k=k, state=state, snapshot=snapshot, w=w: self.step_qcow2(
                                          k, state, snapshot, w)))
        if "raw" not in self.opts.sections:
            return steps
        for w in FIO:
            for k in kinds:
                steps.append(("%s/plain/%s" % (k, w[0]), k, lambda k=k, w=w: self.step_fio(k, False, w)))
        for w in FIO:
            for k in kinds:
                if k in SNAPSHOT_KINDS:
                    steps.append(("%s/snapshot/%s" % (k, w[0]), k, lambda k=k, w=w: self.step_fio(k, True, w)))
        for k in kinds:
            if k in PULL_KINDS:
                steps.append(("%s/pull/live" % k, k, lambda k=k: self.step_live_pull(k)))
        for k in kinds:
            if k in SNAPSHOT_KINDS:
                steps.append(("%s/pull/view-idle" % k, k, lambda k=k: self.step_view_idle(k)))
        for k in kinds:
            if k in SNAPSHOT_KINDS:
                steps.append(("%s/pull/view-writes-null" % k, k, lambda k=k: self.step_view_writes(k, False)))
        for k in kinds:
            if k in SNAPSHOT_KINDS:
                steps.append(("%s/pull/view-rate-null" % k, k,
                              lambda k=k: self.step_view_writes(k, False, self.opts.pull_write_rate)))
        for k in kinds:
            if k in SNAPSHOT_KINDS:
                steps.append(("%s/pull/view-writes-file" % k, k, lambda k=k: self.step_view_writes(k, True)))
        for w in TLS_FIO:
            for k in kinds:
                if k in TLS_KINDS:
                    steps.append(("%s/tls/%s" % (k, w[0]), k, lambda k=k, w=w: self.step_tls(k, w)))
        return steps

    def go(self):
        self.fill()
        steps = self.plan()
        if self.opts.steps:
            want = [x.strip() for x in self.opts.steps.split(",") if x.strip()]
            steps = [s for s in steps if any(x in s[0] for x in want)]
            if not steps:
                raise SystemExit("--steps %s matches no step" % self.opts.steps)
        for rnd in range(self.opts.rounds):
            # alternate who goes first within a workload from round to round
            order = steps if rnd % 2 == 0 else _reverse_within_groups(steps)
            for key, kind, fn in order:
                label = key + ("" if self.opts.rounds == 1 else " (round %d)" % (rnd + 1))
                try:
                    r = fn()
                except StepError as e:
                    r = {"error": str(e)}
                except Exception as e:  # a bug here should not lose the other rows
                    r = {"error": "%s: %s" % (type(e).__name__, e)}
                self.results.setdefault(key, []).append(r)
                log("%-40s %s" % (label, summary(r)))


def _reverse_within_groups(steps):
    """Same workloads in the same order, servers in reverse order within each."""
    out, group, last = [], [], None
    for s in steps:
        g = s[0].split("/", 1)[1]
        if g != last and group:
            out += group[::-1]
            group = []
        group.append(s)
        last = g
    return out + group[::-1]


def summary(r):
    if "error" in r:
        return "n/a: " + r["error"][:200]
    parts = []
    if "iops" in r:
        parts.append("%.0f IOPS %.0f MiB/s p50 %.0f p99 %.0f us" % (r["iops"], r["mib_s"], r["p50_us"], r["p99_us"]))
        if "first_iops" in r:
            parts.append("first %.0f IOPS" % r["first_iops"])
    elif "mib_s" in r:
        parts.append("%.0f MiB/s" % r["mib_s"])
        if r.get("write_iops"):
            parts.append("writes %.0f IOPS" % r["write_iops"])
        if "exact" in r:
            parts.append("exact" if r["exact"] else "MISMATCH " + r.get("cmp", ""))
    if r.get("server_rss_mib"):
        parts.append("rss %.1f MiB cpu %.1f s" % (r["server_rss_mib"], r["server_cpu_s"]))
    return ", ".join(parts)


def aggregate(rounds):
    """Median of the numeric fields over the rounds that succeeded."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return {"error": rounds[0]["error"]}
    if len(good) == 1:
        out = dict(good[0])
    else:
        out = {}
        for k in good[0]:
            vals = [r.get(k) for r in good]
            if all(isinstance(v, bool) for v in vals):
                out[k] = all(vals)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                out[k] = statistics.median(vals)
            else:
                out[k] = vals[0]
        out["rounds"] = good
    errs = [r["error"] for r in rounds if "error" in r]
    if errs:
        out["failed_rounds"] = errs
    return out


# ---------------------------------------------------------------- report
class Report:
    def __init__(self, R, opts, meta, run_notes=()):
        self.R, self.opts, self.meta, self.run_notes = R, opts, meta, list(run_notes)
        self.size = opts.size
        self.notes = []  # footnote reasons, in order
        self.kinds = opts.only
        self.sections = getattr(opts, "sections", None) or ["raw"]

    def ran(self, section):
        return section in self.sections

    def get(self, key, field):
        v = self.R.get(key)
        if not isinstance(v, dict) or "error" in v:
            return None
        x = v.get(field)
        return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    def cell(self, key, field, fmt="%.0f"):
        """The value, '-' when the step is not part of this run, or n/a[N] with a reason."""
        if key is None or key not in self.R:
            return "-"
        v = self.R[key]
        if "error" in v:
            reason = v["error"]
            if reason not in self.notes:
                self.notes.append(reason)
            return "n/a[%d]" % (self.notes.index(reason) + 1)
        x = v.get(field)
        return fmt % x if isinstance(x, (int, float)) else "-"

    @staticmethod
    def ratio(a, b, fmt="%.2fx"):
        return fmt % (a / b) if a and b else "-"

    def throughput(self):
        L = ["| workload | unit | fleece | qemu-storage-daemon | nbdkit | %s | limit (%s) | fleece/qemu "
             "| fleece/nbdkit | fleece/null | fleece/limit |" % (LABEL["null"], self.meta["limit_desc"]),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def row(desc, unit, keys, field, fmt="%.0f"):
            cells = [self.cell(keys.get(k), field, fmt) for k in KINDS]
            f = self.get(keys.get("fleece"), field)
            ratios = [self.ratio(f, self.get(keys.get(k), field)) for k in ("qemu", "nbdkit", "null", "limit")]
            L.append("| %s | %s | %s | %s |" % (desc, unit, " | ".join(cells), " | ".join(ratios)))

        for mode in ("plain", "snapshot"):
            for w in FIO:
                field = "iops" if w[4] == "IOPS" else "mib_s"
                kinds = KINDS if mode == "plain" else SNAPSHOT_KINDS
                keys = {k: "%s/%s/%s" % (k, mode, w[0]) for k in kinds}
                desc = w[5] + (", fresh snapshot" if mode == "snapshot" else "")
                row(desc, w[4], keys, field)
                if mode == "snapshot" and w[0] == "randwrite-4k-qd16":
                    row("&nbsp;&nbsp;… its first %g s (most copies happen here)" % self.opts.first_window, "IOPS",
                        keys, "first_iops")
        pk = lambda step, kinds: {k: "%s/pull/%s" % (k, step) for k in kinds}
        row("nbdcopy live disk → null:", "MiB/s", pk("live", PULL_KINDS), "mib_s")
        row("nbdcopy live disk → file", "MiB/s", pk("live", PULL_KINDS), "file_mib_s")
        row("nbdcopy snapshot view → null:, idle", "MiB/s", pk("view-idle", SNAPSHOT_KINDS), "mib_s")
        row("nbdcopy snapshot view → file, idle", "MiB/s", pk("view-idle", SNAPSHOT_KINDS), "file_mib_s")
        row("nbdcopy snapshot view → null: under 4 KiB random writes QD16", "MiB/s",
            pk("view-writes-null", SNAPSHOT_KINDS), "mib_s")
        row("&nbsp;&nbsp;… write rate during that pull", "IOPS", pk("view-writes-null", SNAPSHOT_KINDS), "write_iops")
        row("nbdcopy snapshot view → null: under 4 KiB random writes QD16 at %d IOPS" % self.opts.pull_write_rate,
            "MiB/s", pk("view-rate-null", SNAPSHOT_KINDS), "mib_s")
        row("&nbsp;&nbsp;… write rate during that pull", "IOPS", pk("view-rate-null", SNAPSHOT_KINDS), "write_iops")
        row("nbdcopy snapshot view → file under 4 KiB random writes QD16", "MiB/s",
            pk("view-writes-file", SNAPSHOT_KINDS), "mib_s")
        row("&nbsp;&nbsp;… write rate during that pull", "IOPS", pk("view-writes-file", SNAPSHOT_KINDS), "write_iops")
        return L

    def latency(self):
        L = ["| fio completion latency, p50 / p99 (µs) | fleece | qemu-storage-daemon | nbdkit | %s | limit "
             "| p99 fleece/qemu | p99 fleece/nbdkit |" % LABEL["null"], "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for mode in ("plain", "snapshot"):
            for w in FIO:
                kinds = KINDS if mode == "plain" else SNAPSHOT_KINDS
                keys = {k: "%s/%s/%s" % (k, mode, w[0]) for k in kinds}
                cells = []
                for k in KINDS:
                    a, b = self.cell(keys.get(k), "p50_us"), self.cell(keys.get(k), "p99_us")
                    cells.append(a if a == b and not a[0].isdigit() else "%s / %s" % (a, b))
                f = self.get(keys.get("fleece"), "p99_us")
                L.append("| %s%s | %s | %s | %s |" % (
                    w[5], ", fresh snapshot" if mode == "snapshot" else "", " | ".join(cells),
                    self.ratio(f, self.get(keys.get("qemu"), "p99_us")),
                    self.ratio(f, self.get(keys.get("nbdkit"), "p99_us"))))
        return L

    def resources(self):
        servers = [k for k in KINDS if k != "limit"]
        L = ["| server CPU s (utime+stime) · peak RSS MiB (VmHWM) | fleece | qemu-storage-daemon | nbdkit | %s "
             "| CPU fleece/qemu | CPU fleece/nbdkit |" % LABEL["null"], "|---|---:|---:|---:|---:|---:|---:|"]
        steps = [("%s/%s" % (m, w[0]), w[5] + (", fresh snapshot" if m == "snapshot" else "")) for m in
                 ("plain", "snapshot") for w in FIO]
        steps += [("pull/live", "nbdcopy live disk (null: + file)"), ("pull/view-idle", "view pulls, idle"),
                  ("pull/view-writes-null", "view pull → null: under writes (server total)"),
                  ("pull/view-rate-null", "view pull → null: under held writes (server total)"),
                  ("pull/view-writes-file", "view pull → file under writes (server total)")]
        for step, desc in steps:
            cells = []
            for k in servers:
                key = "%s/%s" % (k, step)
                c, m = self.cell(key if key in self.R else None, "server_cpu_s", "%.1f"), \
                    self.cell(key if key in self.R else None, "server_rss_mib", "%.1f")
                cells.append(c if c == m else "%s · %s" % (c, m))
            f = self.get("fleece/" + step, "server_cpu_s")
            L.append("| %s | %s | %s | %s |" % (desc, " | ".join(cells),
                                                self.ratio(f, self.get("qemu/" + step, "server_cpu_s")),
                                                self.ratio(f, self.get("nbdkit/" + step, "server_cpu_s"))))
        peak = []
        for k in servers:
            v = [self.get(key, "server_rss_mib") for key in self.R if key.startswith(k + "/")]
            v = [x for x in v if x]
            peak.append("%.1f" % max(v) if v else "-")
        L.append("| **peak RSS over all runs (MiB)** | %s | - | - |" % " | ".join(peak))
        return L

    def tls(self):
        L = ["| over TLS (fio nbd engine, nbds:// on 127.0.0.1) | unit | fleece | qemu-nbd | fleece/qemu-nbd "
             "| p50 / p99 µs fleece | p50 / p99 µs qemu-nbd | server CPU s fleece · qemu-nbd |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
        for w in TLS_FIO:
            field = "iops" if w[4] == "IOPS" else "mib_s"
            keys = {k: "%s/tls/%s" % (k, w[0]) for k in TLS_KINDS}
            if not any(k in self.R for k in keys.values()):
                continue
            cells = [self.cell(keys[k], field) for k in TLS_KINDS]
            lat = ["%s / %s" % (self.cell(keys[k], "p50_us"), self.cell(keys[k], "p99_us")) for k in TLS_KINDS]
            cpu = " · ".join(self.cell(keys[k], "server_cpu_s", "%.1f") for k in TLS_KINDS)
            L.append("| %s | %s | %s | %s | %s | %s |" % (
                w[5], w[4], " | ".join(cells),
                self.ratio(self.get(keys["fleece"], field), self.get(keys["qemu"], field)), " | ".join(lat), cpu))
        return L if len(L) > 2 else []

    def qcow2(self):
        """The qcow2 section: fleece and qemu-storage-daemon on the same qcow2 image."""
        L = ["| qcow2 image, 64 KiB clusters | unit | fleece | qemu-storage-daemon | fleece/qemu "
             "| p50 / p99 µs fleece | p50 / p99 µs qemu | server CPU s fleece · qemu | peak RSS MiB fleece · qemu |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, state, snapshot, w, desc in QCOW2:
            fk, qk = "fleece/" + key, "qemu/" + key
            cells = [self.cell(fk, "iops"), self.cell(qk, "iops"),
                     self.ratio(self.get(fk, "iops"), self.get(qk, "iops"))]
            for k in (fk, qk):
                a, b = self.cell(k, "p50_us"), self.cell(k, "p99_us")
                cells.append(a if a == b and not a[0].isdigit() else "%s / %s" % (a, b))
            for field in ("server_cpu_s", "server_rss_mib"):
                a, b = self.cell(fk, field, "%.1f"), self.cell(qk, field, "%.1f")
                cells.append("%s · %s" % (a, b))
            L.append("| %s | IOPS | %s |" % (desc, " | ".join(cells)))
            if state == "fresh" or snapshot:
                L.append("| &nbsp;&nbsp;… its first %g s (%s) | IOPS | %s | %s | %s | | | | |" % (
                    self.opts.first_window, "most copies happen here" if snapshot else "most allocations happen here",
                    self.cell(fk, "first_iops"), self.cell(qk, "first_iops"),
                    self.ratio(self.get(fk, "first_iops"), self.get(qk, "first_iops"))))
        checked = [(k, v) for k, v in sorted(self.R.items()) if "/qcow2-" in k and "qemu_img_check_clean" in v]
        if checked:
            bad = [k for k, v in checked if not v["qemu_img_check_clean"]]
            L.append("")
            L.append("`qemu-img check` after every qcow2 measurement (server stopped): %s." % (
                "clean every time (%d steps)" % len(checked) if not bad else "NOT clean after " + ", ".join(bad)))
        return L

    def correctness(self):
        L = []
        for key in sorted(k for k in self.R if "/pull/" in k):
            v = self.R[key]
            if "error" in v or "exact" not in v:
                continue
            extra = ""
            if "live_changed" in v:
                extra = " (live disk changed meanwhile: %s)" % ("yes" if v["live_changed"] else "NO")
            L.append("- %s: %s%s" % (key, "equal" if v["exact"] else "DIFFERENT: " + v.get("cmp", ""), extra))
        return L

    def reason(self, keys):
        for k in keys:
            v = self.R.get(k)
            if v is None:
                return "%s not run" % k
            if "error" in v:
                return "%s: %s" % (k, v["error"][:160])
        return "no value"

    def targets(self, section=None):
        T = []
        g = self.get

        def per_round(ka, kb, field):
            """' (per round: 0.91x, 1.02x)' when there are several rounds."""
            ra = (self.R.get(ka) or {}).get("rounds") or []
            rb = (self.R.get(kb) or {}).get("rounds") or []
            if len(ra) < 2 or len(ra) != len(rb):
                return ""
            cells = []
            for x, y in zip(ra, rb):
                a, b = x.get(field), y.get(field)
                cells.append("%.2fx" % (a / b) if a and b else "n/a")
            return " (per round: %s)" % ", ".join(cells)

        def target(desc, keys, value, ok, fmt="%.2fx", note="", field=None):
            if value is None:
                T.append("- n/a  %s (%s)" % (desc, self.reason(keys)))
            else:
                if field:
                    note += per_round(keys[0], keys[1], field)
                T.append("- %s %s: %s%s" % ("PASS" if ok(value) else "FAIL", desc, fmt % value, note))

        def r(ka, kb, field):
            a, b = g(ka, field), g(kb, field)
            return a / b if a and b else None

        def round_ratios(ka, kb, field):
            """Per-round ratios when every round of both steps succeeded, else []."""
            ra = (self.R.get(ka) or {}).get("rounds") or [self.R.get(ka) or {}]
            rb = (self.R.get(kb) or {}).get("rounds") or [self.R.get(kb) or {}]
            if len(ra) != len(rb):
                return []
            out = []
            for x, y in zip(ra, rb):
                a, b = x.get(field), y.get(field)
                if not (a and b):
                    return []
                out.append(a / b)
            return out

        if self.ran("qcow2") and section in (None, "qcow2"):
            for key, want in (("qcow2-allocated/randwrite-4k-qd16", 1.0), ("qcow2-allocated/randread-4k-qd16", 1.0),
                              ("qcow2-fresh/randwrite-4k-qd16", 1.0), ("qcow2-snapshot/randwrite-4k-qd16", 2.0)):
                desc = [q[4] for q in QCOW2 if q[0] == key][0]
                k = ("fleece/" + key, "qemu/" + key)
                target("qcow2: %s >= %gx qemu-storage-daemon" % (desc, want), k, r(*k, "iops"),
                       lambda x, want=want: x >= want, field="iops")
        if not (self.ran("raw") and section in (None, "raw")):
            return T
        rw = "randwrite-4k-qd16"
        k = ("fleece/plain/" + rw, "nbdkit/plain/" + rw)
        worst = min(round_ratios(*k, "iops") or [float("inf")])
        target("plain 4 KiB random writes >= 1.1x nbdkit (median; never below 1.0x in a round)", k, r(*k, "iops"),
               lambda x: x >= 1.1 and worst >= 1.0, field="iops")
        k = ("fleece/plain/" + rw, "null/plain/" + rw)
        target("plain 4 KiB random writes >= 0.85x nbdkit null", k, r(*k, "iops"),
               lambda x: x >= 0.85, field="iops")
        k = ("fleece/snapshot/" + rw, "qemu/snapshot/" + rw)
        target("4 KiB random writes during a fresh snapshot >= 2x qemu-storage-daemon", k, r(*k, "iops"),
               lambda x: x >= 2.0, field="iops")
        k = ("fleece/snapshot/" + rw, "fleece/plain/" + rw)
        target("4 KiB random writes during a fresh snapshot >= 0.5x fleece's own plain speed", k, r(*k, "iops"),
               lambda x: x >= 0.5, field="iops")
        k = ("fleece/pull/view-idle", "qemu/pull/view-idle")
        target("view pull (nbdcopy → null:) idle >= 1.2x qemu-storage-daemon", k, r(*k, "mib_s"),
               lambda x: x >= 1.2, field="mib_s")
        k = ("fleece/pull/view-rate-null", "qemu/pull/view-rate-null")
        target("view pull (nbdcopy → null:) under 4 KiB random writes at %d IOPS >= 1.2x qemu-storage-daemon"
               % self.opts.pull_write_rate, k, r(*k, "mib_s"), lambda x: x >= 1.2, field="mib_s")
        k = ("fleece/pull/view-writes-null", "qemu/pull/view-writes-null")
        wk = r(*k, "write_iops")
        v = r(*k, "mib_s")
        T.append("- info view pull (nbdcopy → null:) under unthrottled 4 KiB random writes: %s, with the writer at "
                 "%s qemu's rate (both share 2 CPUs with the server, so a faster writer leaves the pull less)" % (
                     "%.2fx" % v if v else "n/a", "%.2fx" % wk if wk else "n/a"))
        k = ("fleece/snapshot/" + rw, "qemu/snapshot/" + rw)
        target("p99 write latency during a fresh snapshot <= 0.5x qemu-storage-daemon", k, r(*k, "p99_us"),
               lambda x: x <= 0.5, field="p99_us")
        # runs where fleece served the disk and a snapshot with a file store
        fk = [key for key in self.R if key.startswith("fleece/snapshot/") or key.startswith("fleece/pull/view-")]
        rss = [x for x in (g(key, "server_rss_mib") for key in fk) if x]
        note = "" if self.size >= 1 << 30 else " (image %d MiB here, not 1 GiB: indicative only)" % (self.size >> 20)
        target("peak RSS <= 64 MiB serving a 1 GiB disk with a file store (max over fleece's snapshot runs)",
               fk or ["fleece/snapshot/*"], max(rss) if rss else None, lambda x: x <= 64, "%.1f MiB", note)
        for w in TLS_FIO:
            field = "iops" if w[4] == "IOPS" else "mib_s"
            k = ("fleece/tls/" + w[0], "qemu/tls/" + w[0])
            if k[0] in self.R or k[1] in self.R:
                target("%s >= 1.0x qemu-nbd over TLS" % w[5], k, r(*k, field), lambda x: x >= 1.0, field=field)
        pulls = {key: v for key, v in self.R.items() if "/pull/" in key and "exact" in v}
        bad = [key for key, v in pulls.items() if not v["exact"]]
        if not pulls:
            T.append("- n/a  every pull equals the image at the instant (no pull finished)")
        else:
            T.append("- %s every pull equals the image at the instant (%d of %d pulls checked with cmp%s)" % (
                "FAIL" if bad else "PASS", len(pulls) - len(bad), len(pulls),
                "; different: " + ", ".join(bad) if bad else ""))
        return T

    def render(self, section=None):
        """The report: every section that ran (section None), or one."""
        m = self.meta
        raw = self.ran("raw") and section in (None, "raw")
        q = self.ran("qcow2") and section in (None, "qcow2")
        out = []
        out.append("Run: `%s` — %s" % (m["command"], m["date"]))
        out.append("")
        out.append("Machine: %s; %d CPUs; %s RAM; kernel %s; load average %s at start, %s at end." % (
            m["cpu_model"], m["cpus"], m["memory"], m["kernel"], m["loadavg_start"], m["loadavg_end"]))
        out.append("Tools: %s." % "; ".join("%s" % v for v in m["versions"].values()))
        out.append("fleece: %s (%s)." % (m["fleece_commit"], m["fleece_build"]))
        out.append("Setup: image %d MiB in /dev/shm filled with random data; fio runs of %d s (+%d s ramp on plain runs, "
                   "none on fresh-snapshot runs); %d idle pull(s) per point (median); %d round(s) (median); "
                   "qemu-storage-daemon file nodes aio=%s; the limit is %s." % (
                       self.size >> 20, self.opts.runtime, self.opts.ramp, self.opts.repeat, self.opts.rounds,
                       self.opts.qemu_aio, m["limit_desc"]))
        if q:
            out.append("qcow2 section: fleece and qemu-storage-daemon (`--blockdev qcow2` over the file node) serve "
                       "the same qcow2 image in /dev/shm, %d MiB, 64 KiB clusters: \"allocated\" is `qemu-img "
                       "convert` of the random image (every cluster allocated), \"fresh\" is `qemu-img create` "
                       "before every measurement; fresh images and fresh snapshots are measured from the first "
                       "write (no ramp). Snapshot stores as in the raw section (fleece: file store; qemu: "
                       "copy-before-write + snapshot-access with a raw target)." % (self.size >> 20))
        if raw:
            out.append("")
            out += self.throughput()
            out.append("")
            out += self.latency()
            out.append("")
            out += self.resources()
        if q:
            out.append("")
            out += self.qcow2()
        out.append("")
        t = self.tls()
        if t:
            out += t
            out.append("")
        out.append("Targets:")
        out.append("")
        out += self.targets(section)
        out.append("")
        c = self.correctness() if raw else []
        if c:
            out.append("Pulled copies compared with the image at the instant:")
            out.append("")
            out += c
            out.append("")
        if self.run_notes:
            out.append("Notes (did not spoil a measurement):")
            out.append("")
            out += ["- " + n.replace("|", "\\|") for n in self.run_notes]
            out.append("")
        if self.notes:
            out.append("n/a reasons:")
            out.append("")
            for i, n in enumerate(self.notes):
                out.append("%d. %s" % (i + 1, n.replace("|", "\\|")))
            out.append("")
        return "\n".join(out)


# ---------------------------------------------------------------- setup
def versions():
    v = {}
    for name, cmd in (("qemu", ["qemu-storage-daemon", "--version"]), ("nbdkit", ["nbdkit", "--version"]),
                      ("fio", ["fio", "--version"]), ("libnbd", ["nbdcopy", "--version"])):
        try:
            _, out, _ = run(cmd, timeout=20)
            line = out.strip().splitlines()[0 if name != "libnbd" else -1]
            v[name] = line.replace("qemu-storage-daemon version", "qemu-storage-daemon")
        except (StepError, OSError, IndexError) as e:
            v[name] = "%s: unavailable (%s)" % (name, e)
    return v


def machine():
    model, mem = "unknown CPU", "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem = "%.0f GiB" % (int(f.readline().split()[1]) / 2**20)
    except OSError:
        pass
    return model, mem


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def probe_limit_engine(tmpdir):
    """io_uring, else libaio, else psync: the first fio engine that works on a file here."""
    probe = os.path.join(tmpdir, "probe.raw")
    tried = []
    for engine in ("io_uring", "libaio", "psync"):
        try:
            run(["fio", "--name=probe", "--ioengine=" + engine, "--filename=" + probe, "--size=1M", "--rw=randwrite",
                 "--bs=4k", "--iodepth=4", "--output=/dev/null"], timeout=60)
            os.unlink(probe)
            desc = engine if not tried else "%s (%s)" % (engine, "; ".join(tried))
            return engine, desc
        except (StepError, OSError) as e:
            tried.append("%s unavailable: %s" % (engine, str(e)[:120]))
    return "psync", "psync (probes failed: %s)" % "; ".join(tried)


def build_fleece(opts):
    """None when the binary is ready, else the reason fleece's rows are n/a."""
    if opts.fleece_bin_given:
        log("using %s (no build)" % opts.fleece_bin)
    elif not opts.no_build:
        log("building fleece: cargo build --release -p fleece")
        try:
            run(["cargo", "build", "--release", "-p", "fleece"], timeout=opts.build_timeout, cwd=ROOT)
        except StepError as e:
            msg = str(e)
            # the first compiler error says more than the last line
            i = msg.find("error")
            return "cargo build --release -p fleece failed: " + (msg[i:i + 300] if i >= 0 else msg)
        except OSError as e:
            return "cargo build failed: %s" % e
    if not os.access(opts.fleece_bin, os.X_OK):
        return "no fleece binary at %s" % opts.fleece_bin
    try:
        run([opts.fleece_bin, "--version"], timeout=20)
    except (StepError, OSError) as e:
        return "fleece --version failed: %s" % e
    return None


def fleece_commit():
    try:
        _, head, _ = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], timeout=20)
        _, dirty, _ = run(["git", "-C", ROOT, "status", "--porcelain", "--", "crates", "Cargo.toml", "Cargo.lock"],
                          timeout=20)
        return head.strip() + (" + uncommitted changes in crates/" if dirty.strip() else "")
    except (StepError, OSError):
        return "unknown commit"


def remove_stale_tmpdirs():
    """Temp dirs of earlier runs that were killed before they could clean up."""
    for name in os.listdir(SHM):
        if not name.startswith("fleece-bench-"):
            continue
        try:
            pid = int(name.split("-")[2])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log("removing the stale %s/%s of a dead run" % (SHM, name))
            shutil.rmtree(os.path.join(SHM, name), ignore_errors=True)
        except PermissionError:
            pass


def update_benchmarks(rep):
    """Rewrites the generated block of each section that ran (the others keep theirs)."""
    path = os.path.join(ROOT, "BENCHMARKS.md")
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmarks\n"
    for section in SECTIONS:
        if not rep.ran(section):
            continue
        begin, end = MARKERS[section]
        block = "%s\n%s\n%s" % (begin, rep.render(section).rstrip(), end)
        if begin in doc and end in doc:
            doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
        else:
            title = "Latest run" if section == "raw" else "Latest qcow2 run"
            doc = doc.rstrip() + "\n\n## %s\n\n%s\n" % (title, block)
    with open(path, "w") as f:
        f.write(doc)
    log("updated %s" % path)


def report_from_json(opts):
    """The report of a saved run, rendered by this version of the script."""
    with open(opts.from_json) as f:
        data = json.load(f)
    c = data["config"]
    saved = argparse.Namespace(size=c["image_bytes"], runtime=c["runtime_s"], ramp=c["ramp_s"],
                               repeat=c["repeat"], rounds=c["rounds"], quick=c["quick"], only=c["servers"],
                               qemu_aio=c["qemu_aio"], first_window=c["first_window_s"],
                               pull_write_rate=c.get("pull_write_rate", 5000),
                               sections=c.get("sections", ["raw"]))
    rep = Report(data["results"], saved, data["meta"], data.get("notes", ()))
    text = rep.render()
    print(text)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(text + "\n")
    if opts.update_benchmarks:
        update_benchmarks(rep)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 MiB image, 3 s fio jobs (about 2 minutes)")
    ap.add_argument("--only", default=",".join(KINDS), help="servers to run, from %s" % ",".join(KINDS))
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="sections to run, from %s (qcow2: fleece and qemu only)" % ",".join(SECTIONS))
    ap.add_argument("--fleece-bin", help="use this fleece binary (and do not build)")
    ap.add_argument("--no-build", action="store_true", help="use target/release/fleece as it is")
    ap.add_argument("--steps", help="run only steps whose key contains one of these comma-separated "
                    "strings (keys as in the log, e.g. snapshot/randwrite-4k,pull/view-idle)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every step N times, report medians")
    ap.add_argument("--repeat", type=int, help="timed idle pulls per point (median); default 3, quick 1")
    ap.add_argument("--runtime", type=int, help="seconds per fio job (default 12, quick 3)")
    ap.add_argument("--size-mib", type=int, help="image size in MiB (default 1024, quick 256)")
    ap.add_argument("--qemu-aio", default="threads", choices=("threads", "io_uring"),
                    help="aio= of qemu-storage-daemon's file nodes (default: qemu's default, threads)")
    ap.add_argument("--markdown", help="also write the report to this file")
    ap.add_argument("--update-benchmarks", action="store_true",
                    help="rewrite the generated part of BENCHMARKS.md with this run's report")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "latest.json"))
    ap.add_argument("--from-json", metavar="FILE",
                    help="run nothing: print the report of a saved run (with --markdown, --update-benchmarks)")
    opts = ap.parse_args()
    if opts.from_json:
        report_from_json(opts)
        return
    opts.only = [k.strip() for k in opts.only.split(",") if k.strip()]
    bad = [k for k in opts.only if k not in KINDS]
    if bad:
        ap.error("unknown server(s) %s; choose from %s" % (",".join(bad), ",".join(KINDS)))
    opts.sections = [x.strip() for x in opts.sections.split(",") if x.strip()]
    bad = [x for x in opts.sections if x not in SECTIONS]
    if bad or not opts.sections:
        ap.error("unknown section(s) %s; choose from %s" % (",".join(bad), ",".join(SECTIONS)))
    if opts.steps and opts.update_benchmarks:
        ap.error("--update-benchmarks needs the whole run; drop --steps")
    opts.fleece_bin_given = bool(opts.fleece_bin)
    opts.fleece_bin = os.path.abspath(opts.fleece_bin or os.path.join(ROOT, "target", "release", "fleece"))
    opts.size = (opts.size_mib or (256 if opts.quick else 1024)) << 20
    opts.runtime = opts.runtime or (3 if opts.quick else 12)
    opts.ramp = 1 if opts.quick else 3
    opts.repeat = opts.repeat or (1 if opts.quick else 3)
    opts.first_window = 1 if opts.quick else 2
    opts.writer_lead = 0.5  # s between starting the writer and the pull
    opts.pull_write_rate = 5000  # IOPS of the held writer: well within what both servers sustain
    opts.ready_timeout = 20
    opts.pull_timeout = 120 if opts.quick else 300
    opts.build_timeout = 1800
    command = "python3 bench/run.py" + ("" if len(sys.argv) == 1 else " " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]))

    def on_signal(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    for tool in ("fio", "nbdcopy", "cmp") + (("qemu-storage-daemon", "qemu-nbd") if "qemu" in opts.only else ()) + \
            (("nbdkit",) if "nbdkit" in opts.only or "null" in opts.only else ()):
        if not shutil.which(tool):
            sys.exit("bench: %s is not installed" % tool)
    remove_stale_tmpdirs()
    load0 = loadavg()
    b = None
    reason = None
    fleece_build = "not run"
    try:
        if "fleece" in opts.only:
            reason = build_fleece(opts)
            fleece_build = "release build at %s" % opts.fleece_bin if reason is None else "unavailable: " + reason
        b = Bench(opts)
        opts.limit_engine, limit_desc = probe_limit_engine(b.tmp)
        if "fleece" in opts.only and reason:
            log("fleece rows will be n/a: " + reason)
            b.skip["fleece"] = reason
        elif "fleece" in opts.only:
            # run a private copy: a rebuild during the run cannot swap binaries under it
            b.fleece_bin = b.path("fleece")
            shutil.copy2(opts.fleece_bin, b.fleece_bin)
        b.go()
    except KeyboardInterrupt:
        log("interrupted: stopping servers and removing %s" % (b.tmp if b else "nothing"))
        if b:
            b.cleanup()
        sys.exit(130)
    finally:
        if b:
            b.cleanup()
    results = {k: aggregate(v) for k, v in b.results.items()}
    model, mem = machine()
    meta = {"command": command, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu_model": model, "cpus": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "arch": platform.machine(), "loadavg_start": load0, "loadavg_end": loadavg(),
            "versions": versions(), "fleece_commit": fleece_commit(), "fleece_build": fleece_build,
            "limit_engine": opts.limit_engine, "limit_desc": "fio %s; nbdcopy from the file" % limit_desc}
    data = {"meta": meta, "config": {"image_bytes": opts.size, "runtime_s": opts.runtime, "ramp_s": opts.ramp,
                                     "repeat": opts.repeat, "rounds": opts.rounds, "quick": opts.quick,
                                     "servers": opts.only, "qemu_aio": opts.qemu_aio,
                                     "first_window_s": opts.first_window,
                                     "pull_write_rate": opts.pull_write_rate,
                                     "sections": opts.sections},
            "results": results, "notes": b.notes}
    os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)

    def save():
        with open(opts.json, "w") as f:
            json.dump(data, f, indent=1)

    save()  # the numbers survive a bug in the report below
    rep = Report(results, opts, meta, b.notes)
    text = rep.render()
    print(text)
    if "push" in opts.sections:
        # Push backups (bench/push.py): its own servers and image, same run.
        import push
        popts = argparse.Namespace(rounds=opts.rounds, seconds=opts.runtime, size_mib=opts.size >> 20,
                                   rate="50M", fleece_bin=opts.fleece_bin, update_benchmarks=False)
        try:
            prounds = push.measure(popts)
        finally:
            stop_all()
        ptext = push.report(prounds, popts)
        print(ptext)
        data["push"] = {"rounds": prounds, "report_markdown": ptext}
        if opts.update_benchmarks:
            push.update_benchmarks(ptext)
    data["targets"], data["report_markdown"] = rep.targets(), text
    save()
    log("wrote %s (%.0f s in all)" % (opts.json, time.time() - T0))
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(text + "\n")
    if opts.update_benchmarks:
        update_benchmarks(rep)


if __name__ == "__main__":
    main()
