"""A missing export name fails INFO and GO with an error reply; the
connection stays in negotiation and the right name then works."""
import errno

import nbd

from nbdtest import EXPORT, SOCK, URI, done, expect_error

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(SOCK)
for name in ["no-such-export", EXPORT + "-nope", "x" * 300]:
    h.set_export_name(name)
    expect_error(h.opt_info, (errno.ENOENT,), "opt_info(%r)" % name[:40])
    assert h.aio_is_negotiating(), "connection left negotiation after a failed opt_info"
    expect_error(h.opt_go, (errno.ENOENT,), "opt_go(%r)" % name[:40])
    assert h.aio_is_negotiating(), "connection left negotiation after a failed opt_go"
h.set_export_name(EXPORT)
h.opt_info()
size = h.get_size()
h.opt_go()
assert h.get_size() == size
h.pwrite(b"\x07" * 512, 512)
assert h.pread(512, 512) == b"\x07" * 512
h.shutdown()

# Without opt mode, connecting to a missing export fails as a whole.
h = nbd.NBD()
expect_error(lambda: h.connect_uri(URI.replace("///" + EXPORT + "?", "///no-such-export?")),
             (errno.ENOENT,), "connect to a missing export")
done()
