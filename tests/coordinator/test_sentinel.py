"""The coordinator reaching Redis through Sentinel, with redis-py's own support.

A real master, a real replica and a real sentinel (``redis-server --sentinel``)
run on free ports, and a real coordinator process is configured with the
sentinel alone: it can reach Redis only by asking the sentinel where the
master is. The node's ``CoordinatorClient`` drives it, and redis-py reads
what landed in Redis, straight from the server that holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import yaml

from coordinator.keys import Keys
from node.coordinator_client import CoordinatorClient, CoordinatorUnavailable
from protos.values import Content, Holder
from testbed.cluster import SECRET
from testbed.processes import Process, free_port, require_binary, wait_until

pytestmark = pytest.mark.integration

T = TypeVar("T")

SERVICE = "shoal"
NODE_ID = "node-a"
NODE_URL = "http://127.0.0.1:5001"
MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
TTL_MS = 3_600_000
KEYS = Keys("shoal:")


def _digest(seed: str) -> str:
    return f"sha256:{hashlib.sha256(seed.encode()).hexdigest()}"


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=1)


def _answers_ping(process: Process, port: int) -> bool:
    if not process.alive():
        raise RuntimeError(f"redis-server exited before answering PING\n{process.describe()}")
    try:
        with _client(port) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def _start_redis(directory: Path, port: int, *args: str) -> Process:
    """A redis-server (or, with a config file and ``--sentinel``, a sentinel) answering PING on ``port``."""
    binary = require_binary("redis-server", "redis-server")
    directory.mkdir(parents=True, exist_ok=True)
    process = Process([binary, *args], directory / "redis.log", cwd=directory)
    try:
        wait_until(lambda: _answers_ping(process, port), timeout=10, message=lambda: process.describe())
    except BaseException:
        process.stop()
        raise
    return process


def _start_server(directory: Path, port: int, *args: str) -> Process:
    """A data server in memory only, so that nothing but replication carries data across a failover."""
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return _start_redis(directory, port, *options, "--dir", str(directory), *args)


def _start_sentinel(directory: Path, port: int, master_port: int) -> Process:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"
    # Sentinel rewrites its config file with what it learns (replicas, the
    # epoch, a new master), so it is a file of its own in a writable folder.
    config.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {directory}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {SERVICE} 500\n"
        f"sentinel failover-timeout {SERVICE} 5000\n"
    )
    return _start_redis(directory, port, str(config), "--sentinel")


def _start_coordinator(directory: Path, sentinel_port: int) -> tuple[Process, str]:
    """``shoal coordinator`` with sentinels and no redis_url; returns it and its address once it answers."""
    directory.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    config = directory / "coordinator.yml"
    settings = {
        "bind": address,
        "sentinels": [f"127.0.0.1:{sentinel_port}"],
        "sentinel_service": SERVICE,
        "metrics_bind": "127.0.0.1:0",
        # Longer than any failover here, so the node's membership survives one
        # and what the new master holds can be read back through Locate.
        "membership_ttl": "60s",
        "scheduler_interval": "0.2s",
        "leader_lease": "1s",
    }
    config.write_text(yaml.safe_dump({"coordinator": settings}))
    env = dict(os.environ, SHOAL_COORDINATOR__CLUSTER_SECRET=SECRET)
    process = Process(
        [sys.executable, "-m", "shoal", "coordinator", "--config", config], directory / "coordinator.log", env=env
    )

    def answers() -> bool:
        if not process.alive():
            raise RuntimeError(f"coordinator exited:\n{process.describe()}")
        # GetMetrics reads Redis, so an answer means the sentinel was found
        # and the master it named was reached.
        with CoordinatorClient([address], SECRET, "probe", timeout=1) as probe:
            try:
                probe.get_metrics()
            except CoordinatorUnavailable:
                return False
            return True

    try:
        wait_until(answers, timeout=20, message=lambda: f"the coordinator did not answer\n{process.describe()}")
    except BaseException:
        process.stop()
        raise
    return process, address


def _replica_online(master_port: int, replica_port: int) -> bool:
    with _client(master_port) as master:
        replication = master.info("replication")
    return any(
        isinstance(entry, dict) and entry.get("port") == replica_port and entry.get("state") == "online"
        for name, entry in replication.items()
        if name.startswith("slave")
    )


@dataclass
class Deployment:
    """A master with one replica, a sentinel watching them, and a coordinator that knows only the sentinel."""

    master_port: int
    replica_port: int
    sentinel_port: int
    master: Process
    replica: Process
    sentinel: Process
    coordinator: Process
    coordinator_address: str

    def master_named_by_sentinel(self) -> int:
        with _client(self.sentinel_port) as sentinel:
            host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        assert host == "127.0.0.1"
        return int(port)

    def sentinel_knows_the_replica(self) -> bool:
        with _client(self.sentinel_port) as sentinel:
            replicas = sentinel.sentinel_slaves(SERVICE)
        return any(
            replica["port"] == self.replica_port and not replica["is_sdown"] and not replica["is_disconnected"]
            for replica in replicas
        )

    def describe(self) -> str:
        return "\n\n".join(p.describe() for p in (self.sentinel, self.master, self.replica, self.coordinator))


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    assert len({master_port, replica_port, sentinel_port}) == 3
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(_start_server(tmp_path / "master", master_port))
        replica = stack.enter_context(
            _start_server(tmp_path / "replica", replica_port, "--replicaof", "127.0.0.1", str(master_port))
        )
        # The sentinel learns of replicas from the master's INFO, which it
        # asks for at once on connecting and then only every ten seconds: a
        # replica already in sync when it starts is known right away.
        wait_until(lambda: _replica_online(master_port, replica_port), timeout=10, message="the replica never synced")
        sentinel = stack.enter_context(_start_sentinel(tmp_path / "sentinel", sentinel_port, master_port))
        coordinator, address = _start_coordinator(tmp_path / "coordinator", sentinel_port)
        stack.enter_context(coordinator)
        yield Deployment(master_port, replica_port, sentinel_port, master, replica, sentinel, coordinator, address)


def _record_fetch(client: CoordinatorClient, digest: str, size: int) -> None:
    """What a node does for a miss: take the fetch lease, then register the content it fetched."""
    key = f"blob:{digest}"
    lease = client.acquire_lease(key, ttl_ms=10_000)
    assert lease.granted, lease
    client.complete_fetch(key, lease.token, digest, size, MEDIA_TYPE, TTL_MS)


def _stored_on(port: int, digest: str, size: int) -> None:
    """Assert that the Redis on ``port`` holds the membership and the content registered for ``digest``."""
    with _client(port) as server:
        assert server.hget(KEYS.node(NODE_ID), "url") == NODE_URL
        assert NODE_ID in server.smembers(KEYS.nodes())
        assert server.smembers(KEYS.loc(digest)) == {NODE_ID}
        assert digest in server.smembers(KEYS.held(NODE_ID))
        meta = server.hgetall(KEYS.meta(digest))
        assert meta["size"] == str(size)
        assert meta["media_type"] == MEDIA_TYPE
        assert server.zscore(KEYS.ttl(), digest) is not None
        # complete_fetch released the lease in the same step.
        assert not server.exists(KEYS.lock(f"blob:{digest}"))


def _retry(call: Callable[[], T]) -> Callable[[], T | None]:
    """``call`` as a predicate for wait_until: None while no coordinator can answer."""

    def attempt() -> T | None:
        try:
            return call()
        except CoordinatorUnavailable:
            return None

    return attempt


def test_calls_land_in_the_master_the_sentinel_names(deployment: Deployment) -> None:
    assert deployment.master_named_by_sentinel() == deployment.master_port
    digest = _digest("sentinel/first")

    with CoordinatorClient([deployment.coordinator_address], SECRET, NODE_ID, timeout=5) as client:
        assert client.register(NODE_URL, capacity_bytes=10_000, used_bytes=0) == 60.0
        _record_fetch(client, digest, 1234)
        location = client.locate(digest, lease_key=f"blob:{digest}")

    assert location.holders == [Holder(NODE_ID, NODE_URL)]
    assert location.content == Content(digest, 1234, MEDIA_TYPE)
    assert location.fetcher is None
    assert not location.fetching
    _stored_on(deployment.master_port, digest, 1234)


def test_the_coordinator_follows_a_failover(deployment: Deployment) -> None:
    before, after = _digest("sentinel/before"), _digest("sentinel/after")
    with CoordinatorClient([deployment.coordinator_address], SECRET, NODE_ID, timeout=5) as client:
        client.register(NODE_URL)
        _record_fetch(client, before, 111)
        with _client(deployment.replica_port) as replica:
            wait_until(lambda: replica.exists(KEYS.loc(before)), timeout=10, message="never replicated")

        wait_until(deployment.sentinel_knows_the_replica, timeout=10, message="the sentinel never saw the replica")
        deployment.master.stop()
        wait_until(
            lambda: deployment.master_named_by_sentinel() == deployment.replica_port,
            timeout=20,
            message=lambda: f"the sentinel never promoted the replica\n{deployment.describe()}",
        )
        # Calls in flight during the switch may fail; once the sentinel names
        # the new master, the coordinator must find it on its own.
        location = wait_until(
            _retry(lambda: client.locate(before)),
            timeout=15,
            message=lambda: f"the coordinator never reached the new master\n{deployment.describe()}",
        )
        assert location.holders == [Holder(NODE_ID, NODE_URL)]
        assert location.content == Content(before, 111, MEDIA_TYPE)

        known, _ = client.heartbeat(NODE_URL)
        assert known
        _record_fetch(client, after, 222)
        assert client.locate(after).holders == [Holder(NODE_ID, NODE_URL)]

    with _client(deployment.replica_port) as promoted:
        assert promoted.info("replication")["role"] == "master"
    _stored_on(deployment.replica_port, before, 111)
    _stored_on(deployment.replica_port, after, 222)
