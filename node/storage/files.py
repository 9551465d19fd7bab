"""File locks between the workers of a node, and atomic writes.

A lock is an ``flock`` held by an open file description, so the kernel
releases it when its holder's process dies. Nothing here blocks in the
kernel: under gevent that would stall every client of the worker, and could
wait forever on a lock held by another greenlet of the same worker.
``exclusive`` therefore tries without blocking and sleeps (cooperatively)
between tries, up to a deadline.

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

from node.errors import UpstreamUnavailable

# Between tries, the wait doubles from the first to the last value.
RETRY_FIRST, RETRY_LAST = 0.001, 0.02


class LockTimeout(UpstreamUnavailable):
    """The lock was not free within the timeout: whoever holds it waits on the upstream too."""


def try_lock(path: str, mode: int = fcntl.LOCK_EX) -> int | None:
    """The open descriptor holding ``flock(mode)`` on ``path``, or None when it is taken.

    The caller owns the descriptor: closing it releases the lock.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def exclusive(
    path: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block.

    Raises ``LockTimeout`` (a 503) when the lock is not free within ``timeout``.
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
        os.close(fd)


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
