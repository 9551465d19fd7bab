"""The pull-through store: the local store, filled from the upstream on a miss.

It decorates ``LocalStore`` the way distribution's proxy stores decorate
theirs: ask the local store first, go to the upstream only when the content
is unknown, write one upstream fetch to the client and the cache at once,
and let the content count only when it is complete and verified.

Single flight on a node spans all its gunicorn workers: blobs through
``Fills``; manifests and tag checks, which are small, under an exclusive
``flock`` (waited for cooperatively, with a deadline) with a second look
after the lock is taken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from node.config import UpstreamConfig
from node.directory import Directory, Standalone
from node.errors import TooManyRequests, UpstreamInvalid, UpstreamUnavailable
from node.reference import Digest, digest_of, parse_digest
from node.storage.fill import Fills, Following
from node.storage.local import LocalStore, Stored, TagPointer
from node.storage.locks import exclusive
from node.upstream import TagPage, Upstream

log = logging.getLogger(__name__)

# Upstream failures for which a cached tag answer is served instead
# (stale-if-error). A 404 is an answer, not a failure: it is passed on.
_STALE_OK = (UpstreamUnavailable, TooManyRequests)


@dataclass(frozen=True)
class Blob:
    """A blob to serve: complete on disk (``stored``) or being filled."""

    digest: Digest
    stored: Stored | None = None
    following: Following | None = None

    @property
    def size(self) -> int | None:
        if self.stored is not None:
            return self.stored.size
        return self.following.size if self.following is not None else None

    @property
    def outcome(self) -> str:
        """The metric this request counts as: hits, misses or peer_hits."""
        if self.following is None:
            return "hits"
        return _OUTCOMES[self.following.origin]


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: Digest
    # The metric this request counts as: hits, misses or peer_hits.
    outcome: str = "hits"


_OUTCOMES = {"upstream": "misses", "peer": "peer_hits"}


class ProxyStore:
    def __init__(
        self,
        local: LocalStore,
        fills: Fills,
        upstream: Upstream,
        config: UpstreamConfig,
        directory: Directory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local = local
        self.fills = fills
        self.upstream = upstream
        self.config = config
        self.directory: Directory = directory or Standalone()
        self._clock = clock

    # Blobs.

    def blob(self, name: str, digest: Digest) -> Blob:
        stored = self.local.open(digest)
        if stored is not None:
            self.local.touch(digest)
            return Blob(digest, stored=stored)
        following = self.fills.join(
            digest,
            lambda: self.directory.blob_source(self.config, digest, lambda: self.upstream.open_blob(name, str(digest))),
        )
        if following is None:
            stored = self.local.open(digest)
            if stored is not None:
                return Blob(digest, stored=stored)
            raise UpstreamUnavailable("the blob vanished from the cache while it was being filled")
        return Blob(digest, following=following)

    # Manifests.

    def manifest(self, name: str, reference: str) -> Manifest:
        if ":" in reference:
            manifest = self._manifest_by_digest(name, parse_digest(reference))
        else:
            manifest = self._manifest_by_tag(name, reference)
        self.local.remember_repository(self._scoped(name))
        return manifest

    def _manifest_by_digest(self, name: str, digest: Digest) -> Manifest:
        cached = self._cached_manifest(digest)
        if cached is not None:
            return cached
        with self._lock(f"{digest.algorithm}-{digest.hex}"):
            cached = self._cached_manifest(digest)
            if cached is not None:
                return cached
            fetched: list[Manifest] = []

            def from_upstream() -> tuple[bytes, str]:
                answer = self.upstream.get_manifest(name, str(digest))
                return answer.data, answer.media_type

            def store(data: bytes, media_type: str) -> None:
                if digest_of(data, digest.algorithm) != digest:
                    raise UpstreamInvalid("the upstream sent a manifest that does not match its digest")
                self.local.put(digest, data, media_type)
                fetched.append(Manifest(data, media_type, digest))

            origin = self.directory.fetch_manifest(self.config, digest, from_upstream, store)
            return dataclasses.replace(fetched[0], outcome=_OUTCOMES[origin])

    def _cached_manifest(self, digest: Digest) -> Manifest | None:
        found = self.local.read(digest)
        if found is None:
            return None
        self.local.touch(digest)
        return Manifest(found[0], found[1], digest)

    def _manifest_by_tag(self, name: str, tag: str) -> Manifest:
        fresh = self._fresh_tag(name, tag)
        if fresh is not None:
            return fresh
        key = hashlib.sha256(f"{name}:{tag}".encode()).hexdigest()
        with self._lock(f"tag-{key}"):
            # Another worker may have checked the tag while this one waited.
            fresh = self._fresh_tag(name, tag)
            if fresh is not None:
                return fresh
            pointer = self.local.read_tag(self._scoped(name), tag)
            try:
                digest = self.directory.resolve_tag(self.config, name, tag, lambda: self._check_tag(name, tag))
                manifest = self._manifest_by_digest(name, parse_digest(digest))
            except _STALE_OK as exc:
                stale = self._cached_manifest(parse_digest(pointer.digest)) if pointer else None
                if stale is None or pointer is None:
                    raise
                log.warning("serving %s:%s as %s from the cache: %s", name, tag, pointer.digest, exc.message)
                return stale
            self.local.write_tag(
                self._scoped(name),
                tag,
                TagPointer(str(manifest.digest), manifest.media_type, len(manifest.data), self._clock()),
            )
            return manifest

    def _fresh_tag(self, name: str, tag: str) -> Manifest | None:
        pointer = self.local.read_tag(self._scoped(name), tag)
        if pointer is None or self._clock() - pointer.checked_at >= self.config.tag_ttl:
            return None
        return self._manifest_by_digest(name, parse_digest(pointer.digest))

    def _check_tag(self, name: str, tag: str) -> str:
        """Ask the upstream what the tag points at now.

        A HEAD is cheap and Docker Hub does not count it against the pull
        limit, so the manifest itself is fetched only when the digest is new.
        An upstream that does not say the digest on HEAD gets a GET.
        """
        head = self.upstream.head_manifest(name, tag)
        if head.digest is not None:
            return str(parse_digest(head.digest))
        fetched = self.upstream.get_manifest(name, tag)
        digest = digest_of(fetched.data)
        if fetched.digest is not None and fetched.digest != str(digest):
            raise UpstreamInvalid("the upstream sent a manifest that does not match its digest")
        self.local.put(digest, fetched.data, fetched.media_type)
        return str(digest)

    # Tags and the catalog.

    def tags(self, name: str, n: int | None, last: str | None) -> TagPage:
        try:
            page = self.upstream.tags(name, n, last)
        except _STALE_OK as exc:
            known = self.local.known_tags(self._scoped(name))
            if not known:
                raise
            log.warning("answering the tag list of %s from the cache: %s", name, exc.message)
            return paginate(known, n, last, f"/v2/{name}/tags/list")
        # The spec wants lexical order; distribution 2.x sends the list in
        # the order its storage walks, and ignores n and last.
        tags = sorted(page.tags)
        if n is None and last is None:
            self.local.write_tag_list(self._scoped(name), tags)
        elif page.link is None:
            return paginate(tags, n, last, f"/v2/{name}/tags/list")
        return TagPage(tags, page.link)

    def catalog(self, n: int | None, last: str | None) -> TagPage:
        return paginate(self.local.repositories(self.config.name), n, last, "/v2/_catalog")

    def _scoped(self, name: str) -> str:
        """Tags and repositories are kept per registry: the same name is another repository elsewhere."""
        return f"{self.config.name}/{name}"

    def _lock(self, name: str) -> AbstractContextManager[None]:
        # Whoever holds it waits on the upstream, bounded by its timeout (and,
        # in a cluster, on another node's fetch for about as long again).
        return exclusive(os.path.join(self.local.fills_dir(), f"{name}.lock"), 2 * self.config.timeout + 5)


def paginate(items: list[str], n: int | None, last: str | None, path: str) -> TagPage:
    """One page of a sorted list, with a Link to the next as the spec has it."""
    if last is not None:
        items = [item for item in items if item > last]
    if n is None or len(items) <= n:
        return TagPage(items, None)
    page = items[:n]
    return TagPage(page, f'<{path}?n={n}&last={page[-1]}>; rel="next"')
