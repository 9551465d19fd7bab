"""``/metrics`` on a real coordinator: counters reported through the node's client, scraped with httpx.

The coordinator runs in-process (``CoordinatorServer`` with ``metrics_bind``
on a free port) against a real Redis; the scrape is parsed with
prometheus-client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import prometheus_client
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from coordinator.keys import Keys
from coordinator.server import CoordinatorServer
from node.coordinator_client import CoordinatorClient
from testbed.clock import FakeClock
from testbed.processes import free_port
from testbed.redis_server import RedisServer
from tests.coordinator.digests import digest
from tests.coordinator.test_servicer import SECRET, make_config

LAYER = digest("layer")
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def server(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Iterator[CoordinatorServer]:
    with CoordinatorServer(make_config(keys), client=redis_client, clock=clock) as running:
        yield running


def node(server: CoordinatorServer, node_id: str) -> CoordinatorClient:
    client = CoordinatorClient([server.address], SECRET, node_id)
    client.register(f"http://{node_id}:5000")
    return client


def scrape(server: CoordinatorServer, path: str = "/metrics") -> httpx.Response:
    return httpx.get(f"http://{server.metrics_address}{path}", timeout=5)


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_scrape_renders_node_and_cluster_counters_from_redis(
    server: CoordinatorServer, redis_client: redis.Redis, keys: Keys
) -> None:
    with node(server, "n1") as n1, node(server, "n2") as n2:
        n1.report_metrics("worker-1", 1, {"blob.requests": 5, "blob.hits": 3, "manifest.hits": 1})
        n1.report_metrics("worker-2", 1, {"blob.hits": 2, "upstream.blob.2xx.ghcr.io": 4})
        n2.report_metrics("worker-1", 1, {"blob.hits": 10, "evictions.ttl": 2})
        lease = n1.acquire_lease(f"blob:{LAYER}", 30_000)
        n1.complete_fetch(f"blob:{LAYER}", lease.token, LAYER, 1234, LAYER_TYPE, 3_600_000)
    redis_client.delete(keys.node("n2"))  # n2's membership expired.

    response = scrape(server)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    assert value(found, "registry_proxy_hits_total", type="blob", node="n1") == 5
    assert value(found, "registry_proxy_hits_total", type="blob", node="n2") == 10
    assert value(found, "registry_proxy_hits_total", type="manifest", node="n1") == 1
    assert value(found, "registry_proxy_requests_total", type="blob", node="n1") == 5
    assert value(found, "shoal_cluster_hits_total", type="blob") == 15
    assert value(found, "shoal_cluster_hits_total", type="manifest") == 1
    assert (
        value(found, "shoal_upstream_requests_total", kind="blob", node="n1", registry="ghcr.io", **{"class": "2xx"})
        == 4
    )
    assert value(found, "shoal_cluster_evictions_total", reason="ttl") == 2
    assert value(found, "shoal_node_up", node="n1") == 1
    assert value(found, "shoal_node_up", node="n2") == 0
    assert value(found, "shoal_cluster_cached_distinct_bytes") == 1234


def test_every_scrape_reads_redis_again(server: CoordinatorServer) -> None:
    before = samples(scrape(server).text)
    assert value(before, "shoal_cluster_hits_total", type="blob") == 0
    assert value(before, "shoal_cluster_cached_distinct_bytes") == 0

    with node(server, "n1") as n1:
        n1.report_metrics("worker-1", 1, {"blob.hits": 3})
        n1.report_metrics("worker-1", 1, {"blob.hits": 3})  # A retry: counted once.

    after = samples(scrape(server).text)
    assert value(after, "registry_proxy_hits_total", type="blob", node="n1") == 3
    assert value(after, "shoal_cluster_hits_total", type="blob") == 3


def test_only_the_metrics_path_is_served_and_nothing_goes_to_the_global_registry(server: CoordinatorServer) -> None:
    assert scrape(server, "/").status_code == 404
    assert scrape(server, "/metricsx").status_code == 404
    assert scrape(server).status_code == 200
    assert b"shoal_cluster" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_redis_down_answers_503_until_it_is_back(
    tmp_path: Path, keys: Keys, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        RedisServer(tmp_path / "redis") as own_redis,
        own_redis.client() as client,
        CoordinatorServer(make_config(keys), client=client, clock=clock) as server,
    ):
        assert scrape(server).status_code == 200
        own_redis.stop()

        first, second = scrape(server), scrape(server)

        assert first.status_code == second.status_code == 503
        assert "cannot reach Redis" in first.text
        assert caplog.text.count("/metrics answers 503") == 1, "logged once per outage"
        own_redis.start()
        assert scrape(server).status_code == 200


def test_empty_metrics_bind_disables_the_endpoint(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
    with CoordinatorServer(make_config(keys, metrics_bind=""), client=redis_client, clock=clock) as server:
        assert server.metrics_server is None
        assert server.metrics_port is None and server.metrics_address is None


def test_a_port_in_use_fails_at_once_and_holds_no_other_port(
    redis_client: redis.Redis, keys: Keys, clock: FakeClock
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port))
        taken.listen()
        config = make_config(keys, bind=f"127.0.0.1:{grpc_port}", metrics_bind=f"127.0.0.1:{metrics_port}")
        with pytest.raises(OSError, match=f"cannot serve /metrics on 127.0.0.1:{metrics_port}"):
            CoordinatorServer(config, client=redis_client, clock=clock)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", grpc_port))
        taken.listen()
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{grpc_port}"):
            CoordinatorServer(config, client=redis_client, clock=clock)
    # Neither failure left a port behind: both are free for a server that starts.
    with CoordinatorServer(config, client=redis_client, clock=clock) as server:
        assert (server.port, server.metrics_port) == (grpc_port, metrics_port)
        assert scrape(server).status_code == 200


def test_close_is_idempotent_and_frees_the_port(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
    never_started = CoordinatorServer(make_config(keys), client=redis_client, clock=clock)
    never_started.close()
    never_started.close()

    server = CoordinatorServer(make_config(keys), client=redis_client, clock=clock)
    server.start()
    assert scrape(server).status_code == 200
    server.close()
    server.close()
    with pytest.raises(httpx.ConnectError):
        scrape(server)
