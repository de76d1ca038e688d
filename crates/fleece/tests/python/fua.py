"""FUA on writes, zeroes and trims is accepted; the data is in the image
file when the reply arrives (NBD_IMAGE names the file, if given)."""
import os
import subprocess
import tempfile

import nbd

from nbdtest import MIB, connect, done

IMAGE = os.environ.get("NBD_IMAGE")
FORMAT = os.environ.get("NBD_IMAGE_FORMAT", "raw")

h = connect()
assert h.can_fua() and h.can_flush()


def read_image(off, n):
    """n bytes at off of the image as QEMU reads it (qcow2: qemu-img
    convert -U of the file as it is, so imago's cached metadata counts only
    if the FUA wrote it out)."""
    if FORMAT == "raw":
        with open(IMAGE, "rb") as f:
            f.seek(off)
            return f.read(n)
    with tempfile.NamedTemporaryFile() as out:
        subprocess.run(["qemu-img", "convert", "-U", "-f", FORMAT, "-O", "raw", IMAGE, out.name],
                       check=True)
        out.seek(off)
        return out.read(n)


def in_file(off, want):
    if IMAGE:
        got = read_image(off, len(want))
        assert got == want, "FUA-acknowledged data at %d is not in %s" % (off, IMAGE)


data = os.urandom(128 << 10)
h.pwrite(data, 3 * MIB, nbd.CMD_FLAG_FUA)
in_file(3 * MIB, data)
assert h.pread(len(data), 3 * MIB) == data
h.zero(64 << 10, 3 * MIB, nbd.CMD_FLAG_FUA)
in_file(3 * MIB, b"\0" * (64 << 10) + data[64 << 10:])
h.trim(64 << 10, 3 * MIB + (64 << 10), nbd.CMD_FLAG_FUA)
in_file(3 * MIB + (64 << 10), b"\0" * (64 << 10))
assert h.pread(128 << 10, 3 * MIB) == b"\0" * (128 << 10)
# Many FUA writes in flight at once.
bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 4096) for i in range(32)]
cookies = [h.aio_pwrite(b, 5 * MIB + i * 4096, flags=nbd.CMD_FLAG_FUA) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
in_file(5 * MIB, b"".join(bytes([i + 1]) * 4096 for i in range(32)))
h.flush()
h.shutdown()
done()
