"""The confirmations of a node on its own, on its disk, shared by its workers.

A node without coordinators keeps which digests are confirmed for which
repository (``node.bindings``) in one small file per pair,
``repos/<registry>/<name>/_bound/<algorithm>-<hex>`` (``layout.py``),
holding when the confirmation expires (Unix seconds, ``inf`` for never).
A worker reads it only when its own memory does not hold the pair, so the
warm path never touches these files. Writes are atomic and only ever move
an expiry later; two workers writing at once leave one of their values,
both of them valid.

Files are written only for pairs the upstream confirmed (or a confirmed
manifest referenced), so a made-up repository name never leaves a folder
behind. The store's sweep removes, now and then (``remove_unheld``), the
files of content it no longer holds and those run out, so the folders do not
keep one file for every pair ever confirmed.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

from node.reference import Digest
from node.storage.files import disk_full_is_busy, write_atomic
from node.storage.layout import BINDINGS, TAGS, Layout


class LocalLedger:
    """``node.bindings.Ledger`` on the node's disk."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def confirmed(self, registry: str, repository: str, digests: list[Digest]) -> dict[Digest, float]:
        """The ones of ``digests`` ever confirmed, with their expiry (the caller compares it with now)."""
        found: dict[Digest, float] = {}
        for digest in digests:
            expires_at = self._read(f"{registry}/{repository}", digest)
            if expires_at is not None:
                found[digest] = expires_at
        return found

    def confirm(self, registry: str, repository: str, digests: list[Digest], expires_at: float) -> None:
        name = f"{registry}/{repository}"
        for digest in digests:
            known = self._read(name, digest)
            if known is not None and known >= expires_at:
                continue
            with disk_full_is_busy():
                os.makedirs(self._layout.bindings(name), exist_ok=True)
                write_atomic(self._layout.binding(name, digest), repr(expires_at).encode())

    def _read(self, name: str, digest: Digest) -> float | None:
        return _read_expiry(self._layout.binding(name, digest))


# A confirmation of content the store does not hold is kept this long after
# it was written: a manifest's references are confirmed before its client
# asks for them.
UNHELD_GRACE = 600.0


def remove_unheld(layout: Layout, held: Callable[[Digest], bool], now: float) -> int:
    """Remove the confirmations run out by ``now``, and those of content the store does not hold; return how many.

    Confirmations of content not held go once they are ``UNHELD_GRACE``
    old. Either kind is only worth a ``HEAD`` to the upstream: a pair asked
    for again is confirmed again (a worker's memory keeps its own copy
    until that expires). A confirmation written again while the sweep looks
    may be removed with the old one; that too costs one ``HEAD``.
    """
    removed = 0
    for folder, subfolders, files in os.walk(layout.repos):
        if os.path.basename(folder) != BINDINGS:
            subfolders[:] = [s for s in subfolders if s != TAGS]
            continue
        subfolders[:] = []
        for entry in files:
            algorithm, _, encoded = entry.partition("-")
            if entry.startswith(".") or not encoded:
                continue  # an atomic write on its way; the stale sweep takes crashed ones
            path = os.path.join(folder, entry)
            digest = Digest(algorithm, encoded)
            with contextlib.suppress(FileNotFoundError):
                expires_at = _read_expiry(path)
                current = expires_at is not None and expires_at > now
                if current and (held(digest) or os.stat(path).st_mtime > now - UNHELD_GRACE):
                    continue
                os.unlink(path)
                removed += 1
    return removed


def _read_expiry(path: str) -> float | None:
    with contextlib.suppress(FileNotFoundError, ValueError), open(path) as handle:
        value = float(handle.read())
        return value if not math.isnan(value) else None
    return None
