"""A real upstream registry: the ``docker-registry`` binary from the distribution project.

It serves as the upstream that Shoal caches, and in proxy mode as the
reference pull-through cache that benchmarks compare Shoal against.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from testbed.processes import Process, free_port, require_binary, wait_for_http

# One line of the combined log format that distribution writes to stdout, e.g.
# 127.0.0.1 - - [27/Nov/2026:23:57:22 +0000] "HEAD /v2/foo/manifests/latest HTTP/1.1" 404 96 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) ')


class DistributionRegistry:
    """A ``docker-registry serve`` process on 127.0.0.1 with filesystem storage.

    The port and the storage directory are chosen once, so ``stop()`` followed
    by ``start()`` brings back the same registry with the same content at the
    same address; tests use that to prove a cache keeps serving while its
    upstream is down.

    The access log (stdout of the process) is appended to across restarts, so
    ``requests()`` and ``count()`` cover every run. The registry writes a line
    only after its handler returns, which can be a moment after the client has
    the full response: wait for a count with ``wait_until`` rather than
    asserting it right after a request.
    """

    SECRET = "shoal-tests-fixed-secret"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        proxy_remote_url: str | None = None,
        start: bool = True,
    ) -> None:
        self._binary = require_binary("docker-registry", "docker-registry")
        if workdir is None:
            self._tempdir: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="shoal-registry-"
            )
            workdir = self._tempdir.name
        else:
            self._tempdir = None
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.access_log_path = self.workdir / "access.log"
        self.proxy_remote_url = proxy_remote_url
        self.port = free_port()
        self.config_path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        self._process: Process | None = None
        if start:
            self.start()

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": self.SECRET},
        }
        if self.proxy_remote_url is not None:
            config["proxy"] = {"remoteurl": self.proxy_remote_url}
        return config

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the process (again) and wait until ``/v2/`` answers."""
        if self._process is not None and self._process.alive():
            return
        # The registry reads REGISTRY_* variables as config overrides; none
        # from the test runner's environment may change what we configured.
        env = {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}
        self._process = Process(
            [self._binary, "serve", self.config_path],
            self.log_path,
            stdout_path=self.access_log_path,
            env=env,
            cwd=self.workdir,
        )
        process = self._process
        try:
            wait_for_http(f"{self.url}/v2/", timeout=timeout, alive=process.alive)
        except (TimeoutError, RuntimeError) as exc:
            process.stop()
            raise RuntimeError(f"docker-registry did not start:\n{process.describe()}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process; the data directory and port are kept for ``start()``."""
        if self._process is not None:
            self._process.stop(timeout)

    def kill(self) -> None:
        """Stop the process with SIGKILL, as a crash would."""
        if self._process is not None:
            self._process.kill()

    @property
    def pid(self) -> int:
        """The id of the running process (for ``bench.miss_costs``, which reads its CPU time)."""
        if self._process is None:
            raise RuntimeError("not started")
        return self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def close(self) -> None:
        """Stop the process and remove the temporary directory, if we made one. Idempotent."""
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def requests(self, method: str | None = None, path_prefix: str | None = None) -> list[tuple[str, str, int]]:
        """Return ``(method, path, status)`` for each request in the access log, oldest first.

        ``path`` is the request target as sent, query string included.
        """
        try:
            lines = self.access_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            match = _ACCESS_LINE.match(line)
            if match is None:
                continue
            entry = (match["method"], match["path"], int(match["status"]))
            if method is not None and entry[0] != method:
                continue
            if path_prefix is not None and not entry[1].startswith(path_prefix):
                continue
            found.append(entry)
        return found

    def count(self, method: str, path: str) -> int:
        """Return how many ``method`` requests for exactly ``path`` the access log holds."""
        return sum(1 for entry in self.requests(method) if entry[1] == path)

    def log_text(self) -> str:
        """Return the application log (stderr), for failure messages."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> DistributionRegistry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
