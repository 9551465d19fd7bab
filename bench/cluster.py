"""A Shoal cluster for the benchmark, started the way ``shoal up`` starts one.

A redis-server, one coordinator (``shoal coordinator``) and N nodes
(``shoal node``, gunicorn), each a child process in its own process group,
with the product's default settings: only addresses, directories and the
cluster secret are set here.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import redis
import yaml

from coordinator.config import CoordinatorConfig
from coordinator.keys import Keys
from testbed.processes import Process, free_port, wait_for_http, wait_for_port, wait_until
from testbed.redis_server import RedisServer


@dataclass
class Node:
    node_id: str
    url: str
    cache_dir: Path
    process: Process

    @property
    def pid(self) -> int:
        """The gunicorn master; its children are the workers."""
        return self.process.pid

    def stored_file(self, digest: str, timeout: float = 30.0) -> Path:
        """The node's own file of ``digest``, once its store holds it, wherever the store keeps it.

        A fill's clients finish when the digest is verified; the file is
        synced and renamed into the store a moment later.
        """
        hex_digest = digest.split(":", 1)[1]

        def found() -> Path | None:
            return next((path for path in (self.cache_dir / "blobs").rglob(hex_digest) if path.is_file()), None)

        stored = wait_until(found, timeout=timeout, message=f"{self.node_id} never stored {digest}")
        assert stored is not None  # wait_until returns only a truthy value
        return stored


class ShoalCluster:
    """Starts in the constructor; ``close`` stops nodes, coordinator, Redis, in that order."""

    def __init__(self, workdir: Path, upstream_url: str, nodes: int = 3) -> None:
        self.workdir = workdir
        self.secret = secrets.token_urlsafe(24)
        self.nodes: list[Node] = []
        self.coordinator: Process | None = None
        self.redis: RedisServer | None = None
        try:
            self._start(upstream_url, nodes)
        except BaseException:
            self.close()
            raise

    def _environment(self) -> dict[str, str]:
        # Nothing of the caller's SHOAL_* settings may change what is measured.
        return {key: value for key, value in os.environ.items() if not key.startswith("SHOAL_")}

    def _start(self, upstream_url: str, count: int) -> None:
        self.redis = RedisServer(self.workdir / "redis")
        coordinator_port = free_port()
        settings: dict[str, object] = {"bind": f"127.0.0.1:{coordinator_port}", "redis_url": self.redis.url}
        if "metrics_bind" in {field.name for field in dataclasses.fields(CoordinatorConfig)}:
            # Its /metrics port would clash with another coordinator's on this machine.
            settings["metrics_bind"] = "127.0.0.1:0"
        folder = self.workdir / "coordinator"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "coordinator.yml"
        config.write_text(yaml.safe_dump({"coordinator": settings}))
        self.coordinator = Process(
            [sys.executable, "-m", "shoal", "coordinator", "--config", config],
            folder / "coordinator.log",
            env={**self._environment(), "SHOAL_COORDINATOR__CLUSTER_SECRET": self.secret},
        )
        wait_for_port(coordinator_port, self.coordinator, "the coordinator")
        for index in range(count):
            node_id = f"node-{index + 1}"
            folder = self.workdir / node_id
            folder.mkdir(parents=True, exist_ok=True)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            config = folder / "node.yml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "server": {"bind": f"127.0.0.1:{port}"},
                        "cache": {"dir": str(folder / "cache"), "max_size": "200GiB"},
                        "upstream": {"url": upstream_url},
                        "cluster": {
                            "coordinators": [f"127.0.0.1:{coordinator_port}"],
                            "node_id": node_id,
                            "advertise_url": url,
                        },
                    }
                )
            )
            process = Process(
                [sys.executable, "-m", "shoal", "node", "--config", config],
                folder / "node.log",
                env={**self._environment(), "SHOAL_CLUSTER__SECRET": self.secret},
            )
            self.nodes.append(Node(node_id, url, folder / "cache", process))
        # Started all at once: importing the node takes a while, so they wait together.
        for node in self.nodes:
            wait_for_http(f"{node.url}/healthz", timeout=60, alive=node.process.alive)
        with redis.Redis.from_url(self.redis.url, decode_responses=True) as client:
            expected = {node.node_id for node in self.nodes}
            key = Keys("shoal:").nodes()
            wait_until(
                lambda: expected <= set(client.smembers(key)),
                timeout=30,
                message=lambda: f"nodes never joined: {client.smembers(key)}",
            )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def close(self) -> None:
        # The nodes drain in parallel: each takes a moment to stop its workers.
        stoppers = [threading.Thread(target=node.process.stop, kwargs={"timeout": 20}) for node in self.nodes]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for node in self.nodes:
            # Joined threads stop nothing if they died; this one is idempotent.
            node.process.stop(timeout=20)
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.redis is not None:
            self.redis.close()
