"""Waking the followers of a fill when its partial file changes.

A fill's followers may sit in any of the node's workers, so the leader
cannot wake them itself; the kernel can. Each worker has one ``inotify``
instance and one thread (a greenlet under gevent) reading it. A follower
watches the partial file it has open; every write, chmod (the leader marks
the bytes verified by making the file read-only), unlink or rename of that
file bumps the watch's generation and wakes every follower of it in this
worker at once. Followers of one fill share one watch, so a hundred of them
cost one kernel watch and one wake-up per write.

How a follower waits, without missing a change that lands between its look
and its sleep::

    with watch.watching(path) as change:
        while True:
            seen = change.generation
            ...look at the file; return if there is something to do...
            change.wait(seen, timeout)

A leader that dies leaves no event behind; followers therefore wake at
least every ``timeout`` seconds to check for it. Where ``inotify`` is not
available (no instance left for this user), watches fall back to waking
every ``FALLBACK_INTERVAL`` seconds, and the node logs it once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Iterator

from inotify_simple import INotify, flags, parse_events

log = logging.getLogger(__name__)

# What a follower cares about: new bytes, the verified mark, and the end of
# the partial file's life (unlinked on failure, renamed into the store).
_MASK = flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE | flags.MOVE_SELF | flags.DELETE_SELF
# How often the reader looks up from the kernel to see whether it is closed.
_READ_INTERVAL = 1.0
FALLBACK_INTERVAL = 0.02


class Change:
    """The changes to one partial file, as a counter followers wait on."""

    def __init__(self, interval: float | None = None) -> None:
        self.generation = 0
        self._condition = threading.Condition()
        # Without a kernel watch, waits are capped at this interval.
        self._interval = interval
        self.users = 0

    def bump(self) -> None:
        with self._condition:
            self.generation += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Return once the generation moved past ``seen``, or after ``timeout``."""
        if self._interval is not None:
            timeout = min(timeout, self._interval)
        with self._condition:
            self._condition.wait_for(lambda: self.generation != seen, timeout)


class PartialWatch:
    """One worker's watches on partial files; ``close`` stops its reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_wd: dict[int, Change] = {}
        self._closed = threading.Event()
        self._inotify: INotify | None = None
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as exc:
            log.warning("inotify is not available (%s): followers of fills check every %ss", exc, FALLBACK_INTERVAL)
            return
        self._thread = threading.Thread(target=self._read, name="shoal-fill-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, path: str) -> Iterator[Change]:
        """Watch ``path`` while the block runs.

        A path that is gone already yields a change nobody will bump; the
        caller finds the outcome on the file it has open, and its waits are
        short because there is nothing to wait for.
        """
        if self._inotify is None:
            yield Change(FALLBACK_INTERVAL)
            return
        with self._lock:
            try:
                wd = self._inotify.add_watch(path, _MASK)
            except OSError:
                wd = None
            if wd is None:
                change = Change(FALLBACK_INTERVAL)
            else:
                change = self._by_wd.setdefault(wd, Change())
                change.users += 1
        try:
            yield change
        finally:
            if wd is not None:
                self._release(wd, change)

    def _release(self, wd: int, change: Change) -> None:
        with self._lock:
            change.users -= 1
            if change.users or self._by_wd.get(wd) is not change:
                return
            del self._by_wd[wd]
            # The kernel drops the watch itself when the file is deleted.
            if self._inotify is not None and not self._closed.is_set():
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(wd)

    def _read(self) -> None:
        assert self._inotify is not None
        fd = self._inotify.fileno()
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], _READ_INTERVAL)
                if not ready:
                    continue
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                if self._closed.is_set():
                    return
                raise
            woken: set[int] = set()
            for event in parse_events(data):
                woken.add(event.wd)
                if event.mask & flags.IGNORED:
                    # The file is gone and the kernel dropped the watch.
                    with self._lock:
                        gone = self._by_wd.pop(event.wd, None)
                    if gone is not None:
                        gone.bump()
            for wd in woken:
                change = self._by_wd.get(wd)
                if change is not None:
                    change.bump()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._inotify is not None:
            self._thread.join()
            self._inotify.close()
