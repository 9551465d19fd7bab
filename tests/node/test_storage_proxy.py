"""The pull-through logic against a fake upstream (a ``Source`` fake, or the HTTP one) and a fake clock."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator

import pytest

from node.bindings import Bindings, Confirmer, Ledger
from node.budget import DEFAULT_PAUSE, Budget
from node.config import UpstreamConfig
from node.errors import BlobUnknown, ManifestUnknown, TooManyRequests, UpstreamInvalid, UpstreamUnavailable
from node.reference import Digest, digest_of, parse_digest
from node.sources import FetchedManifest, Origin, TagAnswer
from node.storage.fill import FillFailed, Fills
from node.storage.ledger import LocalLedger
from node.storage.local import LocalStore
from node.storage.memory import MemoryCache
from node.storage.proxy import ProxyStore
from node.upstream import TagPage, Upstream
from testbed import fake_upstream
from testbed.clock import FakeClock
from testbed.images import build_image

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
        # Repositories that hold nothing: a HEAD for them answers 404.
        self.strangers: set[str] = set()
        # The media type manifests come with (a peer that got one through
        # the blob endpoint sends application/octet-stream).
        self.media_type = MEDIA

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
        yield FetchedManifest(self.manifests[str(digest)], self.media_type)

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

    def confirm(self, name: str, digest: Digest, kind: str) -> None:
        """The HEAD of ``node.bindings.Confirmer``: every repository but the strangers holds everything known."""
        self._check("confirm", f"{name}@{digest}")
        known = self.manifests if kind == "manifest" else self.blobs
        if name in self.strangers or str(digest) not in known:
            raise ManifestUnknown("unknown") if kind == "manifest" else BlobUnknown("unknown")


def bindings(
    local: LocalStore,
    confirmer: Confirmer,
    config: UpstreamConfig,
    clock: FakeClock,
    memory: MemoryCache | None = None,
    ledger: Ledger | None = None,
) -> Bindings:
    """What ``Node`` gives a proxy store: a node on its own keeps its confirmations in files."""
    return Bindings(
        config,
        confirmer,
        ledger or LocalLedger(local.layout),
        memory if memory is not None else MemoryCache(1 << 20),
        clock=clock,
    )


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
    memory = MemoryCache(1 << 20)
    yield ProxyStore(
        local, fills, upstream, config, bindings(local, upstream, config, clock, memory), clock=clock, memory=memory
    )
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


def test_a_manifest_first_fetched_as_a_blob_is_served_with_its_media_type(
    proxy: ProxyStore, upstream: FakeUpstream
) -> None:
    manifest = build_image([10], seed="as-a-blob").manifest
    digest = digest_of(manifest)
    upstream.blobs[str(digest)] = upstream.manifests[str(digest)] = manifest
    assert _read_blob(proxy, digest) == manifest
    proxy.fills.close()
    assert proxy.local.has(digest)
    served = proxy.manifest("app", str(digest))
    assert served.data == manifest
    assert served.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert ("get", str(digest)) not in upstream.calls


def test_a_manifest_a_source_sends_untyped_gets_its_media_type(proxy: ProxyStore, upstream: FakeUpstream) -> None:
    manifest = build_image([10], seed="untyped", oci=True).manifest
    digest = upstream.set_tag("app", "v1", manifest)
    upstream.media_type = "application/octet-stream"
    for attempt in ("fetched", "from memory"):
        assert proxy.manifest("app", digest).media_type == MEDIA, attempt
    assert proxy.local.read(parse_digest(digest)) == (manifest, MEDIA)


def test_a_layer_asked_for_as_a_manifest_is_not_read_into_memory(proxy: ProxyStore, upstream: FakeUpstream) -> None:
    data = os.urandom(4 * 1024 * 1024 + 1)
    digest = digest_of(data)
    proxy.local.put(digest, data)
    with pytest.raises(ManifestUnknown):
        proxy.manifest("app", str(digest))
    assert ("get", str(digest)) in upstream.calls


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
    assert page.next == {"n": "2", "last": "c"}
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


# The upstream's rate-limit budget: a real client against the HTTP fake upstream, on the fake clock.


class Counts:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counter: str, value: int = 1) -> None:
        self.counts[counter] += value


class Budgeted:
    """Two workers of one node (a proxy store each over one cache directory) in front of ``registry``."""

    def __init__(self, root: str, registry: fake_upstream.FakeUpstream, clock: FakeClock) -> None:
        self.config = UpstreamConfig(name="registry.test", url=registry.url, tag_ttl=30, ratelimit_floor=10)
        self.counts = Counts()
        self.workers: list[ProxyStore] = []
        for _ in range(2):
            local = LocalStore(root, max_size=1 << 30, clock=clock)
            budget = Budget(self.config, local.layout.budget(self.config.name), clock=clock, observer=self.counts)
            client = Upstream(self.config, clock=clock, budget=budget)
            bound = bindings(local, client, self.config, clock)
            self.workers.append(
                ProxyStore(local, Fills(local, timeout=5), client, self.config, bound, clock=clock, budget=budget)
            )

    @property
    def skipped(self) -> int:
        return self.counts.counts["tag_checks_skipped.registry.test"]

    def close(self) -> None:
        for worker in self.workers:
            worker.fills.close()
            assert isinstance(worker.source, Upstream)
            worker.source.close()
            worker.local.close()


@pytest.fixture
def registry() -> Iterator[fake_upstream.FakeUpstream]:
    with fake_upstream.FakeUpstream() as fake:
        yield fake


@pytest.fixture
def node(tmp_path, registry: fake_upstream.FakeUpstream, clock: FakeClock) -> Iterator[Budgeted]:
    made = Budgeted(str(tmp_path / "cache"), registry, clock)
    yield made
    made.close()


def _tag_requests(registry: fake_upstream.FakeUpstream, tag: str = "v1") -> list[tuple[str, str]]:
    return [request for request in registry.requests if request[1] == f"/v2/app/manifests/{tag}"]


def _read_blob(worker: ProxyStore, digest: Digest) -> bytes:
    with worker.blob("app", digest) as blob:
        if blob.stored is not None:
            return os.pread(blob.stored.fileno(), 1 << 20, 0)
        assert blob.following is not None
        return b"".join(worker.fills.follow(blob.following))


def test_a_429_pauses_tag_checks_on_every_worker_until_retry_after(
    node: Budgeted, registry: fake_upstream.FakeUpstream, clock: FakeClock
) -> None:
    one, other = node.workers
    first, second = build_image([100], seed="budget-1"), build_image([100], seed="budget-2")
    registry.add_image("app", "v1", first)
    for worker in node.workers:
        assert str(worker.manifest("app", "v1").digest) == first.digest
    clock.advance(31)
    registry.set_rate_limit(fake_upstream.RateLimit(refuse=True, retry_after="120"))
    # The check that meets the 429 serves the cached tag (stale-if-error) and starts the pause.
    assert str(one.manifest("app", "v1").digest) == first.digest
    assert len(_tag_requests(registry)) == 2
    # The upstream would answer now, and the tag moved; but for 120 s nobody asks it.
    registry.set_rate_limit(None)
    registry.add_image("app", "v1", second)
    registry.reset_requests()
    for _ in range(4):
        clock.advance(29)
        assert {str(worker.manifest("app", "v1").digest) for worker in node.workers} == {first.digest}
    assert _tag_requests(registry) == []
    assert node.skipped == 8
    # Content by digest is not paused: a miss still goes to the upstream.
    assert str(other.manifest("app", second.digest).digest) == second.digest
    layer = next(iter(second.blobs.items()))
    assert _read_blob(other, parse_digest(layer[0])) == layer[1]
    assert ("GET", f"/v2/app/manifests/{second.digest}") in registry.requests
    assert ("GET", f"/v2/app/blobs/{layer[0]}") in registry.requests
    # 120 s after the 429 the checks resume, and see the new digest.
    clock.advance(4)
    assert str(other.manifest("app", "v1").digest) == second.digest
    assert _tag_requests(registry) == [("HEAD", "/v2/app/manifests/v1")]
    assert node.skipped == 8
    assert node.counts.counts["budget_pauses.429.registry.test"] == 1


def test_a_low_ratelimit_remaining_pauses_tag_checks_until_it_recovers(
    node: Budgeted, registry: fake_upstream.FakeUpstream, clock: FakeClock
) -> None:
    worker = node.workers[0]
    image, other = build_image([100], seed="budget-low"), build_image([100], seed="budget-other")
    registry.add_image("app", "v1", image)
    registry.add_image("app", "other", other)
    registry.set_rate_limit(fake_upstream.RateLimit(remaining=5, limit=100))
    # A tag never seen is fetched (spending the budget is what it is for), and
    # the answer, 5 left below a floor of 10, pauses the checks.
    assert str(worker.manifest("app", "v1").digest) == image.digest
    registry.reset_requests()
    clock.advance(31)
    assert str(worker.manifest("app", "v1").digest) == image.digest
    assert _tag_requests(registry) == []
    assert node.skipped == 1
    # A manifest by digest still goes; its answer, with the budget recovered, ends the pause.
    registry.set_rate_limit(fake_upstream.RateLimit(remaining=60, limit=100))
    assert str(worker.manifest("app", other.digest).digest) == other.digest
    assert str(worker.manifest("app", "v1").digest) == image.digest
    assert _tag_requests(registry) == [("HEAD", "/v2/app/manifests/v1")]
    assert node.skipped == 1


def test_a_low_pause_without_a_reset_ends_after_the_default_pause(
    node: Budgeted, registry: fake_upstream.FakeUpstream, clock: FakeClock
) -> None:
    worker = node.workers[0]
    image = build_image([100], seed="budget-default")
    registry.add_image("app", "v1", image)
    registry.set_rate_limit(fake_upstream.RateLimit(remaining=2, limit=100))
    worker.manifest("app", "v1")
    registry.reset_requests()
    clock.advance(DEFAULT_PAUSE - 1)
    worker.manifest("app", "v1")
    assert _tag_requests(registry) == []
    clock.advance(1)
    worker.manifest("app", "v1")
    # The check (a HEAD, which Docker Hub does not count) reads the budget again.
    assert _tag_requests(registry) == [("HEAD", "/v2/app/manifests/v1")]
    assert node.workers[1].budget is not None and node.workers[1].budget.paused() == DEFAULT_PAUSE


def test_a_tag_never_cached_still_goes_to_the_upstream_while_paused(
    node: Budgeted, registry: fake_upstream.FakeUpstream, clock: FakeClock
) -> None:
    worker = node.workers[0]
    image = build_image([100], seed="budget-new")
    registry.add_image("app", "v1", image)
    registry.add_image("app", "new", image)
    registry.set_rate_limit(fake_upstream.RateLimit(refuse=True, retry_after="90"))
    # Refused, with nothing cached: the client gets the 429, told when to come back.
    with pytest.raises(TooManyRequests) as raised:
        worker.manifest("app", "v1")
    assert raised.value.retry_after == 90
    clock.advance(30)
    with pytest.raises(TooManyRequests) as raised:
        worker.manifest("app", "new")
    # The second 429 said 90 s from now: the pause grew to match.
    assert raised.value.retry_after == 90
    assert len(_tag_requests(registry, "new")) == 1
    # Once the upstream answers, so does the node, though the pause holds.
    registry.set_rate_limit(None)
    assert str(worker.manifest("app", "new").digest) == image.digest
    assert node.skipped == 0
