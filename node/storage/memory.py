"""A worker's memory of manifests, tag pointers, repositories and bindings, within a budget of bytes.

A warm manifest request should touch no file: the bytes and media type of
a manifest by digest, the pointer of a fresh tag, the fact that a
repository's marker exists, and which digests are confirmed for which
repository (``node.bindings``) are all kept here, least recently used first
out once the budget (``cache.memory``, shared evenly by the workers) is
spent. What is kept is a copy; the disk and the cluster stay the truth, and
the rules for when a copy may answer live with its user (``ProxyStore``):

- a manifest is kept only once its bytes were verified against its digest,
  with the removal stamp (``node.storage.removals``) read before the bytes
  were; it is served only while that stamp is unchanged;
- a tag pointer is served only while it is fresh (``tag_ttl``), as its file
  would be;
- a repository is remembered so that its marker file is written, or looked
  for, once per worker;
- a binding is kept until its own expiry (the content's TTL from when it
  was confirmed), and answers only until then.

Every entry is charged its bytes plus ``ENTRY_OVERHEAD`` (the objects, the
key and the map's own slot; ``BINDING_OVERHEAD`` for a binding), so that the memory the cache really holds
stays within its budget (``tests/node/test_memory_cache.py`` measures it).

An OrderedDict under a lock rather than a library's LRU: this is all of it,
and the lock would be needed around a library's too (fills and the
background thread run beside the requests).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from node.reference import Digest
from protos.values import TagPointer

# What an entry costs beyond its bytes: the entry object, its key (a tuple
# and a Digest), the strings in them, and the map's own slot and link.
# Measured with tracemalloc on CPython 3.11: 730 to 850 bytes for a
# manifest, about 540 for a tag pointer; one figure, rounded up.
ENTRY_OVERHEAD = 1024
# A binding holds no bytes of its own, only its key (four strings) and a
# small object: measured the same way, about 590 bytes with its name and
# digest; one figure, rounded up.
BINDING_OVERHEAD = 640


@dataclass
class RememberedManifest:
    """A verified manifest; ``stamp`` is its removal stamp from before its bytes were read."""

    data: bytes
    media_type: str
    stamp: bytes
    # When this worker last recorded a hit on it (``LocalStore.touch``); None: not yet.
    touched_at: float | None = None

    def touch_due(self, now: float, interval: float) -> bool:
        """True, and the hit is taken as recorded, when the last was ``interval`` or more ago (or never)."""
        if self.touched_at is not None and 0 <= now - self.touched_at < interval:
            return False
        self.touched_at = now
        return True


@dataclass
class RememberedBinding:
    """A digest confirmed for a repository until ``expires_at`` (Unix seconds; ``math.inf``: never).

    ``references_bound`` is set once the digests a manifest refers to were
    confirmed for the repository too (``node.bindings``).
    """

    expires_at: float
    references_bound: bool = False


class MemoryCache:
    """Least recently used out first, within ``max_bytes``; safe between threads. 0 keeps nothing."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    # Manifests, by digest.

    def manifest(self, digest: Digest, stamp: bytes) -> RememberedManifest | None:
        """The manifest, if it was kept under ``stamp`` (the digest's removal stamp now)."""
        kept = self._get(("manifest", digest))
        if not isinstance(kept, RememberedManifest):
            return None
        if kept.stamp != stamp:
            self._discard(("manifest", digest))
            return None
        return kept

    def keep_manifest(self, digest: Digest, manifest: RememberedManifest) -> None:
        self._put(("manifest", digest), manifest, len(manifest.data) + len(manifest.media_type))

    # Tag pointers, by registry-scoped name and tag.

    def tag(self, name: str, tag: str) -> TagPointer | None:
        kept = self._get(("tag", name, tag))
        return kept if isinstance(kept, TagPointer) else None

    def keep_tag(self, name: str, tag: str, pointer: TagPointer) -> None:
        size = len(name) + len(tag) + len(pointer.digest) + len(pointer.media_type)
        self._put(("tag", name, tag), pointer, size)

    # Repositories whose marker exists.

    def knows_repository(self, name: str) -> bool:
        return self._get(("repository", name)) is not None

    def keep_repository(self, name: str) -> None:
        self._put(("repository", name), True, len(name))

    # Bindings, by registry-scoped name and digest.

    def binding(self, name: str, digest: Digest, now: float) -> RememberedBinding | None:
        """The binding, while it has not expired at ``now``."""
        # A key of strings only: their hashes are cached, so the lookup runs
        # no Python code (a Digest's __hash__ and __eq__ would, on a hot path).
        key = ("bound", name, digest.algorithm, digest.hex)
        kept = self._get(key)
        if not isinstance(kept, RememberedBinding):
            return None
        if kept.expires_at <= now:
            self._discard(key)
            return None
        return kept

    def keep_binding(self, name: str, digest: Digest, binding: RememberedBinding) -> None:
        size = len(name) + len(digest.hex) + BINDING_OVERHEAD - ENTRY_OVERHEAD
        self._put(("bound", name, digest.algorithm, digest.hex), binding, size)

    # The map.

    def _get(self, key: Hashable) -> object | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def _put(self, key: Hashable, value: object, size: int) -> None:
        size += ENTRY_OVERHEAD
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.used_bytes -= previous[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self.used_bytes += size
            while self.used_bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.used_bytes -= dropped

    def _discard(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.used_bytes -= entry[1]
