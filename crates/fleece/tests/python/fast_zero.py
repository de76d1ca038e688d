"""WRITE_ZEROES: plain, NO_HOLE and FAST_ZERO all read back as zero; FAST_ZERO
may instead fail with ENOTSUP, and then changes nothing. Bytes around the
range are never touched."""
import errno

import nbd

from nbdtest import MIB, connect, done

h = connect()
assert h.can_zero()
base = 2 * MIB
pat = bytes((i * 31 + 7) & 0xff for i in range(192 << 10))


def fill():
    h.pwrite(pat, base)


def check(zero_off, zero_len):
    got = h.pread(len(pat), base)
    a, b = zero_off - base, zero_off - base + zero_len
    assert got[:a] == pat[:a], "bytes before the zeroed range changed"
    assert got[a:b] == b"\0" * zero_len, "zeroed range does not read as zero"
    assert got[b:] == pat[b:], "bytes after the zeroed range changed"


fill()
h.zero(64 << 10, base + (64 << 10))
check(base + (64 << 10), 64 << 10)
fill()
h.zero(64 << 10, base + (64 << 10), nbd.CMD_FLAG_NO_HOLE)
check(base + (64 << 10), 64 << 10)
fill()
h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ALIGN)
h.zero(3000, base + 1000)        # unaligned
check(base + 1000, 3000)
h.set_strict_mode(nbd.STRICT_MASK)

if h.can_fast_zero():
    for flags in (nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE):
        fill()
        try:
            h.zero(64 << 10, base + (64 << 10), flags)
            check(base + (64 << 10), 64 << 10)
        except nbd.Error as e:
            assert e.errnum == errno.ENOTSUP, "FAST_ZERO failed with %s" % e
            assert h.pread(len(pat), base) == pat, "a failed FAST_ZERO changed data"
else:
    # libnbd refuses to send the flag to a server that did not offer it
    # (and nbdkit 1.32 would abort on it).
    try:
        h.zero(4096, base, nbd.CMD_FLAG_FAST_ZERO)
        raise AssertionError("FAST_ZERO sent although not advertised")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL
print("can_fast_zero", h.can_fast_zero())
h.shutdown()
done()
