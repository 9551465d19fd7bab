"""The node's content-addressed store on local disk.

The paths it uses are drawn in ``layout.py``. Invariant: a file exists at its content path only if its bytes hash to its
name. Content reaches that path only by ``os.replace`` of a file already
verified and synced to disk (blobs by the fill, manifests by ``put``), so a
reader that finds the path never sees a partial file, and a crash leaves at
most an orphan in ``fills/``. A manifest's type file is not synced: a
manifest that lost it is served with the type its document names.

Least-recently-used order is the files' access time; their modification
time is when they were stored. Hits do not touch files themselves (the hit
path is an open, a stat and sendfile); they record the digest with
``touch``, and ``flush_touches`` sets the access times in the background.
The TTL counts from the last access (``extend_ttl_on_hit``, the default)
or from when the content was stored, as distribution's proxy does.

Two bounds on the disk, both kept by the sweep evicting least recently used
content: the bytes of complete content plus the bytes fills in flight said
they will write stay under ``max_size``, and the cache's filesystem keeps
``min_free`` bytes free (``os.statvfs``; other files on it count too). A
fill does not start when it would leave less than ``min_free`` free
(``has_room``). The sweep also removes what crashed writers left behind
(``node.storage.stale``) and, now and then, a node alone's confirmations of
content it no longer holds (``node.storage.ledger``).

Every removal is recorded in the node's removal table (``removals.py``),
which tells the workers' memory copies of manifests that they are gone.
The store owns the table's mapping: ``close`` unmaps it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from node.media_types import OCTET_STREAM, manifest_media_type
from node.offload import run_blocking
from node.reference import Digest
from node.storage.files import disk_full_is_busy, try_lock, write_atomic
from node.storage.layout import BINDINGS, PARTIAL_SUFFIX, TAGS, TYPE_SUFFIX, Layout
from node.storage.ledger import remove_unheld
from node.storage.removals import Removals
from node.storage.stale import STALE_AGE, remove_stale
from protos.values import Content, TagPointer

# The sweep looks for stale temporary files outside fills/, and for
# confirmations of content no longer held (a node alone), this often: walking
# repos/ every sweep would cost more.
STALE_SCAN_INTERVAL = 600.0


class Stored:
    """An open, complete piece of content; it owns its file descriptor.

    ``close`` closes it (idempotent); ``detach`` hands the descriptor to
    whoever closes it from then on (a response body).
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self.size = size

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the content was closed or handed over")
        return self._fd

    def detach(self) -> int:
        fd = self.fileno()
        self._fd = None
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Stored:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Entry:
    digest: Digest
    accessed: float
    stored: float
    size: int


class LocalStore:
    def __init__(
        self,
        root: str,
        max_size: int,
        ttl: float = 0.0,
        clock: Callable[[], float] = time.time,
        *,
        extend_ttl_on_hit: bool = True,
        min_free: int = 0,
    ) -> None:
        self.layout = Layout(root)
        self.root = self.layout.root
        self.max_size = max_size
        self.min_free = min_free
        self.ttl = ttl
        self.extend_ttl_on_hit = extend_ttl_on_hit
        self._clock = clock
        self._touched: set[Digest] = set()
        self._touched_lock = threading.Lock()
        self.layout.create()
        self.removals = Removals(self.layout.removals())
        self._stale_scanned_at = float("-inf")

    # Content.

    def open(self, digest: Digest) -> Stored | None:
        """Open complete content, or None when the store does not hold it.

        The blob hit path: one open and one fstat, nothing else.
        """
        try:
            fd = os.open(self.layout.content(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        return Stored(fd, os.fstat(fd).st_size)

    def content(self, digest: Digest) -> Content | None:
        """What the store holds of ``digest``, as the cluster is told of it."""
        stored = self.open(digest)
        if stored is None:
            return None
        with stored:
            return Content(str(digest), stored.size, self.media_type(digest))

    def has(self, digest: Digest) -> bool:
        return os.path.exists(self.layout.content(digest))

    def read(self, digest: Digest, limit: int | None = None) -> tuple[bytes, str] | None:
        """The whole content and its media type; for small things (manifests).

        None when the store does not hold it, or holds more than ``limit``
        bytes of it (a layer asked for as a manifest is not read into memory).
        Content stored without a type (a manifest first fetched through the
        blob endpoint) gets the type its document names
        (``node.media_types.manifest_media_type``).
        """
        stored = self.open(digest)
        if stored is None:
            return None
        if limit is not None and stored.size > limit:
            stored.close()
            return None
        with os.fdopen(stored.detach(), "rb") as handle:
            data = handle.read()
        return data, manifest_media_type(self.media_type(digest), data)

    def commit(self, digest: Digest, verified_path: str, media_type: str | None = None) -> None:
        """Move a file whose bytes were verified against ``digest`` into place."""
        with disk_full_is_busy():
            path = self.layout.content(digest)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if media_type and media_type != OCTET_STREAM:
                write_atomic(self.layout.media_type(digest), media_type.encode())
            os.replace(verified_path, path)

    def put(self, digest: Digest, data: bytes, media_type: str | None = None) -> None:
        """Store bytes already verified against ``digest``."""
        with disk_full_is_busy():
            folder = os.path.dirname(self.layout.content(digest))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.layout.fills, prefix=self.layout.put_prefix(digest), suffix=".put")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    # As durable as a blob, which a fill syncs before its rename:
                    # after a crash the path holds the whole manifest or nothing.
                    run_blocking(os.fdatasync, handle.fileno())
                self.commit(digest, tmp, media_type)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    def remove(self, digest: Digest) -> bool:
        """Unlink the content, then record the removal for every worker's memory; True if it was there."""
        path = self.layout.content(digest)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.media_type(digest))
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        finally:
            self.removals.record(digest)
        return True

    def media_type(self, digest: Digest) -> str:
        """The media type a manifest was stored with; blobs have none of their own."""
        try:
            with open(self.layout.media_type(digest), encoding="utf-8") as handle:
                return handle.read().strip() or OCTET_STREAM
        except FileNotFoundError:
            return OCTET_STREAM

    # Access order and limits.

    def touch(self, digest: Digest) -> None:
        """Record a hit; ``flush_touches`` moves it to the front of LRU order."""
        with self._touched_lock:
            self._touched.add(digest)

    def flush_touches(self) -> list[Digest]:
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        now = self._clock()
        for digest in touched:
            path = self.layout.content(digest)
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, (now, os.stat(path).st_mtime))
        return sorted(touched, key=str)

    def free_bytes(self) -> int:
        """Bytes free for the node on the cache's filesystem."""
        info = os.statvfs(self.root)
        return info.f_bavail * info.f_frsize

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more bytes leave at least ``min_free`` free on the filesystem."""
        return self.free_bytes() - size >= self.min_free

    def sweep(self, reserved: int = 0, wanted: int = 0) -> list[tuple[Digest, str]]:
        """Remove expired content, then least recently used content over the limits.

        ``reserved`` is what fills in flight will write; it counts against
        ``max_size`` as stored content does; ``wanted`` is the size of a
        fill refused for room, which is made on top of ``min_free``. Content
        goes, oldest access first, while the two exceed ``max_size`` or the
        filesystem has less than ``min_free`` (and ``wanted``) free. Returns what was removed, each with its
        reason: ``ttl`` or ``size``. Runs under a lock file so that the
        workers of one node never sweep at once: a worker that finds another
        sweeping leaves it to that one. Content served right now stays
        readable: unlinking an open file does not disturb its readers (nor
        gives its space back before they finish).
        """
        removed: list[tuple[Digest, str]] = []
        lock = try_lock(self.layout.sweep_lock())
        if lock is None:
            return removed
        with os.fdopen(lock):
            now = time.monotonic()
            everywhere = now - self._stale_scanned_at > STALE_SCAN_INTERVAL
            if everywhere:
                self._stale_scanned_at = now
            remove_stale(self.layout, older_than=STALE_AGE, everywhere=everywhere)
            entries = sorted(self._entries(), key=lambda entry: entry.accessed)
            total = sum(entry.size for entry in entries) + reserved
            short = self.min_free + wanted - self.free_bytes()
            expired_before = self._clock() - self.ttl if self.ttl > 0 else None
            for entry in entries:
                digest, size = entry.digest, entry.size
                over = total > self.max_size or short > 0
                since = entry.accessed if self.extend_ttl_on_hit else entry.stored
                expired = expired_before is not None and since < expired_before
                if not (over or expired):
                    continue
                if self.remove(digest):
                    removed.append((digest, "ttl" if expired else "size"))
                    total -= size
                    short -= size
            if everywhere:
                remove_unheld(self.layout, self.has, self._clock())
        return removed

    def used_bytes(self) -> int:
        return sum(entry.size for entry in self._entries())

    def fills_in_progress(self) -> int:
        """Fills whose bytes are still arriving: partial files that keep a write bit (a verified one has none)."""
        count = 0
        with os.scandir(self.layout.fills) as scan:
            for entry in scan:
                if entry.name.endswith(PARTIAL_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        count += bool(entry.stat().st_mode & 0o222)
        return count

    def digests(self) -> Iterator[Digest]:
        for entry in self._entries():
            yield entry.digest

    def _entries(self) -> Iterator[_Entry]:
        blobs = self.layout.blobs
        for algorithm in os.listdir(blobs):
            for prefix in os.listdir(os.path.join(blobs, algorithm)):
                folder = os.path.join(blobs, algorithm, prefix)
                with os.scandir(folder) as scan:
                    for entry in scan:
                        # Media types, and a media type's atomic write on its way.
                        if entry.name.endswith(TYPE_SUFFIX) or entry.name.startswith("."):
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            info = entry.stat()
                            yield _Entry(Digest(algorithm, entry.name), info.st_atime, info.st_mtime, info.st_size)

    # Tags and repositories.

    def read_tag(self, name: str, tag: str) -> TagPointer | None:
        path = self.layout.tag_pointer(name, tag)
        try:
            with open(path, encoding="utf-8") as handle:
                return TagPointer(**json.load(handle))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def write_tag(self, name: str, tag: str, pointer: TagPointer) -> None:
        with disk_full_is_busy():
            self.remember_repository(name)
            os.makedirs(self.layout.tag_pointers(name), exist_ok=True)
            write_atomic(self.layout.tag_pointer(name, tag), json.dumps(dataclasses.asdict(pointer)).encode())

    def remember_repository(self, name: str) -> None:
        with disk_full_is_busy():
            marker = self.layout.repository_marker(name)
            if not os.path.exists(marker):
                os.makedirs(self.layout.repository(name), exist_ok=True)
                open(marker, "a").close()

    def known_tags(self, name: str) -> list[str]:
        """Tags from pointers and from the last tag list the upstream sent."""
        tags: set[str] = set()
        folder = self.layout.tag_pointers(name)
        with contextlib.suppress(FileNotFoundError):
            tags.update(entry[: -len(".json")] for entry in os.listdir(folder) if entry.endswith(".json"))
        listed = self.layout.tag_list(name)
        with contextlib.suppress(FileNotFoundError, ValueError), open(listed, encoding="utf-8") as handle:
            tags.update(str(tag) for tag in json.load(handle))
        return sorted(tags)

    def write_tag_list(self, name: str, tags: list[str]) -> None:
        with disk_full_is_busy():
            os.makedirs(self.layout.repository(name), exist_ok=True)
            write_atomic(self.layout.tag_list(name), json.dumps(sorted(tags)).encode())

    def repositories(self, registry: str) -> list[str]:
        """Names of the repositories of ``registry`` the cache has served a manifest of."""
        base = self.layout.repository(registry)
        names = []
        for folder, subfolders, files in os.walk(base):
            subfolders[:] = [s for s in subfolders if s not in (TAGS, BINDINGS)]
            if "_repo" in files:
                names.append(os.path.relpath(folder, base))
        return sorted(names)

    def close(self) -> None:
        self.removals.close()
