"""A real cluster for tests: redis-server, coordinator processes, gunicorn nodes."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from coordinator.keys import Keys
from node.coordinator_client import CoordinatorClient
from testbed.node import NodeProcess
from testbed.processes import Process, free_port, wait_until
from testbed.redis_server import RedisServer

SECRET = "cluster-secret-for-tests-7d1f"


class CoordinatorProcess:
    """``shoal coordinator`` on a free port; stop() and start() keep the port."""

    def __init__(self, workdir: Path, redis_url: str, settings: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "bind": f"127.0.0.1:{self.port}",
            "redis_url": redis_url,
            "scheduler_interval": "0.2s",
            "leader_lease": "1s",
            "membership_ttl": "3s",
            "metrics_bind": "127.0.0.1:0",
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
        env = dict(os.environ, SHOAL_COORDINATOR__CLUSTER_SECRET=SECRET)
        self.process = Process(
            [sys.executable, "-m", "shoal", "coordinator", "--config", self.config_path],
            self.workdir / "coordinator.log",
            env=env,
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
            wait_until(answers, timeout=20, message="the coordinator did not answer")
        except BaseException:
            process.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log_text(self) -> str:
        return self.process.log_text() if self.process is not None else ""


class Cluster:
    """Redis, ``coordinators`` coordinator processes and ``nodes`` nodes in front of ``upstream_url``."""

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        *,
        nodes: int = 3,
        coordinators: int = 1,
        node_settings: dict[str, Any] | None = None,
        coordinator_settings: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.keys = Keys("shoal:")
        self.coordinators: list[CoordinatorProcess] = []
        self.nodes: list[NodeProcess] = []
        self.redis = RedisServer(self.workdir / "redis")
        try:
            self._start(upstream_url, nodes, coordinators, node_settings, coordinator_settings)
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
    ) -> None:
        for index in range(coordinators):
            # One at a time, so that close() stops those started when a later one fails.
            self.coordinators.append(
                CoordinatorProcess(self.workdir / f"coordinator-{index + 1}", self.redis.url, coordinator_settings)
            )
        for index in range(nodes):
            settings: dict[str, Any] = {
                "cluster": {
                    "coordinators": [coordinator.address for coordinator in self.coordinators],
                    "heartbeat_interval": "0.2s",
                    "lease_ttl": "2s",
                    "timeout": "1s",
                },
                "upstream": {"tag_ttl": "1h"},
            }
            for section, values in (node_settings or {}).items():
                if isinstance(values, dict):
                    settings.setdefault(section, {}).update(values)
                else:
                    settings[section] = values
            self.nodes.append(
                NodeProcess(
                    self.workdir / f"node-{index + 1}",
                    upstream_url,
                    settings,
                    env={"SHOAL_CLUSTER__SECRET": SECRET},
                    wait=False,
                )
            )
        # The nodes start side by side; then each must answer.
        for node in self.nodes:
            node.wait_ready()
        self.wait_for_members()

    def client(self) -> CoordinatorClient:
        """A coordinator client for looking at the directory."""
        return CoordinatorClient([c.address for c in self.coordinators], SECRET, "test-observer", timeout=2)

    def wait_for_members(self) -> None:
        redis = self.redis.client()
        expected = {node.workdir.name for node in self.nodes}
        wait_until(
            lambda: expected <= set(redis.smembers(self.keys.nodes())),
            timeout=20,
            message=lambda: f"nodes never registered: {redis.smembers(self.keys.nodes())}",
        )

    def holders(self, digest: str) -> set[str]:
        with self.client() as client:
            return {holder.node_id for holder in client.locate(digest).holders}

    def close(self) -> None:
        for node in self.nodes:
            node.begin_stop()
        for node in self.nodes:
            node.stop()
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
