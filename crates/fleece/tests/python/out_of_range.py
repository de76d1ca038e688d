"""Requests beyond the end fail (EINVAL for read/trim/cache/block status,
ENOSPC for write/zero, as the spec says servers SHOULD), touch nothing
inside the export, and leave the connection usable."""
import errno
import os

import nbd

from nbdtest import assert_usable, connect, done, expect_error

FLEECE = os.environ.get("NBD_SERVER", "Fleece") == "Fleece"
# qemu-nbd answers a write past the end with EINVAL rather than ENOSPC.
WRITE_ERRS = (errno.ENOSPC,) if FLEECE else (errno.ENOSPC, errno.EINVAL)

h = connect()
h.set_strict_mode(0)
size = h.get_size()
tail = bytes((i * 7) & 0xff for i in range(4096))
h.pwrite(tail, size - 4096)
U64 = 1 << 64

cases = [
    ("read straddling the end", lambda: h.pread(4096, size - 2048), (errno.EINVAL,)),
    ("read at the end", lambda: h.pread(512, size), (errno.EINVAL,)),
    ("read far past the end", lambda: h.pread(512, size * 4), (errno.EINVAL,)),
    ("read with offset+length wrapping", lambda: h.pread(4096, U64 - 2048), (errno.EINVAL,)),
    ("read at 2^63", lambda: h.pread(512, 1 << 63), (errno.EINVAL,)),
    ("write straddling the end", lambda: h.pwrite(b"\xee" * 4096, size - 2048), WRITE_ERRS),
    ("write at the end", lambda: h.pwrite(b"\xee" * 512, size), WRITE_ERRS),
    ("write with offset+length wrapping", lambda: h.pwrite(b"\xee" * 4096, U64 - 2048), WRITE_ERRS + (errno.EINVAL,)),
    ("trim straddling the end", lambda: h.trim(4096, size - 2048), (errno.EINVAL,)),
    ("trim with offset+length wrapping", lambda: h.trim(4096, U64 - 2048), (errno.EINVAL,)),
    ("zero straddling the end", lambda: h.zero(4096, size - 2048), WRITE_ERRS),
    ("zero with offset+length wrapping", lambda: h.zero(4096, U64 - 2048), WRITE_ERRS + (errno.EINVAL,)),
    ("cache straddling the end", lambda: h.cache(4096, size - 2048), (errno.EINVAL,)),
    ("block status at the end", lambda: h.block_status(4096, size, lambda *a: 0), (errno.EINVAL,)),
    ("block status with offset+length wrapping", lambda: h.block_status(4096, U64 - 2048, lambda *a: 0), (errno.EINVAL,)),
]
for what, fn, codes in cases:
    expect_error(fn, codes, what)
    assert h.aio_is_ready(), "%s dropped the connection" % what
    # The in-range part of a failed straddling request was not applied.
    assert h.pread(4096, size - 4096) == tail, "%s changed data inside the export" % what
assert_usable(h)
# The last byte is still readable and writable.
h.pwrite(b"\x01", size - 1)
assert h.pread(1, size - 1) == b"\x01"
h.shutdown()
done()
