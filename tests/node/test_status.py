"""Metrics as operators read them: /metrics, /debug/vars and shoal stats, from a real cluster."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed.cluster import Cluster
from testbed.images import Image, build_image, push
from testbed.node import NodeProcess
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry

pytestmark = pytest.mark.integration


def _pull(url: str, name: str, image: Image) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get(f"/v2/{name}/manifests/v1").content == image.manifest
        for digest, data in image.blobs.items():
            assert http.get(f"/v2/{name}/blobs/{digest}").content == data


def _debug_vars(node: NodeProcess) -> dict:  # type: ignore[type-arg]
    response = httpx.get(f"{node.url}/debug/vars", timeout=10)
    assert response.status_code == 200
    data: dict = response.json()  # type: ignore[type-arg]
    return data


def _samples(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def cluster(tmp_path: Path, upstream_registry: DistributionRegistry) -> Iterator[Cluster]:
    with Cluster(tmp_path, upstream_registry.url, nodes=2) as started:
        yield started


def test_exact_counts_in_every_output(cluster: Cluster, upstream_registry: DistributionRegistry) -> None:
    image = build_image([300_000, 70_000], seed="metrics-exact")
    push(upstream_registry.url, "metrics/exact", "v1", image)
    k = len(image.blobs)
    blob_bytes = sum(len(data) for data in image.blobs.values())
    manifest_bytes = len(image.manifest)
    first, second = cluster.nodes
    registry = upstream_registry.host

    _pull(first.url, "metrics/exact", image)  # cold: misses
    _pull(first.url, "metrics/exact", image)  # warm: hits
    _pull(second.url, "metrics/exact", image)  # the other node: peer hits

    expected = {
        "node-1": {
            "blob.requests": 2 * k,
            "blob.hits": k,
            "blob.misses": k,
            "blob.bytes_pulled": blob_bytes,
            "blob.bytes_pushed": 2 * blob_bytes,
            "manifest.requests": 2,
            "manifest.hits": 1,
            "manifest.misses": 1,
            "manifest.bytes_pulled": manifest_bytes,
            "manifest.bytes_pushed": 2 * manifest_bytes,
            f"upstream.blob.2xx.{registry}": k,
            f"upstream.manifest.2xx.{registry}": 2,  # the tag's HEAD and the manifest's GET
            f"registry.blob.requests.{registry}": 2 * k,
            f"registry.blob.hits.{registry}": k,
            f"registry.blob.misses.{registry}": k,
            f"registry.manifest.requests.{registry}": 2,
            f"registry.manifest.hits.{registry}": 1,
            f"registry.manifest.misses.{registry}": 1,
        },
        "node-2": {
            "blob.requests": k,
            "blob.peer_hits": k,
            "blob.peer_bytes": blob_bytes,
            "blob.bytes_pushed": blob_bytes,
            "manifest.requests": 1,
            "manifest.peer_hits": 1,
            "manifest.peer_bytes": manifest_bytes,
            "manifest.bytes_pushed": manifest_bytes,
            f"registry.blob.requests.{registry}": k,
            f"registry.blob.peer_hits.{registry}": k,
            f"registry.manifest.requests.{registry}": 1,
            f"registry.manifest.peer_hits.{registry}": 1,
        },
    }

    def counters() -> dict[str, dict[str, int]]:
        nodes = _debug_vars(first)["shoal"]["nodes"]
        return {node_id: node["counters"] for node_id, node in nodes.items()}

    wait_until(
        lambda: (
            counters().get("node-2", {}).get("blob.requests") == k
            and counters().get("node-1", {}).get("blob.requests") == 2 * k
        ),
        message=lambda: f"counters never arrived: {counters()}",
    )
    assert counters() == expected
    cluster_total: dict[str, int] = {}
    for node in expected.values():
        for name, value in node.items():
            cluster_total[name] = cluster_total.get(name, 0) + value

    # /debug/vars: the seed's objects for the node asked, and the cluster's beside them.
    for node, mine in ((first, expected["node-1"]), (second, expected["node-2"])):
        proxy = _debug_vars(node)["registry"]["proxy"]
        assert proxy["blobs"] == {
            "Requests": mine["blob.requests"],
            "Hits": mine.get("blob.hits", 0) + mine.get("blob.peer_hits", 0),
            "Misses": mine.get("blob.misses", 0),
            "BytesPulled": mine.get("blob.bytes_pulled", 0),
            "BytesPushed": mine["blob.bytes_pushed"],
        }
        assert proxy["cluster"]["manifests"] == {
            "Requests": 3,
            "Hits": 2,
            "Misses": 1,
            "BytesPulled": manifest_bytes,
            "BytesPushed": 3 * manifest_bytes,
        }
    assert _debug_vars(second)["shoal"]["cluster"] | {"cached.distinct_bytes": 0} == cluster_total | {
        "cached.distinct_bytes": 0
    }

    # /metrics: distribution's names per node, shoal_cluster_* totals, parsed by prometheus-client.
    samples = _samples(second)
    blob_node1 = (("node", "node-1"), ("type", "blob"))
    assert samples[("registry_proxy_requests_total", blob_node1)] == 2 * k
    assert samples[("registry_proxy_hits_total", blob_node1)] == k
    assert samples[("registry_proxy_misses_total", blob_node1)] == k
    assert samples[("registry_proxy_pulled_bytes_total", blob_node1)] == blob_bytes
    assert samples[("shoal_peer_hits_total", (("node", "node-2"), ("type", "blob")))] == k
    assert samples[("shoal_cluster_requests_total", (("type", "blob"),))] == 3 * k
    assert samples[("shoal_cluster_pushed_bytes_total", (("type", "manifest"),))] == 3 * manifest_bytes
    labels = (("class", "2xx"), ("kind", "blob"), ("node", "node-1"), ("registry", registry))
    assert samples[("shoal_upstream_requests_total", labels)] == k
    labels = (("counter", "peer_hits"), ("node", "node-2"), ("registry", registry), ("type", "blob"))
    assert samples[("shoal_registry_content_total", labels)] == k
    assert any(name == "shoal_request_duration_seconds_count" for name, _ in samples)

    # shoal stats, as a user runs it.
    out = subprocess.run(
        [sys.executable, "-m", "shoal", "stats", "--url", first.url, "--json"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    stats = json.loads(out)
    by_node = {row["node"]: row for row in stats["nodes"]}
    assert by_node["node-1"]["requests"] == 2 * k + 2
    assert by_node["node-2"]["peer_hits"] == k + 1
    assert stats["cluster"]["requests"] == 3 * k + 3
    assert stats["cluster"]["hit_ratio"] == round((2 * k + 2) / (3 * k + 3), 4)
    assert stats["cluster"]["bytes_pulled"] == blob_bytes + manifest_bytes
    table = subprocess.run(
        [sys.executable, "-m", "shoal", "stats", "--url", first.url], capture_output=True, check=True, text=True
    ).stdout
    assert "node-1" in table and "cluster" in table and "upstream amplification" in table


def test_concurrent_requests_on_every_node_lose_no_count(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    image = build_image([20_000], seed="metrics-concurrent")
    push(upstream_registry.url, "metrics/concurrent", "v1", image)
    layer = image.layer_digests[0]
    for node in cluster.nodes:
        _pull(node.url, "metrics/concurrent", image)

    def requests() -> int:
        return int(_debug_vars(cluster.nodes[0])["shoal"]["cluster"].get("blob.requests", 0))

    before = wait_until(requests, message="no counts")
    wait_until(lambda: requests() == 2 * len(image.blobs), message="initial pulls not counted")
    before = requests()

    def get(index: int) -> int:
        node = cluster.nodes[index % 2]
        return httpx.get(f"{node.url}/v2/metrics/concurrent/blobs/{layer}", timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(get, range(120))) == {200}
    wait_until(lambda: requests() == before + 120, message=lambda: f"{requests()} != {before + 120}")


def test_counts_made_while_the_coordinator_is_down_arrive_once(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    image = build_image([10_000], seed="metrics-outage")
    push(upstream_registry.url, "metrics/outage", "v1", image)
    layer = image.layer_digests[0]
    node = cluster.nodes[0]
    _pull(node.url, "metrics/outage", image)

    def hits() -> int:
        response = httpx.get(f"{node.url}/debug/vars", timeout=10)
        if response.status_code != 200:  # The coordinator is not reachable (yet).
            return -1
        return int(response.json()["shoal"]["nodes"]["node-1"]["counters"].get("blob.hits", 0))

    wait_until(lambda: _debug_vars(node)["shoal"]["cluster"].get("blob.misses") == len(image.blobs), message="x")
    before = hits()
    cluster.coordinators[0].stop()
    for _ in range(25):
        assert httpx.get(f"{node.url}/v2/metrics/outage/blobs/{layer}", timeout=30).status_code == 200
    assert httpx.get(f"{node.url}/debug/vars", timeout=10).status_code == 503
    cluster.coordinators[0].start()
    wait_until(lambda: hits() == before + 25, timeout=20, message=lambda: f"{hits()} != {before + 25}")
    # One more hit after the outage's counts arrived: had any delta been
    # applied twice, the count would now be past this.
    assert httpx.get(f"{node.url}/v2/metrics/outage/blobs/{layer}", timeout=30).status_code == 200
    wait_until(lambda: hits() >= before + 26, message="the last hit was not counted")
    assert hits() == before + 26


def test_a_node_alone_counts_too(tmp_path: Path, upstream_registry: DistributionRegistry) -> None:
    image = build_image([5_000], seed="metrics-alone")
    push(upstream_registry.url, "metrics/alone", "v1", image)
    node = NodeProcess(tmp_path, upstream_registry.url)
    try:
        _pull(node.url, "metrics/alone", image)
        _pull(node.url, "metrics/alone", image)
        k = len(image.blobs)
        wait_until(lambda: _debug_vars(node)["registry"]["proxy"]["blobs"]["Requests"] == 2 * k, message="not counted")
        assert _debug_vars(node)["registry"]["proxy"]["blobs"]["Hits"] == k
        node_id = _debug_vars(node)["shoal"]["node"]
        assert node_id == f"127.0.0.1-{node.port}"
        samples = _samples(node)
        assert samples[("registry_proxy_misses_total", (("node", node_id), ("type", "blob")))] == k
    finally:
        node.stop()
