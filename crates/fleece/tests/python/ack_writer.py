"""Writes 4 KiB blocks at random offsets until killed, printing each offset
once the server acknowledged it.

usage: ack_writer.py URI SEED
"""
import random
import sys

import nbd

uri, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
buf = bytes([seed % 251 + 1]) * 4096
while True:
    off = rng.randrange(0, size // 4096) * 4096
    try:
        h.pwrite(buf, off)
    except nbd.Error:
        break
    print(off, flush=True)
