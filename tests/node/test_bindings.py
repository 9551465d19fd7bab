"""Content bound to its repository (node/bindings.py, its ledgers, and its use in proxy.py), on fakes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.bindings import Bindings, ClusterLedger, Ledger, references
from node.config import UpstreamConfig
from node.errors import BlobUnknown, ManifestUnknown, UpstreamUnavailable
from node.reference import digest_of, parse_digest
from node.storage.fill import Fills
from node.storage.ledger import UNHELD_GRACE, LocalLedger
from node.storage.local import LocalStore
from node.storage.memory import MemoryCache
from node.storage.proxy import ProxyStore
from testbed.clock import FakeClock
from testbed.fake_coordinator import FakeCoordinator, FakeDirectory
from tests.node.test_storage_proxy import FakeUpstream

CONFIG = UpstreamConfig(name="registry.test", url="http://upstream.test", tag_ttl=60, ttl=3600)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Counts:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counter: str, value: int = 1) -> None:
        self.counts[counter] += value


class Image:
    """A manifest with a config and two layers, known to the fake upstream under ``app:v1``."""

    def __init__(self, upstream: FakeUpstream, seed: str, name: str = "app", tag: str = "v1") -> None:
        self.blobs = {str(digest_of(data)): data for data in (f"{seed}-config".encode(), f"{seed}-layer".encode())}
        config, layer = list(self.blobs)
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": config, "size": 1},
            "layers": [{"digest": layer, "size": 1}],
        }
        self.manifest = json.dumps(document).encode()
        upstream.blobs.update(self.blobs)
        self.digest = upstream.set_tag(name, tag, self.manifest)


class Worker:
    """One worker's proxy store over a node's cache directory, with its own memory."""

    def __init__(
        self, root: Path, upstream: FakeUpstream, clock: FakeClock, ledger: Ledger | None = None, **config: object
    ) -> None:
        self.local = LocalStore(str(root), max_size=1 << 30, clock=clock)
        self.fills = Fills(self.local, timeout=5)
        self.counts = Counts()
        memory = MemoryCache(1 << 20)
        settings = dataclasses.replace(CONFIG, **config)
        self.bindings = Bindings(
            settings, upstream, ledger or LocalLedger(self.local.layout), memory, clock=clock, counter=self.counts
        )
        self.store = ProxyStore(self.local, self.fills, upstream, settings, self.bindings, clock=clock, memory=memory)

    def blob(self, name: str, digest: str) -> bytes:
        with self.store.blob(name, parse_digest(digest)) as blob:
            if blob.stored is not None:
                return os.pread(blob.stored.fileno(), 1 << 20, 0)
            assert blob.following is not None
            return b"".join(self.fills.follow(blob.following.detach()))

    def pull(self, name: str, reference: str) -> None:
        manifest = self.store.manifest(name, reference)
        for digest in references(manifest.data):
            self.blob(name, str(digest))

    def close(self) -> None:
        self.fills.close()
        self.local.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream() -> FakeUpstream:
    fake = FakeUpstream()
    fake.strangers.add("zzz")
    return fake


@pytest.fixture
def worker(tmp_path: Path, upstream: FakeUpstream, clock: FakeClock) -> Iterator[Worker]:
    made = Worker(tmp_path / "cache", upstream, clock)
    yield made
    made.close()


def _heads(upstream: FakeUpstream) -> list[str]:
    return [argument for call, argument in upstream.calls if call == "confirm"]


def test_references_of_an_image_an_index_and_schema_1() -> None:
    one, two, three = (digest_of(bytes([n])) for n in range(3))
    image = {"config": {"digest": str(one)}, "layers": [{"digest": str(two)}, {"digest": str(one)}]}
    index = {"manifests": [{"digest": str(three)}, {"digest": "md5:nonsense"}, {"size": 3}]}
    schema1 = {"fsLayers": [{"blobSum": str(two)}]}
    assert references(json.dumps(image).encode()) == [one, two]
    assert references(json.dumps(index).encode()) == [three]
    assert references(json.dumps(schema1).encode()) == [two]
    assert references(b"[1, 2]") == references(b"not json") == references(b'{"layers": 3}') == []


def test_an_ordinary_pull_confirms_everything_it_needs_without_a_head(
    worker: Worker, upstream: FakeUpstream, clock: FakeClock
) -> None:
    image = Image(upstream, "ordinary")
    worker.pull("app", "v1")
    # Cold: the tag, the manifest and each blob, once.
    assert upstream.calls == [("head", "v1"), ("get", image.digest), *(("blob", digest) for digest in image.blobs)]
    upstream.calls.clear()
    worker.pull("app", "v1")
    worker.pull("app", image.digest)
    assert upstream.calls == []
    clock.advance(61)
    worker.pull("app", "v1")
    assert upstream.calls == [("head", "v1")]
    assert worker.counts.counts == {}


def test_a_cached_digest_under_a_repository_the_upstream_lacks_is_unknown(
    worker: Worker, upstream: FakeUpstream
) -> None:
    image = Image(upstream, "stranger")
    worker.pull("app", "v1")
    upstream.calls.clear()
    layer = list(image.blobs)[1]
    for _ in range(2):
        with pytest.raises(ManifestUnknown):
            worker.store.manifest("zzz", image.digest)
        with pytest.raises(BlobUnknown):
            worker.blob("zzz", layer)
    # One HEAD per request: an answer of 404 is not remembered.
    assert _heads(upstream) == [f"zzz@{image.digest}", f"zzz@{layer}"] * 2
    assert upstream.calls == [("confirm", head) for head in _heads(upstream)]
    assert worker.counts.counts == {"binding_checks.unknown.registry.test": 4}
    assert worker.local.repositories("registry.test") == ["app"]
    assert not Path(worker.local.layout.repository("registry.test/zzz")).exists()


def test_another_repository_that_holds_it_costs_one_head_for_the_whole_image(
    worker: Worker, upstream: FakeUpstream
) -> None:
    image = Image(upstream, "mirrored")
    worker.pull("app", "v1")
    upstream.calls.clear()
    worker.pull("mirror/app", image.digest)
    worker.pull("mirror/app", image.digest)
    assert upstream.calls == [("confirm", f"mirror/app@{image.digest}")]
    assert worker.counts.counts == {"binding_checks.confirmed.registry.test": 1}
    assert worker.local.repositories("registry.test") == ["app", "mirror/app"]


def test_an_index_binds_its_children_and_each_child_its_blobs(worker: Worker, upstream: FakeUpstream) -> None:
    children = [Image(upstream, f"child-{n}", tag=f"child-{n}") for n in range(2)]
    index = {"manifests": [{"digest": child.digest, "mediaType": OCI_MANIFEST} for child in children]}
    index_digest = upstream.set_tag("app", "multi", json.dumps(index).encode())
    worker.store.manifest("app", "multi")
    worker.pull("app", children[1].digest)
    assert _heads(upstream) == []
    # Under another name the index costs one HEAD; its child and the child's blobs none.
    worker.store.manifest("other", index_digest)
    worker.pull("other", children[0].digest)
    assert _heads(upstream) == [f"other@{index_digest}"]


def test_with_the_upstream_down_confirmed_pairs_are_served_and_others_refused(
    worker: Worker, upstream: FakeUpstream
) -> None:
    image = Image(upstream, "down")
    worker.pull("app", "v1")
    upstream.down = True
    worker.pull("app", image.digest)
    with pytest.raises(UpstreamUnavailable) as refused:
        worker.store.manifest("mirror/app", image.digest)
    assert "cannot confirm that mirror/app holds" in refused.value.message
    assert refused.value.status == 503
    with pytest.raises(UpstreamUnavailable):
        worker.blob("mirror/app", next(iter(image.blobs)))
    assert worker.counts.counts == {"binding_checks.failed.registry.test": 2}


def test_the_workers_of_a_node_share_confirmations_through_its_files(
    tmp_path: Path, worker: Worker, upstream: FakeUpstream, clock: FakeClock
) -> None:
    image = Image(upstream, "shared")
    worker.pull("app", "v1")
    other = Worker(tmp_path / "cache", upstream, clock)
    try:
        upstream.down = True
        other.pull("app", image.digest)
        assert _heads(upstream) == []
    finally:
        other.close()


def test_a_confirmation_lasts_the_contents_ttl(
    worker: Worker, upstream: FakeUpstream, clock: FakeClock, tmp_path: Path
) -> None:
    image = Image(upstream, "ttl")
    worker.store.manifest("app", image.digest)
    clock.advance(CONFIG.ttl - 1)
    worker.pull("app", image.digest)
    assert _heads(upstream) == []
    clock.advance(2)
    worker.pull("app", image.digest)
    assert _heads(upstream) == [f"app@{image.digest}"]
    # Kept with no TTL, a confirmation never expires.
    forever = Worker(tmp_path / "forever", upstream, clock, ttl=0.0)
    try:
        forever.store.manifest("app", image.digest)
        clock.advance(10 * CONFIG.ttl)
        forever.pull("app", image.digest)
        assert _heads(upstream) == [f"app@{image.digest}"]
    finally:
        forever.close()


def test_a_tag_checked_again_refreshes_its_confirmations(
    worker: Worker, upstream: FakeUpstream, clock: FakeClock
) -> None:
    image = Image(upstream, "refresh")
    worker.pull("app", "v1")
    for _ in range(3):
        clock.advance(CONFIG.ttl / 2)
        worker.store.manifest("app", "v1")
    worker.pull("app", image.digest)
    assert _heads(upstream) == []


def test_the_ledger_never_shortens_a_confirmation(tmp_path: Path) -> None:
    ledger = LocalLedger(LocalStore(str(tmp_path), 1 << 20).layout)
    digest = digest_of(b"x")
    ledger.confirm("registry.test", "app", [digest], 200.0)
    ledger.confirm("registry.test", "app", [digest], 100.0)
    assert ledger.confirmed("registry.test", "app", [digest, digest_of(b"y")]) == {digest: 200.0}
    ledger.confirm("registry.test", "app", [digest], math.inf)
    assert ledger.confirmed("registry.test", "app", [digest]) == {digest: math.inf}


def test_the_sweep_removes_confirmations_of_content_not_held_and_run_out(tmp_path: Path) -> None:
    clock = FakeClock()
    store = LocalStore(str(tmp_path), 1 << 20, clock=clock)
    ledger = LocalLedger(store.layout)
    held, evicted, never_stored = (digest_of(data) for data in (b"held", b"evicted", b"never stored"))
    store.put(held, b"held")
    store.put(evicted, b"evicted")
    for repository in ("app", "team/app"):
        ledger.confirm("registry.test", repository, [held, evicted, never_stored], math.inf)
    ledger.confirm("registry.test", "old", [held], clock() + 10)
    store.remove(evicted)
    # A manifest's references are confirmed before they are fetched: kept for a while.
    ledger.confirm("registry.test", "app", [digest_of(b"referenced")], math.inf)
    clock.advance(UNHELD_GRACE + 1)
    for repository in ("app", "team/app"):
        for digest in (evicted, never_stored):
            os.utime(store.layout.binding(f"registry.test/{repository}", digest), (clock() - UNHELD_GRACE - 1,) * 2)
    os.utime(store.layout.binding("registry.test/app", digest_of(b"referenced")), (clock() - UNHELD_GRACE + 1,) * 2)
    # The first sweep of a store looks through repos/ too.
    assert store.sweep() == []
    for repository in ("app", "team/app"):
        assert ledger.confirmed("registry.test", repository, [held, evicted, never_stored]) == {held: math.inf}
    assert os.listdir(store.layout.bindings("registry.test/old")) == []
    assert sorted(os.listdir(store.layout.bindings("registry.test/app"))) == sorted(
        f"sha256-{digest.hex}" for digest in (held, digest_of(b"referenced"))
    )
    assert store.has(held)


# In a cluster: the coordinator's ledger, shared by every node.


class Node(Worker):
    def __init__(self, root: Path, upstream: FakeUpstream, clock: FakeClock, directory: FakeDirectory) -> None:
        self.coordinator = FakeCoordinator(directory, root.name)
        super().__init__(root, upstream, clock, ClusterLedger(self.coordinator, clock))

    def holds(self, upstream: FakeUpstream, digests: list[str]) -> None:
        """Copy content into this node's store, as a peer transfer would, without asking anyone."""
        for digest in digests:
            data = upstream.manifests.get(digest) or upstream.blobs[digest]
            self.local.put(parse_digest(digest), data, OCI_MANIFEST if digest in upstream.manifests else None)


@pytest.fixture
def nodes(tmp_path: Path, upstream: FakeUpstream, clock: FakeClock) -> Iterator[list[Node]]:
    directory = FakeDirectory()
    made = [Node(tmp_path / f"node-{n}", upstream, clock, directory) for n in range(2)]
    yield made
    for node in made:
        node.close()


def test_a_pair_confirmed_on_one_node_is_served_by_another_without_a_head(
    nodes: list[Node], upstream: FakeUpstream
) -> None:
    first, second = nodes
    image = Image(upstream, "cluster")
    first.pull("app", "v1")
    second.holds(upstream, [image.digest, *image.blobs])
    upstream.calls.clear()
    second.pull("app", image.digest)
    assert upstream.calls == []
    # The manifest's binding came from the coordinator; its blobs' from the manifest.
    assert second.coordinator.calls("get_bindings") == [f"app@{image.digest}"]
    # Warm, nobody is asked: not the upstream, not the coordinator.
    second.coordinator.directory.calls.clear()
    second.pull("app", image.digest)
    assert second.coordinator.directory.calls == [] and upstream.calls == []


def test_without_a_coordinator_a_node_asks_the_upstream_and_remembers(
    nodes: list[Node], upstream: FakeUpstream
) -> None:
    first, second = nodes
    image = Image(upstream, "degraded")
    first.pull("app", "v1")
    second.holds(upstream, [image.digest, *image.blobs])
    second.coordinator.directory.down = True
    second.pull("app", image.digest)
    second.pull("app", image.digest)
    assert _heads(upstream) == [f"app@{image.digest}"]
    with pytest.raises(ManifestUnknown):
        second.store.manifest("zzz", image.digest)


def test_bound_digests_of_one_registry_do_not_bind_another(tmp_path: Path, upstream: FakeUpstream) -> None:
    clock = FakeClock()
    directory = FakeDirectory()
    ours = Node(tmp_path / "ours", upstream, clock, directory)
    try:
        image = Image(upstream, "registries")
        ours.pull("app", "v1")
        assert all(key[0] == "registry.test" for key in directory.bindings)
        assert {key[2] for key in directory.bindings} == {image.digest, *image.blobs}
        theirs = Bindings(
            UpstreamConfig(name="other.test", url="http://other.test"),
            upstream,
            ClusterLedger(FakeCoordinator(directory, "theirs"), clock),
            MemoryCache(1 << 20),
            clock=clock,
        )
        assert theirs.binding("app", parse_digest(image.digest)) is None
    finally:
        ours.close()
