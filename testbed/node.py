"""A real Shoal node: ``shoal node`` (gunicorn) started as a user would."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from testbed.processes import Process, free_port, wait_for_http


class NodeProcess:
    """One node with its own cache directory, on a free port of 127.0.0.1.

    ``settings`` are merged into the generated YAML config, section by
    section (``{"upstream": {"tag_ttl": "1s"}}``).
    """

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        settings: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.cache_dir = self.workdir / "cache"
        config: dict[str, Any] = {
            "server": {"bind": f"127.0.0.1:{self.port}", "workers": 2},
            "cache": {"dir": str(self.cache_dir)},
            "upstream": {"url": upstream_url, "timeout": "10s"},
        }
        for section, values in (settings or {}).items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        if "upstreams" in config:
            # Several upstreams replace the single one.
            del config["upstream"]
        if "cluster" in config:
            config["cluster"].setdefault("advertise_url", self.url)
            config["cluster"].setdefault("node_id", self.workdir.name)
        self.config_path = self.workdir / "node.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = dict(os.environ, **(env or {}))
        self.process: Process | None = None
        self.start(wait=wait)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        """Start gunicorn; ``wait=False`` returns at once (then call ``wait_ready``)."""
        self.process = Process(
            [sys.executable, "-m", "shoal", "node", "--config", self.config_path],
            self.workdir / "node.log",
            env=self.env,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        process = self.process
        assert process is not None
        wait_for_http(f"{self.url}/healthz", alive=process.alive)

    def begin_stop(self) -> None:
        """Send SIGTERM without waiting, so that several nodes stop at once."""
        if self.process is not None and self.process.alive():
            self.process.popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

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
