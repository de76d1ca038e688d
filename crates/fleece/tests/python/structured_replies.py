"""Structured replies on and off: both work; DF and block status need them."""
import errno

import nbd

from nbdtest import MIB, connect, done, expect_error

# On (the default): negotiated; DF and base:allocation offered.
h = connect()
assert h.get_structured_replies_negotiated()
assert h.can_df()
assert h.can_meta_context("base:allocation")
data = bytes(range(256)) * 256  # 64 KiB
h.pwrite(data, 1 * MIB)
h.trim(64 << 10, 1 * MIB + (64 << 10))
chunks = []
buf = h.pread_structured(128 << 10, 1 * MIB,
                         lambda sub, off, status, err: chunks.append((off, len(sub), status)) or 0)
assert buf == data + b"\0" * (64 << 10)
assert sum(c[1] for c in chunks) == 128 << 10, chunks
h.shutdown()

# Off: simple replies carry the data; no DF, no meta context.
h = connect(meta=True, structured=False)
assert not h.get_structured_replies_negotiated()
assert not h.can_df(), "DF advertised without structured replies"
assert not h.can_meta_context("base:allocation"), "meta context without structured replies"
assert h.pread(64 << 10, 1 * MIB) == data
assert h.pread(64 << 10, 1 * MIB + (64 << 10)) == b"\0" * (64 << 10)
h.pwrite(b"\x99" * 8192, 2 * MIB + 100)
assert h.pread(8192 + 200, 2 * MIB) == b"\0" * 100 + b"\x99" * 8192 + b"\0" * 100
chunks = []
buf = h.pread_structured(4096, 2 * MIB + 100,
                         lambda sub, off, status, err: chunks.append((off, status)) or 0)
assert buf == b"\x99" * 4096
assert chunks == [(2 * MIB + 100, nbd.READ_DATA)], chunks
# Errors still come back as errors with simple replies.
h.set_strict_mode(0)
expect_error(lambda: h.pread(4096, h.get_size()), (errno.EINVAL,), "simple reply: read past the end")
assert h.pread(8192, 2 * MIB + 100) == b"\x99" * 8192
h.shutdown()
done()
