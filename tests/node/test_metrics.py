"""Counting and flushing deltas, with fake sinks."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, generate_latest

from node.coordinator_client import CoordinatorUnavailable
from node.metrics import CoordinatorReachability, LocalSink, Metrics
from protos.metrics import NodeCounts, expvar, families


class FlakySink:
    """Applies each (worker, sequence) once; can fail before or after applying."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.applied: set[tuple[str, int]] = set()
        self.fail_before = False
        self.fail_after = False
        self.down = False
        self.sent: list[int] = []

    def send(self, worker_id: str, sequence: int, counters: Mapping[str, int]) -> None:
        self.sent.append(sequence)
        if self.fail_before:
            raise CoordinatorUnavailable("down")
        if (worker_id, sequence) not in self.applied:
            self.applied.add((worker_id, sequence))
            for name, value in counters.items():
                self.totals[name] = self.totals.get(name, 0) + value
        if self.fail_after:
            # The delta landed, but the answer was lost on the way back.
            raise CoordinatorUnavailable("timed out")

    def snapshot(self) -> tuple[list[NodeCounts], dict[str, int]]:
        if self.down:
            raise CoordinatorUnavailable("GetMetrics: no coordinator answered")
        return [NodeCounts("n1", self.totals)], dict(self.totals)


def test_a_failed_flush_is_retried_unchanged_and_counted_once() -> None:
    sink = FlakySink()
    metrics = Metrics(sink, "n1")
    metrics.count("blob", "hits", 2)
    sink.fail_after = True
    assert not metrics.flush()
    metrics.count("blob", "hits", 5)
    sink.fail_after = False
    sink.fail_before = True
    assert not metrics.flush()
    sink.fail_before = False
    assert metrics.flush()
    # The retried delta kept its number; the later counts went in the next one.
    assert sink.sent == [1, 1, 1]
    assert sink.totals == {"blob.hits": 2}
    assert metrics.flush()
    assert sink.totals == {"blob.hits": 7}
    assert sink.sent[-1] == 2


def test_no_increment_is_lost_under_concurrency() -> None:
    sink = FlakySink()
    metrics = Metrics(sink, "n1")
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            metrics.flush()

    def counter() -> None:
        for _ in range(2000):
            metrics.count("manifest", "requests")

    background = threading.Thread(target=flusher)
    background.start()
    workers = [threading.Thread(target=counter) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    background.join()
    metrics.flush()
    assert sink.totals == {"manifest.requests": 16000}


def test_local_sink_applies_each_sequence_once(tmp_path) -> None:
    sink = LocalSink(str(tmp_path / "metrics.json"), "alone")
    sink.send("w1", 1, {"blob.hits": 3})
    sink.send("w1", 1, {"blob.hits": 3})
    sink.send("w2", 1, {"blob.hits": 1, "blob.requests": 4})
    sink.send("w1", 2, {"blob.requests": 3})
    nodes, cluster = sink.snapshot()
    assert cluster == {"blob.hits": 4, "blob.requests": 7}
    assert nodes == [NodeCounts("alone", cluster)]


def test_upstream_requests_are_counted_by_kind_and_status_class() -> None:
    sink = FlakySink()
    metrics = Metrics(sink, "n1")
    metrics.upstream_request("ghcr.io", "blob", 200, 0.1)
    metrics.upstream_request("ghcr.io", "manifest", 404, 0.1)
    metrics.upstream_request("docker.io", "manifest", None, 0.1)
    metrics.flush()
    assert sink.totals == {
        "upstream.blob.2xx.ghcr.io": 1,
        "upstream.manifest.4xx.ghcr.io": 1,
        "upstream.manifest.error.docker.io": 1,
    }


def test_expvar_keeps_the_seed_field_names() -> None:
    counters = {"blob.requests": 5, "blob.hits": 2, "blob.peer_hits": 1, "blob.misses": 2, "blob.bytes_pulled": 10}
    objects = expvar(counters)
    assert set(objects) == {"blobs", "manifests"}
    assert objects["blobs"] == {"Requests": 5, "Hits": 3, "Misses": 2, "BytesPulled": 10, "BytesPushed": 0}
    assert set(objects["manifests"]) == {"Requests", "Hits", "Misses", "BytesPulled", "BytesPushed"}


def test_upstream_rate_limits_become_gauges() -> None:
    import httpx

    from node.config import UpstreamConfig
    from node.upstream import Upstream

    def registry(request: httpx.Request) -> httpx.Response:
        headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}
        return httpx.Response(200, headers=headers, content=b"{}")

    metrics = Metrics(FlakySink(), "n1")
    upstream = Upstream(
        UpstreamConfig(name="docker.io", url="https://registry.test"),
        transport=httpx.MockTransport(registry),
        observer=metrics,
    )
    upstream.ping()
    upstream.close()
    text = generate_latest(metrics.registry).decode()
    assert 'shoal_upstream_ratelimit{header="ratelimit-remaining",node="n1",registry="docker.io"} 76.0' in text
    assert 'shoal_upstream_ratelimit{header="ratelimit-limit",node="n1",registry="docker.io"} 100.0' in text
    metrics.flush()
    assert metrics.sink.totals == {"upstream.ping.2xx.docker.io": 1}  # type: ignore[attr-defined]


def test_degraded_decisions_are_counted_per_type_for_each_node_and_the_cluster() -> None:
    nodes = [NodeCounts("n1", {"blob.degraded": 3, "tag.degraded": 1}), NodeCounts("n2", {"manifest.degraded": 2})]
    cluster = {"blob.degraded": 3, "tag.degraded": 1, "manifest.degraded": 2}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families(nodes, cluster)
        for sample in family.samples
    }

    assert samples[("shoal_degraded_decisions_total", (("node", "n1"), ("type", "blob")))] == 3
    assert samples[("shoal_degraded_decisions_total", (("node", "n1"), ("type", "tag")))] == 1
    assert samples[("shoal_degraded_decisions_total", (("node", "n2"), ("type", "manifest")))] == 2
    assert samples[("shoal_degraded_decisions_total", (("node", "n2"), ("type", "blob")))] == 0
    assert samples[("shoal_cluster_degraded_decisions_total", (("type", "manifest"),))] == 2


def test_the_breaker_gauge_is_scraped_even_while_no_coordinator_answers() -> None:
    registry = CollectorRegistry()
    reachability = CoordinatorReachability(registry, "n1")
    sink = FlakySink()
    metrics = Metrics(sink, "n1", registry)
    reachability.coordinator_reachable("c1:7000", True)
    reachability.coordinator_reachable("c2:7000", True)
    reachability.coordinator_reachable("c2:7000", False)
    metrics.count("blob", "hits")
    metrics.flush()

    text = generate_latest(metrics.prometheus_registry()).decode()
    assert 'shoal_coordinator_reachable{address="c1:7000",node="n1"} 1.0' in text
    assert 'shoal_coordinator_reachable{address="c2:7000",node="n1"} 0.0' in text
    assert 'registry_proxy_hits_total{node="n1",type="blob"} 1.0' in text

    sink.down = True
    text = generate_latest(metrics.prometheus_registry()).decode()
    assert 'shoal_coordinator_reachable{address="c2:7000",node="n1"} 0.0' in text
    assert "registry_proxy_hits_total" not in text


def test_the_cache_size_its_limit_and_its_filesystem_are_gauges(tmp_path) -> None:
    from node.reference import digest_of
    from node.storage.local import LocalStore

    store = LocalStore(str(tmp_path / "cache"), max_size=4096)
    data = b"x" * 1000
    store.put(digest_of(data), data)
    metrics = Metrics(FlakySink(), "n1", cache=store)

    samples = {
        sample.name: sample.value
        for family in metrics.prometheus_registry().collect()
        for sample in family.samples
        if sample.labels == {"node": "n1"}
    }
    assert samples["shoal_cache_used_bytes"] == 1000
    assert samples["shoal_cache_max_bytes"] == 4096
    assert 0 < samples["shoal_cache_filesystem_free_bytes"] <= samples["shoal_cache_filesystem_size_bytes"]
    assert samples["shoal_fills_in_progress"] == 0


def test_fills_in_progress_are_the_partial_files_still_written(tmp_path) -> None:
    import os

    from node.reference import digest_of
    from node.storage.local import LocalStore

    store = LocalStore(str(tmp_path / "cache"), max_size=4096)
    for token, mode in (("a", 0o644), ("b", 0o444), ("c", 0o600)):
        path = store.layout.fill_partial(digest_of(token.encode()), token)
        with open(path, "wb"):
            pass
        os.chmod(path, mode)
    # Two are still being written; the read-only one is verified.
    assert store.fills_in_progress() == 2
