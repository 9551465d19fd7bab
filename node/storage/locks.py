"""File locks between the workers of a node (``flock`` on files in ``fills/``).

A lock is held by an open file description, so the kernel releases it when
its holder's process dies. Nothing here blocks in the kernel: under gevent
that would stall every client of the worker, and could wait forever on a
lock held by another greenlet of the same worker. ``exclusive`` therefore
tries without blocking and sleeps (cooperatively) between tries, up to a
deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator

from node.errors import UpstreamUnavailable

# Between tries, the wait doubles from the first to the last value.
_RETRY_FIRST, _RETRY_LAST = 0.001, 0.02


def try_lock(path: str, mode: int = fcntl.LOCK_EX) -> int | None:
    """The open descriptor holding ``flock(mode)`` on ``path``, or None when it is taken."""
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

    Raises ``UpstreamUnavailable`` (503) when the lock is not free within
    ``timeout``: whoever holds it is waiting on the upstream too.
    """
    deadline = clock() + timeout
    wait = _RETRY_FIRST
    while (fd := try_lock(path)) is None:
        if clock() > deadline:
            raise UpstreamUnavailable("timed out waiting for another request for the same content")
        sleep(wait)
        wait = min(wait * 2, _RETRY_LAST)
    try:
        yield
    finally:
        os.close(fd)
