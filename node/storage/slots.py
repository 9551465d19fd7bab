"""The node's fill slots: at most ``cache.max_fills`` fills at once, whichever workers run them.

A slot is one of ``count`` fixed lock files (``fills/slot-<n>.lock``). A
fill takes a free one with a non-blocking ``flock`` and holds it until it
ends; the kernel gives the slot back when its holder's process dies, so a
crashed worker never keeps one. Taking a slot is at most ``count`` opens
and ``flock`` tries, starting at a random slot so that workers do not all
queue at the first; nothing waits here (``Fills.join`` decides whether to
wait and for how long).

While a fill holds its slot it writes the bytes it will need (the size the
source announced) into the slot file, so the sweep can reserve room for
fills in flight without listing ``fills/`` (``reserved``). The file set is
fixed: nothing here grows with the number of fills.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from collections.abc import Iterator


class Slot:
    """One held slot; ``close`` gives it back (idempotent)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def reserve(self, size: int) -> None:
        """Record the bytes this fill will write, for ``Slots.reserved``."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, str(size).encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            finally:
                os.close(fd)


class Slots:
    def __init__(self, paths: list[str]) -> None:
        if not paths:
            raise ValueError("at least one fill slot is needed")
        self._paths = paths

    @property
    def count(self) -> int:
        return len(self._paths)

    def take(self) -> Slot | None:
        """A free slot, or None when every slot is held."""
        first = random.randrange(len(self._paths))
        for offset in range(len(self._paths)):
            path = self._paths[(first + offset) % len(self._paths)]
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return Slot(fd)
        return None

    def in_use(self) -> int:
        """How many slots are held now, by any worker."""
        return sum(1 for _ in self._held())

    def reserved(self) -> int:
        """The bytes the fills holding slots now said they will write."""
        total = 0
        for fd in self._held():
            with contextlib.suppress(ValueError, OSError):
                total += int(os.pread(fd, 32, 0) or b"0")
        return total

    def _held(self) -> Iterator[int]:
        for path in self._paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield fd
                    continue
            finally:
                os.close(fd)
