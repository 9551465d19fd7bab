"""Filling the store from a source, once per node, while clients follow.

A fill copies one blob from a source (the upstream, later a peer) into the
store. Only one fill per digest runs on a node at a time, whichever of the
node's gunicorn workers asked first: the leader holds an exclusive ``flock``
on ``fills/<digest>.lock``, which the kernel releases if the process dies.
At most ``max_fills`` fills run in a worker at once; a miss beyond that
waits for a free slot, or follows a fill of the same blob that another
worker started meanwhile.

Every client, the leader's own included, reads the growing partial file
(``Fills.follow``): sent with sendfile as it grows, woken by the kernel when
bytes arrive (``watch.py``). The fill therefore runs in a background thread
that does not care whether any client is still listening: a client that
disconnects does not abort it, and the next request is a hit.

Files of a fill, under ``fills/``::

    <algorithm>-<hex>.lock              the leader's flock
    <algorithm>-<hex>.json              {"size": N | null, "partial": NAME, "origin": ...}
    <algorithm>-<hex>.<token>.partial   the bytes so far; read-only once verified

How a follower tells the outcome from the partial file it has open:

- complete: the file is read-only. The leader makes it so once the digest
  matched, before the file is synced to disk and renamed into place, so
  clients do not wait for the disk; the rename keeps the mode;
- failed: the leader unlinks the partial on every failure, so its link
  count drops to 0; a leader that died without cleaning up is seen by its
  lock being free while the file is still writable.

A follower holds back the last byte of its response until the fill is
verified, so a failed or corrupt fill always cuts the response short and
never looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from node.errors import Busy, ShoalError, UpstreamInvalid, UpstreamUnavailable
from node.offload import run_blocking
from node.reference import Digest
from node.storage.local import LocalStore
from node.storage.locks import try_lock
from node.storage.watch import PartialWatch

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A followed body this small is answered only once it is complete (``Followed.begin``).
SMALL_BODY = 64 * 1024
# While a fill is being started (by another worker, or while no fill slot
# is free), a request looks again after this long, doubling to the last.
_RETRY_FIRST, _RETRY_LAST = 0.001, 0.02
# A follower checks at least this often that its fill's leader is alive:
# a leader that dies leaves no event behind.
_LIVENESS = 1.0
# Mode bits: a partial file without any write bit is verified.
_WRITABLE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


class Source(Protocol):
    """An open stream of a blob's bytes, as ``Upstream.open_blob`` yields.

    ``origin`` says where the bytes come from (``upstream`` or ``peer``);
    ``joined`` is true when the source itself rides on a fetch already
    running elsewhere (a peer's fill in progress).
    """

    size: int | None
    origin: str

    def iter_bytes(self, chunk_size: int | None = ...) -> Iterator[bytes]: ...


Opener = Callable[[], AbstractContextManager[Source]]


class FillFailed(ShoalError):
    """The fill a client was following failed; its response is cut short."""

    code, status = "UPSTREAM_UNAVAILABLE", 503


@dataclass(frozen=True)
class Following:
    """A fill in progress that a client can read from; the caller owns ``file``."""

    file: int
    size: int | None
    digest: Digest
    content_path: str
    lock_path: str
    # The partial file's path: what the follower watches.
    partial: str
    # Where the fill's bytes come from: "upstream" or "peer".
    origin: str = "upstream"
    # True when this client rode on a fetch that was already running.
    joined: bool = False


class Fills:
    def __init__(
        self,
        store: LocalStore,
        timeout: float = 30.0,
        on_commit: Callable[[Digest], None] | None = None,
        max_fills: int = 16,
    ):
        self.store = store
        # How long a follower waits for a leader that makes no progress,
        # and a miss for a free fill slot.
        self.timeout = timeout
        self._on_commit = on_commit
        self._slots = threading.BoundedSemaphore(max_fills)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._watch = PartialWatch()

    def _base(self, digest: Digest) -> str:
        return os.path.join(self.store.fills_dir(), f"{digest.algorithm}-{digest.hex}")

    def join(self, digest: Digest, opener: Opener) -> Following | None:
        """Start or join the fill of ``digest``.

        Returns None when the content turned out to be complete in the store
        already (the caller serves it as a hit). Raises the source's error
        when this call led the fill and the source failed before any byte,
        and ``Busy`` when no fill slot came free within ``timeout``.
        """
        base = self._base(digest)
        deadline = time.monotonic() + self.timeout
        wait = _RETRY_FIRST
        while True:
            if self.store.has(digest):
                return None
            following = self._open_partial(digest)
            if following is not None:
                if not _verified(following.file):
                    return following
                # Verified and about to be committed: wait a moment and
                # serve it as the hit it is about to become.
                os.close(following.file)
            elif self._slots.acquire(timeout=wait):
                lock = try_lock(base + ".lock", fcntl.LOCK_EX)
                if lock is not None:
                    if self.store.has(digest):
                        os.close(lock)
                        self._slots.release()
                        return None
                    return self._lead(digest, opener, lock)
                self._slots.release()
            if time.monotonic() > deadline:
                if following is None and not os.path.exists(base + ".json"):
                    raise Busy("this node is running as many fills as it may; try again", {"digest": str(digest)})
                raise UpstreamUnavailable("timed out waiting for another fill of this blob", {"digest": str(digest)})
            time.sleep(wait)
            wait = min(wait * 2, _RETRY_LAST)

    def in_progress(self, digest: Digest) -> Following | None:
        """Follow a fill that is running on this node, without starting one."""
        return self._open_partial(digest)

    def follow(self, fill: Following, start: int = 0, end: int | None = None) -> Followed:
        """The response body of bytes ``[start, end)`` of ``fill``; it owns ``fill.file`` from now on."""
        return Followed(fill, self._watch, start, end, self.timeout)

    def _open_partial(self, digest: Digest) -> Following | None:
        base = self._base(digest)
        try:
            with open(base + ".json", encoding="utf-8") as handle:
                info = json.load(handle)
            fd = os.open(os.path.join(self.store.fills_dir(), info["partial"]), os.O_RDONLY)
        except (FileNotFoundError, ValueError, KeyError):
            return None
        origin = info.get("origin", "upstream")
        partial = os.path.join(self.store.fills_dir(), info["partial"])
        return Following(
            fd, info["size"], digest, self.store.content_path(digest), base + ".lock", partial, origin, True
        )

    def _lead(self, digest: Digest, opener: Opener, lock: int) -> Following:
        """Run the fill in a thread holding ``lock`` and a slot; both are released when it ends."""
        base = self._base(digest)
        self._remove_stale(digest)
        ready = threading.Event()
        outcome: dict[str, object] = {}

        def run() -> None:
            partial = f"{base}.{secrets.token_hex(8)}.partial"
            try:
                with opener() as source:
                    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "wb") as out:
                        origin = getattr(source, "origin", "upstream")
                        outcome["following"] = Following(
                            os.open(partial, os.O_RDONLY),
                            source.size,
                            digest,
                            self.store.content_path(digest),
                            base + ".lock",
                            partial,
                            origin,
                            bool(getattr(source, "joined", False)),
                        )
                        info = {"size": source.size, "partial": os.path.basename(partial), "origin": origin}
                        _write_json(base + ".json", info)
                        ready.set()
                        _copy_verified(source, out, digest)
                        out.flush()
                        # Followers may finish now: the bytes match the digest.
                        # Syncing to disk is for the store, not for them.
                        os.fchmod(out.fileno(), 0o444)
                        run_blocking(os.fdatasync, out.fileno())
                    # Committed inside the source's context, so that a source
                    # that reports completion (a lease) does so after the fact.
                    self.store.commit(digest, partial)
                if self._on_commit is not None:
                    self._on_commit(digest)
            except BaseException as exc:
                outcome["error"] = exc
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
                if ready.is_set():
                    log.warning("fill of %s failed: %s", digest, exc)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(base + ".json")
                os.close(lock)
                self._slots.release()
                ready.set()
                with self._threads_lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"fill-{digest.hex[:12]}", daemon=True)
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()
        ready.wait()
        following = outcome.get("following")
        if isinstance(following, Following):
            return following
        error = outcome.get("error")
        if isinstance(error, ShoalError):
            raise error
        raise UpstreamUnavailable("the upstream fetch failed", {"digest": str(digest)}) from (
            error if isinstance(error, BaseException) else None
        )

    def _remove_stale(self, digest: Digest) -> None:
        """Unlink what a leader that died left behind, so its followers fail."""
        prefix = os.path.basename(self._base(digest)) + "."
        for name in os.listdir(self.store.fills_dir()):
            if name.startswith(prefix) and name.endswith((".partial", ".json")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.store.fills_dir(), name))

    def close(self, timeout: float = 5.0) -> None:
        """Wait a little for running fills (daemon threads after that), then stop the watch."""
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        self._watch.close()


class Followed:
    """Bytes ``[start, end)`` of a fill as a response body, sent as they arrive.

    A server that can send from a file descriptor (``node.serving``) uses
    ``fileno`` and ``available`` to send the partial file with sendfile as it
    grows; any other server iterates, which reads the same bytes with
    ``pread``. Either way the bytes that may be the last ones (the end of the
    range, or the last byte of a fill whose size is unknown) go out only once
    the fill is verified; a fill that fails, or a leader that stalls for
    ``stall_timeout``, raises ``FillFailed`` so the response is cut short.
    ``close`` closes the partial file.
    """

    def __init__(self, fill: Following, watch: PartialWatch, start: int, end: int | None, stall_timeout: float):
        self.fill = fill
        self._watch = watch
        self._start, self._end = start, end
        self._stall_timeout = stall_timeout
        self._closed = False
        self._position = start
        os.lseek(fill.file, start, os.SEEK_SET)

    def fileno(self) -> int:
        return self.fill.file

    def available(self, position: int) -> int:
        """Wait until bytes past ``position`` may be sent; return where they end.

        Returns ``position`` itself only when the body is complete there.
        """
        fill = self.fill
        last_size, stalled_since = -1, time.monotonic()
        with self._watch.watching(fill.partial) as change:
            while True:
                seen = change.generation
                info = os.fstat(fill.file)
                verified = not info.st_mode & _WRITABLE
                end = info.st_size if self._end is None else min(info.st_size, self._end)
                if not verified:
                    # Hold back the last byte until the digest is known to match.
                    end = min(end, info.st_size - 1 if self._end is None else self._end - 1)
                if end > position or (verified and end == position):
                    return end
                if not verified and self._failed(info):
                    raise FillFailed(
                        "the upstream fetch failed before the blob was complete", {"digest": str(fill.digest)}
                    )
                if info.st_size != last_size:
                    last_size, stalled_since = info.st_size, time.monotonic()
                elif time.monotonic() - stalled_since > self._stall_timeout:
                    raise FillFailed("the upstream fetch stalled", {"digest": str(fill.digest)})
                change.wait(seen, _LIVENESS)

    def begin(self) -> None:
        """Wait until the first bytes may be sent; for a body of at most ``SMALL_BODY`` bytes, all of them.

        A response waits for this before it answers, so that a fill failing
        before then (a small blob that does not match its digest) gets an
        OCI error instead of a response that has already promised a body.
        """
        small = self._end is not None and self._end - self._start <= SMALL_BODY
        position = self._start
        while True:
            ready = self.available(position)
            if not small or ready == position:
                return
            position = ready

    def _failed(self, info: os.stat_result) -> bool:
        if info.st_nlink == 0:
            return True
        # The partial is still linked: failed only if its leader is gone.
        lock = try_lock(self.fill.lock_path, fcntl.LOCK_SH)
        if lock is None:
            return False
        os.close(lock)
        return bool(os.fstat(self.fill.file).st_mode & _WRITABLE)

    def read(self, size: int = CHUNK) -> bytes:
        """The next bytes of the body, at most ``size``; empty at its end."""
        ready = self.available(self._position)
        if ready == self._position:
            return b""
        chunk = os.pread(self.fill.file, min(size, ready - self._position), self._position)
        if not chunk:
            raise FillFailed("the partial file is shorter than it was", {"digest": str(self.fill.digest)})
        self._position += len(chunk)
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read():
            yield chunk

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fill.file)


def _verified(fd: int) -> bool:
    return not os.fstat(fd).st_mode & _WRITABLE


def _copy_verified(source: Source, out: object, digest: Digest) -> None:
    hasher = digest.hasher()
    written = 0
    write = out.write  # type: ignore[attr-defined]
    for chunk in source.iter_bytes():
        written += len(chunk)
        if source.size is not None and written > source.size:
            raise UpstreamInvalid("the upstream sent more bytes than it announced", {"digest": str(digest)})
        hasher.update(chunk)
        write(chunk)
    if source.size is not None and written != source.size:
        raise UpstreamUnavailable("the upstream closed the blob early", {"digest": str(digest)})
    if hasher.hexdigest() != digest.hex:
        raise UpstreamInvalid("the upstream sent a blob that does not match its digest", {"digest": str(digest)})


def _write_json(path: str, value: object) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    os.replace(tmp, path)
