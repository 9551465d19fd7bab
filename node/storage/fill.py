"""Filling the store from a source, once per node, while clients follow.

A fill copies one blob from a source (the upstream, later a peer) into the
store. Only one fill per digest runs on a node at a time, whichever of the
node's gunicorn workers asked first: the leader holds an exclusive ``flock``
on ``fills/<digest>.lock``, which the kernel releases if the process dies.

Every client, the leader's own included, reads the growing partial file
(``follow``). The fill therefore runs in a background thread that does not
care whether any client is still listening: a client that disconnects does
not abort it, and the next request is a hit.

Files of a fill, under ``fills/``::

    <algorithm>-<hex>.lock              the leader's flock
    <algorithm>-<hex>.json              {"size": N | null, "partial": NAME, "origin": ...}
    <algorithm>-<hex>.<token>.partial   the bytes so far
    <algorithm>-<hex>.<token>.partial.ok  the bytes are all there and match the digest

How a follower tells the outcome from the partial file it has open:

- complete: the ``.ok`` marker beside the partial exists (written once the
  digest matched, before the file is synced to disk and renamed into
  place, so clients do not wait for the disk), or the content path names
  the same inode;
- failed: the leader unlinks the partial on every failure, so its link
  count drops to 0; a leader that died without cleaning up is seen by its
  lock being free while the content path still does not name the inode.

A follower holds back the last bytes of its response until the fill is
committed, so a failed or corrupt fill always cuts the response short and
never looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from node.errors import ShoalError, UpstreamInvalid, UpstreamUnavailable
from node.reference import Digest
from node.storage.local import LocalStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Followers poll the partial file; the wait doubles from the first to the
# last value while no bytes arrive, and starts again at the first on progress.
_POLL_FIRST, _POLL_LAST = 0.001, 0.02


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
    """A fill in progress that a client can read from."""

    file: int
    size: int | None
    digest: Digest
    content_path: str
    lock_path: str
    # The partial file's path; its ``.ok`` marker says the bytes are verified.
    partial: str
    # Where the fill's bytes come from: "upstream" or "peer".
    origin: str = "upstream"
    # True when this client rode on a fetch that was already running.
    joined: bool = False


class Fills:
    def __init__(self, store: LocalStore, timeout: float = 30.0, on_commit: Callable[[Digest], None] | None = None):
        self.store = store
        # How long a follower waits for a leader that makes no progress.
        self.timeout = timeout
        self._on_commit = on_commit
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    def _base(self, digest: Digest) -> str:
        return os.path.join(self.store.fills_dir(), f"{digest.algorithm}-{digest.hex}")

    def join(self, digest: Digest, opener: Opener) -> Following | None:
        """Start or join the fill of ``digest``.

        Returns None when the content turned out to be complete in the store
        already (the caller serves it as a hit). Raises the source's error
        when this call led the fill and the source failed before any byte.
        """
        base = self._base(digest)
        deadline = time.monotonic() + self.timeout
        wait = _POLL_FIRST
        while True:
            if self.store.has(digest):
                return None
            lock = _try_lock(base + ".lock", fcntl.LOCK_EX)
            if lock is not None:
                if self.store.has(digest):
                    os.close(lock)
                    return None
                return self._lead(digest, opener, lock)
            following = self._open_partial(digest)
            if following is not None:
                if not os.path.exists(following.partial + ".ok"):
                    return following
                # Verified and about to be committed: wait a moment and
                # serve it as the hit it is about to become.
                os.close(following.file)
            if time.monotonic() > deadline:
                raise UpstreamUnavailable("timed out waiting for another fill of this blob", {"digest": str(digest)})
            time.sleep(wait)
            wait = min(wait * 2, _POLL_LAST)

    def in_progress(self, digest: Digest) -> Following | None:
        """Follow a fill that is running on this node, without starting one."""
        return self._open_partial(digest)

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
        base = self._base(digest)
        self._remove_stale(digest)
        ready = threading.Event()
        outcome: dict[str, object] = {}

        def run() -> None:
            partial = f"{base}.{secrets.token_hex(8)}.partial"
            try:
                with opener() as source:
                    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
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
                    with os.fdopen(fd, "wb") as out:
                        _copy_verified(source, out, digest)
                        out.flush()
                        # Followers may finish now: the bytes match the digest.
                        # Syncing to disk is for the store, not for them.
                        os.close(os.open(partial + ".ok", os.O_CREAT | os.O_WRONLY, 0o644))
                        os.fdatasync(out.fileno())
                    # Committed inside the source's context, so that a source
                    # that reports completion (a lease) does so after the fact.
                    self.store.commit(digest, partial)
                if self._on_commit is not None:
                    self._on_commit(digest)
            except BaseException as exc:
                outcome["error"] = exc
                for leftover in (partial, partial + ".ok"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
                if ready.is_set():
                    log.warning("fill of %s failed: %s", digest, exc)
            finally:
                for leftover in (base + ".json", partial + ".ok"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
                os.close(lock)
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
            if name.startswith(prefix) and name.endswith((".partial", ".json", ".ok")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.store.fills_dir(), name))

    def close(self, timeout: float = 5.0) -> None:
        """Wait a little for running fills; they are daemon threads after that."""
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)


def follow(fill: Following, start: int = 0, end: int | None = None, *, stall_timeout: float = 30.0) -> Iterator[bytes]:
    """Yield bytes ``[start, end)`` of a fill as they arrive (to its end when ``end`` is None).

    Bytes that may be the last ones (the end of the range, or anything of a
    fill whose size is unknown) are held back until the fill is committed;
    a fill that fails, or a leader that stalls for ``stall_timeout``, raises
    ``FillFailed`` so the caller's response is cut short.
    """
    try:
        position, held = start, b""
        wait = _POLL_FIRST
        stalled_since = time.monotonic()
        while True:
            want = CHUNK if end is None else min(CHUNK, end - position)
            chunk = os.pread(fill.file, want, position) if want > 0 else b""
            if chunk:
                position += len(chunk)
                if held:
                    yield held
                    held = b""
                if end is not None and position < end:
                    yield chunk
                else:
                    held = chunk
                wait, stalled_since = _POLL_FIRST, time.monotonic()
                continue
            at_end = position == end if end is not None else os.fstat(fill.file).st_size == position
            if at_end and _committed(fill):
                if held:
                    yield held
                return
            if _failed(fill):
                raise FillFailed("the upstream fetch failed before the blob was complete", {"digest": str(fill.digest)})
            if time.monotonic() - stalled_since > stall_timeout:
                raise FillFailed("the upstream fetch stalled", {"digest": str(fill.digest)})
            time.sleep(wait)
            wait = min(wait * 2, _POLL_LAST)
    finally:
        os.close(fill.file)


def _committed(fill: Following) -> bool:
    """The fill's bytes are complete and verified (see the module's docstring)."""
    if os.path.exists(fill.partial + ".ok"):
        return True
    try:
        return os.stat(fill.content_path).st_ino == os.fstat(fill.file).st_ino
    except FileNotFoundError:
        return False


def _failed(fill: Following) -> bool:
    if os.fstat(fill.file).st_nlink == 0:
        return not _committed(fill)
    # The partial is still linked: failed only if its leader is gone.
    lock = _try_lock(fill.lock_path, fcntl.LOCK_SH)
    if lock is None:
        return False
    os.close(lock)
    return not _committed(fill)


def _try_lock(path: str, mode: int) -> int | None:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
