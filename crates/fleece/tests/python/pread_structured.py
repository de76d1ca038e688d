"""pread_structured: chunks tile the request exactly, data chunks carry the
right bytes, hole chunks only cover zeroes; a callback error fails the read
without hurting the connection."""
import errno
import os

import nbd

from nbdtest import MIB, connect, done

h = connect()
base = 6 * MIB
a = os.urandom(64 << 10)
c = os.urandom(64 << 10)
h.pwrite(a, base)
h.trim(128 << 10, base + (64 << 10))
h.pwrite(c, base + (192 << 10))
want = a + b"\0" * (128 << 10) + c

for off, length in [(base, 256 << 10), (base + 1000, 200 << 10), (base + (64 << 10), 128 << 10),
                    (base + (60 << 10), 8 << 10)]:
    chunks = []

    def cb(sub, o, status, err):
        chunks.append((o, bytes(sub), status))
        return 0
    buf = h.pread_structured(length, off, cb)
    exp = want[off - base:off - base + length]
    assert buf == exp, "pread_structured at %d returned wrong data" % off
    covered = sorted((o, o + len(s)) for o, s, _ in chunks)
    pos = off
    for s, e in covered:
        assert s == pos, "chunks leave a gap or overlap at %d: %s" % (pos, covered)
        pos = e
    assert pos == off + length, "chunks end at %d, not %d" % (pos, off + length)
    for o, s, status in chunks:
        assert status in (nbd.READ_DATA, nbd.READ_HOLE), status
        piece = want[o - base:o - base + len(s)]
        if status == nbd.READ_HOLE:
            assert piece == b"\0" * len(s), "hole chunk at %d over data" % o
        assert s == piece, "chunk at %d has wrong bytes" % o

# A callback that fails makes the command fail; the connection goes on.
try:
    h.pread_structured(4096, base, lambda sub, o, status, err: -1)
    raise AssertionError("pread_structured succeeded although the callback failed")
except nbd.Error as e:
    assert e.errnum in (errno.EPROTO, errno.EINVAL, errno.EIO) or e.errnum, e
assert h.pread(4096, base) == a[:4096]
h.shutdown()
done()
