"""A real redis-server for tests, on a free port, with nothing persisted.

The server keeps its data in memory only (``--save ''``, no append-only
file), so ``restart()`` brings it back empty on the same port: the way tests
simulate Redis losing its data and check that nodes re-announce.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import redis

from testbed.processes import Process, free_port, require_binary, wait_until


class RedisServer:
    """A redis-server child process bound to 127.0.0.1; started by the constructor."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        # A missing binary is a broken test machine, never a reason to skip.
        self.binary = require_binary("redis-server", "redis-server")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.process: Process | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new client with ``decode_responses``, as the coordinator uses."""
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.alive():
            return
        self.process = Process(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            self.directory / "redis.log",
        )
        wait_until(self._answers, timeout=10, message=lambda: f"redis-server never answered PING\n{self.describe()}")

    def stop(self) -> None:
        """Stop the server; its data is gone. Safe to call twice."""
        if self.process is not None:
            self.process.stop()

    def restart(self) -> None:
        """Stop and start again on the same port: Redis comes back empty."""
        self.stop()
        self.start()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def describe(self) -> str:
        return self.process.describe() if self.process is not None else "redis-server not started"

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _answers(self) -> bool:
        if self.process is None or not self.process.alive():
            raise RuntimeError(f"redis-server exited before answering\n{self.describe()}")
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False
