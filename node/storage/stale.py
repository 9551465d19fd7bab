"""Removing what crashed writers left in the cache directory.

A worker that dies mid-fill leaves its partial file, its state file and
its lock file in ``fills/``; one that dies mid-write leaves a ``.put`` (a
small file on its way into ``blobs/``) or a hidden ``.<random>.tmp`` (an
atomic write, ``files.write_atomic``) beside its destination. Nothing else
ever removes them, so ``remove_stale`` does, at start (``shoal node``,
before gunicorn's workers exist) and from the sweep.

What counts as stale:

- a fill's files (partial, state, lock) when the digest's lock is free:
  ``remove_stale`` takes that lock itself while it removes them, so no new
  fill of the digest can start in between (``files.try_lock``);
- a tag's or manifest's lock file that nobody holds (taken, then removed);
- a ``.put`` or ``.tmp`` file older than ``older_than`` seconds (0 at start,
  when no writer runs; ``STALE_AGE`` from the sweep, far longer than any
  write of a small file takes).

Fill slots, the duty lock and the other fixed files are left alone: there
is a fixed number of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

from node.storage.files import try_lock, unlock
from node.storage.layout import Layout

log = logging.getLogger(__name__)

# A .put or .tmp file this old is left from a writer that is gone.
STALE_AGE = 600.0
_FILL_SUFFIXES = (".partial", ".json", ".lock")


def remove_stale(
    layout: Layout, *, older_than: float, everywhere: bool = True, clock: Callable[[], float] = time.time
) -> int:
    """Remove stale files under ``layout``; how many were removed.

    ``everywhere`` also walks ``repos/``, ``budget/`` and the root for
    ``.tmp`` files (``blobs/`` is the sweep's own walk, ``remove_stale_in``).
    """
    removed = _fills(layout, older_than, clock)
    if everywhere:
        removed += remove_stale_in(layout.root, _names(layout.root), older_than, clock)
        for top in (layout.repos, layout.budgets, layout.blobs):
            for folder, _, files in os.walk(top):
                removed += remove_stale_in(folder, files, older_than, clock)
    if removed:
        log.info("removed %d files left behind by writers that are gone", removed)
    return removed


def remove_stale_in(
    folder: str, names: Iterable[str], older_than: float, clock: Callable[[], float] = time.time
) -> int:
    """Remove the stale ``.tmp`` and ``.put`` files among ``names`` in ``folder``."""
    removed = 0
    for name in names:
        if is_temporary(name) and _remove_if_old(os.path.join(folder, name), older_than, clock):
            removed += 1
    return removed


def is_temporary(name: str) -> bool:
    """A file on its way to its place: a ``.put`` or a hidden ``.tmp``."""
    return name.endswith(".put") or (name.startswith(".") and name.endswith(".tmp"))


def _fills(layout: Layout, older_than: float, clock: Callable[[], float]) -> int:
    names = _names(layout.fills)
    removed = remove_stale_in(layout.fills, names, older_than, clock)
    # A fill's files, and the manifest and tag locks, by the lock that guards them.
    guarded: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if not name.endswith(_FILL_SUFFIXES) or name.startswith(("slot-", "cluster.")):
            continue
        base = name.split(".", 1)[0]
        guarded[base].append(name)
    for base, files in guarded.items():
        lock_path = os.path.join(layout.fills, base + ".lock")
        lock = try_lock(lock_path)
        if lock is None:
            continue
        try:
            for name in files:
                if name.endswith(".lock"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(layout.fills, name))
                    removed += 1
        finally:
            unlock(lock, lock_path)
        removed += any(name.endswith(".lock") for name in files)
    return removed


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _remove_if_old(path: str, older_than: float, clock: Callable[[], float]) -> bool:
    try:
        if older_than > 0 and clock() - os.lstat(path).st_mtime < older_than:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
