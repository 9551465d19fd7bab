"""A real Shoal node: ``shoal node`` (gunicorn) started as a user would."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from testbed.proc import children
from testbed.processes import Process, environment, free_port, wait_for_http, wait_until

# What the tests change from the product's defaults: two workers whatever the
# default (a test machine has two cores), and an upstream timeout that fails
# a test well before pytest's patience runs out.
TEST_SETTINGS: dict[str, dict[str, Any]] = {"server": {"workers": 2}, "upstream": {"timeout": "10s"}}


def merged(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """One config from ``layers``, each laid over the ones before it section by section; none is changed.

    A section given as a mapping updates the section before it key by key;
    anything else (a list of upstreams, say) replaces it.
    """
    result: dict[str, Any] = {}
    for layer in layers:
        for section, values in (layer or {}).items():
            if isinstance(values, dict) and isinstance(result.get(section), dict):
                result[section].update(values)
            else:
                result[section] = dict(values) if isinstance(values, dict) else values
    return result


class NodeProcess:
    """One node with its own cache directory, on a free port of 127.0.0.1.

    ``settings`` are merged into the generated YAML config, section by
    section (``{"upstream": {"tag_ttl": "1s"}}``), over ``TEST_SETTINGS``;
    with ``product_defaults`` (the benchmark) only the address, the
    directories, the upstream and ``settings`` are set. ``env`` adds to the
    caller's environment, whose ``SHOAL_*`` variables are left out.
    """

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        settings: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        wait: bool = True,
        product_defaults: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.cache_dir = self.workdir / "cache"
        config = merged(
            {
                "server": {"bind": f"127.0.0.1:{self.port}"},
                "cache": {"dir": str(self.cache_dir)},
                "upstream": {"url": upstream_url},
            },
            None if product_defaults else TEST_SETTINGS,
            settings,
        )
        if "upstreams" in config:
            # Several upstreams replace the single one.
            del config["upstream"]
        if "cluster" in config:
            config["cluster"].setdefault("advertise_url", self.url)
            config["cluster"].setdefault("node_id", self.workdir.name)
        self.config = config
        self.config_path = self.workdir / "node.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = environment(env)
        self.process: Process | None = None
        self.start(wait=wait)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def node_id(self) -> str:
        """The node's id in a cluster: its directory's name unless the settings named one."""
        return str(self.config.get("cluster", {}).get("node_id", self.workdir.name))

    @property
    def pid(self) -> int:
        """The gunicorn master; its children are the workers."""
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """The gunicorn workers running now."""
        return sorted(worker.pid for worker in children(self.pid))

    def start(self, wait: bool = True) -> None:
        """Start gunicorn; ``wait=False`` returns at once (then call ``wait_ready``)."""
        self.process = Process(
            [sys.executable, "-m", "shoal", "node", "--config", self.config_path],
            self.workdir / "node.log",
            env=self.env,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        process = self.process
        assert process is not None
        wait_for_http(f"{self.url}/healthz", timeout=timeout, alive=process.alive)

    def begin_stop(self) -> None:
        """Send SIGTERM without waiting, so that several nodes stop at once."""
        if self.process is not None and self.process.alive():
            self.process.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; idempotent."""
        if self.process is not None:
            self.process.stop(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the master and its workers at once, as a crash of the host would."""
        if self.process is not None and self.process.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.kill()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def log_text(self) -> str:
        return self.process.log_text() if self.process is not None else ""

    def stored_digests(self) -> set[str]:
        """Digests of the complete content in the node's store, read from disk."""
        found = set()
        blobs = self.cache_dir / "blobs"
        for path in blobs.glob("*/*/*"):
            if not path.name.endswith(".type"):
                found.add(f"{path.parent.parent.name}:{path.name}")
        return found

    def leftover_fill_files(self) -> list[str]:
        """Files of fills in progress or abandoned, lock files aside."""
        fills = self.cache_dir / "fills"
        return sorted(p.name for p in fills.iterdir() if not p.name.endswith(".lock")) if fills.exists() else []

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
