"""A real Prometheus (Debian's ``prometheus``) with a configuration of the test's, and its HTTP API.

The process gets a free port, its own data directory and its own config
file, so it never touches the package's own service (``/etc/prometheus``,
port 9090) that a Debian machine may run.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from testbed.processes import Process, free_port, require_binary, wait_until


class PrometheusError(Exception):
    """The HTTP API refused a query; the message is Prometheus's own."""


class Prometheus:
    """``prometheus`` serving ``config`` (whose rule files sit beside it) on 127.0.0.1."""

    def __init__(self, config: str | os.PathLike[str], workdir: str | os.PathLike[str]) -> None:
        binary = require_binary("prometheus", "prometheus")
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.workdir / "prometheus.log",
        )
        self._client = httpx.Client(base_url=self.url, timeout=10)
        try:
            wait_until(
                self._ready, timeout=30, interval=0.1, message=lambda: f"Prometheus never got ready\n{self.describe()}"
            )
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if not self.process.alive():
            raise RuntimeError(f"Prometheus exited\n{self.describe()}")
        try:
            return self._client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def describe(self) -> str:
        return self.process.describe()

    def _get(self, path: str, **params: str) -> Any:
        body = self._client.get(path, params=params).json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now; the samples of its vector (a scalar comes back as one sample)."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def names(self) -> set[str]:
        """Every metric name with a sample now."""
        return {sample["metric"]["__name__"] for sample in self.query('count by (__name__) ({__name__=~".+"})')}

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        """Every rule Prometheus loaded, with its health and last error."""
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def close(self) -> None:
        self._client.close()
        self.process.stop()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
