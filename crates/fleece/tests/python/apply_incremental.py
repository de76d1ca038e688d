"""Applies the dirty extents of an incremental snapshot to a backup file.

usage: apply_incremental.py VIEW_URI BITMAP BACKUP_FILE
Reads block status of qemu:dirty-bitmap:BITMAP on the view and copies every
dirty extent from the view into BACKUP_FILE at the same offset. Prints the
number of bytes copied.
"""
import sys

import nbd

uri, bitmap, backup = sys.argv[1:4]
ctx = "qemu:dirty-bitmap:" + bitmap
h = nbd.NBD()
h.add_meta_context(ctx)
h.connect_uri(uri)
assert h.can_meta_context(ctx), "view does not offer " + ctx
size = h.get_size()
dirty = []


def extents(metacontext, offset, entries, err):
    if metacontext != ctx:
        return 0
    pos = offset
    for i in range(0, len(entries), 2):
        length, flags = entries[i], entries[i + 1]
        if flags & 1:
            dirty.append((pos, length))
        pos += length
    extents.end = pos
    return 0


pos = 0
while pos < size:
    extents.end = pos
    h.block_status(min(size - pos, 1 << 30), pos, extents)
    assert extents.end > pos, "block status made no progress"
    pos = extents.end

copied = 0
with open(backup, "r+b") as f:
    for off, length in dirty:
        length = min(length, size - off)
        done = 0
        while done < length:
            n = min(length - done, 4 << 20)
            f.seek(off + done)
            f.write(h.pread(n, off + done))
            done += n
        copied += length
h.shutdown()
print(copied)
