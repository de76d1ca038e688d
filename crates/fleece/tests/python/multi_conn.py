"""Multi-conn: with CAN_MULTI_CONN, a write completed and flushed on one
connection is seen by reads on every other connection."""
import os

import nbd

from nbdtest import MIB, connect, done

hs = [connect() for _ in range(4)]
for h in hs:
    assert h.can_multi_conn(), "export does not advertise CAN_MULTI_CONN"

# Each connection writes its own range; one flush on another connection.
datas = [os.urandom(256 << 10) for _ in hs]
for i, h in enumerate(hs):
    h.pwrite(datas[i], 2 * MIB + i * MIB)
hs[3].flush()
for j, h in enumerate(hs):
    for i in range(len(hs)):
        assert h.pread(256 << 10, 2 * MIB + i * MIB) == datas[i], \
            "connection %d does not see connection %d's flushed write" % (j, i)

# Overwrites ping-pong between two connections.
for k in range(20):
    w, r = hs[k % 2], hs[(k + 1) % 2]
    blob = bytes([k + 1]) * 4096
    w.pwrite(blob, 8 * MIB + 4096 * (k % 3), nbd.CMD_FLAG_FUA)
    assert r.pread(4096, 8 * MIB + 4096 * (k % 3)) == blob, "round %d: FUA write not visible" % k

# Concurrent aio writes on all handles, then a flush on one: all visible.
bufs = []
for i, h in enumerate(hs):
    for n in range(16):
        b = nbd.Buffer.from_bytearray(bytearray([16 * i + n + 1]) * 8192)
        bufs.append(b)
        h.aio_pwrite(b, 10 * MIB + (i * 16 + n) * 8192)
for h in hs:
    while h.aio_in_flight() > 0:
        h.poll(-1)
hs[0].flush()
for i in range(len(hs)):
    for n in range(16):
        got = hs[(i + 1) % len(hs)].pread(8192, 10 * MIB + (i * 16 + n) * 8192)
        assert got == bytes([16 * i + n + 1]) * 8192
# Trim on one connection is seen as zeroes on another.
hs[1].trim(256 << 10, 2 * MIB)
hs[1].flush()
assert hs[2].pread(256 << 10, 2 * MIB) == b"\0" * (256 << 10)
for h in hs:
    h.shutdown()
done()
