"""A blob streamed from a peer that breaks off is carried on elsewhere (node/cluster_source.py's ``_Relay``).

Each test runs a real fill (``node.storage.fill``) from a ``ClusterSource``
over a fake coordinator, fake peers and the real upstream client on a
mock transport, with the fake clock: node-a follows node-b's fetch, and
node-b dies part way.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from node.cluster_source import MAX_TAKEOVERS, ClusterSource
from node.config import UpstreamConfig
from node.errors import UpstreamUnavailable
from node.flight import Announcements, Flight
from node.reference import digest_of
from node.sources import FetchedManifest, Origin
from node.storage.fill import FillFailed, Fills
from node.storage.local import LocalStore
from node.upstream import Upstream
from protos.leases import blob_lease
from protos.values import Content
from testbed.clock import FakeClock
from testbed.fake_coordinator import FakeCoordinator, FakeDirectory

DATA = os.urandom(700_000)
DIGEST = digest_of(DATA)
KEY = blob_lease(str(DIGEST))
PATH = f"/v2/app/blobs/{DIGEST}"
# Where node-b's transfer breaks off, and its lease's lifetime (seconds).
BROKEN_AT = 300_000
LEASE_TTL = 3.0
CONFIG = UpstreamConfig(url="http://registry.test")


class PeerStream:
    """What a peer sends: ``data`` in pieces, then the end, or an error when it ``breaks`` (after ``on_break``)."""

    origin = Origin.PEER

    def __init__(
        self,
        data: bytes,
        size: int,
        *,
        joined: bool = True,
        breaks: bool = False,
        on_break: Callable[[], None] | None = None,
    ) -> None:
        self._data, self.size, self.joined, self._breaks = data, size, joined, breaks
        self._on_break = on_break
        self._sent = 0

    def read(self, size: int) -> bytes:
        piece = self._data[self._sent : self._sent + min(size, 65536)]
        if not piece and self._breaks:
            if self._on_break is not None:
                self._on_break()
            raise UpstreamUnavailable("the peer broke off the transfer (RemoteProtocolError)")
        self._sent += len(piece)
        return piece


class Peers:
    """Other nodes by URL: each open hands out the next of its streams; with none left, it cannot be reached.

    ``manifests`` holds what ``fetch`` answers, by URL.
    """

    def __init__(self) -> None:
        self.streams: dict[str, list[PeerStream]] = {}
        self.opened: list[str] = []
        self.manifests: dict[str, bytes] = {}

    def fetch(self, peer_url: str, digest: str, limit: int) -> FetchedManifest:
        self.opened.append(peer_url)
        if peer_url not in self.manifests:
            raise UpstreamUnavailable(f"cannot reach peer {peer_url} (ConnectError)")
        return FetchedManifest(self.manifests[peer_url], "application/vnd.oci.image.manifest.v1+json", Origin.PEER)

    @contextlib.contextmanager
    def open(self, peer_url: str, digest: str, kind: str = "blob") -> Iterator[PeerStream]:
        self.opened.append(peer_url)
        waiting = self.streams.get(peer_url, [])
        if not waiting:
            raise UpstreamUnavailable(f"cannot reach peer {peer_url} (ConnectError)")
        yield waiting.pop(0)


class Registry:
    """The upstream behind a mock transport: the blob, with or without Range."""

    def __init__(self) -> None:
        self.honour_range = True
        # A ranged answer breaks off after its first bytes.
        self.breaks = False
        # A ranged answer sends its first bytes, then waits this long (on ``clock``) before the next.
        self.stalls: float = 0.0
        self.clock: FakeClock | None = None
        self.ranges: list[str | None] = []
        self.sent = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        asked = request.headers.get("range")
        self.ranges.append(asked)
        match = re.fullmatch(r"bytes=(\d+)-", asked or "")
        if match is None or not self.honour_range:
            self.sent += len(DATA)
            return httpx.Response(200, content=DATA)
        first = int(match[1])
        self.sent += len(DATA) - first
        headers = {
            "Content-Range": f"bytes {first}-{len(DATA) - 1}/{len(DATA)}",
            "Content-Length": str(len(DATA) - first),
        }
        return httpx.Response(206, content=self._body(DATA[first:]), headers=headers)

    def _body(self, rest: bytes) -> Iterator[bytes]:
        yield rest[:1000]
        if self.breaks:
            raise httpx.ReadError("connection reset")
        if self.stalls and self.clock is not None:
            self.clock.advance(self.stalls)
            yield rest[1000:2000]
        yield rest[1000:]


class Counts:
    def count(self, kind: str, counter: str, value: int = 1) -> None:
        pass


class Node:
    """node-a, whose fill follows node-b; node-b's lease runs out ``LEASE_TTL`` after ``died`` (the fake Redis PX)."""

    def __init__(self, root: Path) -> None:
        self.clock = FakeClock()
        self.directory = FakeDirectory()
        self.coordinator = FakeCoordinator(self.directory, "node-a")
        self.directory.grant(KEY, "node-b")
        self.died: float | None = None
        self.taken_over_at: float | None = None
        self.peers = Peers()
        self.registry = Registry()
        self.registry.clock = self.clock
        self.upstream = Upstream(
            CONFIG, transport=httpx.MockTransport(self.registry), clock=self.clock, monotonic=self.clock
        )
        self.store = LocalStore(str(root), 1 << 30)
        self.fills = Fills(self.store, timeout=5)
        flight = Flight(
            self.coordinator,
            "node-a",
            Announcements(str(root / "unannounced")),
            Counts(),
            lease_ttl=LEASE_TTL,
            wait_timeout=30,
            clock=self.clock,
            sleep=self.clock.sleep,
        )
        self.directory.before = self._expire
        self.source = ClusterSource(self.upstream, CONFIG, flight, self.coordinator, self.peers, self.store, self.clock)  # type: ignore[arg-type]

    def url(self, node_id: str) -> str:
        return self.directory.holder(node_id).url

    def dies_at(self, position: int, data: bytes = DATA, then: Callable[[], None] | None = None) -> None:
        """node-b sends ``data`` up to ``position`` and dies: its transfer breaks and it cannot be reached."""

        def died() -> None:
            self.died = self.clock()
            if then is not None:
                then()

        stream = PeerStream(data[:position], len(DATA), breaks=True, on_break=died)
        self.peers.streams[self.url("node-b")] = [stream]

    def _expire(self, method: str) -> None:
        """Redis's PX: node-b's lease runs out ``LEASE_TTL`` after node-b's last renewal, when it died."""
        lease = self.directory.leases.get(KEY)
        if lease is None or lease.node_id != "node-b" or self.died is None:
            return
        if self.clock() >= self.died + LEASE_TTL:
            del self.directory.leases[KEY]
            self.taken_over_at = self.clock()

    def fetch(self) -> bytes:
        following = self.fills.join(self.source, "app", DIGEST)
        assert following is not None
        with contextlib.closing(self.fills.follow(following, 0, len(DATA))) as body:
            return b"".join(body)

    def close(self) -> None:
        self.fills.close()
        self.upstream.close()
        self.store.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    started = Node(tmp_path)
    yield started
    started.close()


def test_a_follower_takes_the_dead_holders_lease_over_and_carries_on_with_a_range(node: Node) -> None:
    node.dies_at(BROKEN_AT)
    assert node.fetch() == DATA
    node.fills.close()
    assert node.store.has(DIGEST)
    # The lease was taken over as soon as it ran out, and the rest came with one ranged request.
    assert node.died is not None and node.taken_over_at is not None
    assert node.taken_over_at - node.died <= LEASE_TTL + 0.1
    assert node.registry.ranges == [f"bytes={BROKEN_AT}-"]
    assert node.registry.sent == len(DATA) - BROKEN_AT
    # The fill completed the lease it took over: node-a is the holder, and the lease is gone.
    assert node.coordinator.calls("complete_fetch") == [KEY]
    assert node.directory.holders[str(DIGEST)] == {"node-a"}
    assert KEY not in node.directory.leases


def test_an_upstream_that_ignores_range_sends_the_whole_blob_and_the_rest_is_used(node: Node) -> None:
    node.dies_at(BROKEN_AT)
    node.registry.honour_range = False
    assert node.fetch() == DATA
    node.fills.close()
    assert node.store.has(DIGEST)
    assert node.registry.ranges == [f"bytes={BROKEN_AT}-"]
    assert node.registry.sent == len(DATA)
    assert node.coordinator.calls("complete_fetch") == [KEY]


def test_the_new_fetcher_is_followed_from_where_the_transfer_stopped(node: Node) -> None:
    node.dies_at(BROKEN_AT, then=lambda: node.directory.grant(KEY, "node-c"))
    # node-c followed node-b too, so its partial file has the same start.
    node.peers.streams[node.url("node-c")] = [PeerStream(DATA, len(DATA))]
    assert node.fetch() == DATA
    node.fills.close()
    assert node.store.has(DIGEST)
    assert node.registry.ranges == []
    # Copied from a peer: added as a holder, the lease left to node-c.
    assert node.coordinator.calls("complete_fetch") == []
    assert node.coordinator.calls("add_content") == [str(DIGEST)]
    assert node.directory.leases[KEY].node_id == "node-c"


def test_a_corrupt_start_from_the_dead_peer_stores_nothing_and_gives_the_lease_back(node: Node) -> None:
    node.dies_at(BROKEN_AT, data=bytes([DATA[0] ^ 0xFF]) + DATA[1:])
    with pytest.raises(FillFailed):
        node.fetch()
    node.fills.close()
    assert not node.store.has(DIGEST)
    assert node.registry.ranges == [f"bytes={BROKEN_AT}-"]
    assert node.coordinator.calls("complete_fetch") == []
    assert KEY not in node.directory.leases


def test_a_transfer_that_keeps_breaking_off_fails_after_a_few_takeovers(node: Node) -> None:
    step = 50_000
    pieces = [PeerStream(DATA[: step * (i + 1)], len(DATA), breaks=True) for i in range(MAX_TAKEOVERS + 1)]
    # node-b never dies for the cluster (its lease stands); its transfers keep breaking off.
    node.directory.before = None
    node.peers.streams[node.url("node-b")] = pieces
    with pytest.raises(FillFailed):
        node.fetch()
    node.fills.close()
    assert not node.store.has(DIGEST)
    assert node.registry.ranges == []
    assert node.directory.holders.get(str(DIGEST), set()) == set()


def test_a_copy_from_a_holder_that_breaks_off_carries_on_from_another_holder(node: Node) -> None:
    del node.directory.leases[KEY]
    content = Content(str(DIGEST), len(DATA), "application/octet-stream")
    node.directory.hold("node-b", content)

    def node_b_died() -> None:
        node.directory.holders[str(DIGEST)] = {"node-c"}

    broken = PeerStream(DATA[:BROKEN_AT], len(DATA), joined=False, breaks=True, on_break=node_b_died)
    node.peers.streams[node.url("node-b")] = [broken]
    node.peers.streams[node.url("node-c")] = [PeerStream(DATA, len(DATA), joined=False)]
    assert node.fetch() == DATA
    node.fills.close()
    assert node.store.has(DIGEST)
    assert node.registry.ranges == []
    assert node.peers.opened == [node.url("node-b"), node.url("node-c")]


def test_an_upstream_that_breaks_off_after_the_takeover_fails_the_fill_and_gives_the_lease_back(node: Node) -> None:
    node.dies_at(BROKEN_AT)
    node.registry.breaks = True
    with pytest.raises(FillFailed):
        node.fetch()
    node.fills.close()
    assert not node.store.has(DIGEST)
    assert node.registry.ranges == [f"bytes={BROKEN_AT}-"]
    # Given back at once, not left to run out: the next asker fetches at once.
    assert node.coordinator.calls("abort_fetch") == [KEY]
    assert KEY not in node.directory.leases


def test_a_holders_copy_that_does_not_verify_is_reported_and_fetched_again_from_the_upstream(node: Node) -> None:
    del node.directory.leases[KEY]
    node.directory.hold("node-b", Content(str(DIGEST), len(DATA), "application/octet-stream"))
    middle = len(DATA) // 2
    bad = DATA[:middle] + bytes([DATA[middle] ^ 0xFF]) + DATA[middle + 1 :]
    node.peers.streams[node.url("node-b")] = [PeerStream(bad, len(DATA), joined=False)]
    # This body began with the bad copy, so it is cut short; the fill goes on.
    with pytest.raises(FillFailed):
        node.fetch()
    node.fills.close()
    assert node.store.has(DIGEST)
    assert node.coordinator.calls("report_bad_copy") == [f"node-b {DIGEST}"]
    # Once unlisted, node-b is not asked again: the upstream is, under the lease.
    assert node.peers.opened == [node.url("node-b")]
    assert node.registry.ranges == [None]
    assert node.coordinator.calls("complete_fetch") == [KEY]
    assert node.directory.holders[str(DIGEST)] == {"node-a"}


def test_a_manifest_copy_that_does_not_match_is_reported_and_the_next_holder_asked(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = b'{"schemaVersion": 2}'
    digest = digest_of(manifest)
    content = Content(str(digest), len(manifest), "application/vnd.oci.image.manifest.v1+json")
    for holder in ("node-b", "node-c"):
        node.directory.hold(holder, content)
    node.peers.manifests = {node.url("node-b"): manifest.replace(b"2", b"3"), node.url("node-c"): manifest}
    # The holders in the directory's order (node-b first), not shuffled.
    monkeypatch.setattr("node.cluster_source.random.shuffle", lambda holders: None)
    with node.source.open_manifest("app", digest) as fetched:
        assert fetched.data == manifest
    assert node.peers.opened == [node.url("node-b"), node.url("node-c")]
    assert node.coordinator.calls("report_bad_copy") == [f"node-b {digest}"]
    assert node.directory.holders[str(digest)] == {"node-c"}


def test_a_transfer_from_a_fetch_given_up_as_too_slow_fails_instead_of_fetching_again(node: Node) -> None:
    def gave_up() -> None:
        # node-b's upstream was too slow: it released its lease with the failure (Flight.coordinate).
        del node.directory.leases[KEY]
        node.directory.failures[KEY] = "upstream http://registry.test: blob app@...: below upstream.min_rate"

    node.peers.streams[node.url("node-b")] = [PeerStream(DATA[:BROKEN_AT], len(DATA), breaks=True, on_break=gave_up)]
    with pytest.raises(FillFailed):
        node.fetch()
    node.fills.close()
    assert not node.store.has(DIGEST)
    # Neither the upstream asked again nor the lease taken: the next asker may fetch at once.
    assert node.registry.ranges == []
    assert node.coordinator.calls("acquire_lease") == []
    assert KEY not in node.directory.leases


def test_an_upstream_too_slow_after_a_takeover_gives_the_lease_back_with_the_reason(node: Node) -> None:
    node.dies_at(BROKEN_AT)
    node.registry.stalls = CONFIG.min_rate_window + 1
    with pytest.raises(FillFailed):
        node.fetch()
    node.fills.close()
    assert not node.store.has(DIGEST)
    assert node.registry.ranges == [f"bytes={BROKEN_AT}-"]
    assert KEY not in node.directory.leases
    assert "upstream.min_rate" in node.directory.failures[KEY]
