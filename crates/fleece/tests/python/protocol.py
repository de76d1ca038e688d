"""NBD protocol checks with python3-libnbd against a fleece export.

usage: protocol.py SOCKET EXPORT
Exits non-zero (AssertionError) on the first behaviour that is wrong.
"""
import errno
import sys

import nbd

sock, export = sys.argv[1], sys.argv[2]
uri = "nbd+unix:///%s?socket=%s" % (export, sock)


def expect_error(fn, codes, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum in codes, "%s: errno %s (%s), expected one of %s" % (what, e.errnum, e, codes)
        return
    raise AssertionError("%s: succeeded, expected an error" % what)


# Option haggling: list, info on a missing export, info, then go.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
assert export in names, names
h.set_export_name("no-such-export")
expect_error(h.opt_info, (errno.ENOENT, errno.EINVAL, errno.ENOTSUP, 0, None), "opt_info of a missing export")
h.set_export_name(export)
h.opt_info()
assert h.get_size() > 0
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert "base:allocation" in ctxs, ctxs
h.opt_go()
assert h.get_structured_replies_negotiated()
size = h.get_size()
h.shutdown()

# opt_abort leaves cleanly.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
h.opt_abort()

# Without structured replies: simple replies, no DF.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
h.pwrite(b"\x5a" * 4096, 0)
assert h.pread(4096, 0) == b"\x5a" * 4096
h.shutdown()

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.can_df() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_fast_zero()
assert h.can_multi_conn() and h.can_cache() and h.can_flush()
assert h.get_block_size(nbd.SIZE_MAXIMUM) >= 32 << 20

# DF read, FUA write, zero-length requests.
h.pwrite(b"\xa5" * 65536, 65536, nbd.CMD_FLAG_FUA)
df_chunks = []
data = h.pread_structured(65536, 65536, lambda sub, off, status, err: df_chunks.append(status) or 0, nbd.CMD_FLAG_DF)
assert data == b"\xa5" * 65536
assert df_chunks == [nbd.READ_DATA], "DF read came in several chunks: %s" % df_chunks

# Out-of-range requests fail and the connection stays usable; zero-length
# requests succeed (libnbd only sends these with strict mode off).
h.set_strict_mode(0)
assert h.pread(0, 0) == b""
h.pwrite(b"", 0)
expect_error(lambda: h.pread(4096, size - 2048), (errno.EINVAL,), "read past the end")
expect_error(lambda: h.pwrite(b"x" * 4096, size), (errno.ENOSPC, errno.EINVAL), "write past the end")
expect_error(lambda: h.trim(4096, size), (errno.EINVAL, errno.ENOSPC), "trim past the end")
expect_error(lambda: h.pread(512, 0, 0x8000), (errno.EINVAL,), "read with an unknown flag")
assert h.pread(4096, 65536) == b"\xa5" * 4096
h.set_strict_mode(nbd.STRICT_MASK)

# Trim makes a hole, block status says so; REQ_ONE gives one extent.
h.pwrite(b"\x11" * (1 << 20), 4 << 20)
h.trim(1 << 20, 4 << 20)
seen = []


def cb(meta, off, entries, err):
    if meta == "base:allocation":
        seen.append(list(entries))
    return 0


h.block_status(1 << 20, 4 << 20, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(seen[-1]) == 2, seen
assert seen[-1][1] & 1, "trimmed range is not reported as a hole: %s" % seen
assert seen[-1][0] <= 1 << 20
assert h.pread(4096, 4 << 20) == b"\0" * 4096

# FAST_ZERO either zeroes fast or says ENOTSUP; never loses data around it.
h.pwrite(b"\x22" * 8192, 8 << 20)
try:
    h.zero(4096, 8 << 20, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(8192, 8 << 20) == b"\0" * 4096 + b"\x22" * 4096
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
    assert h.pread(8192, 8 << 20) == b"\x22" * 8192

# Structured read callback sees the data chunk.
chunks = []
h.pread_structured(4096, 65536, lambda sub, off, status, err: chunks.append((off, status)) or 0)
assert chunks and chunks[0][1] == nbd.READ_DATA, chunks

# Many requests in flight; completion in any order; data correct.
bufs = []
cookies = []
for i in range(64):
    b = nbd.Buffer.from_bytearray(bytearray([i + 1]) * 4096)
    bufs.append(b)
    cookies.append(h.aio_pwrite(b, (16 << 20) + i * 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
reads = []
for i in range(64):
    b = nbd.Buffer(4096)
    reads.append((i, b, h.aio_pread(b, (16 << 20) + i * 4096)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, b, c in reads:
    assert h.aio_command_completed(c)
    assert b.to_bytearray() == bytearray([i + 1]) * 4096, "aio read %d returned wrong data" % i

# Multi-conn: a flushed write on one connection is visible on another.
h2 = nbd.NBD()
h2.connect_uri(uri)
h.pwrite(b"\x77" * 4096, 20 << 20)
h.flush()
assert h2.pread(4096, 20 << 20) == b"\x77" * 4096
h2.shutdown()
h.shutdown()
print("ok")
