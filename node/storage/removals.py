"""Which content a node removed, as every worker of the node sees it without a system call.

A worker keeps manifests in memory (``node.storage.memory``); the content
behind them may be removed by any worker of the node (the sweep, an
expiry the coordinator ordered). Each worker maps the same small file,
``<cache.dir>/removals``, into its memory: a table of ``SLOTS`` stamps of 8
bytes, one slot per digest (by a CRC of its hex, the same in every
process). ``record`` writes a new random stamp into the
digest's slot after the files are unlinked; ``stamp`` reads the slot from
the shared mapping, a memory read with no system call.

A memory copy keeps the stamp read *before* its bytes were read from the
disk, and is served only while the slot still holds that stamp. Timeline of
a removal racing a read::

    reader: stamp = S ... read the file ... keep (bytes, S)
    remover:                               unlink ... record: slot = S'
    reader: next request: slot is S' != S: the copy is not served

The reader could read the file only before the unlink, so its stamp was
read before the ``record`` that follows it: once ``remove`` has returned,
no worker serves the old copy again. (A request that read the stamp just
before the record may still answer from memory, as a download that opened
the file before the unlink still finishes.)

Stamps are random rather than counted, so that two workers recording into
one slot at once need no lock: whichever write lands last, the slot holds a
value no copy was kept under. A torn read of a slot being written only
reads as a change. Digests that share a slot are forgotten together; with
4,096 slots that is one in 4,096 of the copies for each removal.
"""

from __future__ import annotations

import mmap
import os
import secrets
import zlib

from node.reference import Digest

SLOTS = 4096
STAMP_SIZE = 8


class Removals:
    """The node's table of removal stamps, mapped into this process; ``close`` unmaps it."""

    def __init__(self, path: str) -> None:
        size = SLOTS * STAMP_SIZE
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            # Every worker may create it; allocating it is idempotent. Its
            # blocks are allocated, not just its size set: writing to a hole
            # of a mapped file on a full disk kills the process (SIGBUS).
            os.posix_fallocate(fd, 0, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def stamp(self, digest: Digest) -> bytes:
        """The stamp of ``digest``'s slot now: a copy kept under it is valid while this stays the same."""
        offset = _slot(digest) * STAMP_SIZE
        return self._mapping()[offset : offset + STAMP_SIZE]

    def record(self, digest: Digest) -> None:
        """``digest`` was removed: no copy kept before now is valid any more."""
        offset = _slot(digest) * STAMP_SIZE
        self._mapping()[offset : offset + STAMP_SIZE] = secrets.token_bytes(STAMP_SIZE)

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError("the removal table was closed")
        return self._map

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _slot(digest: Digest) -> int:
    # Not hash(): it differs between processes.
    return zlib.crc32(digest.hex.encode()) % SLOTS
