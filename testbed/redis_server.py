"""A real redis-server for tests, on a free port, with nothing persisted.

The server keeps its data in memory only (``--save ''``, no append-only
file), so ``restart()`` brings it back empty on the same port: the way tests
simulate Redis losing its data and check that nodes re-announce.

With ``password`` it asks for AUTH (``requirepass``); with ``tls`` it
listens with TLS only (``--tls-port``, no plaintext port) and asks every
client for a certificate its CA issued (``tls-auth-clients yes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from testbed.processes import Process, free_port, require_binary, wait_until
from testbed.tls import Issued


@dataclass(frozen=True)
class RedisTLS:
    """The files a TLS Redis serves with: its certificate, and the CA its clients' certificates come from."""

    server: Issued
    ca: Path
    # The client certificate the fixture itself checks the server with.
    client: Issued


class RedisServer:
    """A redis-server child process bound to 127.0.0.1; started by the constructor."""

    def __init__(
        self, directory: Path, port: int | None = None, *, password: str | None = None, tls: RedisTLS | None = None
    ) -> None:
        # A missing binary is a broken test machine, never a reason to skip.
        self.binary = require_binary("redis-server", "redis-server")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.password = password
        self.tls = tls
        self.process: Process | None = None
        self.start()

    @property
    def url(self) -> str:
        """Where it listens, without the password."""
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new client with ``decode_responses``, as the coordinator uses (with the password and certificates)."""
        return redis.Redis.from_url(
            self.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2, **self._client_options()
        )

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"password": self.password}
        if self.tls:
            options.update(
                ssl_ca_certs=str(self.tls.ca),
                ssl_certfile=str(self.tls.client.cert),
                ssl_keyfile=str(self.tls.client.key),
            )
        return options

    @property
    def pid(self) -> int:
        """The id of the running process (for ``bench.miss_costs``, which reads its CPU time)."""
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.alive():
            return
        command = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            command += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server.cert),
                "--tls-key-file", str(self.tls.server.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes",
            ]  # fmt: skip
        else:
            command += ["--port", str(self.port)]
        self.process = Process(command, self.directory / "redis.log")
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
            with redis.Redis.from_url(
                self.url, socket_timeout=0.5, socket_connect_timeout=0.5, **self._client_options()
            ) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False
