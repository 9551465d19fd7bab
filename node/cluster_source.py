"""The upstream, decorated with the cluster: other nodes first, the upstream once.

A ``ClusterSource`` is the ``Source`` of a node in a cluster, one per
mirrored registry. For every miss it runs the cluster's single flight
(``Flight.coordinate``) with a look of its own kind:

- a **blob**: a live node that holds it completely, streamed from that
  node's internal endpoint; else the node fetching it now (the lease
  holder), following its growing file; else this node fetches it from the
  upstream under the lease. The fill verifies the digest in every case.
- a **manifest**: copied whole from a node that holds it; else fetched from
  the upstream under the lease.
- a **tag**: the cluster's pointer while it is fresh (``tag_ttl``); else the
  one node holding the tag's lease asks the upstream and shares the answer.
  When the upstream fails, that node answers with the cluster's stale
  pointer (stale-if-error), and so does every node while the upstream's
  rate-limit budget pauses tag checks (``node.budget``).

Content is announced to the coordinator once the caller committed it, when
the caller leaves the ``open_`` context (``Flight.committed``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from node.budget import Budget
from node.config import UpstreamConfig
from node.coordinator_client import Coordinator
from node.errors import BlobUnknown, TooManyRequests, UpstreamUnavailable
from node.flight import Flight, Outcome
from node.peers import PeerClient
from node.reference import Digest, parse_digest
from node.sources import BlobStream, FetchedManifest, Source, TagAnswer
from node.storage.local import LocalStore
from node.upstream import MANIFEST_MAX, TagPage
from protos.leases import blob_lease, manifest_lease, tag_lease
from protos.values import Holder, TagPointer

log = logging.getLogger(__name__)

# Upstream failures for which the cluster's stale tag pointer is served.
_STALE_OK = (UpstreamUnavailable, TooManyRequests)


@dataclass
class ClusterSource:
    """The ``Source`` of one mirrored registry on a node in a cluster."""

    upstream: Source
    config: UpstreamConfig
    flight: Flight
    coordinator: Coordinator
    peers: PeerClient
    local: LocalStore
    clock: Callable[[], float] = time.time
    # The upstream's rate-limit budget; without one, tag checks never pause.
    budget: Budget | None = None

    @property
    def _node_id(self) -> str:
        return self.flight.node_id

    @property
    def _ttl_ms(self) -> int:
        return int(self.config.ttl * 1000)

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: Digest) -> Iterator[BlobStream]:
        key = blob_lease(str(digest))
        with contextlib.ExitStack() as streams:

            def look() -> BlobStream | None:
                location = self.coordinator.locate(str(digest), key)
                return self._first_peer(streams, self._peers(location.holders, location.fetcher), digest)

            def follow(holder: Holder) -> BlobStream | None:
                return self._first_peer(streams, [holder], digest)

            with self.flight.coordinate(key, look, follow, kind="blob") as turn:
                stream = turn.found
                if stream is None:
                    stream = streams.enter_context(self.upstream.open_blob(name, digest))
                yield stream
                self.flight.committed(turn, self.local.content(digest), self._ttl_ms)

    @contextlib.contextmanager
    def open_manifest(self, name: str, digest: Digest) -> Iterator[FetchedManifest]:
        key = manifest_lease(self.config.name, str(digest))

        def look() -> FetchedManifest | None:
            return self._manifest_from_peers(self._peers(self.coordinator.locate(str(digest), key).holders), digest)

        with contextlib.ExitStack() as fetches, self.flight.coordinate(key, look, kind="manifest") as turn:
            manifest = turn.found
            if manifest is None:
                manifest = fetches.enter_context(self.upstream.open_manifest(name, digest))
            yield manifest
            self.flight.committed(turn, self.local.content(digest), self._ttl_ms)

    def tags(self, name: str, n: int | None = None, last: str | None = None) -> TagPage:
        return self.upstream.tags(name, n, last)

    def check_tag(self, name: str, tag: str) -> TagAnswer:
        registry = self.config.name
        seen: list[TagPointer] = []

        def look() -> TagAnswer | None:
            pointer = self.coordinator.get_tag(registry, name, tag)
            if pointer is None:
                return None
            seen.append(pointer)
            if not pointer.fresh(self.clock(), self.config.tag_ttl):
                if self.budget is None or self.budget.paused() == 0:
                    return None
                # Served stale, and kept stale: checked_at stays the pointer's.
                self.budget.skipped_tag_check()
            return TagAnswer(parse_digest(pointer.digest), checked_at=pointer.checked_at)

        with self.flight.coordinate(tag_lease(registry, name, tag), look) as turn:
            if turn.found is not None:
                return turn.found
            try:
                answer = self.upstream.check_tag(name, tag)
            except _STALE_OK as exc:
                if turn.outcome is not Outcome.GRANTED or not seen:
                    raise
                stale = seen[-1]
                log.warning("serving %s:%s as %s from the cluster: %s", name, tag, stale.digest, exc.message)
                return TagAnswer(parse_digest(stale.digest))
            self.flight.share_tag(turn, registry, name, tag, self._pointer(answer))
            return answer

    # Peers.

    def _peers(self, holders: list[Holder], fetcher: Holder | None = None) -> list[Holder]:
        """Holders first (in random order, to spread the load), then the fetcher; never this node."""
        others = [holder for holder in holders if holder.node_id != self._node_id and holder.url]
        random.shuffle(others)
        if fetcher is not None and fetcher.url and fetcher.node_id != self._node_id:
            others.append(fetcher)
        return others

    def _first_peer(self, streams: contextlib.ExitStack, peers: list[Holder], digest: Digest) -> BlobStream | None:
        for peer in peers:
            try:
                return streams.enter_context(self.peers.open(peer.url, str(digest)))
            except (BlobUnknown, UpstreamUnavailable) as exc:
                log.info("peer %s cannot serve %s: %s", peer.node_id, digest, exc.message)
        return None

    def _manifest_from_peers(self, peers: list[Holder], digest: Digest) -> FetchedManifest | None:
        for peer in peers:
            try:
                return self.peers.fetch(peer.url, str(digest), MANIFEST_MAX)
            except (BlobUnknown, UpstreamUnavailable) as exc:
                log.info("peer %s cannot serve %s: %s", peer.node_id, digest, exc.message)
        return None

    # Announcing.

    def _pointer(self, answer: TagAnswer) -> TagPointer:
        manifest = answer.manifest
        if manifest is None:
            stored = self.local.read(answer.digest)
            manifest = FetchedManifest(*stored) if stored is not None else None
        if manifest is None:
            return TagPointer(str(answer.digest), "", 0, self.clock())
        return TagPointer(str(answer.digest), manifest.media_type, len(manifest.data), self.clock())
