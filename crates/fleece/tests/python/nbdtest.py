"""Helpers shared by the python3-libnbd protocol scripts in this directory.

Every script is run as `python3 SCRIPT SOCKET EXPORT` (or with NBD_SOCKET and
NBD_EXPORT in the environment) against a read-write export of at least
16 MiB that the script may overwrite. Scripts fail with an AssertionError
(non-zero exit) on the first wrong behaviour and print "ok" at the end.
"""
import errno
import os
import sys

import nbd

SOCK = sys.argv[1] if len(sys.argv) > 1 else os.environ["NBD_SOCKET"]
EXPORT = sys.argv[2] if len(sys.argv) > 2 else os.environ["NBD_EXPORT"]
URI = "nbd+unix:///%s?socket=%s" % (EXPORT, SOCK)
MIB = 1 << 20

ERRNAMES = {v: k for k, v in errno.errorcode.items()}


def errname(n):
    return ERRNAMES.get(n, str(n))


def connect(meta=True, structured=True, strict=None):
    """A handle in transmission phase on the export."""
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_request_structured_replies(structured)
    h.connect_uri(URI)
    if strict is not None:
        h.set_strict_mode(strict)
    return h


def expect_error(fn, codes, what):
    """Calls fn(), which must raise nbd.Error with an errno in codes."""
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum in codes, "%s: failed with %s (%s), expected one of %s" % (
            what, errname(e.errnum), e, [errname(c) for c in codes])
        return e.errnum
    raise AssertionError("%s: succeeded, expected an error %s" % (what, [errname(c) for c in codes]))


def assert_usable(h, off=0):
    """The connection still answers: a write and a read at off round-trip."""
    marker = os.urandom(512)
    h.pwrite(marker, off)
    got = h.pread(512, off)
    assert got == marker, "connection no longer returns what was written at %d" % off


def extents(h, length, offset, flags=0, ctx=nbd.CONTEXT_BASE_ALLOCATION):
    """block_status as a list of (offset, length, flags) for one context."""
    out = []

    def cb(meta, off, entries, err):
        if meta == ctx:
            assert off == offset, "extents for %d, asked for %d" % (off, offset)
            pos = off
            for i in range(0, len(entries), 2):
                out.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def done():
    print("ok")
