"""The pull-through store: the local store, filled from a source on a miss.

It decorates ``LocalStore`` the way distribution's proxy stores decorate
theirs: ask the local store first, go to the source (``node.sources``: the
upstream, or the cluster in front of it) only when the content is unknown,
write one fetch to the client and the cache at once, and let the content
count only when it is complete and verified.

Single flight on a node spans all its gunicorn workers: blobs through
``Fills``; manifests and tag checks, which are small, under an exclusive
``flock`` (waited for cooperatively, with a deadline) with a second look
after the lock is taken.

Manifests and fresh tag pointers are answered from the worker's memory
(``node.storage.memory``) when it holds them, so that a warm manifest
request touches no file. A manifest enters memory once its bytes were
verified (on a fetch, or on its first read from the disk), is served from
there only while the node has not removed its digest since
(``node.storage.removals``), and records its hits at most every
``TOUCH_INTERVAL``. A tag pointer is served from memory only while it is
fresh, exactly as long as its file would be.

While the upstream's rate-limit budget pauses tag checks (``node.budget``),
a tag past ``tag_ttl`` whose manifest the node holds is served stale without
asking anyone; a tag it cannot answer still goes to the source.

Content is served under a name only once ``node.bindings`` confirms that
the repository holds it: before a blob is opened, and before a manifest,
however it was found, is answered. A manifest the upstream just answered
for the name (fetched from it, or named by a tag it answered) confirms
itself and what it references, without asking again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from node.bindings import Bindings
from node.budget import Budget
from node.config import CacheConfig, UpstreamConfig
from node.errors import Busy, TooManyRequests, UpstreamInvalid, UpstreamUnavailable
from node.media_types import manifest_media_type
from node.reference import Digest, digest_of, parse_digest
from node.sources import FetchedManifest, Origin, Source
from node.storage.files import exclusive
from node.storage.fill import Fills, Following
from node.storage.local import LocalStore, Stored
from node.storage.memory import MemoryCache, RememberedManifest
from node.upstream import MANIFEST_MAX, TagPage
from protos.values import TagPointer

log = logging.getLogger(__name__)

# Upstream failures for which a cached tag answer is served instead
# (stale-if-error). A 404 is an answer, not a failure: it is passed on.
_STALE_OK = (UpstreamUnavailable, TooManyRequests)

# A manifest answered from memory records its hits (``LocalStore.touch``:
# access order, and expiry with extend_ttl_on_hit) at most this often, and
# at least ten times per upstream.ttl, so content in use never expires.
TOUCH_INTERVAL = 30.0


@dataclass
class Blob:
    """A blob to serve: complete on disk (``stored``) or being filled (``following``).

    It owns the open file of either until a response body takes it over;
    ``close`` (or leaving a ``with`` block) closes what is still owned. A
    blob for a HEAD may have neither: then only ``stat_size``, the size the
    source said (None when it did not), is known.
    """

    digest: Digest
    stored: Stored | None = None
    following: Following | None = None
    stat_size: int | None = None

    @property
    def size(self) -> int | None:
        if self.stored is not None:
            return self.stored.size
        return self.following.size if self.following is not None else self.stat_size

    @property
    def outcome(self) -> str:
        """The metric this request counts as: hits, misses or peer_hits."""
        if self.following is None:
            return "hits"
        return self.following.origin.outcome

    def close(self) -> None:
        if self.stored is not None:
            self.stored.close()
        if self.following is not None:
            self.following.close()

    def __enter__(self) -> Blob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: Digest
    # The metric this request counts as: hits, misses or peer_hits.
    outcome: str = "hits"
    # When the upstream answered this manifest for the requested repository,
    # if it just did (fetched from it, or named by a tag it answered).
    vouched_at: float | None = None


@dataclass
class ProxyStore:
    """The cache of one mirrored registry: ``local`` in front of ``source``."""

    local: LocalStore
    fills: Fills
    source: Source
    config: UpstreamConfig
    # Which digests may be served under which name of this registry.
    bindings: Bindings
    clock: Callable[[], float] = time.time
    # The worker's memory of manifests and tags, shared by its proxy stores
    # (``Node`` passes one); a store made on its own gets one of its own.
    memory: MemoryCache = field(default_factory=lambda: MemoryCache(CacheConfig().memory))
    # The upstream's rate-limit budget (``Node`` passes the upstream client's);
    # without one, tag checks never pause.
    budget: Budget | None = None

    # Blobs.

    def blob(self, name: str, digest: Digest, *, head: bool = False) -> Blob:
        """The blob from the store, or its fill from the source (started, or joined), if bound to ``name``.

        For a ``head`` request the fill starts only when a fill slot (and
        room on the disk) is free at once: a client that asks whether a
        blob exists is likely to pull it next. Otherwise the source is asked
        for the size, and nothing is stored: a flood of HEADs costs the
        upstream one HEAD each, never a fill slot or disk it has to wait for.
        """
        self.bindings.bind_blob(name, digest)
        stored = self.local.open(digest)
        if stored is not None:
            self.local.touch(digest)
            return Blob(digest, stored=stored)
        try:
            following = self.fills.join(self.source, name, digest, wait=not head)
        except Busy:
            if not head:
                raise
            return Blob(digest, stat_size=self.source.stat_blob(name, digest))
        if following is not None:
            return Blob(digest, following=following)
        stored = self.local.open(digest)
        if stored is None:
            raise UpstreamUnavailable("the blob vanished from the cache while it was being filled")
        return Blob(digest, stored=stored)

    # Manifests.

    def manifest(self, name: str, reference: str) -> Manifest:
        if ":" in reference:
            manifest = self._manifest_by_digest(name, parse_digest(reference))
        else:
            manifest = self._manifest_by_tag(name, reference)
        # A manifest this worker served under the name before has marked its repository then.
        if not self.bindings.bind_manifest(name, manifest.digest, manifest.data, manifest.vouched_at):
            self._remember_repository(self._scoped(name))
        return manifest

    def _remember_repository(self, scoped: str) -> None:
        """The catalog lists the repository; its marker is looked for (or written) once per worker."""
        if not self.memory.knows_repository(scoped):
            self.local.remember_repository(scoped)
            self.memory.keep_repository(scoped)

    def _manifest_by_digest(self, name: str, digest: Digest) -> Manifest:
        cached = self._cached_manifest(digest)
        if cached is not None:
            return cached
        with self._lock(self.local.layout.manifest_lock(digest)):
            cached = self._cached_manifest(digest)
            if cached is not None:
                return cached
            with self.source.open_manifest(name, digest) as fetched:
                media_type = self._put_manifest(digest, fetched)
            vouched_at = self.clock() if fetched.origin is Origin.UPSTREAM else None
            return Manifest(fetched.data, media_type, digest, fetched.origin.outcome, vouched_at)

    def _put_manifest(self, digest: Digest, fetched: FetchedManifest) -> str:
        """Store a fetched manifest and keep it in memory; the media type it is served with."""
        if digest_of(fetched.data, digest.algorithm) != digest:
            raise UpstreamInvalid("the upstream sent a manifest that does not match its digest")
        # Read before the bytes reach the disk: any removal after it voids the copy.
        stamp = self.local.removals.stamp(digest)
        # A peer that got the manifest through the blob endpoint states no type of its own.
        media_type = manifest_media_type(fetched.media_type, fetched.data)
        self.local.put(digest, fetched.data, media_type)
        self.memory.keep_manifest(digest, RememberedManifest(fetched.data, media_type, stamp, self.clock()))
        return media_type

    def _cached_manifest(self, digest: Digest) -> Manifest | None:
        """The manifest from memory, else from the disk; None when the store does not hold it."""
        # Read before the disk is: a removal after it voids the copy read now.
        stamp = self.local.removals.stamp(digest)
        remembered = self.memory.manifest(digest, stamp) or self._read_manifest(digest, stamp)
        if remembered is None:
            return None
        if remembered.touch_due(self.clock(), self._touch_interval):
            self.local.touch(digest)
        return Manifest(remembered.data, remembered.media_type, digest)

    def _read_manifest(self, digest: Digest, stamp: bytes) -> RememberedManifest | None:
        """The manifest from the disk, verified, and kept in memory under ``stamp``.

        A file that does not match its digest breaks the store's invariant
        (a disk error, a hand edit): it is removed and fetched again.
        """
        found = self.local.read(digest, MANIFEST_MAX)
        if found is None:
            return None
        data, media_type = found
        if digest_of(data, digest.algorithm) != digest:
            log.error("%s in the store does not match its digest: removed it, to fetch it again", digest)
            self.local.remove(digest)
            return None
        remembered = RememberedManifest(data, media_type, stamp)
        self.memory.keep_manifest(digest, remembered)
        return remembered

    @property
    def _touch_interval(self) -> float:
        ttl = self.config.ttl
        return min(TOUCH_INTERVAL, ttl / 10) if ttl > 0 else TOUCH_INTERVAL

    def _manifest_by_tag(self, name: str, tag: str) -> Manifest:
        fresh = self._fresh_tag(name, tag)
        if fresh is not None:
            return fresh
        paused = self._paused_tag(name, tag)
        if paused is not None:
            return paused
        with self._lock(self.local.layout.tag_lock(name, tag)):
            # Another worker may have checked the tag while this one waited.
            fresh = self._fresh_tag(name, tag)
            if fresh is not None:
                return fresh
            pointer = self.local.read_tag(self._scoped(name), tag)
            try:
                answer = self.source.check_tag(name, tag)
                if answer.manifest is not None:
                    self._put_manifest(answer.digest, answer.manifest)
                manifest = self._manifest_by_digest(name, answer.digest)
            except _STALE_OK as exc:
                stale = self._cached_manifest(parse_digest(pointer.digest)) if pointer else None
                if stale is None or pointer is None:
                    raise
                log.warning("serving %s:%s as %s from the cache: %s", name, tag, pointer.digest, exc.message)
                return stale
            checked_at = self.clock() if answer.checked_at is None else answer.checked_at
            checked = TagPointer(str(manifest.digest), manifest.media_type, len(manifest.data), checked_at)
            self.local.write_tag(self._scoped(name), tag, checked)
            self.memory.keep_tag(self._scoped(name), tag, checked)
            # The upstream named this digest for this repository (now, or when the cluster's pointer was checked).
            return dataclasses.replace(manifest, vouched_at=checked_at)

    def _fresh_tag(self, name: str, tag: str) -> Manifest | None:
        """The tag's manifest if its pointer is fresh: from memory, else from the pointer's file."""
        scoped, now = self._scoped(name), self.clock()
        pointer = self.memory.tag(scoped, tag)
        if pointer is None or not pointer.fresh(now, self.config.tag_ttl):
            pointer = self.local.read_tag(scoped, tag)
            if pointer is None or not pointer.fresh(now, self.config.tag_ttl):
                return None
            self.memory.keep_tag(scoped, tag, pointer)
        return self._manifest_by_digest(name, parse_digest(pointer.digest))

    def _paused_tag(self, name: str, tag: str) -> Manifest | None:
        """The tag's cached manifest, stale, while the budget pauses tag checks; else None.

        No lock is taken and nobody is asked: the pointer and the manifest are
        the node's own. A tag the node has no pointer or manifest for is None,
        so it goes to the source (and the upstream) as usual.
        """
        if self.budget is None or self.budget.paused() == 0:
            return None
        scoped = self._scoped(name)
        # The file first: another worker may have checked the tag since this one kept it.
        pointer = self.local.read_tag(scoped, tag) or self.memory.tag(scoped, tag)
        manifest = self._cached_manifest(parse_digest(pointer.digest)) if pointer is not None else None
        if manifest is None:
            return None
        self.budget.skipped_tag_check()
        log.debug("serving %s:%s as %s from the cache: tag checks are paused", name, tag, manifest.digest)
        return manifest

    # Tags and the catalog.

    def tags(self, name: str, n: int | None, last: str | None) -> TagPage:
        if n == 0:
            # Distribution answers n=0 with an empty page, and so does the cache, without asking.
            return TagPage([])
        try:
            page = self.source.tags(name, n, last)
        except _STALE_OK as exc:
            known = self.local.known_tags(self._scoped(name))
            if not known:
                raise
            log.warning("answering the tag list of %s from the cache: %s", name, exc.message)
            return paginate(known, n, last)
        # The spec wants lexical order; distribution 2.x sends the list in
        # the order its storage walks, and ignores n and last.
        tags = sorted(page.tags)
        if n is None and last is None:
            self.local.write_tag_list(self._scoped(name), tags)
        elif page.next is None:
            return paginate(tags, n, last)
        return TagPage(tags, page.next)

    def catalog(self, n: int | None, last: str | None) -> TagPage:
        return paginate(self.local.repositories(self.config.name), n, last)

    def _scoped(self, name: str) -> str:
        """Tags and repositories are kept per registry: the same name is another repository elsewhere."""
        return f"{self.config.name}/{name}"

    def _lock(self, path: str) -> AbstractContextManager[None]:
        # Whoever holds it waits on the upstream, bounded by its timeout (and,
        # in a cluster, on another node's fetch for about as long again).
        return exclusive(path, 2 * self.config.timeout + 5)


def paginate(items: list[str], n: int | None, last: str | None) -> TagPage:
    """One page of a sorted list, with the query of the next page as the spec has it."""
    if last is not None:
        items = [item for item in items if item > last]
    if n is None or len(items) <= n:
        return TagPage(items)
    page = items[:n]
    if not page:
        return TagPage([])
    return TagPage(page, {"n": str(n), "last": page[-1]})
