"""File locks between the workers of a node, and atomic writes.

A lock is an ``flock`` held by an open file description, so the kernel
releases it when its holder's process dies. Nothing here blocks in the
kernel: under gevent that would stall every client of the worker, and could
wait forever on a lock held by another greenlet of the same worker.
``exclusive`` therefore tries without blocking and sleeps (cooperatively)
between tries, up to a deadline.

Lock files of one digest or tag would pile up, one per thing ever asked
for, so their holder removes them: ``unlock`` unlinks the path *while still
holding the lock*, then closes it. A lock counts only while its file is
still the one at the path, which ``try_lock`` checks after every ``flock``::

    A holds /l (inode 1)      B opens /l (inode 1), tries: taken
    A unlinks /l, closes      B's flock on inode 1 succeeds, but /l is gone
                              (or is inode 2, made by C): B closes and tries again

So two holders never both believe they hold the lock of one path. Files
whose holder died (the kernel released the lock, nobody unlinked) are
removed by whoever takes them next, and by ``node.storage.stale``.

An atomic write goes to a hidden temporary file in the destination's folder
and is renamed over it, so a reader sees the old bytes or the new ones,
never a part; a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator

from node.errors import NoRoom, UpstreamUnavailable, is_disk_full

# Between tries, the wait doubles from the first to the last value.
RETRY_FIRST, RETRY_LAST = 0.001, 0.02


class LockTimeout(UpstreamUnavailable):
    """The lock was not free within the timeout: whoever holds it waits on the upstream too."""

    retry_after = 1


def try_lock(path: str, mode: int = fcntl.LOCK_EX) -> int | None:
    """The open descriptor holding ``flock(mode)`` on ``path``, or None when it is taken.

    The caller owns the descriptor: closing it releases the lock, and
    ``unlock`` releases it and removes the file.
    """
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            if _still_linked(fd, path):
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The holder before removed the file as this one took it: try the new one.
        os.close(fd)


def _still_linked(fd: int, path: str) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def unlock(fd: int, path: str) -> None:
    """Release an exclusive lock from ``try_lock`` and remove its file (unlinked first, then closed)."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)


def held(path: str) -> bool:
    """Whether someone holds an exclusive lock on ``path``; creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def exclusive(
    path: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block; leaving it removes the file.

    Raises ``LockTimeout`` (a 503 with Retry-After) when the lock is not
    free within ``timeout``.
    """
    deadline = clock() + timeout
    wait = RETRY_FIRST
    while (fd := try_lock(path)) is None:
        if clock() > deadline:
            raise LockTimeout("timed out waiting for another request for the same content")
        sleep(wait)
        wait = min(wait * 2, RETRY_LAST)
    try:
        yield
    finally:
        unlock(fd, path)


@contextlib.contextmanager
def disk_full_is_busy() -> Iterator[None]:
    """Raise ``NoRoom`` (a 503 with Retry-After) for a write the disk had no room for."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise NoRoom("the cache's disk is full; try again shortly") from exc
        raise


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
