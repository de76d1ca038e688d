"""base:allocation block status: REQ_ONE gives exactly one extent; extents
are contiguous and true to the data; trimmed ranges become holes."""
import nbd

from nbdtest import MIB, connect, done, extents

HOLE, ZERO = nbd.STATE_HOLE, nbd.STATE_ZERO

h = connect()
assert h.can_meta_context("base:allocation")
size = h.get_size()
# Layout: [0, 4M) never written (qemu always reports the first 4 KiB as
# data, so holes are probed from 1M), [4M, 5M) data, [8M, 9M) written then trimmed.
h.pwrite(b"\x11" * MIB, 4 * MIB)
h.pwrite(b"\x22" * MIB, 8 * MIB)
h.trim(MIB, 8 * MIB)
h.flush()


def check_contiguous(ex, offset, length):
    assert ex, "no extents for [%d, +%d)" % (offset, length)
    pos = offset
    for off, n, flags in ex:
        assert off == pos and n > 0, "extents not contiguous: %s" % ex
        pos += n
    assert pos <= size


# REQ_ONE: exactly one extent, starting at the offset, no longer than asked.
for off, length, want_hole in [(1 * MIB, 2 * MIB, True), (4 * MIB, 2 * MIB, False),
                               (4 * MIB + 4096, 4096, False), (8 * MIB, MIB, True),
                               (8 * MIB + 512, 1000, True)]:
    ex = extents(h, length, off, nbd.CMD_FLAG_REQ_ONE)
    assert len(ex) == 1, "REQ_ONE at %d gave %d extents: %s" % (off, len(ex), ex)
    o, n, flags = ex[0]
    assert o == off and 0 < n <= length, "REQ_ONE extent %s for [%d, +%d)" % (ex, off, length)
    if want_hole:
        assert flags & ZERO, "range at %d reads as zero but is reported %s" % (off, ex)
        assert flags & HOLE, "never-written or trimmed range at %d is not a hole: %s" % (off, ex)
    else:
        assert flags == 0, "data at %d reported as %s" % (off, ex)

# Without REQ_ONE: contiguous, and every extent flagged zero reads as zero.
ex = extents(h, 12 * MIB, 0)
check_contiguous(ex, 0, 12 * MIB)
assert len(ex) >= 3, "data between holes not told apart: %s" % ex
for off, n, flags in ex:
    if flags & ZERO:
        step = min(n, MIB)
        for probe in range(off, off + n, step):
            k = min(step, off + n - probe)
            assert h.pread(k, probe) == b"\0" * k, "extent %s says zero but %d has data" % ((off, n, flags), probe)


def flags_at(off):
    ex = extents(h, 4096, off, nbd.CMD_FLAG_REQ_ONE)
    return ex[0][2]


assert flags_at(4 * MIB + MIB - 4096) == 0
assert flags_at(8 * MIB + MIB // 2) & (HOLE | ZERO) == HOLE | ZERO
# Trim of data written now: the status follows at once.
h.pwrite(b"\x33" * (256 << 10), 12 * MIB)
assert flags_at(12 * MIB) == 0
h.trim(256 << 10, 12 * MIB)
assert flags_at(12 * MIB) & HOLE, "trimmed range not reported as a hole"
assert h.pread(256 << 10, 12 * MIB) == b"\0" * (256 << 10)
# Unaligned queries work too.
h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ALIGN)
ex = extents(h, 3000, 4 * MIB + 1001)
check_contiguous(ex, 4 * MIB + 1001, 3000)
assert ex[0][2] == 0
# The last bytes of the export.
ex = extents(h, 4096, size - 4096, nbd.CMD_FLAG_REQ_ONE)
assert len(ex) == 1 and ex[0][0] == size - 4096 and ex[0][1] <= 4096
h.shutdown()
done()
