"""The node's side of the cluster: one upstream fetch per key, cluster-wide.

For a miss the node asks the coordinator, in this order:

1. **Peer hit**: a live node holds the content completely; stream it from
   that node's internal endpoint (the fill verifies the digest).
2. **Follow**: a node is fetching it from the upstream right now (it holds
   the lease); stream its growing file through the same endpoint.
3. **Miss**: take the cluster-wide lease (``blob:<digest>``) and fetch from
   the upstream, renewing the lease while the bytes flow; on success the
   location is registered and the lease released in one step, fenced by
   the lease token.

When the coordinator cannot be reached the node is **degraded**: it fetches
from the upstream directly, with only its own single flight, and marks its
inventory for re-announcement; the worker on heartbeat duty announces it
once the coordinator answers again.

Manifests follow the same order without streaming (they are small); tags
are shared pointers, checked against the upstream by the one node that
holds the tag's lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator

from node.config import NodeConfig, UpstreamConfig
from node.coordinator_client import (
    Content,
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnavailable,
    Holder,
    LeaseLost,
    TagPointerInfo,
)
from node.directory import ManifestFetch, ManifestStore, TagCheck, UpstreamOpener
from node.errors import BlobUnknown, TooManyRequests, UpstreamUnavailable
from node.metrics import Metrics
from node.peers import PeerClient
from node.reference import Digest, parse_digest
from node.storage.fill import Source
from node.storage.local import LocalStore
from node.upstream import MANIFEST_MAX

log = logging.getLogger(__name__)

# While another node holds a lease, poll the coordinator this often.
_POLL = 0.05
# Marker file: content arrived while the coordinator was unreachable.
_UNANNOUNCED = "unannounced"


class Cluster:
    def __init__(
        self,
        config: NodeConfig,
        local: LocalStore,
        client: CoordinatorClient,
        peers: PeerClient,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = config.node_id
        self.metrics = metrics
        self.url = config.advertise_url
        self.local = local
        self.client = client
        self.peers = peers
        # Content announced without a fetch (inventory) gets the default
        # upstream's TTL; fetched content gets its own upstream's.
        self.content_ttl_ms = int(config.upstream.ttl * 1000)
        self.extend_ttl_on_hit = config.cache.extend_ttl_on_hit
        self.lease_ttl_ms = int(config.cluster.lease_ttl * 1000)
        self.heartbeat_interval = config.cluster.heartbeat_interval
        # How long to wait for another node's fetch before fetching anyway.
        self.wait_timeout = config.upstream.timeout + config.cluster.lease_ttl
        self._clock = clock
        self._duty: int | None = None
        self._last_beat = 0.0

    # Blobs.

    @contextlib.contextmanager
    def blob_source(self, upstream: UpstreamConfig, digest: Digest, from_upstream: UpstreamOpener) -> Iterator[Source]:
        # Blobs are keyed by digest alone: the same bytes from two registries
        # are fetched and stored once.
        key = f"blob:{digest}"
        ttl_ms = int(upstream.ttl * 1000)
        with contextlib.ExitStack() as stack:
            source, done = self._choose_blob_source(stack, key, digest, from_upstream, ttl_ms)
            yield source
            done()

    def _choose_blob_source(
        self,
        stack: contextlib.ExitStack,
        key: str,
        digest: Digest,
        from_upstream: UpstreamOpener,
        ttl_ms: int,
    ) -> tuple[Source, Callable[[], None]]:
        deadline = time.monotonic() + self.wait_timeout
        waited = False
        while True:
            try:
                location = self.client.locate(str(digest), key)
                for peer in self._peers(location.holders, location.fetcher):
                    stream = self._open_peer(stack, peer, digest)
                    if stream is not None:
                        return stream, lambda: self._add(digest, ttl_ms)
                lease = self.client.acquire_lease(key, self.lease_ttl_ms)
            except CoordinatorError as exc:
                return self._degraded(stack, from_upstream, exc), self._mark_unannounced
            if lease.granted:
                stream = self._second_look(stack, key, lease.token, digest)
                if stream is not None:
                    return stream, lambda: self._add(digest, ttl_ms)
                return self._leased(stack, key, lease.token, digest, from_upstream, ttl_ms)
            if lease.holder is not None and lease.holder.url and lease.holder.node_id != self.node_id:
                stream = self._open_peer(stack, lease.holder, digest)
                if stream is not None:
                    return stream, lambda: self._add(digest, ttl_ms)
            if not waited:
                waited = True
                self.metrics.count("blob", "lease_waits")
            if time.monotonic() > deadline:
                log.warning("gave up waiting for the cluster's fetch of %s; fetching it myself", digest)
                return stack.enter_context(from_upstream()), lambda: self._add(digest, ttl_ms)
            time.sleep(_POLL)

    def _second_look(self, stack: contextlib.ExitStack, key: str, token: str, digest: Digest) -> Source | None:
        """After the lease is granted, look for holders once more.

        Another node may have completed its fetch between this node's look
        and its lease: CompleteFetch registers the location and releases
        the lease in one step, so a lease granted after it always sees the
        location here, and the content is never fetched twice.
        """
        try:
            holders = self.client.locate(str(digest), key).holders
        except CoordinatorError:
            return None
        for peer in self._peers(holders, None):
            stream = self._open_peer(stack, peer, digest)
            if stream is not None:
                with contextlib.suppress(CoordinatorError):
                    self.client.abort_fetch(key, token)
                return stream
        return None

    def _peers(self, holders: list[Holder], fetcher: Holder | None) -> list[Holder]:
        """Holders first (in random order, to spread the load), then the fetcher."""
        others = [holder for holder in holders if holder.node_id != self.node_id and holder.url]
        random.shuffle(others)
        if fetcher is not None and fetcher.url and fetcher.node_id != self.node_id:
            others.append(fetcher)
        return others

    def _open_peer(self, stack: contextlib.ExitStack, peer: Holder, digest: Digest) -> Source | None:
        try:
            return stack.enter_context(self.peers.open(peer.url, str(digest)))
        except (BlobUnknown, UpstreamUnavailable) as exc:
            log.info("peer %s cannot serve %s: %s", peer.node_id, digest, exc.message)
            return None

    def _leased(
        self,
        stack: contextlib.ExitStack,
        key: str,
        token: str,
        digest: Digest,
        from_upstream: UpstreamOpener,
        ttl_ms: int,
    ) -> tuple[Source, Callable[[], None]]:
        renewer = _LeaseRenewer(self.client, key, token, self.lease_ttl_ms)

        def release_on_failure(exc_type: object, *_: object) -> None:
            renewer.stop()
            if exc_type is not None:
                with contextlib.suppress(CoordinatorError):
                    self.client.abort_fetch(key, token)

        stack.push(lambda exc_type, exc, tb: release_on_failure(exc_type))
        source = stack.enter_context(from_upstream())
        renewer.start()

        def complete() -> None:
            renewer.stop()
            self._complete(key, token, digest, ttl_ms)

        return source, complete

    def _degraded(self, stack: contextlib.ExitStack, from_upstream: UpstreamOpener, exc: CoordinatorError) -> Source:
        # Unreachable, or refusing (a wrong secret): the client still gets
        # its content, straight from the upstream, and the log says why.
        log.warning("coordinator unusable, fetching from the upstream directly: %s", exc)
        return stack.enter_context(from_upstream())

    # Manifests.

    def fetch_manifest(
        self, upstream: UpstreamConfig, digest: Digest, from_upstream: ManifestFetch, store: ManifestStore
    ) -> str:
        key = f"manifest:{upstream.name}/{digest}"
        ttl_ms = int(upstream.ttl * 1000)
        deadline = time.monotonic() + self.wait_timeout
        waited = False
        while True:
            try:
                if self._manifest_from_peers(key, digest, store, ttl_ms):
                    return "peer"
                lease = self.client.acquire_lease(key, self.lease_ttl_ms)
            except CoordinatorError as exc:
                log.warning("coordinator unusable, fetching %s from the upstream directly: %s", digest, exc)
                store(*from_upstream())
                self._mark_unannounced()
                return "upstream"
            if lease.granted:
                # A second look, as for blobs (see _second_look).
                try:
                    found = self._manifest_from_peers(key, digest, store, ttl_ms)
                except CoordinatorError:
                    found = False
                if found:
                    with contextlib.suppress(CoordinatorError):
                        self.client.abort_fetch(key, lease.token)
                    return "peer"
                try:
                    store(*from_upstream())
                except BaseException:
                    with contextlib.suppress(CoordinatorError):
                        self.client.abort_fetch(key, lease.token)
                    raise
                self._complete(key, lease.token, digest, ttl_ms)
                return "upstream"
            if not waited:
                waited = True
                self.metrics.count("manifest", "lease_waits")
            if time.monotonic() > deadline:
                store(*from_upstream())
                self._add(digest, ttl_ms)
                return "upstream"
            time.sleep(_POLL)

    def _manifest_from_peers(self, key: str, digest: Digest, store: ManifestStore, ttl_ms: int) -> bool:
        """Copy the manifest from a node that holds it; False when none could."""
        for peer in self._peers(self.client.locate(str(digest), key).holders, None):
            try:
                data, media_type = self.peers.fetch(peer.url, str(digest), MANIFEST_MAX)
            except (BlobUnknown, UpstreamUnavailable) as exc:
                log.info("peer %s cannot serve %s: %s", peer.node_id, digest, exc.message)
                continue
            store(data, media_type)
            self._add(digest, ttl_ms)
            return True
        return False

    # Tags.

    def resolve_tag(self, upstream: UpstreamConfig, name: str, tag: str, check: TagCheck) -> str:
        """A fresh shared pointer, or the answer of the one node that asks the upstream."""
        key = f"tag:{upstream.name}/{name}:{tag}"
        deadline = time.monotonic() + self.wait_timeout
        pointer: TagPointerInfo | None = None
        while True:
            try:
                pointer = self.client.get_tag(upstream.name, name, tag)
                if pointer is not None and self._clock() - pointer.checked_at < upstream.tag_ttl:
                    return pointer.digest
                lease = self.client.acquire_lease(key, self.lease_ttl_ms)
            except CoordinatorError:
                return check()
            if lease.granted:
                try:
                    # A second look: the node that held the lease before may
                    # have shared its answer just before releasing it.
                    with contextlib.suppress(CoordinatorError):
                        pointer = self.client.get_tag(upstream.name, name, tag) or pointer
                    if pointer is not None and self._clock() - pointer.checked_at < upstream.tag_ttl:
                        return pointer.digest
                    return self._check_shared_tag(upstream.name, name, tag, key, lease.token, check, pointer)
                finally:
                    with contextlib.suppress(CoordinatorError):
                        self.client.abort_fetch(key, lease.token)
            if time.monotonic() > deadline:
                return check()
            time.sleep(_POLL)

    def _check_shared_tag(
        self,
        registry: str,
        name: str,
        tag: str,
        key: str,
        token: str,
        check: TagCheck,
        pointer: TagPointerInfo | None,
    ) -> str:
        try:
            digest = check()
        except (UpstreamUnavailable, TooManyRequests) as exc:
            if pointer is None:
                raise
            log.warning("serving %s:%s as %s from the cluster: %s", name, tag, pointer.digest, exc.message)
            return pointer.digest
        stored = self.local.read(parse_digest(digest))
        media_type, size = (stored[1], len(stored[0])) if stored else ("", 0)
        try:
            self.client.put_tag(registry, name, tag, TagPointerInfo(digest, media_type, size, self._clock()), token)
        except LeaseLost:
            log.warning("lost the lease on %s while checking it; not sharing the answer", key)
        except CoordinatorError:
            pass
        return digest

    # Bookkeeping.

    def _complete(self, key: str, token: str, digest: Digest, ttl_ms: int) -> None:
        content = self._content(digest)
        if content is None:
            return
        try:
            self.client.complete_fetch(key, token, content.digest, content.size, content.media_type, ttl_ms)
        except LeaseLost:
            # Another node took the lease over; the coordinator keeps its
            # registration. This copy is verified, and the next inventory
            # announcement registers it.
            log.warning("lease %s was taken over; %s is not registered now", key, digest)
            self._mark_unannounced()
        except CoordinatorError:
            self._mark_unannounced()

    def _add(self, digest: Digest, ttl_ms: int) -> None:
        content = self._content(digest)
        if content is None:
            return
        try:
            self.client.add_content([content], ttl_ms=ttl_ms)
        except CoordinatorError:
            self._mark_unannounced()

    def _content(self, digest: Digest) -> Content | None:
        stored = self.local.open(digest)
        if stored is None:
            return None
        os.close(stored.file)
        return Content(str(digest), stored.size, self.local.media_type(digest))

    def _mark_unannounced(self) -> None:
        open(os.path.join(self.local.fills_dir(), _UNANNOUNCED), "a").close()

    def touched(self, digests: list[Digest]) -> None:
        if digests and self.extend_ttl_on_hit:
            with contextlib.suppress(CoordinatorError):
                self.client.touch([str(digest) for digest in digests])

    def dropped(self, digests: list[Digest]) -> None:
        if digests:
            try:
                self.client.drop_content([str(digest) for digest in digests])
            except CoordinatorError:
                self._mark_unannounced()

    # Membership, from the background thread of one worker per node.

    def tick(self) -> None:
        """Heartbeat on schedule; register and announce when the coordinator asks."""
        now = time.monotonic()
        if now - self._last_beat < self.heartbeat_interval or not self._on_duty():
            return
        self._last_beat = now
        capacity, used = self.local.max_size, self.local.used_bytes()
        try:
            known, evict = self.client.heartbeat(self.url, capacity_bytes=capacity, used_bytes=used)
            self._evict(evict)
            marker = os.path.join(self.local.fills_dir(), _UNANNOUNCED)
            if not known or os.path.exists(marker):
                self.client.register(self.url, capacity_bytes=capacity, used_bytes=used)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)
                self._evict(self.client.announce_inventory(self._inventory(), ttl_ms=self.content_ttl_ms))
                log.info("announced the inventory to the coordinator")
        except CoordinatorUnavailable:
            self._mark_unannounced()
        except CoordinatorError as exc:
            log.warning("heartbeat refused: %s", exc)

    def _on_duty(self) -> bool:
        """One worker per node heartbeats: the one holding ``cluster.lock``."""
        if self._duty is None:
            fd = os.open(os.path.join(self.local.fills_dir(), "cluster.lock"), os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._duty = fd
            # A worker taking over duty (at start, or after another worker
            # exited) announces, so the directory matches the disk.
            self._mark_unannounced()
        return True

    def _inventory(self) -> list[Content]:
        found = []
        for digest in self.local.digests():
            content = self._content(digest)
            if content is not None:
                found.append(content)
        return found

    def _evict(self, digests: list[str]) -> None:
        for text in digests:
            digest = parse_digest(text)
            if self.local.remove(digest):
                self.metrics.add("evictions.ttl")
                log.info("evicted %s (expired)", digest)

    def close(self) -> None:
        if self._duty is not None:
            os.close(self._duty)
            self._duty = None
        self.peers.close()
        self.client.close()


class _LeaseRenewer:
    """Renews a lease every third of its lifetime while a fetch runs."""

    def __init__(self, client: CoordinatorClient, key: str, token: str, ttl_ms: int) -> None:
        self._client, self._key, self._token, self._ttl_ms = client, key, token, ttl_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew-{key[:24]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_ms / 3000):
            try:
                if not self._client.renew_lease(self._key, self._token, self._ttl_ms):
                    log.warning("lost the lease %s during the fetch", self._key)
                    return
            except CoordinatorError as exc:
                log.warning("could not renew the lease %s: %s", self._key, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
