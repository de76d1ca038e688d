"""Option haggling: LIST, INFO, GO, ABORT and LIST_META_CONTEXT in opt mode."""
import nbd

from nbdtest import EXPORT, SOCK, connect, done

# LIST names the export; INFO reports what GO then gives.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(SOCK)
assert h.aio_is_negotiating()
names = []
n = h.opt_list(lambda name, desc: names.append(name) or 0)
assert EXPORT in names, "opt_list: %s has no %r" % (names, EXPORT)
assert n == len(names)
assert len(set(names)) == len(names), "opt_list repeats a name: %s" % names

h.set_export_name(EXPORT)
h.opt_info()
info_size = h.get_size()
assert info_size >= 16 << 20, info_size
info_flags = (h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
              h.can_multi_conn(), h.can_cache(), h.can_df())
assert h.is_read_only() is False or h.is_read_only() == 0
# INFO may be repeated; the answer does not change.
h.opt_info()
assert h.get_size() == info_size
assert h.aio_is_negotiating(), "opt_info left negotiation"

# LIST_META_CONTEXT: everything, a namespace, an exact name, an unknown namespace.
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert "base:allocation" in ctxs, ctxs
ctxs = []
h.add_meta_context("base:")
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert ctxs == ["base:allocation"], "query base: gave %s" % ctxs
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert ctxs == ["base:allocation"], ctxs
h.clear_meta_contexts()
h.add_meta_context("nosuchns:whatever")
ctxs = []
assert h.opt_list_meta_context(lambda name: ctxs.append(name) or 0) == 0
assert ctxs == [], "unknown namespace listed %s" % ctxs
assert h.aio_is_negotiating()

# SET_META_CONTEXT on its own came in libnbd 1.16; use it when present.
if hasattr(h, "opt_set_meta_context"):
    h.clear_meta_contexts()
    h.add_meta_context("base:allocation")
    assert h.opt_set_meta_context(lambda name: 0) == 1

# GO with base:allocation: the same size and flags as INFO said.
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.opt_go()
assert h.aio_is_ready()
assert h.get_size() == info_size
assert (h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
        h.can_multi_conn(), h.can_cache(), h.can_df()) == info_flags
assert h.can_meta_context("base:allocation")
assert h.get_structured_replies_negotiated()
h.pwrite(b"\x42" * 4096, 0)
assert h.pread(4096, 0) == b"\x42" * 4096
h.shutdown()

# ABORT ends the negotiation cleanly; the handle is then closed.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(SOCK)
h.opt_list(lambda name, desc: 0)
h.opt_abort()
assert h.aio_is_closed(), "opt_abort did not close the handle"
try:
    h.pread(512, 0)
    raise AssertionError("read after opt_abort succeeded")
except nbd.Error:
    pass

# An ABORT right away, then a client that simply goes.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(SOCK)
h.opt_abort()
assert h.aio_is_closed()

# The server still serves new clients after all that.
h = connect()
assert h.get_size() == info_size
h.shutdown()
done()
