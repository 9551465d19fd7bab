"""A real cluster: redis-server, coordinators, three gunicorn nodes, a real upstream."""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.config import ClusterConfig
from testbed.cluster import TEST_NODE_SETTINGS, Cluster, verify_store
from testbed.fake_upstream import FakeUpstream
from testbed.images import Image, build_image, push, random_layer
from testbed.node import NodeProcess
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry
from testbed.takeover import Takeover, kill_the_fetcher

pytestmark = pytest.mark.integration


def _pull(base_url: str, name: str, tag: str, image: Image) -> None:
    """Pull an image as a client does and check every byte."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        manifest = http.get(f"/v2/{name}/manifests/{tag}")
        assert manifest.status_code == 200, manifest.text
        assert manifest.content == image.manifest
        for digest, data in image.blobs.items():
            body = http.get(f"/v2/{name}/blobs/{digest}").content
            assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
            assert len(body) == len(data)


def _wait_for_every_worker_to_reach_the_coordinator(node: NodeProcess) -> None:
    """Wait until the node's workers answer a call that needs the coordinator, many times in a row.

    ``/debug/vars`` asks the coordinator from whichever worker accepts the
    connection; a fresh connection each time lets every worker's turn come.
    """
    streak = 0

    def answered() -> bool:
        nonlocal streak
        with httpx.Client(timeout=5) as http:
            ok = http.get(node.url + "/debug/vars").status_code == 200
        streak = streak + 1 if ok else 0
        return streak >= 16

    wait_until(answered, timeout=20, message=f"{node.url}: the coordinator is not reachable from every worker")


def _upstream_gets(registry: DistributionRegistry, name: str, image: Image) -> dict[str, int]:
    paths = [f"/v2/{name}/blobs/{digest}" for digest in image.blobs]
    paths.append(f"/v2/{name}/manifests/{image.digest}")
    return {path: registry.count("GET", path) for path in paths}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry) -> Iterator[Cluster]:
    """One cluster for the tests that leave it as they found it (each uses its own repository)."""
    with Cluster(tmp_path_factory.mktemp("cluster"), upstream_registry.url) as started:
        yield started


def test_cold_burst_fetches_everything_once(cluster: Cluster, upstream_registry: DistributionRegistry) -> None:
    image = build_image([4_000_000, 2_000_000, 1_000_000, 300_000, 20_000], seed="burst-32")
    push(upstream_registry.url, "cluster/burst", "v1", image)
    urls = [node.url for node in cluster.nodes]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: _pull(urls[i % 3], "cluster/burst", "v1", image), range(32)))
    elapsed = time.perf_counter() - started

    counts = _upstream_gets(upstream_registry, "cluster/burst", image)
    wait_until(lambda: all(_upstream_gets(upstream_registry, "cluster/burst", image).values()), message="no GETs")
    counts = _upstream_gets(upstream_registry, "cluster/burst", image)
    assert counts == dict.fromkeys(counts, 1), counts
    assert upstream_registry.count("HEAD", "/v2/cluster/burst/manifests/v1") == 1
    print(f"\n32 clients over 3 nodes: {elapsed:.2f}s, upstream GETs per item: {set(counts.values())}")
    for node in cluster.nodes:
        verify_store(node)


def test_later_pulls_come_from_peers(cluster: Cluster, upstream_registry: DistributionRegistry) -> None:
    image = build_image([500_000, 10_000], seed="peers")
    push(upstream_registry.url, "cluster/peers", "v1", image)
    _pull(cluster.nodes[0].url, "cluster/peers", "v1", image)
    _pull(cluster.nodes[1].url, "cluster/peers", "v1", image)
    _pull(cluster.nodes[2].url, "cluster/peers", "v1", image)
    counts = _upstream_gets(upstream_registry, "cluster/peers", image)
    assert counts == dict.fromkeys(counts, 1), counts
    for digest in image.blobs:
        wait_until(lambda digest=digest: digest in cluster.nodes[2].stored_digests(), message=f"{digest} not stored")
        wait_until(lambda digest=digest: len(cluster.holders(digest)) == 3, message=f"{digest} not on every node")


def test_follower_on_another_node_streams_while_the_leader_fetches(tmp_path: Path) -> None:
    data = random_layer(6 * 1024 * 1024, seed="follower")
    with FakeUpstream() as upstream, Cluster(tmp_path, upstream.url, nodes=2) as cluster:
        digest = upstream.add_blob("cluster/follow", data)
        gate = threading.Event()
        fault = upstream.set_fault(digest, gate=gate, chunk_size=256 * 1024)
        path = f"/v2/cluster/follow/blobs/{digest}"
        with httpx.Client(timeout=60) as http, http.stream("GET", cluster.nodes[0].url + path) as leader:
            assert fault.reached.wait(20)
            asked = time.perf_counter()
            with http.stream("GET", cluster.nodes[1].url + path) as follower:
                chunks = follower.iter_raw()
                first = next(chunks)
                first_byte = time.perf_counter() - asked
                assert not gate.is_set(), "the follower waited for the whole layer"
                assert first == data[: len(first)]
                gate.set()
                follower_body = first + b"".join(chunks)
            leader_body = leader.read()
        assert leader_body == follower_body == data
        assert upstream.count("GET", path) == 1
        print(f"\nfollower time to first byte: {first_byte * 1000:.1f} ms")


def test_content_expires_from_every_node_after_its_ttl(tmp_path: Path, upstream_registry: DistributionRegistry) -> None:
    image = build_image([200_000], seed="ttl")
    push(upstream_registry.url, "cluster/ttl", "v1", image)
    layer = image.layer_digests[0]
    settings = {"upstream": {"ttl": "3s", "tag_ttl": "1h"}}
    with Cluster(tmp_path, upstream_registry.url, nodes=2, node_settings=settings) as cluster:
        path = f"/v2/cluster/ttl/blobs/{layer}"
        for node in cluster.nodes:
            assert httpx.get(node.url + path, timeout=30).content == image.blobs[layer]
        wait_until(lambda: len(cluster.holders(layer)) == 2, message="both nodes should hold the layer")
        for node in cluster.nodes:
            wait_until(lambda node=node: layer not in node.stored_digests(), timeout=20, message="not evicted")
        assert cluster.holders(layer) == set()
        assert httpx.get(cluster.nodes[0].url + path, timeout=30).content == image.blobs[layer]
        assert upstream_registry.count("GET", path) == 2


def test_another_coordinator_sweeps_when_the_leader_stops(
    tmp_path: Path, upstream_registry: DistributionRegistry
) -> None:
    image = build_image([100_000], seed="failover")
    push(upstream_registry.url, "cluster/failover", "v1", image)
    layer = image.layer_digests[0]
    settings = {"upstream": {"ttl": "3s"}}
    with Cluster(tmp_path, upstream_registry.url, nodes=2, coordinators=2, node_settings=settings) as cluster:
        redis = cluster.redis.client()
        leader_id = wait_until(lambda: redis.get(cluster.keys.leader()), message="no leader elected")
        leader = next(c for c in cluster.coordinators if leader_id in c.log_text())
        leader.stop()
        path = f"/v2/cluster/failover/blobs/{layer}"
        assert httpx.get(cluster.nodes[0].url + path, timeout=30).content == image.blobs[layer]
        wait_until(lambda: cluster.holders(layer) == {"node-1"}, message="the layer was not registered")
        wait_until(lambda: layer not in cluster.nodes[0].stored_digests(), timeout=20, message="no sweep")
        assert redis.get(cluster.keys.leader()) not in (None, leader_id)


# The fetcher killed mid-fetch (testbed/takeover.py): a blob of 32 MiB paced at
# 20 MB/s, node-1 killed 4 MiB in, with the lease lifetime nodes ship with.
TAKEOVER_SIZE = 32 * 1024 * 1024
TAKEOVER_RATE = 20e6
TAKEOVER_SETTINGS = {"cluster": {"lease_ttl": f"{ClusterConfig().lease_ttl}s"}}


def _took_over(tmp_path: Path, **scenario: bool) -> Takeover:
    taken = kill_the_fetcher(
        tmp_path,
        size=TAKEOVER_SIZE,
        rate=TAKEOVER_RATE,
        kill_at=4 * 1024 * 1024,
        node_settings=TAKEOVER_SETTINGS,
        **scenario,
    )
    print(
        f"\nkill to node-2's takeover {taken.taken_over:.2f}s, to its complete response {taken.seconds:.2f}s;"
        f" upstream sent {taken.blobs:.3f} blobs"
    )
    # The target is the transfer plus 3 s; asserted at three times that, for noisy machines.
    assert taken.seconds <= 3 * (taken.transfer + 3.0)
    # The lease is taken over within about 3 s of the death (the 10 s lease of before took 7 to 10 s).
    assert taken.taken_over <= 2 * 3.0
    return taken


def test_a_follower_of_a_killed_fetcher_takes_over_and_resumes_with_a_range(tmp_path: Path) -> None:
    taken = _took_over(tmp_path)
    # node-2 asked only for the bytes it did not have: the ones it had came
    # once. What the upstream sent node-1 beyond them (in buffers at the kill)
    # depends on the machine's load; bench.takeover measures it (1.005 blobs).
    assert taken.ranged and taken.resumed_at > 0
    assert taken.blobs <= 1.2


def test_a_follower_of_a_killed_fetcher_reads_past_what_it_has_when_the_upstream_ignores_range(
    tmp_path: Path,
) -> None:
    taken = _took_over(tmp_path, honour_range=False)
    assert taken.blobs <= 1.2


def test_a_request_after_the_fetcher_was_killed_is_taken_over_within_the_lease(tmp_path: Path) -> None:
    taken = _took_over(tmp_path, follow=False)
    assert not taken.ranged
    assert taken.blobs <= 1.2


def test_nodes_serve_and_fetch_while_the_coordinator_is_down(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    cached = build_image([300_000, 5_000], seed="coordinator-down-cached")
    fresh = build_image([200_000], seed="coordinator-down-fresh")
    push(upstream_registry.url, "cluster/down", "cached", cached)
    push(upstream_registry.url, "cluster/down", "fresh", fresh)
    for node in cluster.nodes:
        _pull(node.url, "cluster/down", "cached", cached)
    before = _upstream_gets(upstream_registry, "cluster/down", cached)

    cluster.coordinators[0].stop()
    for node in cluster.nodes:
        _pull(node.url, "cluster/down", "cached", cached)
    assert _upstream_gets(upstream_registry, "cluster/down", cached) == before
    _pull(cluster.nodes[0].url, "cluster/down", "fresh", fresh)
    assert upstream_registry.count("GET", f"/v2/cluster/down/blobs/{fresh.layer_digests[0]}") == 1

    cluster.coordinators[0].start()
    # The node that fetched on its own announces it once the coordinator is back.
    wait_until(lambda: "node-1" in cluster.holders(fresh.layer_digests[0]), timeout=20, message="no re-announce")
    # Each worker of node-3 tried the coordinator while it was down; until its
    # channel's reconnect backoff (at most 2 s) runs out it is still degraded.
    _wait_for_every_worker_to_reach_the_coordinator(cluster.nodes[2])
    _pull(cluster.nodes[2].url, "cluster/down", "fresh", fresh)
    assert upstream_registry.count("GET", f"/v2/cluster/down/blobs/{fresh.layer_digests[0]}") == 1


def _timed_get(http: httpx.Client, url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    response = http.get(url)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started, response.content


def _node_counter(node: NodeProcess, counter: str) -> int | None:
    """A counter of the node as the coordinator holds it; None while /debug/vars cannot reach one."""
    response = httpx.get(f"{node.url}/debug/vars", timeout=10)
    if response.status_code != 200:
        return None
    return int(response.json()["shoal"]["nodes"].get(node.node_id, {}).get("counters", {}).get(counter, 0))


def _reachable(node: NodeProcess, address: str) -> float | None:
    """``shoal_coordinator_reachable`` for ``address`` on the node's /metrics, which answers without a coordinator."""
    response = httpx.get(f"{node.url}/metrics", timeout=10)
    assert response.status_code == 200
    wanted = f'shoal_coordinator_reachable{{address="{address}",node="{node.node_id}"}} '
    line = next((line for line in response.text.splitlines() if line.startswith(wanted)), None)
    return float(line.split()[-1]) if line is not None else None


def test_a_hung_coordinator_costs_one_deadline_and_its_return_is_noticed(
    tmp_path: Path, upstream_registry: DistributionRegistry
) -> None:
    """SIGSTOP: the coordinator's connections stay open and nothing answers.

    The node's two workers share what one of them found (``node.breaker``):
    the first miss pays at most one deadline, the later ones none, whichever
    worker serves them. After SIGCONT the node uses the coordinator again
    and announces what it fetched meanwhile.
    """
    deadline = float(TEST_NODE_SETTINGS["cluster"]["timeout"].removesuffix("s"))
    image = build_image([150_000, 100_000, 80_000, 60_000, 40_000, 20_000], seed="coordinator-hung")
    push(upstream_registry.url, "cluster/hung", "v1", image)
    after = build_image([30_000], seed="coordinator-hung-after")
    push(upstream_registry.url, "cluster/hung", "after", after)
    with Cluster(tmp_path, upstream_registry.url, nodes=1) as cluster:
        node, coordinator = cluster.nodes[0], cluster.coordinators[0]
        wait_until(lambda: _node_counter(node, "blob.misses") == 0, message="the node's counters never arrived")
        durations: list[float] = []
        coordinator.pause()
        try:
            for digest, data in image.blobs.items():
                # A connection each, so that both workers get their turns.
                with httpx.Client(base_url=node.url, timeout=60) as http:
                    took, body = _timed_get(http, f"/v2/cluster/hung/blobs/{digest}")
                assert body == data
                durations.append(took)
            assert _reachable(node, coordinator.address) == 0
        finally:
            coordinator.resume()
        resumed = time.perf_counter()
        print(f"\nmisses with the coordinator hung: {', '.join(f'{took:.3f}s' for took in durations)}")
        assert durations[0] < deadline * 2, "the first miss paid more than one deadline"
        assert all(took < deadline / 2 for took in durations[1:]), f"a later miss waited: {durations}"

        wait_until(lambda: _reachable(node, coordinator.address) == 1, timeout=10, message="the breaker stayed open")
        back = time.perf_counter() - resumed
        # What the node fetched on its own while degraded is announced.
        for digest in image.blobs:
            wait_until(
                lambda digest=digest: cluster.holders(digest) == {node.node_id},
                timeout=15,
                message=f"{digest} was not announced",
            )
        announced = time.perf_counter() - resumed
        print(f"coordinator used again {back:.2f}s after SIGCONT, inventory announced after {announced:.2f}s")
        # Each worker's count arrives with its next delta.
        wait_until(
            lambda: _node_counter(node, "blob.degraded") == len(image.blobs),
            timeout=15,
            message=lambda: f"{_node_counter(node, 'blob.degraded')} degraded decisions counted",
        )

        # Out of degraded mode: a fresh miss goes through the cluster.
        layer = after.layer_digests[0]
        assert httpx.get(f"{node.url}/v2/cluster/hung/blobs/{layer}", timeout=30).content == after.blobs[layer]
        wait_until(lambda: cluster.holders(layer) == {node.node_id}, message="the fresh miss was not registered")
        wait_until(lambda: _node_counter(node, "blob.misses") == len(image.blobs) + 1, message="misses not counted")
        assert _node_counter(node, "blob.degraded") == len(image.blobs)


def test_redis_restarted_empty_is_rebuilt_from_the_nodes(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    image = build_image([150_000], seed="redis-restart")
    push(upstream_registry.url, "cluster/redis", "v1", image)
    _pull(cluster.nodes[1].url, "cluster/redis", "v1", image)
    layer = image.layer_digests[0]
    wait_until(lambda: cluster.holders(layer) == {"node-2"}, message="not registered")

    redis = cluster.redis.client()
    redis.set("test:marker", "1")
    cluster.redis.restart()
    # Redis came back empty (the nodes may already be re-announcing).
    assert redis.get("test:marker") is None
    wait_until(lambda: cluster.holders(layer) == {"node-2"}, timeout=20, message="locations not rebuilt")
    wait_until(lambda: redis.zscore(cluster.keys.ttl(), layer) is not None, message="schedule not rebuilt")
    cluster.wait_for_members()


def test_a_node_with_the_wrong_secret_serves_but_cannot_join(
    cluster: Cluster, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    image = build_image([50_000], seed="wrong-secret")
    push(upstream_registry.url, "cluster/wrong-secret", "v1", image)
    settings = {"cluster": {"coordinators": [c.address for c in cluster.coordinators], "heartbeat_interval": "0.2s"}}
    stray = NodeProcess(
        tmp_path / "stray", upstream_registry.url, settings, env={"SHOAL_CLUSTER__SECRET": "not-the-secret-9f3a"}
    )
    try:
        _pull(stray.url, "cluster/wrong-secret", "v1", image)
        wait_until(lambda: "coordinator unusable" in stray.log_text(), message="no warning in the node's log")
        assert "not-the-secret-9f3a" not in stray.log_text()
        assert "stray" not in cluster.redis.client().smembers(cluster.keys.nodes())
        assert cluster.holders(image.layer_digests[0]) == set()
    finally:
        stray.stop()
