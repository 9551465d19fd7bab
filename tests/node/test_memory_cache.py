"""Manifests and tags from a worker's memory (node/storage/memory.py, removals.py, and their use in proxy.py)."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.app import memory_per_worker
from node.bindings import ClusterLedger
from node.budget import Budget
from node.cluster_source import ClusterSource
from node.config import ConfigError, UpstreamConfig, config_from_dict
from node.errors import BlobUnknown, UpstreamUnavailable
from node.flight import Announcements, Flight
from node.reference import Digest, digest_of, parse_digest
from node.sources import FetchedManifest, Origin
from node.storage.fill import Fills
from node.storage.local import LocalStore
from node.storage.memory import ENTRY_OVERHEAD, MemoryCache, RememberedBinding, RememberedManifest
from node.storage.proxy import TOUCH_INTERVAL, ProxyStore
from node.storage.removals import Removals
from protos.values import TagPointer
from testbed.clock import FakeClock
from testbed.fake_coordinator import FakeCoordinator, FakeDirectory
from tests.node.test_storage_proxy import MEDIA, FakeUpstream, bindings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = UpstreamConfig(url="http://upstream.test", tag_ttl=60)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


class Workers:
    """The workers of one node: a proxy store each, over one cache directory, each with its own memory."""

    def __init__(self, root: Path, upstream: FakeUpstream, clock: FakeClock, memory: int = 1 << 20, **store) -> None:
        self.root = root
        self.stores: list[ProxyStore] = []
        for _ in range(2):
            local = LocalStore(str(root), max_size=store.get("max_size", 1 << 30), ttl=store.get("ttl", 0), clock=clock)
            # Manifests take no fills; one is enough for the test.
            fills = self.stores[0].fills if self.stores else Fills(local, timeout=5)
            cache = MemoryCache(memory)
            bound = bindings(local, upstream, CONFIG, clock, cache)
            self.stores.append(ProxyStore(local, fills, upstream, CONFIG, bound, clock=clock, memory=cache))

    def close(self) -> None:
        self.stores[0].fills.close()
        for store in self.stores:
            store.local.close()


@pytest.fixture
def workers(tmp_path: Path, upstream: FakeUpstream, clock: FakeClock) -> Iterator[Workers]:
    node = Workers(tmp_path / "cache", upstream, clock)
    yield node
    node.close()


def _manifest(upstream: FakeUpstream, data: bytes) -> str:
    digest = str(digest_of(data))
    upstream.manifests[digest] = data
    return digest


# Warm requests touch no file.


def test_warm_manifests_by_digest_and_by_fresh_tag_touch_no_file(workers: Workers, upstream: FakeUpstream) -> None:
    store = workers.stores[0]
    digest = upstream.set_tag("app", "v1", b'{"v": 1}')
    assert str(store.manifest("app", "v1").digest) == digest
    assert str(store.manifest("app", digest).digest) == digest
    # Without the cache directory, and without the upstream, the answers
    # can only come from memory; nothing is recreated on the way.
    shutil.move(workers.root, workers.root.with_name("elsewhere"))
    upstream.down = True
    for _ in range(3):
        by_tag = store.manifest("app", "v1")
        by_digest = store.manifest("app", digest)
        assert by_tag.data == by_digest.data == b'{"v": 1}'
        assert by_tag.media_type == by_digest.media_type == MEDIA
        assert by_tag.outcome == "hits"
    assert not workers.root.exists()


def test_a_manifest_read_from_the_disk_is_remembered_too(workers: Workers, upstream: FakeUpstream) -> None:
    fetched_by, other = workers.stores
    digest = _manifest(upstream, b'{"read": "from disk"}')
    fetched_by.manifest("app", digest)
    assert other.manifest("app", digest).data == b'{"read": "from disk"}'
    shutil.move(workers.root, workers.root.with_name("elsewhere"))
    upstream.down = True
    assert other.manifest("app", digest).data == b'{"read": "from disk"}'


def test_memory_zero_reads_the_disk_every_time(tmp_path: Path, upstream: FakeUpstream, clock: FakeClock) -> None:
    node = Workers(tmp_path / "cache", upstream, clock, memory=0)
    try:
        store = node.stores[0]
        digest = upstream.set_tag("app", "v1", b'{"v": 1}')
        assert str(store.manifest("app", "v1").digest) == digest
        assert store.manifest("app", digest).data == b'{"v": 1}'
        assert len(store.memory) == 0 and store.memory.used_bytes == 0
        # Gone from the disk (by hand, unrecorded): with memory it would still be served.
        os.unlink(store.local.layout.content(parse_digest(digest)))
        upstream.down = True
        with pytest.raises(UpstreamUnavailable):
            store.manifest("app", digest)
    finally:
        node.close()


def test_a_corrupt_manifest_on_disk_is_not_remembered_but_fetched_again(
    workers: Workers, upstream: FakeUpstream
) -> None:
    fetched_by, other = workers.stores
    digest = _manifest(upstream, b'{"good": true}')
    fetched_by.manifest("app", digest)
    with open(fetched_by.local.layout.content(parse_digest(digest)), "r+b") as handle:
        handle.write(b"X")
    assert other.manifest("app", digest).data == b'{"good": true}'
    assert upstream.calls.count(("get", digest)) == 2
    with open(other.local.layout.content(parse_digest(digest)), "rb") as handle:
        assert handle.read() == b'{"good": true}'


# A memory copy never outlives the content.


def test_a_manifest_removed_by_another_worker_is_not_served_from_memory(
    workers: Workers, upstream: FakeUpstream
) -> None:
    serving, remover = workers.stores
    digest = _manifest(upstream, b'{"evicted": true}')
    serving.manifest("app", digest)
    assert remover.local.remove(parse_digest(digest))
    upstream.down = True
    with pytest.raises(UpstreamUnavailable):
        serving.manifest("app", digest)
    upstream.down = False
    upstream.calls.clear()
    assert serving.manifest("app", digest).data == b'{"evicted": true}'
    assert upstream.calls == [("get", digest)]


def test_a_manifest_removed_by_another_process_is_not_served_from_memory(
    workers: Workers, upstream: FakeUpstream
) -> None:
    serving = workers.stores[0]
    digest = _manifest(upstream, b'{"evicted": "elsewhere"}')
    serving.manifest("app", digest)
    remove = (
        "import sys; from node.storage.local import LocalStore; from node.reference import parse_digest; "
        "assert LocalStore(sys.argv[1], 1 << 30).remove(parse_digest(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", remove, str(workers.root), digest], check=True, env=env, timeout=60)
    upstream.down = True
    with pytest.raises(UpstreamUnavailable):
        serving.manifest("app", digest)


@pytest.mark.parametrize("reason", ["ttl", "size"])
def test_a_manifest_swept_from_the_store_is_not_served_from_memory(
    tmp_path: Path, upstream: FakeUpstream, clock: FakeClock, reason: str
) -> None:
    store_settings = {"ttl": 3600} if reason == "ttl" else {"max_size": 10}
    node = Workers(tmp_path / "cache", upstream, clock, **store_settings)
    try:
        serving, sweeping = node.stores
        digest = _manifest(upstream, b'{"swept": "by the other worker"}')
        serving.manifest("app", digest)
        # The store's times are the fake clock's, as if fetched now.
        os.utime(serving.local.layout.content(parse_digest(digest)), (clock(), clock()))
        clock.advance(7200)
        assert sweeping.local.sweep() == [(parse_digest(digest), reason)]
        upstream.down = True
        with pytest.raises(UpstreamUnavailable):
            serving.manifest("app", digest)
    finally:
        node.close()


def test_a_removal_while_the_manifest_is_read_voids_the_copy(
    workers: Workers, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving, remover = workers.stores
    digest = _manifest(upstream, b'{"raced": true}')
    remover.manifest("app", digest)
    read = serving.local.read

    def read_then_removed(wanted: Digest, limit: int | None = None) -> tuple[bytes, str] | None:
        found = read(wanted, limit)
        # Another worker removes it between this read and the copy being kept.
        remover.local.remove(wanted)
        return found

    monkeypatch.setattr(serving.local, "read", read_then_removed)
    assert serving.manifest("app", digest).data == b'{"raced": true}'
    monkeypatch.undo()
    upstream.down = True
    with pytest.raises(UpstreamUnavailable):
        serving.manifest("app", digest)


def test_removal_stamps_are_shared_through_the_file(tmp_path: Path) -> None:
    one, two = Removals(str(tmp_path / "removals")), Removals(str(tmp_path / "removals"))
    digest, neighbour = digest_of(b"one"), digest_of(b"two")
    before, unrelated = one.stamp(digest), one.stamp(neighbour)
    two.record(digest)
    assert one.stamp(digest) != before
    assert one.stamp(digest) == two.stamp(digest)
    if one.stamp(neighbour) != unrelated:
        pytest.fail("the two digests share a slot; pick others")
    one.close()
    one.close()
    two.close()


# Hits keep content alive, without a file operation each.


def test_hits_from_memory_are_recorded_at_most_once_per_interval(
    workers: Workers, upstream: FakeUpstream, clock: FakeClock
) -> None:
    store = workers.stores[0]
    digest = parse_digest(_manifest(upstream, b'{"hot": true}'))
    store.manifest("app", str(digest))
    store.local.flush_touches()
    for _ in range(100):
        store.manifest("app", str(digest))
    assert store.local.flush_touches() == []
    clock.advance(TOUCH_INTERVAL)
    store.manifest("app", str(digest))
    assert store.local.flush_touches() == [digest]
    assert os.stat(store.local.layout.content(digest)).st_atime == clock()


def test_hits_are_recorded_ten_times_per_ttl_when_the_ttl_is_short(
    tmp_path: Path, upstream: FakeUpstream, clock: FakeClock
) -> None:
    local = LocalStore(str(tmp_path), max_size=1 << 30, clock=clock)
    config = UpstreamConfig(url="http://upstream.test", ttl=5)
    store = ProxyStore(
        local, Fills(local, timeout=5), upstream, config, bindings(local, upstream, config, clock), clock=clock
    )
    try:
        digest = parse_digest(_manifest(upstream, b'{"short": "ttl"}'))
        store.manifest("app", str(digest))
        local.flush_touches()
        clock.advance(0.5)
        store.manifest("app", str(digest))
        assert local.flush_touches() == [digest]
    finally:
        store.fills.close()
        local.close()


def test_a_repository_is_remembered_once_per_worker(workers: Workers, upstream: FakeUpstream) -> None:
    store = workers.stores[0]
    digest = _manifest(upstream, b"{}")
    store.manifest("team/app", digest)
    marker = Path(store.local.layout.repository_marker("docker.io/team/app"))
    assert marker.exists()
    marker.unlink()
    store.manifest("team/app", digest)
    assert not marker.exists()
    assert workers.stores[1].local.repositories("docker.io") == []
    workers.stores[1].manifest("team/app", digest)
    assert marker.exists()


# The budget.


def test_the_cache_stays_within_its_budget_under_many_distinct_manifests(workers: Workers) -> None:
    memory = MemoryCache(256 * 1024)
    for number in range(2000):
        data = os.urandom(200 + number % 1800)
        memory.keep_manifest(digest_of(data), RememberedManifest(data, MEDIA, b"\0" * 8))
        assert memory.used_bytes <= memory.max_bytes
    assert 60 < len(memory) < 2000
    newest = os.urandom(1000)
    memory.keep_manifest(digest_of(newest), RememberedManifest(newest, MEDIA, b"\0" * 8))
    assert memory.manifest(digest_of(newest), b"\0" * 8) is not None


def _fill(memory: MemoryCache, kinds: tuple[str, ...], count: int) -> None:
    """Fresh objects for every entry, as a worker's reads and fetches make them."""
    for number in range(count):
        data = os.urandom(100 + number % 3000)
        digest = parse_digest(str(digest_of(data)))
        media_type = MEDIA.encode().decode()
        name = f"library/app-{number}"
        if "manifest" in kinds:
            memory.keep_manifest(digest, RememberedManifest(data, media_type, os.urandom(8), 1.5 * number))
        if "tag" in kinds:
            memory.keep_tag(name, f"v{number}", TagPointer(str(digest), media_type, len(data), 1.5 * number))
        if "repository" in kinds:
            memory.keep_repository(f"docker.io/{name}")
        if "binding" in kinds:
            memory.keep_binding(f"docker.io/{name}", digest, RememberedBinding(1.5 * number))


@pytest.mark.parametrize("kinds", [("manifest",), ("tag",), ("binding",), ("manifest", "tag", "repository", "binding")])
def test_what_the_cache_charges_covers_the_memory_it_really_holds(kinds: tuple[str, ...]) -> None:
    budget = 2 * 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        memory = MemoryCache(budget)
        _fill(memory, kinds, 6000)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(memory) < 6000 * len(kinds), "the budget was never reached"
    assert memory.used_bytes <= budget
    assert held <= budget, f"the cache holds {held} bytes, charged {memory.used_bytes}"
    # And not so far over that the budget buys much less than it says.
    assert held >= 0.6 * memory.used_bytes


def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    memory = MemoryCache(1000)
    data = b"x" * (1001 - ENTRY_OVERHEAD)
    memory.keep_manifest(digest_of(data), RememberedManifest(data, "", b""))
    assert len(memory) == 0 and memory.used_bytes == 0


# Tags: fresh only as long as their files would be, on every node.


class FakePeers:
    """Other nodes' stores by URL, as ``node.peers.PeerClient`` reaches them."""

    def __init__(self) -> None:
        self.stores: dict[str, LocalStore] = {}

    def fetch(self, peer_url: str, digest: str, limit: int) -> FetchedManifest:
        found = self.stores[peer_url].read(parse_digest(digest))
        if found is None:
            raise BlobUnknown("not on this peer")
        return FetchedManifest(found[0], found[1], Origin.PEER)


class Counts:
    def count(self, kind: str, counter: str, value: int = 1) -> None:
        pass


class Cluster:
    """Two nodes of two workers each, with a fake coordinator, fake peers and the fake clock."""

    def __init__(self, root: Path, upstream: FakeUpstream, clock: FakeClock, budget: Budget | None = None) -> None:
        directory, peers = FakeDirectory(), FakePeers()
        self.nodes: list[list[ProxyStore]] = []
        # Manifests take no fills; one is enough for the test.
        self.fills: Fills | None = None
        for node_id in ("node-a", "node-b"):
            workers = []
            for _ in range(2):
                local = LocalStore(str(root / node_id), max_size=1 << 30, clock=clock)
                coordinator = FakeCoordinator(directory, node_id)
                flight = Flight(
                    coordinator,
                    node_id,
                    Announcements(str(root / node_id / "unannounced")),
                    Counts(),
                    lease_ttl=10,
                    wait_timeout=10,
                    clock=clock,
                    sleep=clock.sleep,
                )
                source = ClusterSource(
                    upstream,  # type: ignore[arg-type]
                    CONFIG,
                    flight,
                    coordinator,
                    peers,  # type: ignore[arg-type]
                    local,
                    clock,
                    budget=budget,
                )
                self.fills = self.fills or Fills(local, timeout=5)
                memory = MemoryCache(1 << 20)
                bound = bindings(local, upstream, CONFIG, clock, memory, ClusterLedger(coordinator, clock))
                workers.append(
                    ProxyStore(local, self.fills, source, CONFIG, bound, clock=clock, memory=memory, budget=budget)
                )
            peers.stores[directory.holder(node_id).url] = workers[0].local
            self.nodes.append(workers)

    @property
    def workers(self) -> list[ProxyStore]:
        return [worker for node in self.nodes for worker in node]

    def close(self) -> None:
        if self.fills is not None:
            self.fills.close()
        for worker in self.workers:
            worker.local.close()


@pytest.fixture
def cluster(tmp_path: Path, upstream: FakeUpstream, clock: FakeClock) -> Iterator[Cluster]:
    started = Cluster(tmp_path, upstream, clock)
    yield started
    started.close()


def _digests(cluster: Cluster, tag: str = "v1") -> set[str]:
    return {str(worker.manifest("app", tag).digest) for worker in cluster.workers}


def test_a_tag_changed_upstream_is_served_new_by_every_worker_of_every_node_within_tag_ttl(
    cluster: Cluster, upstream: FakeUpstream, clock: FakeClock
) -> None:
    first = upstream.set_tag("app", "v1", b'{"v": 1}')
    assert _digests(cluster) == {first}
    clock.advance(1)
    second = upstream.set_tag("app", "v1", b'{"v": 2}')
    clock.advance(30)
    # Within tag_ttl of the check the answer is reused, from memory or file.
    assert _digests(cluster) == {first}
    clock.advance(28)
    assert _digests(cluster) == {first}
    assert upstream.calls.count(("head", "v1")) == 1
    # tag_ttl after the check (59 s after the change): new everywhere, and
    # the upstream was asked once for the whole cluster.
    clock.advance(1)
    assert _digests(cluster) == {second}
    assert upstream.calls.count(("head", "v1")) == 2
    assert _digests(cluster) == {second}


def test_a_tag_taken_from_the_clusters_pointer_is_fresh_only_as_long_as_that_pointer(
    cluster: Cluster, upstream: FakeUpstream, clock: FakeClock
) -> None:
    node_a, node_b = cluster.nodes
    first = upstream.set_tag("app", "v1", b'{"v": 1}')
    assert str(node_a[0].manifest("app", "v1").digest) == first
    clock.advance(1)
    second = upstream.set_tag("app", "v1", b'{"v": 2}')
    clock.advance(58)
    assert str(node_b[0].manifest("app", "v1").digest) == first
    clock.advance(1)
    assert _digests(cluster) == {second}


def test_while_tag_checks_pause_a_node_without_the_tag_takes_the_clusters_stale_pointer(
    tmp_path: Path, upstream: FakeUpstream, clock: FakeClock
) -> None:
    # One budget for both nodes, as if each had met the same 429.
    budget = Budget(CONFIG, clock=clock)
    cluster = Cluster(tmp_path, upstream, clock, budget)
    try:
        node_a, node_b = cluster.nodes
        first = upstream.set_tag("app", "v1", b'{"v": 1}')
        assert str(node_a[0].manifest("app", "v1").digest) == first
        upstream.set_tag("app", "v1", b'{"v": 2}')
        clock.advance(61)
        budget.record(429, {"retry-after": "300"})
        # Node b never served the tag: it takes the cluster's pointer, stale, and asks nobody.
        assert str(node_b[0].manifest("app", "v1").digest) == first
        assert upstream.calls.count(("head", "v1")) == 1
        # Its own pointer keeps the cluster's check time: still stale, so
        # checked again as soon as the pause ends.
        clock.advance(300)
        assert str(node_b[1].manifest("app", "v1").digest) != first
        assert upstream.calls.count(("head", "v1")) == 2
    finally:
        cluster.close()


# The setting.


def test_cache_memory_takes_a_size_and_zero_turns_it_off() -> None:
    assert config_from_dict({}).cache.memory == 32 * 1024**2
    assert config_from_dict({"cache": {"memory": "64MiB"}}).cache.memory == 64 * 1024**2
    assert config_from_dict({"cache": {"memory": 0}}).cache.memory == 0
    assert config_from_dict({}, {"SHOAL_CACHE__MEMORY": "8MB"}).cache.memory == 8_000_000
    with pytest.raises(ConfigError, match=r"^cache\.memory: expected a size such as 500MiB or 20GiB$"):
        config_from_dict({"cache": {"memory": "plenty"}})
    with pytest.raises(ConfigError, match=r"^cache\.memory: must not be negative$"):
        config_from_dict({"cache": {"memory": -1}})


def test_the_workers_share_cache_memory() -> None:
    config = config_from_dict({"cache": {"memory": "32MiB"}, "server": {"workers": 4}})
    assert memory_per_worker(config) == 8 * 1024**2
    assert memory_per_worker(config_from_dict({"cache": {"memory": 0}})) == 0
