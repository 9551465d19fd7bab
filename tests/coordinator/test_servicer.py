"""The coordinator end to end: a real gRPC server and Redis, driven through the node's client.

Most tests run the server in-process (``CoordinatorServer`` on a free port,
with the fake clock) so that they can move time; the last ones run the real
``python -m coordinator.server`` process to check its command line and its
graceful stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis

from coordinator.config import CoordinatorConfig
from coordinator.keys import Keys
from coordinator.server import CoordinatorServer
from node.coordinator_client import (
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnavailable,
    Lease,
    LeaseLost,
)
from protos.leases import blob_lease
from protos.values import Content, Holder, TagPointer
from testbed.clock import FakeClock
from testbed.processes import Process, free_port, require_binary, wait_until
from testbed.redis_server import RedisServer
from tests.coordinator.digests import digest

SECRET = "cluster-secret-for-tests-7f3a"
HOUR_MS = 3600 * 1000
LAYER = digest("layer")
LAYER_KEY = blob_lease(LAYER)
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ROOT = Path(__file__).resolve().parents[2]


def make_config(keys: Keys, **overrides: object) -> CoordinatorConfig:
    settings: dict[str, object] = {
        "bind": "127.0.0.1:0",
        # Never the fixed default port: tests and other coordinators run side by side.
        "metrics_bind": "127.0.0.1:0",
        "key_prefix": keys.prefix,
        "cluster_secret": SECRET,
        # The tests run sweeps themselves, with the fake clock.
        "scheduler_interval": 60.0,
        "leader_lease": 120.0,
        "default_ttl": 3600.0,
        "shutdown_grace": 1.0,
        **overrides,
    }
    return CoordinatorConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
def server(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Iterator[CoordinatorServer]:
    with CoordinatorServer(make_config(keys), client=redis_client, clock=clock) as running:
        yield running


def connect(server: CoordinatorServer, node_id: str = "node-a", **options: object) -> CoordinatorClient:
    return CoordinatorClient([server.address], SECRET, node_id, **options)  # type: ignore[arg-type]


@pytest.fixture
def node_a(server: CoordinatorServer) -> Iterator[CoordinatorClient]:
    with connect(server, "node-a") as client:
        client.register("http://a:5000")
        yield client


@pytest.fixture
def node_b(server: CoordinatorServer) -> Iterator[CoordinatorClient]:
    with connect(server, "node-b") as client:
        client.register("http://b:5000")
        yield client


def test_fetch_locate_expire_evict(
    server: CoordinatorServer, node_a: CoordinatorClient, node_b: CoordinatorClient, clock: FakeClock
) -> None:
    assert node_a.heartbeat("http://a:5000") == (True, [])

    lease = node_a.acquire_lease(LAYER_KEY, 30_000)
    assert lease.granted and lease.token and lease.fence > 0 and lease.holder is None
    blocked = node_b.acquire_lease(LAYER_KEY, 30_000)
    assert not blocked.granted and blocked.holder == Holder("node-a", "http://a:5000")

    following = node_b.locate(LAYER, LAYER_KEY)
    assert following.fetching and following.fetcher == Holder("node-a", "http://a:5000")
    assert following.holders == [] and following.content is None

    node_a.complete_fetch(LAYER_KEY, lease.token, LAYER, 1234, LAYER_TYPE, HOUR_MS)
    found = node_b.locate(LAYER, LAYER_KEY)
    assert found.holders == [Holder("node-a", "http://a:5000")]
    assert not found.fetching and found.fetcher is None
    assert found.content == Content(LAYER, 1234, LAYER_TYPE)

    clock.advance(3600)
    assert server.scheduler.run_once()
    assert node_a.heartbeat("http://a:5000") == (True, [LAYER])
    assert node_b.locate(LAYER).holders == []


def test_an_unknown_node_is_told_to_register(server: CoordinatorServer) -> None:
    with connect(server, "node-new") as client:
        assert client.heartbeat("http://new:5000") == (False, [])
        assert client.register("http://new:5000") == 10.0
        assert client.heartbeat("http://new:5000") == (True, [])


def test_fencing_through_the_client(node_a: CoordinatorClient, node_b: CoordinatorClient) -> None:
    stale = node_a.acquire_lease(LAYER_KEY, 50)
    tag_lease = "tag:docker.io/library/alpine:3.20"
    stale_tag = node_a.acquire_lease(tag_lease, 50)

    fresh = acquire_when_free(node_b, LAYER_KEY)
    fresh_tag = acquire_when_free(node_b, tag_lease)
    assert fresh.fence > stale.fence

    with pytest.raises(LeaseLost):
        node_a.complete_fetch(LAYER_KEY, stale.token, LAYER, 1234, LAYER_TYPE, HOUR_MS)
    with pytest.raises(LeaseLost):
        node_a.put_tag("docker.io", "library/alpine", "3.20", TagPointer(digest("stale")), stale_tag.token)

    node_b.put_tag(
        "docker.io", "library/alpine", "3.20", TagPointer(digest("fresh"), size=7), fresh_tag.token, release=True
    )
    assert node_a.acquire_lease(tag_lease, 1000).granted, "the releasing PutTag freed the tag's lease"
    node_b.complete_fetch(LAYER_KEY, fresh.token, LAYER, 1234, LAYER_TYPE, HOUR_MS)
    assert [h.node_id for h in node_a.locate(LAYER).holders] == ["node-b"]
    pointer = node_a.get_tag("docker.io", "library/alpine", "3.20")
    assert pointer is not None and pointer.digest == digest("fresh") and pointer.size == 7


def acquire_when_free(client: CoordinatorClient, key: str) -> Lease:
    """Acquire ``key`` as soon as the lease that holds it runs out."""

    def attempt() -> Lease | None:
        lease = client.acquire_lease(key, 30_000)
        return lease if lease.granted else None

    lease = wait_until(attempt, timeout=5, message=f"the lease on {key} never expired")
    assert lease is not None
    return lease


def test_renew_and_abort(node_a: CoordinatorClient, node_b: CoordinatorClient) -> None:
    lease = node_a.acquire_lease(LAYER_KEY, 30_000)

    assert node_a.renew_lease(LAYER_KEY, lease.token, 60_000)
    assert not node_b.renew_lease(LAYER_KEY, "not-the-token", 60_000)
    node_b.abort_fetch(LAYER_KEY, "not-the-token")
    assert not node_b.acquire_lease(LAYER_KEY, 30_000).granted

    node_a.abort_fetch(LAYER_KEY, lease.token)
    assert not node_a.renew_lease(LAYER_KEY, lease.token, 60_000)
    assert node_b.acquire_lease(LAYER_KEY, 30_000).granted


def test_a_fetch_given_up_with_a_failure_is_reported_to_its_followers_until_the_next_grant(
    node_a: CoordinatorClient, node_b: CoordinatorClient
) -> None:
    lease = node_a.acquire_lease(LAYER_KEY, 30_000)
    assert node_b.locate(LAYER, LAYER_KEY).failure == ""
    node_a.abort_fetch(LAYER_KEY, lease.token, "upstream http://registry.test: below upstream.min_rate")

    following = node_b.locate(LAYER, LAYER_KEY)
    assert not following.fetching and following.failure == "upstream http://registry.test: below upstream.min_rate"
    # The lease is free at once; taking it means a new fetch, whose followers hear of no failure.
    assert node_b.acquire_lease(LAYER_KEY, 30_000).granted
    assert node_a.locate(LAYER, LAYER_KEY).failure == ""


def test_announce_drop_and_touch(
    server: CoordinatorServer, node_a: CoordinatorClient, node_b: CoordinatorClient, clock: FakeClock
) -> None:
    kept, dropped = digest("kept"), digest("dropped")
    assert node_a.announce_inventory([Content(kept, 1), Content(dropped, 2)]) == []
    node_b.announce_inventory([Content(kept, 1)], ttl_ms=0)
    node_a.drop_content([dropped])
    assert node_b.locate(dropped).holders == []
    assert node_a.add_content([Content(dropped, 2)], ttl_ms=10 * HOUR_MS) == []
    assert [h.node_id for h in node_b.locate(dropped).holders] == ["node-a"]

    # Node b reports node a's copy as bad: only that registration goes.
    assert node_b.report_bad_copy("node-a", dropped)
    assert node_b.locate(dropped).holders == []
    assert not node_b.report_bad_copy("node-a", dropped)
    assert [h.node_id for h in node_b.locate(kept).holders] == ["node-a", "node-b"]
    with pytest.raises(CoordinatorError, match="not its own"):
        node_a.report_bad_copy("node-a", kept)

    clock.advance(3000)
    node_b.touch([kept])
    clock.advance(1000)
    server.scheduler.run_once()
    assert node_a.heartbeat("http://a:5000") == (True, []), "the touch moved the expiry"
    assert len(node_b.locate(kept).holders) == 2


def test_metrics_are_idempotent_through_the_client(node_a: CoordinatorClient, node_b: CoordinatorClient) -> None:
    node_a.report_metrics("worker-1", 1, {"blobs.requests": 2, "blobs.hits": 1})
    node_a.report_metrics("worker-1", 1, {"blobs.requests": 2, "blobs.hits": 1})
    node_b.report_metrics("worker-1", 1, {"blobs.requests": 5})

    metrics = node_a.get_metrics()

    assert metrics.cluster == {"blobs.requests": 7, "blobs.hits": 1}
    assert {node.node_id: (node.counters, node.live) for node in metrics.nodes} == {
        "node-a": ({"blobs.requests": 2, "blobs.hits": 1}, True),
        "node-b": ({"blobs.requests": 5}, True),
    }


def test_bindings_confirmed_by_one_node_are_seen_by_another(
    node_a: CoordinatorClient, node_b: CoordinatorClient
) -> None:
    layer, config = digest("bound-layer"), digest("bound-config")
    node_a.confirm_bindings("docker.io", "library/alpine", [layer, config], 60_000)
    node_a.confirm_bindings("docker.io", "library/forever", [layer], 0)

    found = node_b.get_bindings("docker.io", "library/alpine", [layer, config, digest("other")])

    assert set(found) == {layer, config} and all(55_000 < ttl <= 60_000 for ttl in found.values())
    assert node_b.get_bindings("docker.io", "library/forever", [layer, config]) == {layer: 0}
    assert node_b.get_bindings("docker.io", "someone/else", [layer]) == {}
    with pytest.raises(CoordinatorError) as caught:
        node_b.confirm_bindings("docker.io", "library/alpine", ["sha256:nope"], 1000)
    assert caught.value.code == "INVALID_ARGUMENT"


def test_bad_requests_are_invalid_arguments(node_a: CoordinatorClient) -> None:
    with pytest.raises(CoordinatorError) as caught:
        node_a.locate("not-a-digest")
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "digest" in str(caught.value)

    with pytest.raises(CoordinatorError) as caught:
        node_a.acquire_lease(LAYER_KEY, 0)
    assert caught.value.code == "INVALID_ARGUMENT"


def test_calls_without_the_secret_are_unauthenticated(
    server: CoordinatorServer, node_a: CoordinatorClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-c41d"

    with grpc.insecure_channel(server.address) as channel:
        get_metrics = channel.unary_unary("/shoal.v1.Coordinator/GetMetrics")
        with pytest.raises(grpc.RpcError) as no_secret:
            get_metrics(b"", timeout=2)
        assert no_secret.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as bad_scheme:
            get_metrics(b"", timeout=2, metadata=(("authorization", SECRET),))
        assert bad_scheme.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with CoordinatorClient([server.address], wrong, "node-a") as impostor, pytest.raises(CoordinatorError) as caught:
        impostor.get_metrics()
    assert caught.value.code == "UNAUTHENTICATED"
    assert wrong not in str(caught.value) and SECRET not in str(caught.value)

    node_a.get_metrics()  # The right secret still works.
    assert "rejected a call to /shoal.v1.Coordinator/GetMetrics" in caplog.text
    assert SECRET not in caplog.text and wrong not in caplog.text


def test_the_client_fails_over_to_a_live_coordinator(server: CoordinatorServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with CoordinatorClient([dead, server.address], SECRET, "node-a") as client:
        assert client.register("http://a:5000") == 10.0
        assert client.heartbeat("http://a:5000") == (True, [])


def test_no_live_coordinator_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with (
        CoordinatorClient(addresses, SECRET, "node-a", timeout=1.0) as client,
        pytest.raises(CoordinatorUnavailable) as caught,
    ):
        client.get_metrics()
    assert all(address in str(caught.value) for address in addresses)
    assert SECRET not in str(caught.value) and SECRET not in caplog.text


def test_channels_are_made_on_first_use_and_close_is_idempotent(server: CoordinatorServer) -> None:
    client = connect(server)
    assert client._channels == [], "no channel may exist before the first call (fork safety)"
    assert SECRET not in repr(client)
    client.get_metrics()
    client.close()
    client.close()
    with pytest.raises(CoordinatorError):
        client.get_metrics()


def test_nodes_reannounce_after_redis_restarts_empty(tmp_path: Path, keys: Keys, clock: FakeClock) -> None:
    with (
        RedisServer(tmp_path / "redis") as own_redis,
        own_redis.client() as client,
        CoordinatorServer(make_config(keys), client=client, clock=clock) as server,
        connect(server, "node-a") as node,
    ):
        node.register("http://a:5000")
        node.announce_inventory([Content(LAYER, 1234, LAYER_TYPE)])

        own_redis.stop()
        with pytest.raises(CoordinatorUnavailable):
            node.heartbeat("http://a:5000")

        own_redis.start()
        answer = wait_until(
            lambda: _heartbeat_or_none(node), timeout=10, message="the coordinator never reached Redis again"
        )
        assert answer == (False, []), "Redis lost everything, so the node must register again"
        node.register("http://a:5000")
        assert node.announce_inventory([Content(LAYER, 1234, LAYER_TYPE)]) == []

        found = node.locate(LAYER)
        assert found.holders == [Holder("node-a", "http://a:5000")]
        assert found.content == Content(LAYER, 1234, LAYER_TYPE)
        assert client.zscore(keys.ttl(), LAYER) is not None, "the schedule was rebuilt"


def _heartbeat_or_none(node: CoordinatorClient) -> tuple[bool, list[str]] | None:
    try:
        return node.heartbeat("http://a:5000")
    except CoordinatorUnavailable:
        return None


def test_tls(tmp_path: Path, redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> None:
    openssl = require_binary("openssl", "openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    config = make_config(keys, tls_cert=str(cert), tls_key=str(key))
    with CoordinatorServer(config, client=redis_client, clock=clock) as server:
        with connect(server, tls_ca=str(cert)) as secure:
            assert secure.register("http://a:5000") == 10.0
        with connect(server, timeout=1.0) as plaintext, pytest.raises(CoordinatorUnavailable):
            plaintext.get_metrics()


def test_the_server_process_stops_gracefully_on_sigterm(tmp_path: Path, redis_server: RedisServer, keys: Keys) -> None:
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "shoal.yaml"
    config.write_text(
        "node:\n  ignored: true\n"
        "coordinator:\n"
        f"  redis_url: {redis_server.url}\n"
        f"  metrics_bind: 127.0.0.1:{metrics_port}\n"
        f"  key_prefix: '{keys.prefix}'\n"
        f"  cluster_secret: {SECRET}\n"
        "  shutdown_grace: 2s\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "coordinator.server", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
    with Process(command, tmp_path / "coordinator.log", env=env, cwd=ROOT) as process:
        with CoordinatorClient([f"127.0.0.1:{port}"], SECRET, "node-a") as client:
            wait_until(
                lambda: _answers(client, process),
                timeout=15,
                message=lambda: f"the coordinator never answered\n{process.describe()}",
            )
            client.register("http://a:5000")
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert scrape.status_code == 200 and "shoal_node_up" in scrape.text

        process.popen.send_signal(signal.SIGTERM)
        code = process.popen.wait(timeout=10)

    # Python reports death by an unhandled SIGTERM as -15; the handler makes it 0.
    assert code == 0, process.describe()
    log = process.log_text()
    assert "received SIGTERM, stopping" in log and "stopped" in log
    assert SECRET not in log
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # The port is free again.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)


def _answers(client: CoordinatorClient, process: Process) -> bool:
    if not process.alive():
        raise RuntimeError(f"the coordinator exited\n{process.describe()}")
    try:
        client.get_metrics()
    except CoordinatorUnavailable:
        return False
    return True


def test_a_bad_config_exits_with_a_message_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "shoal.yaml"
    config.write_text("coordinator:\n  cluster_secret: x\n  membership_ttl: soon\n")
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.server", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "coordinator.membership_ttl: expected a duration such as 30s" in result.stderr


def test_an_inventory_of_100000_digests_is_announced_complete(
    node_a: CoordinatorClient, redis_client: redis.Redis, keys: Keys
) -> None:
    """One message of them all would pass gRPC's 4 MiB at about 38,000 digests; batches carry any number."""
    stale = [Content(digest(f"stale-{i}"), 1) for i in range(3)]
    node_a.announce_inventory(stale)
    inventory = [Content(digest(i), 1000 + i, LAYER_TYPE, accessed_at=0.0) for i in range(100_000)]

    assert node_a.announce_inventory(inventory) == []

    held = redis_client.smembers(keys.held("node-a"))
    assert len(held) == 100_000
    assert held == {item.digest for item in inventory}
    # Live holders only: the batches kept the node a member however long they took.
    assert [h.node_id for h in node_a.locate(inventory[-1].digest).holders] == ["node-a"]
    assert node_a.locate(stale[0].digest).holders == []
    # Nothing of the announcement is left in Redis but the small marker that it ended (which expires).
    assert not redis_client.exists(
        keys.announcing("node-a"), keys.announcing_id("node-a"), keys.announcing_cursor("node-a")
    )
