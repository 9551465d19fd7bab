"""A real Shoal cluster: redis-server, ``shoal coordinator`` processes and gunicorn nodes.

Tests and the benchmark start it the same way. For tests the cluster's
timings are short, so that expiry, failover and re-registration happen
within a test; the benchmark passes ``product_defaults`` and measures the
product as shipped, with only addresses, directories and the cluster
secret set (and what it passes in ``node_settings``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from coordinator.keys import Keys
from node.coordinator_client import CoordinatorClient
from testbed.node import NodeProcess, merged
from testbed.processes import Process, environment, free_port, wait_until
from testbed.redis_server import RedisServer

SECRET = "cluster-secret-for-tests-7d1f"

# What the tests shorten: the coordinator's sweep, leadership and
# membership, and the nodes' heartbeat, leases and calls to the coordinator.
TEST_COORDINATOR_SETTINGS = {"scheduler_interval": "0.2s", "leader_lease": "1s", "membership_ttl": "3s"}
TEST_NODE_SETTINGS: dict[str, dict[str, Any]] = {
    "cluster": {"heartbeat_interval": "0.2s", "lease_ttl": "2s", "timeout": "1s"},
    "upstream": {"tag_ttl": "1h"},
}


class CoordinatorProcess:
    """``shoal coordinator`` on a free port; stop() and start() keep the port.

    ``settings`` go over ``TEST_COORDINATOR_SETTINGS``, or over the product's
    defaults with ``product_defaults``. Its /metrics listens on a port of its
    own choosing, so that coordinators on one machine never clash.
    """

    def __init__(
        self,
        workdir: Path,
        redis_url: str,
        settings: dict[str, Any] | None = None,
        *,
        product_defaults: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "bind": f"127.0.0.1:{self.port}",
            "redis_url": redis_url,
            "metrics_bind": "127.0.0.1:0",
            **({} if product_defaults else TEST_COORDINATOR_SETTINGS),
            **(settings or {}),
        }
        self.config_path = self.workdir / "coordinator.yml"
        self.config_path.write_text(yaml.safe_dump({"coordinator": config}))
        self.process: Process | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = Process(
            [sys.executable, "-m", "shoal", "coordinator", "--config", self.config_path],
            self.workdir / "coordinator.log",
            env=environment({"SHOAL_COORDINATOR__CLUSTER_SECRET": SECRET}),
        )
        process = self.process

        def answers() -> bool:
            if not process.alive():
                raise RuntimeError(f"coordinator exited:\n{process.describe()}")
            with CoordinatorClient([self.address], SECRET, "probe", timeout=1) as probe:
                try:
                    probe.get_metrics()
                except Exception:
                    return False
                return True

        try:
            wait_until(answers, timeout=30, message="the coordinator did not answer")
        except BaseException:
            process.stop()
            raise

    @property
    def pid(self) -> int:
        """The id of the running process (for ``bench.miss_costs``, which reads its CPU time)."""
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def pause(self) -> None:
        """SIGSTOP: a hung coordinator. Its connections stay open and nothing answers."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``: the calls it held are answered."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def log_text(self) -> str:
        return self.process.log_text() if self.process is not None else ""


class Cluster:
    """Redis, ``coordinators`` coordinator processes and ``nodes`` nodes in front of ``upstream_url``.

    Starts in the constructor; ``close`` stops the nodes (side by side), the
    coordinators and Redis, in that order, and is safe after a start that
    failed half-way.
    """

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        *,
        nodes: int = 3,
        coordinators: int = 1,
        node_settings: dict[str, Any] | None = None,
        coordinator_settings: dict[str, Any] | None = None,
        product_defaults: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.keys = Keys("shoal:")
        self.coordinators: list[CoordinatorProcess] = []
        self.nodes: list[NodeProcess] = []
        self.redis = RedisServer(self.workdir / "redis")
        try:
            self._start(upstream_url, nodes, coordinators, node_settings, coordinator_settings, product_defaults)
        except BaseException:
            self.close()
            raise

    def _start(
        self,
        upstream_url: str,
        nodes: int,
        coordinators: int,
        node_settings: dict[str, Any] | None,
        coordinator_settings: dict[str, Any] | None,
        product_defaults: bool,
    ) -> None:
        for index in range(coordinators):
            # One at a time, so that close() stops those started when a later one fails.
            self.coordinators.append(
                CoordinatorProcess(
                    self.workdir / f"coordinator-{index + 1}",
                    self.redis.url,
                    coordinator_settings,
                    product_defaults=product_defaults,
                )
            )
        settings = merged(
            {"cluster": {"coordinators": [coordinator.address for coordinator in self.coordinators]}},
            None if product_defaults else TEST_NODE_SETTINGS,
            node_settings,
        )
        for index in range(nodes):
            self.nodes.append(
                NodeProcess(
                    self.workdir / f"node-{index + 1}",
                    upstream_url,
                    settings,
                    env={"SHOAL_CLUSTER__SECRET": SECRET},
                    wait=False,
                    product_defaults=product_defaults,
                )
            )
        # The nodes start side by side, and importing the node takes a while
        # on a busy machine; then each must answer.
        for node in self.nodes:
            node.wait_ready(timeout=60)
        self.wait_for_members()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def client(self) -> CoordinatorClient:
        """A coordinator client for looking at the directory."""
        return CoordinatorClient([c.address for c in self.coordinators], SECRET, "test-observer", timeout=2)

    def wait_for_members(self) -> None:
        with self.redis.client() as redis:
            expected = {node.node_id for node in self.nodes}
            wait_until(
                lambda: expected <= set(redis.smembers(self.keys.nodes())),
                timeout=30,
                message=lambda: f"nodes never registered: {redis.smembers(self.keys.nodes())}",
            )

    def holders(self, digest: str) -> set[str]:
        with self.client() as client:
            return {holder.node_id for holder in client.locate(digest).holders}

    def close(self) -> None:
        for node in self.nodes:
            node.begin_stop()
        for node in self.nodes:
            # Each takes a moment to stop its workers; they drain side by side.
            node.stop(timeout=20)
        for coordinator in self.coordinators:
            coordinator.stop()
        self.redis.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def verify_store(node: NodeProcess) -> None:
    """Every complete file in a node's store hashes to its name."""
    for path in (node.cache_dir / "blobs").glob("*/*/*"):
        if path.name.endswith(".type"):
            continue
        algorithm = path.parent.parent.name
        assert hashlib.new(algorithm, path.read_bytes()).hexdigest() == path.name, f"corrupt {path}"
