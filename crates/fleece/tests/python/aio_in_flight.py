"""Many requests in flight at once: writes, reads, zeroes and flushes on
disjoint ranges; replies may come in any order; every byte is right."""
import random

import nbd

from nbdtest import MIB, connect, done

rng = random.Random(1234)
h = connect()
base = 2 * MIB
N = 128
sizes = [rng.choice([512, 4096, 4096 * 3, 65536, 1000, 256 << 10]) for _ in range(N)]
offs = []
pos = base
for n in sizes:
    offs.append(pos)
    pos += n + rng.choice([0, 512, 4096])
assert pos < 14 * MIB


def payload(i):
    return bytes([(i * 37 + 1) & 0xff]) * sizes[i]


order = []
peak = 0


def completer(i):
    def cb(err):
        order.append(i)
        return 0
    return cb


h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ALIGN)
idx = list(range(N))
rng.shuffle(idx)
bufs = {}
for i in idx:
    bufs[i] = nbd.Buffer.from_bytearray(bytearray(payload(i)))
    h.aio_pwrite(bufs[i], offs[i], completion=completer(i))
    peak = max(peak, h.aio_in_flight())
while h.aio_in_flight() > 0:
    h.poll(-1)
assert sorted(order) == list(range(N)), "not every write completed once"
assert peak > 8, "never more than %d requests in flight" % peak

# Reads of everything, plus zeroes of every fourth range and a flush, all in flight.
order.clear()
reads = {}
for i in idx:
    if i % 4 == 3:
        h.aio_zero(sizes[i], offs[i], completion=completer(i))
    else:
        reads[i] = nbd.Buffer(sizes[i])
        h.aio_pread(reads[i], offs[i], completion=completer(i))
h.aio_flush(completion=completer(-1))
while h.aio_in_flight() > 0:
    h.poll(-1)
assert sorted(order) == [-1] + list(range(N)), "not every request completed once"
for i, b in reads.items():
    assert b.to_bytearray() == bytearray(payload(i)), "read %d (%d bytes at %d) returned wrong data" % (i, sizes[i], offs[i])
for i in range(3, N, 4):
    assert h.pread(sizes[i], offs[i]) == b"\0" * sizes[i], "zero %d not applied" % i
# The gaps between ranges were never written.
for i in range(N - 1):
    gap = offs[i + 1] - (offs[i] + sizes[i])
    if gap:
        assert h.pread(gap, offs[i] + sizes[i]) == b"\0" * gap, "gap after range %d was written" % i
print("replies out of submission order:", [i for i in order if i >= 0] != [i for i in idx])
h.shutdown()
done()
