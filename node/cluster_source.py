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

A blob streamed from a peer is a ``_Relay``: when that peer breaks off (it
died, most often the lease holder being followed), the relay goes through
the flight again from the byte it reached, and carries on from whoever the
turn names: a holder or the new fetcher (the bytes before that byte are
read and dropped), or, once the dead holder's lease ran out and this node
took it over, the upstream with a Range request (``Upstream.open_blob``).
The fill on the other side sees one stream of the whole blob and hashes it
as always, so the content is verified whichever sources its bytes came
from. A fetch given up for a reason that holds for the whole cluster (the
upstream sent too slowly, ``node.min_rate``) is not carried on: its
fetcher gives the reason with its lease (``Flight.coordinate``), and the
relay fails with it instead.
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
from node.coordinator_client import Coordinator, CoordinatorError, Lease
from node.errors import BadCopy, BlobUnknown, TooManyRequests, UpstreamInvalid, UpstreamUnavailable
from node.flight import Counter, Flight, Outcome, Turn
from node.peers import PeerClient
from node.reference import Digest, digest_of, parse_digest
from node.sources import BlobStream, FetchedManifest, Origin, Skip, Source, TagAnswer
from node.storage.local import LocalStore
from node.upstream import MANIFEST_MAX, TagPage
from protos.leases import blob_lease, manifest_lease, tag_lease
from protos.metrics import BAD_PEER_COPIES
from protos.values import Holder, TagPointer

log = logging.getLogger(__name__)

# Upstream failures for which the cluster's stale tag pointer is served.
_STALE_OK = (UpstreamUnavailable, TooManyRequests)
# How often one blob transfer from peers may break off and be carried on
# elsewhere before it fails.
MAX_TAKEOVERS = 3


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
    # Where bad copies from peers are counted (``bad_peer_copies``); without one, they are not.
    counter: Counter | None = None

    @property
    def _node_id(self) -> str:
        return self.flight.node_id

    @property
    def _ttl_ms(self) -> int:
        return int(self.config.ttl * 1000)

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: Digest, start: int = 0) -> Iterator[BlobStream]:
        with contextlib.ExitStack() as streams:
            turn, stream, peer = self._blob_turn(streams, name, digest, start)
            relay = _Relay(self, streams, name, digest, start, turn, stream, peer) if peer is not None else None
            try:
                yield relay or stream
            except UpstreamInvalid as exc:
                if relay is not None and not isinstance(exc, BadCopy):
                    self._reject(relay.only_peer, digest, exc)
                raise
            final = relay.turn if relay is not None else turn
            self.flight.committed(final, self.local.content(digest), self._ttl_ms)

    def _blob_turn(
        self, streams: contextlib.ExitStack, name: str, digest: Digest, start: int
    ) -> tuple[Turn[_PeerCopy], BlobStream, Holder | None]:
        """Take a turn for the blob's bytes from ``start`` on, and open them; both stay open in ``streams``.

        From a peer (a holder, or the node fetching it now, returned as the
        third item) when the turn found one, else from the upstream (under
        the lease when GRANTED).
        """
        key = blob_lease(str(digest))

        def look() -> _PeerCopy | None:
            location = self.coordinator.locate(str(digest), key)
            return self._first_peer(streams, self._peers(location.holders, location.fetcher), digest, start)

        def claim(ttl_ms: int) -> tuple[_PeerCopy | None, Lease | None]:
            claimed = self.coordinator.claim(str(digest), key, ttl_ms)
            return self._first_peer(streams, self._peers(claimed.holders), digest, start), claimed.lease

        def follow(holder: Holder) -> _PeerCopy | None:
            return self._first_peer(streams, [holder], digest, start)

        turn = streams.enter_context(self.flight.coordinate(key, look, follow, kind="blob", claim=claim))
        if turn.found is not None:
            return turn, turn.found.stream, turn.found.holder
        return turn, streams.enter_context(self.upstream.open_blob(name, digest, start)), None

    def _reject(self, peer: Holder | None, digest: Digest, error: UpstreamInvalid, kind: str = "blob") -> None:
        """The bytes from ``peer`` failed verification (``error``): report it and raise ``BadCopy``.

        The coordinator unlists that peer's copy, so opening the blob again
        goes to another holder or the upstream. When the bytes came from
        more than one place (a transfer carried on elsewhere), there is no
        one to blame and nothing is raised here: the caller's error stands.
        """
        if peer is None:
            return
        log.warning("the copy of %s from node %s does not match its digest; reporting it", digest, peer.node_id)
        if self.counter is not None:
            self.counter.count(kind, BAD_PEER_COPIES)
        try:
            self.coordinator.report_bad_copy(peer.node_id, str(digest))
        except CoordinatorError as exc:
            # The next attempt most likely finds no coordinator either, and
            # goes to the upstream degraded.
            log.warning("could not report the bad copy of %s from node %s: %s", digest, peer.node_id, exc)
        raise BadCopy(
            f"node {peer.node_id} sent a copy that does not match the digest", {"digest": str(digest)}
        ) from error

    @contextlib.contextmanager
    def open_manifest(self, name: str, digest: Digest) -> Iterator[FetchedManifest]:
        key = manifest_lease(self.config.name, str(digest))

        def look() -> FetchedManifest | None:
            return self._manifest_from_peers(self._peers(self.coordinator.locate(str(digest), key).holders), digest)

        def claim(ttl_ms: int) -> tuple[FetchedManifest | None, Lease | None]:
            claimed = self.coordinator.claim(str(digest), key, ttl_ms)
            return self._manifest_from_peers(self._peers(claimed.holders), digest), claimed.lease

        flight = self.flight.coordinate(key, look, kind="manifest", claim=claim)
        with contextlib.ExitStack() as fetches, flight as turn:
            manifest = turn.found
            if manifest is None:
                manifest = fetches.enter_context(self.upstream.open_manifest(name, digest))
            yield manifest
            self.flight.committed(turn, self.local.content(digest), self._ttl_ms)

    def stat_blob(self, name: str, digest: Digest) -> int | None:
        """The size the cluster knows from a node that holds the blob, else the upstream's HEAD."""
        try:
            location = self.coordinator.locate(str(digest))
        except CoordinatorError:
            location = None
        if location is not None and location.content is not None and location.holders:
            return location.content.size
        return self.upstream.stat_blob(name, digest)

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

    def _first_peer(
        self, streams: contextlib.ExitStack, peers: list[Holder], digest: Digest, start: int = 0
    ) -> _PeerCopy | None:
        """The first of ``peers`` that serves the blob, read from byte ``start`` on."""
        for peer in peers:
            try:
                stream = streams.enter_context(self.peers.open(peer.url, str(digest)))
            except (BlobUnknown, UpstreamUnavailable) as exc:
                log.info("peer %s cannot serve %s: %s", peer.node_id, digest, exc.message)
                continue
            return _PeerCopy(peer, _Skipped(stream, start) if start else stream)
        return None

    def _manifest_from_peers(self, peers: list[Holder], digest: Digest) -> FetchedManifest | None:
        """The manifest from the first of ``peers`` whose copy matches ``digest``; the others are reported."""
        for peer in peers:
            try:
                manifest = self.peers.fetch(peer.url, str(digest), MANIFEST_MAX)
            except (BlobUnknown, UpstreamUnavailable) as exc:
                log.info("peer %s cannot serve %s: %s", peer.node_id, digest, exc.message)
                continue
            if digest_of(manifest.data, digest.algorithm) == digest:
                return manifest
            with contextlib.suppress(BadCopy):
                self._reject(peer, digest, UpstreamInvalid("the copy does not match its digest"), "manifest")
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


@dataclass(frozen=True)
class _PeerCopy:
    """A look's find: a blob stream from a peer, and which peer that is."""

    holder: Holder
    stream: BlobStream


class _Skipped:
    """A blob stream from its byte ``start`` on: the bytes before it are read and dropped."""

    def __init__(self, stream: BlobStream, start: int) -> None:
        self._stream = stream
        self._skip = Skip(start)
        self.size, self.origin, self.joined = stream.size, stream.origin, stream.joined

    def read(self, size: int) -> bytes:
        return self._skip.read(self._stream.read, size)


class _Relay:
    """A blob streamed from peers that carries on elsewhere when its peer breaks off.

    The fill reads one stream of the blob (from ``start``) from here. When the peer's
    transfer fails (``UpstreamUnavailable``, or an end before the announced
    size), the relay takes a new turn for the bytes from where it stopped
    (``ClusterSource._blob_turn``), at most ``MAX_TAKEOVERS`` times, and
    reads on from that. ``turn`` is the last turn taken: the one the
    commit is announced under (a GRANTED turn completes the lease it took
    over). Every turn and stream it opens stays in ``streams``, the blob's
    context, which closes them (and releases a lease not completed).
    """

    def __init__(
        self,
        source: ClusterSource,
        streams: contextlib.ExitStack,
        name: str,
        digest: Digest,
        start: int,
        turn: Turn[_PeerCopy],
        stream: BlobStream,
        peer: Holder,
    ) -> None:
        self._source, self._streams, self._name, self._digest = source, streams, name, digest
        self.turn = turn
        self._stream = stream
        # Where the bytes came from, in order: a peer, or None for the upstream.
        self._sources: list[Holder | None] = [peer]
        self.size = stream.size
        # How the fill counts the request: as it began.
        self.origin: Origin = stream.origin
        self.joined = stream.joined
        self._position = start
        self._takeovers = 0

    @property
    def only_peer(self) -> Holder | None:
        """The peer every byte came from, or None when they came from more than one place."""
        return self._sources[0] if len(self._sources) == 1 else None

    def read(self, size: int) -> bytes:
        while True:
            try:
                data = self._stream.read(size)
            except UpstreamUnavailable as exc:
                self._take_over(exc)
                continue
            if not data and self.size is not None and self._position < self.size:
                self._take_over(UpstreamUnavailable("the transfer ended early", {"digest": str(self._digest)}))
                continue
            self._position += len(data)
            return data

    def _take_over(self, error: UpstreamUnavailable) -> None:
        """Carry on from elsewhere after ``error``; raise it when that is not for this relay to do.

        Only a peer's transfer is carried on: one from the upstream (after a
        takeover, or degraded) that breaks off fails the fill as any fetch
        from the upstream does, and gives its lease back.
        """
        if self._stream.origin is not Origin.PEER:
            raise error
        failure = self._source.flight.failure(blob_lease(str(self._digest)), str(self._digest))
        if failure:
            # The fetch this transfer came from was given up for a reason
            # that holds here too (the upstream too slow): fail with it
            # rather than ask the same upstream again.
            raise UpstreamUnavailable(f"the cluster's fetch failed: {failure}", {"digest": str(self._digest)})
        if self._takeovers >= MAX_TAKEOVERS:
            raise UpstreamUnavailable(
                f"the transfer broke off {self._takeovers + 1} times: {error.message}", {"digest": str(self._digest)}
            )
        self._takeovers += 1
        log.warning(
            "the transfer of %s broke off at byte %d (%s); carrying on from the cluster",
            self._digest,
            self._position,
            error.message,
        )
        self.turn, stream, peer = self._source._blob_turn(self._streams, self._name, self._digest, self._position)
        self._sources.append(peer)
        if stream.size is not None and self.size is not None and stream.size != self.size:
            raise UpstreamInvalid(
                f"the blob's size changed from {self.size} to {stream.size} bytes", {"digest": str(self._digest)}
            )
        self.size = self.size if self.size is not None else stream.size
        self._stream = stream
