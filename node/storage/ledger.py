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
behind.
"""

from __future__ import annotations

import contextlib
import math
import os

from node.reference import Digest
from node.storage.files import disk_full_is_busy, write_atomic
from node.storage.layout import Layout


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
        with contextlib.suppress(FileNotFoundError, ValueError), open(self._layout.binding(name, digest)) as handle:
            value = float(handle.read())
            return value if not math.isnan(value) else None
        return None
