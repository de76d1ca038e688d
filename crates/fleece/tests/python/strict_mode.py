"""With libnbd's strict checks off the server sees requests libnbd would
refuse: unknown or inapplicable flags and block status without a meta
context get EINVAL; FUA must be accepted on every command; unaligned
requests work (minimum block size 1); the connection goes on throughout.
(libnbd cannot send an unknown command type; the raw-socket Rust tests do.)"""
import errno

import nbd

from nbdtest import MIB, assert_usable, connect, done, expect_error

h = connect()
h.set_strict_mode(0)
h.pwrite(b"\x5c" * 4096, MIB)

for what, fn in [
    ("read with unknown flag 0x8000", lambda: h.pread(512, 0, 0x8000)),
    ("read with unknown flag 0x0100", lambda: h.pread(512, 0, 0x0100)),
    ("write with REQ_ONE", lambda: h.pwrite(b"z" * 512, MIB, nbd.CMD_FLAG_REQ_ONE)),
    ("write with DF", lambda: h.pwrite(b"z" * 512, MIB, nbd.CMD_FLAG_DF)),
    ("write with NO_HOLE", lambda: h.pwrite(b"z" * 512, MIB, nbd.CMD_FLAG_NO_HOLE)),
    ("write with FAST_ZERO", lambda: h.pwrite(b"z" * 512, MIB, nbd.CMD_FLAG_FAST_ZERO)),
    ("trim with FAST_ZERO", lambda: h.trim(512, MIB, nbd.CMD_FLAG_FAST_ZERO)),
    ("trim with DF", lambda: h.trim(512, MIB, nbd.CMD_FLAG_DF)),
    ("flush with REQ_ONE", lambda: h.flush(nbd.CMD_FLAG_REQ_ONE)),
    ("read with REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)),
]:
    expect_error(fn, (errno.EINVAL,), what)
    assert h.aio_is_ready(), "%s dropped the connection" % what
    assert h.pread(4096, MIB) == b"\x5c" * 4096, "%s changed data" % what

# FUA: "the server MUST accept all commands with this bit set".
assert h.can_fua()
assert h.pread(4096, MIB, nbd.CMD_FLAG_FUA) == b"\x5c" * 4096
h.flush(nbd.CMD_FLAG_FUA)
h.cache(4096, MIB, nbd.CMD_FLAG_FUA)
h.block_status(4096, MIB, lambda *a: 0, nbd.CMD_FLAG_FUA)

# Unaligned everything.
h.pwrite(b"\x01\x02\x03", MIB + 4093)
assert h.pread(5, MIB + 4092) == b"\x5c\x01\x02\x03\x00"
assert h.pread(1, MIB + 1) == b"\x5c"
h.zero(1, MIB + 4094)
assert h.pread(3, MIB + 4093) == b"\x01\x00\x03"
h.cache(1, 12345)
assert_usable(h)
h.shutdown()

# Structured replies off: DF is not valid.
h = connect(structured=False)
h.set_strict_mode(0)
expect_error(lambda: h.pread(512, 0, nbd.CMD_FLAG_DF), (errno.EINVAL,), "DF read without structured replies")
assert_usable(h)
h.shutdown()

# No meta context negotiated: block status is not valid.
h = connect(meta=False)
assert not h.can_meta_context("base:allocation")
h.set_strict_mode(0)
expect_error(lambda: h.block_status(4096, 0, lambda *a: 0), (errno.EINVAL,), "block status without a meta context")
assert_usable(h)
h.shutdown()
done()
