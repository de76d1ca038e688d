"""Zero-length requests (libnbd sends them only with strict mode off): the
spec leaves the result open but the server must not disconnect. fleece
answers them as successful no-ops."""
import os

import nbd

from nbdtest import MIB, assert_usable, connect, done, errname

FLEECE = os.environ.get("NBD_SERVER", "Fleece") == "Fleece"

h = connect()
h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ZERO_SIZE)
size = h.get_size()
h.pwrite(b"\x33" * 4096, MIB)

results = {}
for name, fn in [
    ("read", lambda off: h.pread(0, off)),
    ("write", lambda off: h.pwrite(b"", off)),
    ("trim", lambda off: h.trim(0, off)),
    ("zero", lambda off: h.zero(0, off)),
    ("cache", lambda off: h.cache(0, off)),
    ("block_status", lambda off: h.block_status(0, off, lambda *a: 0)),
]:
    for off in (0, MIB + 100, size):
        try:
            r = fn(off)
            if name == "read":
                assert r == b"", "zero-length read returned %d bytes" % len(r)
            results[(name, off)] = "ok"
        except nbd.Error as e:
            results[(name, off)] = errname(e.errnum)
        assert h.aio_is_ready(), "%s of length 0 at %d dropped the connection" % (name, off)
        assert_usable(h, 8 * MIB)
print(results)
if FLEECE:
    for name in ("read", "write", "trim", "zero", "cache"):
        for off in (0, MIB + 100, size):
            assert results[(name, off)] == "ok", "fleece: zero-length %s at %d: %s" % (name, off, results[(name, off)])
# Nothing was changed by the zero-length trim and zero.
assert h.pread(4096, MIB) == b"\x33" * 4096
h.shutdown()
done()
