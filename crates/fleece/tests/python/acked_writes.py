"""Writes distinct 4 KiB blocks with 16 requests in flight, printing each
block index once the server acknowledged it, until the connection ends
(the test stops the server). Exits 0 when the server went away after at
least one acknowledgement.

usage: acked_writes.py SOCKET EXPORT FIRST_BLOCK BLOCKS"""
import sys

import nbd

from nbdtest import URI

first, count = int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(URI)


def block(i):
    return (b"%08d" % i) * 512


acked = 0
nxt = first
inflight = {}


def on_done(i):
    def cb(err):
        global acked
        if err.value == 0:
            print(i, flush=True)
            acked += 1
        return 1
    return cb


try:
    while True:
        while h.aio_in_flight() < 16 and nxt < first + count:
            buf = nbd.Buffer.from_bytearray(bytearray(block(nxt)))
            inflight[nxt] = buf
            h.aio_pwrite(buf, nxt * 4096, completion=on_done(nxt))
            nxt += 1
        if nxt >= first + count and h.aio_in_flight() == 0:
            nxt = first  # wrap around and rewrite the same data
            continue
        h.poll(-1)
except nbd.Error as e:
    print("stopped: %s" % e, file=sys.stderr)
assert acked > 0, "no write was acknowledged"
