"""NBD_CMD_FLAG_DF: a read comes back as one chunk (data or hole), or
EOVERFLOW when the server will not send that much in one chunk."""
import errno

import nbd

from nbdtest import MIB, connect, done

h = connect()
assert h.can_df()
base = 4 * MIB
data = bytes((i * 13) & 0xff for i in range(64 << 10))
h.pwrite(data, base)
h.zero(64 << 10, base + (64 << 10))            # may become a hole
h.trim(64 << 10, base + (128 << 10))           # hole, reads as zero
h.pwrite(data, base + (192 << 10))


def df_read(length, off):
    chunks = []

    def cb(sub, o, status, err):
        chunks.append((o, len(sub), status))
        return 0
    try:
        buf = h.pread_structured(length, off, cb, nbd.CMD_FLAG_DF)
    except nbd.Error as e:
        assert e.errnum == errno.EOVERFLOW, "DF read of %d at %d: %s" % (length, off, e)
        return None
    assert len(chunks) == 1, "DF read of %d at %d came in %d chunks: %s" % (length, off, len(chunks), chunks)
    o, n, status = chunks[0]
    assert (o, n) == (off, length), "DF chunk %s does not cover the request (%d, %d)" % (chunks, off, length)
    assert status in (nbd.READ_DATA, nbd.READ_HOLE), status
    return buf, status


# Small reads must not fail with EOVERFLOW.
for length, off, want in [
    (64 << 10, base, data),
    (4096, base + 1000, data[1000:5096]),
    (64 << 10, base + (128 << 10), b"\0" * (64 << 10)),
    (256 << 10, base, data + b"\0" * (128 << 10) + data),       # data, zero, hole, data
    (100, base + (64 << 10) - 50, data[-50:] + b"\0" * 50),
]:
    r = df_read(length, off)
    assert r is not None, "DF read of %d bytes failed with EOVERFLOW" % length
    buf, status = r
    assert buf == want, "DF read of %d at %d returned wrong data" % (length, off)
    if status == nbd.READ_HOLE:
        assert want == b"\0" * length, "hole chunk over data at %d" % off

# A large mixed read: one chunk or EOVERFLOW, never several chunks.
r = df_read(8 * MIB, base)
if r is not None:
    assert r[0][:64 << 10] == data
# Without DF the same read is fine whatever the chunking.
assert h.pread(256 << 10, base) == data + b"\0" * (128 << 10) + data
h.shutdown()
done()
