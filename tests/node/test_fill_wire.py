"""Fills from an upstream, and bodies from a peer, on a real socket, through the blob transport (``node.transport``).

The fake upstream (``testbed.fake_upstream``) is a real HTTP server, so the
bytes take the path they take in production: urllib3 below httpx, read in
pieces as large as what has arrived, hashed and written by the fill.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import threading
from collections.abc import Iterator

import httpx
import pytest

from node.config import UpstreamConfig
from node.errors import UpstreamUnavailable
from node.peers import PeerClient
from node.reference import Digest, parse_digest
from node.storage.fill import FillFailed, Fills
from node.storage.local import LocalStore
from node.transport import Urllib3Transport, read1
from node.upstream import Upstream
from testbed.fake_upstream import FakeUpstream

NAME = "library/wire"
DATA = os.urandom(3 * (1 << 20) + 12345)


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def digest(fake: FakeUpstream) -> Digest:
    return parse_digest(fake.add_blob(NAME, DATA))


@pytest.fixture
def upstream(fake: FakeUpstream) -> Iterator[Upstream]:
    client = Upstream(UpstreamConfig(url=fake.url, timeout=5.0))
    yield client
    client.close()


def fill(fills: Fills, upstream: Upstream, digest: Digest) -> bytes:
    """Fill ``digest`` and follow it to the end, as the first client does."""
    following = fills.join(upstream, NAME, digest)
    assert following is not None
    with contextlib.closing(fills.follow(following, 0, following.size)) as body:
        return b"".join(body)


def stored(store: LocalStore, digest: Digest) -> bytes:
    opened = store.open(digest)
    assert opened is not None, "the fill was not committed"
    with opened, os.fdopen(os.dup(opened.fileno()), "rb") as file:
        return file.read()


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"chunk_size": 7777}, id="odd-sized pieces"),
        pytest.param({"chunk_size": 1}, id="one byte at a time"),
        pytest.param({"chunk_size": 300_001, "chunk_delay": 0.02}, id="pauses"),
        pytest.param({"content_encoding": "gzip"}, id="wrong content-encoding gzip"),
        pytest.param({"content_encoding": "br", "chunk_size": 65_537}, id="wrong content-encoding br"),
        pytest.param({"redirect": True}, id="redirected to a CDN"),
    ],
)
def test_a_fill_stores_exactly_the_upstream_bytes(
    fake: FakeUpstream, digest: Digest, upstream: Upstream, fills: Fills, store: LocalStore, fault: dict[str, object]
) -> None:
    if fault.get("chunk_size") == 1:
        # A byte at a time over a whole blob would take minutes; a small one shows it.
        digest = parse_digest(fake.add_blob(NAME, DATA[:20_000]))
    fake.set_fault(str(digest), **fault)  # type: ignore[arg-type]
    expected = DATA if fault.get("chunk_size") != 1 else DATA[:20_000]
    assert fill(fills, upstream, digest) == expected
    fills.close()
    assert stored(store, digest) == expected


class _Counts:
    """The ``node.upstream.Observer`` a peer client reports its bytes to."""

    def __init__(self) -> None:
        self.counted: dict[tuple[str, str], int] = {}

    def upstream_request(self, registry: str, kind: str, status: int | None, seconds: float) -> None:
        pass

    def count(self, kind: str, counter: str, value: int = 1) -> None:
        self.counted[kind, counter] = self.counted.get((kind, counter), 0) + value

    def rate_limits(self, registry: str, seen: object) -> None:
        pass


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_peer_body_is_read_raw(fake: FakeUpstream, encoding: str) -> None:
    """A layer is gzip bytes: a client that decoded them for a Content-Encoding would change the digest."""
    layer = gzip.compress(os.urandom(300_000))
    digest = fake.add_blob(NAME, layer)
    fake.set_fault(digest, content_encoding=encoding, chunk_size=65_537)
    counts = _Counts()
    peers = PeerClient("secret", 5.0, counts)
    try:
        with peers.open(fake.url, digest) as stream:
            assert b"".join(iter(lambda: stream.read(1 << 20), b"")) == layer
    finally:
        peers.close()
    assert counts.counted["blob", "peer_bytes"] == len(layer)


def test_a_corrupt_body_is_never_committed(
    fake: FakeUpstream, digest: Digest, upstream: Upstream, store: LocalStore
) -> None:
    fake.set_fault(str(digest), corrupt=True, chunk_size=1 << 20)
    fills = Fills(store, timeout=5)
    try:
        following = fills.join(upstream, NAME, digest)
        assert following is not None
        with contextlib.closing(fills.follow(following, 0, following.size)) as body, pytest.raises(FillFailed):
            b"".join(body)
    finally:
        fills.close()
    assert not store.has(digest)


def test_a_body_cut_short_fails_the_fill(
    fake: FakeUpstream, digest: Digest, upstream: Upstream, store: LocalStore
) -> None:
    fake.set_fault(str(digest), die_after=1 << 20)
    with pytest.raises(UpstreamUnavailable), upstream.open_blob(NAME, digest) as stream:
        while stream.read(1 << 20):
            pass


def test_a_blob_left_half_read_does_not_spoil_the_next_one(
    fake: FakeUpstream, digest: Digest, upstream: Upstream
) -> None:
    for _ in range(3):
        with upstream.open_blob(NAME, digest) as stream:
            assert stream.read(1000)
    with upstream.open_blob(NAME, digest) as stream:
        assert b"".join(iter(lambda: stream.read(1 << 20), b"")) == DATA


def test_pieces_are_as_large_as_what_has_arrived(fake: FakeUpstream, digest: Digest, upstream: Upstream) -> None:
    with upstream.open_blob(NAME, digest) as stream:
        pieces = list(iter(lambda: stream.read(1 << 20), b""))
    assert b"".join(pieces) == DATA
    assert max(len(piece) for piece in pieces) > 64 * 1024, "the body came in httpx-sized pieces"
    assert all(len(piece) <= 1 << 20 for piece in pieces)


def test_a_stalled_upstream_times_out(fake: FakeUpstream, digest: Digest) -> None:
    gate = threading.Event()
    fake.set_fault(str(digest), gate=gate)
    client = Upstream(UpstreamConfig(url=fake.url, timeout=0.3))
    try:
        with pytest.raises(UpstreamUnavailable, match="timed out"), client.open_blob(NAME, digest) as stream:
            while stream.read(1 << 20):
                pass
    finally:
        gate.set()
        client.close()


def test_an_upstream_that_is_down_cannot_be_reached(fake: FakeUpstream, digest: Digest, upstream: Upstream) -> None:
    fake.down()
    with pytest.raises(UpstreamUnavailable, match="cannot connect"), upstream.open_blob(NAME, digest):
        pytest.fail("the block must not run")


def test_the_transport_maps_its_errors_to_httpx_ones(fake: FakeUpstream, digest: Digest) -> None:
    with httpx.Client(transport=Urllib3Transport(1), timeout=httpx.Timeout(5.0, pool=0.2)) as client:
        with client.stream("GET", f"{fake.url}/v2/{NAME}/blobs/{digest}") as response:
            assert read1(response, 10) == DATA[:10]
            # The one connection is taken: another request waits for it, then gives up.
            with pytest.raises(httpx.PoolTimeout):
                client.get(f"{fake.url}/v2/")
        assert client.get(f"{fake.url}/v2/").status_code == 200
        fake.down()
        with pytest.raises(httpx.ConnectError):
            client.get(f"{fake.url}/v2/")
