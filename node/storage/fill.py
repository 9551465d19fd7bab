"""Filling the store from a source, once per node, while clients follow.

A fill copies one blob from a source (the upstream, later a peer) into the
store. Only one fill per digest runs on a node at a time, whichever of the
node's gunicorn workers asked first: the leader holds an exclusive ``flock``
on ``fills/<digest>.lock``, which the kernel releases if the process dies,
and removes the file when it lets go (``files.unlock``). At most
``max_fills`` fills run on the node at once, whichever workers run them
(``slots.py``); a miss beyond that waits for a free slot, or follows a fill
of the same blob that another worker started meanwhile. A caller that must
not wait (a HEAD) is told ``Busy`` at once instead.

A fill needs room: before it writes, it records the size the source
announced in its slot, so the sweep counts it against ``cache.max_size``,
and wakes the sweep (``needs_room``); it does not start (``NoRoom``, a 503)
when the cache's filesystem would be left with less than ``cache.min_free``
free.

Every client, the leader's own included, reads the growing partial file
(``Fills.follow``): sent with sendfile as it grows, woken by the kernel when
bytes arrive (``watch.py``). The fill therefore runs in a background thread
that does not care whether any client is still listening: a client that
disconnects does not abort it, and the next request is a hit.

A fill's files (``layout.py`` draws them): the leader's lock, its state
(``{"size": N | null, "partial": NAME, "origin": ...}``) and the partial
file, the bytes so far, read-only once verified. Every descriptor a fill
opens (the lock, the slot, the partial file, the leader's own copy of it)
is closed on every way out, failures before the first byte included.

How a follower tells the outcome from the partial file it has open:

- complete: the file is read-only. The leader makes it so once the digest
  matched, before the file is synced to disk and renamed into place, so
  clients do not wait for the disk; the rename keeps the mode;
- failed: the leader unlinks the partial on every failure, so its link
  count drops to 0, after writing why on the file (an extended attribute,
  which the follower's error quotes); a leader that died without cleaning
  up is seen by its lock being free while the file is still writable.

A follower holds back the last byte of its response until the fill is
verified, so a failed or corrupt fill always cuts the response short and
never looks complete.

A fill tries again when its source rejects the copy it sent (``BadCopy``:
a peer's copy that did not match its digest, which the source now avoids),
up to ``MAX_ATTEMPTS`` in all, each attempt into a partial file of its own.
The state names the new partial before the old one is unlinked, so a
follower whose response has not begun (``Followed.begin``) moves on to the
new attempt and its client never sees the bad copy; a response that has
begun is cut short as for any failure, since the bytes it sent cannot be
taken back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from node.errors import BadCopy, Busy, NoRoom, ShoalError, UpstreamInvalid, UpstreamUnavailable, is_disk_full
from node.offload import run_blocking, start_blocking
from node.reference import Digest
from node.sources import BlobStream, Origin, Source
from node.storage.files import RETRY_FIRST, RETRY_LAST, held, try_lock, unlock, write_atomic
from node.storage.local import LocalStore
from node.storage.slots import Slot, Slots
from node.storage.watch import PartialWatch

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A followed body this small is answered only once it is complete (``Followed.begin``).
SMALL_BODY = 64 * 1024
# A follower checks at least this often that its fill's leader is alive:
# a leader that dies leaves no event behind.
_LIVENESS = 1.0
# A fill whose copy the source rejects (``BadCopy``: a peer's copy that did
# not match its digest, now avoided) is tried this often in all.
MAX_ATTEMPTS = 3
# Mode bits: a partial file without any write bit is verified.
_WRITABLE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
# The extended attribute of a failed fill's partial file that says why, and its longest value.
_FAILURE_ATTRIBUTE = "user.shoal.failure"
_FAILURE_MAX = 1024


class FillFailed(ShoalError):
    """The fill a client was following failed; its response is cut short."""

    code, status = "UPSTREAM_UNAVAILABLE", 503


@dataclass
class Following:
    """A fill in progress that a client can read from; it owns ``file`` until ``Fills.follow`` takes it."""

    file: int
    size: int | None
    digest: Digest
    lock_path: str
    # The partial file's path: what the follower watches.
    partial: str
    origin: Origin = Origin.UPSTREAM
    # True when this client rode on a fetch that was already running.
    joined: bool = False
    closed: bool = False

    def detach(self) -> Following:
        """Hand the open file to a new owner (a response body); this one no longer closes it."""
        moved = dataclasses.replace(self)
        self.closed = True
        return moved

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.file)


class Fills:
    def __init__(
        self,
        store: LocalStore,
        timeout: float = 30.0,
        on_commit: Callable[[Digest], None] | None = None,
        max_fills: int = 16,
        needs_room: Callable[[], None] | None = None,
    ):
        self.store = store
        self.layout = store.layout
        # How long a follower waits for a leader that makes no progress,
        # and a miss for a free fill slot.
        self.timeout = timeout
        self._on_commit = on_commit
        # Told when a fill starts or is refused for room: the sweep should run now.
        self._needs_room = needs_room
        self.slots = Slots([self.layout.fill_slot(number) for number in range(max_fills)])
        self._wanted = 0
        self._running: set[Fill] = set()
        self._running_lock = threading.Lock()
        self._watch = PartialWatch()

    def join(self, source: Source, name: str, digest: Digest, *, wait: bool = True) -> Following | None:
        """Start or join the fill of ``digest`` from ``source``.

        Returns None when the content turned out to be complete in the store
        already (the caller serves it as a hit). Raises the source's error
        when this call led the fill and the source failed before any byte,
        ``NoRoom`` when the disk has no room for it, and ``Busy`` when no
        fill slot came free within ``timeout`` (at once without ``wait``:
        then a fill that is verified and about to be committed is returned
        too, for its size).
        """
        deadline = time.monotonic() + (self.timeout if wait else 0.0)
        pause = RETRY_FIRST
        while True:
            if self.store.has(digest):
                return None
            following = self._open_partial(digest)
            if following is not None:
                verified = _verified(following.file)
                if not verified and not held(following.lock_path):
                    # Its leader died: lead instead (removing what it left).
                    following.close()
                    following = None
                elif not wait or not verified:
                    return following
                else:
                    # Verified and about to be committed: wait a moment and
                    # serve it as the hit it is about to become.
                    following.close()
            if following is None and (slot := self.slots.take()) is not None:
                lock_path = self.layout.fill_lock(digest)
                lock = try_lock(lock_path, fcntl.LOCK_EX)
                if lock is not None:
                    if self.store.has(digest):
                        unlock(lock, lock_path)
                        slot.close()
                        return None
                    return self._lead(Fill(self, source, name, digest, lock, slot))
                slot.close()
            if time.monotonic() >= deadline:
                if following is None and not os.path.exists(self.layout.fill_state(digest)):
                    raise Busy("this node is running as many fills as it may; try again", {"digest": str(digest)})
                raise UpstreamUnavailable("timed out waiting for another fill of this blob", {"digest": str(digest)})
            time.sleep(pause)
            pause = min(pause * 2, RETRY_LAST)

    def in_progress(self, digest: Digest) -> Following | None:
        """Follow a fill that is running on this node, without starting one."""
        return self._open_partial(digest)

    def follow(self, fill: Following, start: int = 0, end: int | None = None) -> Followed:
        """The response body of bytes ``[start, end)`` of ``fill``; it owns ``fill.file`` from now on."""
        return Followed(fill, self, start, end)

    def carry_on(self, failed: Following) -> Following | None:
        """What follows on from the fill ``failed`` (its partial file was unlinked); None when nothing does.

        The same fill's next attempt (``MAX_ATTEMPTS``), another fill of the
        digest started since, or the content itself once committed (its file
        is read-only, so it reads as a fill that is verified).
        """
        digest = failed.digest
        stored = self.store.open(digest)
        if stored is not None:
            return Following(
                stored.detach(), stored.size, digest, self.layout.fill_lock(digest), self.layout.content(digest)
            )
        following = self._open_partial(digest)
        if following is not None and following.partial == failed.partial:
            following.close()
            return None
        return following

    def _open_partial(self, digest: Digest) -> Following | None:
        try:
            with open(self.layout.fill_state(digest), encoding="utf-8") as handle:
                info = json.load(handle)
            partial = os.path.join(self.layout.fills, os.path.basename(info["partial"]))
            size, origin = info["size"], Origin(info.get("origin", Origin.UPSTREAM.value))
            if size is not None and not isinstance(size, int):
                return None
            # Opened last: nothing after it can fail and leave it open.
            fd = os.open(partial, os.O_RDONLY)
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return Following(fd, size, digest, self.layout.fill_lock(digest), partial, origin, joined=True)

    def make_room(self, slot: Slot, size: int | None) -> None:
        """Let a fill of ``size`` bytes write, or raise ``NoRoom``; either way the sweep is woken."""
        try:
            if not self.store.has_room(size or 0):
                # The sweep makes room for it too, not just for min_free.
                self._wanted = max(self._wanted, size or 0)
                raise NoRoom("the cache's disk is too full to store this blob now; try again shortly")
            slot.reserve(size or 0)
        finally:
            if self._needs_room is not None:
                self._needs_room()

    def reserved(self) -> int:
        """Bytes the fills running on the node now (any worker) will write, as their sources announced."""
        return self.slots.reserved()

    def take_wanted(self) -> int:
        """The size of the largest fill of this worker refused for room since the last call."""
        wanted, self._wanted = self._wanted, 0
        return wanted

    def _lead(self, fill: Fill) -> Following:
        """Run ``fill`` in a thread; return once its partial file exists (or it failed before)."""
        with self._running_lock:
            self._running.add(fill)
        threading.Thread(target=fill.run, name=f"fill-{fill.digest.hex[:12]}", daemon=True).start()
        return fill.started.result()

    def _ended(self, fill: Fill) -> None:
        with self._running_lock:
            self._running.discard(fill)
        fill.ended.set()

    def close(self, timeout: float = 5.0) -> None:
        """Wait a little for running fills (daemon threads after that), then stop the watch."""
        with self._running_lock:
            running = list(self._running)
        for fill in running:
            fill.ended.wait(timeout)
        self._watch.close()


class Fill:
    """One fill, led by this worker: the source's bytes into a partial file, verified, then committed.

    ``started`` resolves to the leader's own ``Following`` once the partial
    file of the first attempt exists, or to the source's error when it
    failed before that. The fill holds the digest's lock (``lock``, an open
    descriptor) and a fill slot until it ends, whatever happens, and then
    releases both (the lock file removed).
    """

    def __init__(self, fills: Fills, source: Source, name: str, digest: Digest, lock: int, slot: Slot) -> None:
        self._fills = fills
        self._layout = fills.layout
        self._source = source
        self._name = name
        self.digest = digest
        self._lock = lock
        self._slot = slot
        self.started: Future[Following] = Future()
        self.ended = threading.Event()

    def run(self) -> None:
        digest = self.digest
        # The partial file of the attempt before, kept linked until the next
        # attempt's is announced, so that its followers can move on to it.
        previous: str | None = None
        partial = ""
        try:
            self._remove_stale()
            # No source is asked for bytes there is no room for.
            self._fills.make_room(self._slot, 0)
            for attempt in range(1, MAX_ATTEMPTS + 1):
                partial = self._layout.fill_partial(digest, secrets.token_hex(8))
                try:
                    self._attempt(partial, previous)
                    break
                except BadCopy as exc:
                    if attempt == MAX_ATTEMPTS:
                        raise
                    log.warning("fill of %s: %s; fetching it again", digest, exc.message)
                    if previous is not None:
                        # Unlinked already when this attempt was announced; kept tidy if it never was.
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(previous)
                    previous = partial
            if self._fills._on_commit is not None:
                self._fills._on_commit(digest)
        except BaseException as exc:
            for path in filter(None, (partial, previous)):
                _leave_failure(path, exc)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if self.started.done():
                log.warning("fill of %s failed: %s", digest, exc)
            else:
                self.started.set_exception(_as_shoal_error(exc, digest))
        finally:
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._layout.fill_state(digest))
                unlock(self._lock, self._layout.fill_lock(digest))
            finally:
                self._slot.close()
                self._fills._ended(self)

    def _attempt(self, partial: str, previous: str | None) -> None:
        """Copy the source's bytes into ``partial``, verify them and commit; unlink ``previous`` once announced."""
        digest = self.digest
        with self._source.open_blob(self._name, digest) as stream:
            self._fills.make_room(self._slot, stream.size)
            out = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                self._announce(stream, partial)
                if previous is not None:
                    # Its followers see it fail now, and find this attempt (``Followed.begin``).
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(previous)
                _copy_verified(stream, out, digest)
                # Followers may finish now: the bytes match the digest.
                # Syncing to disk is for the store, not for them.
                os.fchmod(out, 0o444)
                run_blocking(os.fdatasync, out)
            finally:
                os.close(out)
            # Committed inside the source's context: leaving it without an
            # error tells the source that the content is in the store.
            self._fills.store.commit(digest, partial)

    def _announce(self, stream: BlobStream, partial: str) -> None:
        """Write the fill's state for other workers; at first, hand the leader's request its ``Following``."""
        state = {"size": stream.size, "partial": os.path.basename(partial), "origin": stream.origin.value}
        if self.started.done():
            write_atomic(self._layout.fill_state(self.digest), json.dumps(state).encode())
            return
        following = Following(
            os.open(partial, os.O_RDONLY),
            stream.size,
            self.digest,
            self._layout.fill_lock(self.digest),
            partial,
            stream.origin,
            stream.joined,
        )
        try:
            write_atomic(self._layout.fill_state(self.digest), json.dumps(state).encode())
        except BaseException:
            following.close()
            raise
        self.started.set_result(following)

    def _remove_stale(self) -> None:
        """Unlink what a leader that died left behind, so its followers fail.

        Its followers found its partial file through its state file, which
        names it; a partial file it made before writing its state has no
        followers, and ``node.storage.stale`` removes it. No listing of
        ``fills/``: a miss costs the same however many fills ran before.
        """
        state = self._layout.fill_state(self.digest)
        try:
            with open(state, encoding="utf-8") as handle:
                partial: str | None = os.path.basename(str(json.load(handle)["partial"]))
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            partial = None
        if partial and partial.startswith(os.path.basename(self._layout.fill_base(self.digest)) + "."):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._layout.fills, partial))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state)


def _as_shoal_error(exc: BaseException, digest: Digest) -> BaseException:
    if isinstance(exc, ShoalError):
        return exc
    if isinstance(exc, OSError) and is_disk_full(exc):
        error: ShoalError = NoRoom("the cache's disk is full; try again shortly", {"digest": str(digest)})
        error.__cause__ = exc
        return error
    error = UpstreamUnavailable("the upstream fetch failed", {"digest": str(digest)})
    error.__cause__ = exc
    return error


class Followed:
    """Bytes ``[start, end)`` of a fill as a response body, sent as they arrive.

    A server that can send from a file descriptor (``node.serving``) uses
    ``fileno`` and ``available`` to send the partial file with sendfile as it
    grows; any other server iterates, which reads the same bytes with
    ``pread``. Either way the bytes that may be the last ones (the end of the
    range, or the last byte of a fill whose size is unknown) go out only once
    the fill is verified; a fill that fails, or a leader that stalls for
    ``stall_timeout``, raises ``FillFailed`` so the response is cut short.
    A fill that fails before the response began (``begin``) is not the
    end: when the fill tries again (or the content arrived meanwhile), the
    body follows that instead. ``close`` closes the partial file.
    """

    def __init__(self, fill: Following, fills: Fills, start: int, end: int | None):
        self.fill = fill
        self._fills = fills
        self._watch = fills._watch
        self._start, self._end = start, end
        self._stall_timeout = fills.timeout
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
                        f"the upstream fetch failed before the blob was complete{_failure_of(fill.file)}",
                        {"digest": str(fill.digest)},
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
        moves = 0
        while True:
            try:
                ready = self.available(position)
            except FillFailed:
                carried = self._fills.carry_on(self.fill) if moves < MAX_ATTEMPTS else None
                if carried is None:
                    raise
                moves += 1
                self.fill.close()
                self.fill = carried
                os.lseek(carried.file, self._start, os.SEEK_SET)
                position = self._start
                continue
            if not small or ready == position:
                return
            position = ready

    def _failed(self, info: os.stat_result) -> bool:
        if info.st_nlink == 0:
            return True
        # The partial is still linked: failed only if its leader is gone.
        if held(self.fill.lock_path):
            return False
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
        self.fill.close()


def _leave_failure(partial: str, exc: BaseException) -> None:
    """Write why the fill failed on its partial file, for its followers in any worker to read.

    An extended attribute lives on the file itself, so a follower reads it
    through the descriptor it holds after the file was unlinked. Only a
    domain error's message is written (it names no secret); nothing is
    lost but the reason where the filesystem keeps no user attributes.
    """
    if isinstance(exc, ShoalError):
        with contextlib.suppress(OSError):
            os.setxattr(partial, _FAILURE_ATTRIBUTE, exc.message.encode()[:_FAILURE_MAX])


def _failure_of(fd: int) -> str:
    """``": <why>"`` when the fill's leader left the reason it failed (``_leave_failure``), else empty."""
    try:
        return ": " + os.getxattr(fd, _FAILURE_ATTRIBUTE).decode(errors="replace")
    except OSError:
        return ""


def _verified(fd: int) -> bool:
    return not os.fstat(fd).st_mode & _WRITABLE


def _copy_verified(source: BlobStream, out: int, digest: Digest) -> None:
    """Copy ``source`` into the file ``out``; raise unless the bytes are the announced size and match ``digest``."""
    hasher = digest.hasher()
    written = 0
    absorb = _Absorber(hasher, out)
    try:
        while piece := source.read(CHUNK):
            written += len(piece)
            if source.size is not None and written > source.size:
                raise UpstreamInvalid("the upstream sent more bytes than it announced", {"digest": str(digest)})
            absorb.add(piece)
    finally:
        absorb.wait()
    if source.size is not None and written != source.size:
        raise UpstreamUnavailable("the upstream closed the blob early", {"digest": str(digest)})
    if hasher.hexdigest() != digest.hex:
        raise UpstreamInvalid("the upstream sent a blob that does not match its digest", {"digest": str(digest)})


class _Absorber:
    """Hashes and writes a fill's pieces in order, each off the event loop while the next one is read.

    hashlib and ``os.write`` release the GIL, so on a fast source the read
    of one piece overlaps the hashing of the last and the fill runs at about
    the speed of the hash. One piece at a time is in flight: ``add`` waits
    for the last one first, and ``wait`` must be called before the file is
    closed.
    """

    def __init__(self, hasher: hashlib._Hash, out: int) -> None:
        self._hasher = hasher
        self._out = out
        self._pending: Callable[[], None] | None = None

    def add(self, piece: bytes) -> None:
        self.wait()
        self._pending = start_blocking(self._absorb, piece)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def _absorb(self, piece: bytes) -> None:
        self._hasher.update(piece)
        view = memoryview(piece)
        while view:
            view = view[os.write(self._out, view) :]
