"""The pull-through logic against a fake upstream and a fake clock."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from node.config import UpstreamConfig
from node.errors import BlobUnknown, ManifestUnknown, UpstreamInvalid, UpstreamUnavailable
from node.reference import Digest, digest_of, parse_digest
from node.sources import FetchedManifest, Origin, TagAnswer
from node.storage.fill import FillFailed, Fills
from node.storage.local import LocalStore
from node.storage.proxy import ProxyStore
from node.upstream import TagPage
from testbed.clock import FakeClock

MEDIA = "application/vnd.oci.image.manifest.v1+json"


class FakeStream:
    origin = Origin.UPSTREAM
    joined = False

    def __init__(self, data: bytes, size: int | None) -> None:
        self.data, self.size = data, size
        self.sent = 0

    def read(self, size: int) -> bytes:
        piece = self.data[self.sent : self.sent + min(size, 3)]
        self.sent += len(piece)
        return piece


class FakeUpstream:
    """A ``Source`` answering from dicts; ``down`` makes every call fail like a dead upstream."""

    def __init__(self) -> None:
        self.tags_to_digest: dict[tuple[str, str], str] = {}
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.tag_list: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.unsized = False

    def _check(self, call: str, ref: str) -> None:
        self.calls.append((call, ref))
        if self.down:
            raise UpstreamUnavailable("upstream is down")

    def set_tag(self, name: str, tag: str, data: bytes) -> str:
        digest = str(digest_of(data))
        self.manifests[digest] = data
        self.tags_to_digest[(name, tag)] = digest
        return digest

    def check_tag(self, name: str, tag: str) -> TagAnswer:
        self._check("head", tag)
        digest = self.tags_to_digest.get((name, tag))
        if digest is None:
            raise ManifestUnknown("unknown")
        return TagAnswer(parse_digest(digest))

    @contextlib.contextmanager
    def open_manifest(self, name: str, digest: Digest) -> Iterator[FetchedManifest]:
        self._check("get", str(digest))
        if str(digest) not in self.manifests:
            raise ManifestUnknown("unknown")
        yield FetchedManifest(self.manifests[str(digest)], MEDIA)

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: Digest) -> Iterator[FakeStream]:
        self._check("blob", str(digest))
        if str(digest) not in self.blobs:
            raise BlobUnknown("unknown")
        data = self.blobs[str(digest)]
        yield FakeStream(data, None if self.unsized else len(data))

    def tags(self, name: str, n: int | None = None, last: str | None = None) -> TagPage:
        self._check("tags", name)
        return TagPage(list(self.tag_list), None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def proxy(tmp_path, upstream: FakeUpstream, clock: FakeClock) -> Iterator[ProxyStore]:
    local = LocalStore(str(tmp_path), max_size=1 << 30, clock=clock)
    fills = Fills(local, timeout=5)
    config = UpstreamConfig(url="http://upstream.test", tag_ttl=60)
    yield ProxyStore(local, fills, upstream, config, clock=clock)
    fills.close()


def test_tag_is_reused_within_tag_ttl(proxy: ProxyStore, upstream: FakeUpstream, clock: FakeClock) -> None:
    digest = upstream.set_tag("app", "v1", b'{"v": 1}')
    assert str(proxy.manifest("app", "v1").digest) == digest
    assert upstream.calls == [("head", "v1"), ("get", digest)]
    clock.advance(59)
    assert proxy.manifest("app", "v1").data == b'{"v": 1}'
    assert len(upstream.calls) == 2


def test_expired_tag_is_checked_with_head_and_refetched_only_on_change(
    proxy: ProxyStore, upstream: FakeUpstream, clock: FakeClock
) -> None:
    first = upstream.set_tag("app", "v1", b'{"v": 1}')
    proxy.manifest("app", "v1")
    clock.advance(61)
    proxy.manifest("app", "v1")
    assert upstream.calls[2:] == [("head", "v1")]
    second = upstream.set_tag("app", "v1", b'{"v": 2}')
    clock.advance(61)
    manifest = proxy.manifest("app", "v1")
    assert str(manifest.digest) == second != first
    assert upstream.calls[3:] == [("head", "v1"), ("get", second)]


def test_stale_tag_is_served_when_the_upstream_is_down(
    proxy: ProxyStore, upstream: FakeUpstream, clock: FakeClock, caplog
) -> None:
    digest = upstream.set_tag("app", "v1", b'{"v": 1}')
    proxy.manifest("app", "v1")
    upstream.down = True
    clock.advance(3600)
    assert str(proxy.manifest("app", "v1").digest) == digest
    assert "serving app:v1" in caplog.text
    with pytest.raises(UpstreamUnavailable):
        proxy.manifest("app", "never-seen")


def test_unknown_tag_is_passed_on(proxy: ProxyStore) -> None:
    with pytest.raises(ManifestUnknown):
        proxy.manifest("app", "nope")


def test_manifest_by_digest_is_verified(proxy: ProxyStore, upstream: FakeUpstream) -> None:
    good = b'{"good": true}'
    digest = str(digest_of(good))
    upstream.manifests[digest] = b'{"evil": true}'
    with pytest.raises(UpstreamInvalid):
        proxy.manifest("app", digest)
    assert not proxy.local.has(digest_of(good))
    upstream.manifests[digest] = good
    assert proxy.manifest("app", digest).data == good
    upstream.down = True
    assert proxy.manifest("app", digest).data == good


def test_blob_miss_fills_then_hits(proxy: ProxyStore, upstream: FakeUpstream) -> None:
    data = os.urandom(100)
    digest = digest_of(data)
    upstream.blobs[str(digest)] = data
    blob = proxy.blob("app", digest)
    assert blob.following is not None and blob.size == 100
    assert b"".join(proxy.fills.follow(blob.following, 0, 100)) == data
    # The client is done once the bytes are verified; the store commits after
    # the sync. Until then a request joins the fill; afterwards it is a hit.
    proxy.fills.close()
    hit = proxy.blob("app", digest)
    assert hit.stored is not None
    hit.close()
    assert [call for call in upstream.calls if call[0] == "blob"] == [("blob", str(digest))]


def test_corrupt_blob_is_never_complete_and_never_stored(proxy: ProxyStore, upstream: FakeUpstream) -> None:
    data = os.urandom(100)
    digest = digest_of(data)
    upstream.blobs[str(digest)] = os.urandom(100)
    blob = proxy.blob("app", digest)
    assert blob.following is not None
    received = b""
    with pytest.raises(FillFailed):
        for chunk in proxy.fills.follow(blob.following, 0, 100):
            received += chunk
    assert len(received) < 100
    proxy.fills.close()  # The fill thread's cleanup may still be running.
    assert not proxy.local.has(digest)
    assert [name for name in os.listdir(proxy.local.layout.fills) if not name.endswith(".lock")] == []


def test_unknown_blob(proxy: ProxyStore) -> None:
    with pytest.raises(BlobUnknown):
        proxy.blob("app", digest_of(b"missing"))


def test_tag_list_falls_back_to_known_tags(proxy: ProxyStore, upstream: FakeUpstream) -> None:
    upstream.tag_list = ["a", "b", "c"]
    assert proxy.tags("app", None, None).tags == ["a", "b", "c"]
    upstream.set_tag("app", "d", b"{}")
    proxy.manifest("app", "d")
    upstream.down = True
    page = proxy.tags("app", 2, "a")
    assert page.tags == ["b", "c"]
    assert page.link == '</v2/app/tags/list?n=2&last=c>; rel="next"'
    assert proxy.tags("app", None, "c").tags == ["d"]


def test_blob_of_unknown_size_is_held_back_until_verified(proxy: ProxyStore, upstream: FakeUpstream) -> None:
    data = os.urandom(50)
    digest = digest_of(data)
    upstream.blobs[str(digest)] = data
    upstream.unsized = True
    blob = proxy.blob("app", digest)
    assert blob.following is not None and blob.size is None
    assert b"".join(proxy.fills.follow(blob.following)) == data
    bad = digest_of(b"other")
    upstream.blobs[str(bad)] = data
    broken = proxy.blob("app", bad)
    assert broken.following is not None
    with pytest.raises(FillFailed):
        b"".join(proxy.fills.follow(broken.following))
