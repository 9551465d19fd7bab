"""``shoal up`` in a subprocess, as a user runs it, and the processes it started.

Reads the node URLs it prints, records its process tree and listening ports
while it runs, and presses Ctrl-C (SIGINT) to stop it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import urlsplit

import redis
import yaml

from coordinator.keys import Keys
from testbed.proc import Proc, catches_signal, children, descendants
from testbed.processes import free_port, wait_until

READY = "Ctrl-C stops everything."
_NODE_LINE = re.compile(r"^\s*node (\d+): (\S+)$")


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` of 127.0.0.1 now, as a restarted one would.

    SO_REUSEADDR, as servers set it, lets connections of an earlier server
    linger in TIME_WAIT without counting as the port being taken.
    """
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports of 127.0.0.1 that were free a moment ago."""
    for _ in range(100):
        base = free_port()
        if base + count <= 65536 and all(port_is_free(base + offset) for offset in range(count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


@dataclass(frozen=True)
class Tree:
    """What ``shoal up`` started: Redis, the coordinators, and each node's gunicorn master and workers.

    ``coordinators`` are in the order of their names (coordinator-1 first),
    ``nodes`` in the order of their ports (node-1 first).
    """

    redis: Proc
    coordinators: list[Proc]
    nodes: list[Proc]
    workers: list[Proc]

    @property
    def coordinator(self) -> Proc:
        return self.coordinators[0]

    @property
    def everything(self) -> list[Proc]:
        return [self.redis, *self.coordinators, *self.nodes, *self.workers]


def _option(command: tuple[str, ...], name: str) -> str:
    return command[command.index(name) + 1] if name in command[:-1] else ""


@dataclass(frozen=True)
class State:
    """What ``shoal up`` wrote into its state directory: the ports and log files of its children."""

    directory: Path
    redis_port: int
    coordinator_ports: list[int]

    @classmethod
    def read(cls, directory: Path) -> State:
        configs = sorted(directory.glob("coordinator-*.yml"), key=lambda path: int(path.stem.rpartition("-")[2]))
        coordinators = [yaml.safe_load(path.read_text())["coordinator"] for path in configs]
        redis_port = urlsplit(coordinators[0]["redis_url"]).port
        assert redis_port is not None
        ports = [int(coordinator["bind"].rpartition(":")[2]) for coordinator in coordinators]
        return cls(directory, redis_port, ports)

    def log(self, child: str) -> Path:
        return self.directory / f"{child}.log"

    @property
    def redis_password(self) -> str:
        """The password shoal up generated for its Redis."""
        return (self.directory / "redis-password").read_text().strip()

    def redis(self, password: str | None = None) -> redis.Redis:
        """A client of shoal up's Redis, with its password unless another is given (``""``: none)."""
        password = self.redis_password if password is None else password
        return redis.Redis(port=self.redis_port, password=password or None, decode_responses=True, socket_timeout=2)

    def leader(self) -> str | None:
        """The identity of the coordinator that leads now, if any."""
        try:
            identity = self.redis().get(Keys().leader())
        except redis.RedisError:
            return None
        return str(identity) if identity is not None else None

    def coordinator_of(self, identity: str) -> int | None:
        """Which coordinator (1, 2, ...) runs as ``identity`` now, from the identity each one logged last."""
        for index in range(1, len(self.coordinator_ports) + 1):
            logged = _IDENTITY.findall(self.log(f"coordinator-{index}").read_text(errors="replace"))
            if logged and logged[-1] == identity:
                return index
        return None


_IDENTITY = re.compile(r"replica (coordinator-[0-9a-f]+)")


class ShoalUp:
    """``python -m shoal up`` in a subprocess whose stdout is read line by line."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self._stderr: IO[bytes] = stderr_path.open("ab")
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self.tree: Tree | None = None
        # Every process any tree held, restarted ones' predecessors too.
        self.seen: set[Proc] = set()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "shoal", "up", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except BaseException:
            self._stderr.close()
            raise
        assert self.popen.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.popen.stdout,), name="shoal-up-stdout")
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def describe(self) -> str:
        status = "running" if self.popen.poll() is None else f"exited with {self.popen.returncode}"
        stderr = self.stderr()
        return f"shoal up ({status})\nstdout:\n" + "\n".join(self.lines) + f"\nstderr:\n{stderr}"

    def wait_ready(self, timeout: float = 90) -> list[str]:
        """Wait for the message that ends the start-up; return the node URLs it lists."""

        def ready() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"shoal up exited before it was ready\n{self.describe()}")
            return READY in self.lines

        wait_until(
            ready, timeout=timeout, interval=0.05, message=lambda: f"shoal up never got ready\n{self.describe()}"
        )
        nodes = [match for line in self.lines if (match := _NODE_LINE.match(line))]
        assert [int(match[1]) for match in nodes] == list(range(1, len(nodes) + 1)), self.lines
        return [match[2] for match in nodes]

    def tree_now(self, nodes: int, workers_per_node: int, coordinators: int = 1) -> Tree | None:
        """Every process shoal up should have running now, or None while one is missing (or one too many)."""
        # A child that exited and was not reaped yet shows no command line.
        started = [child for child in children(self.popen.pid) if child.command]
        redis_servers = [child for child in started if "redis-server" in os.path.basename(child.command[0])]
        found = [child for child in started if "coordinator.server" in child.command]
        masters = [child for child in started if child not in redis_servers + found]
        workers = [worker for master in masters for worker in children(master.pid)]
        if len(started) != 1 + coordinators + nodes or len(redis_servers) != 1 or len(found) != coordinators:
            return None
        if len(workers) != nodes * workers_per_node:
            return None
        found.sort(key=lambda proc: Path(_option(proc.command, "--config")).stem.rpartition("-")[2].zfill(9))
        masters.sort(key=lambda proc: _option(proc.command, "--bind").rpartition(":")[2].zfill(9))
        return Tree(redis_servers[0], found, masters, workers)

    def wait_for_tree(
        self,
        nodes: int,
        workers_per_node: int,
        coordinators: int = 1,
        *,
        replacing: Proc | None = None,
        timeout: float = 30,
    ) -> Tree:
        """Wait until every process is there (``replacing`` gone, another in its place) and keep the list.

        A node answers as soon as one of its workers does; the others may
        still be on their way.
        """

        def complete() -> Tree | None:
            tree = self.tree_now(nodes, workers_per_node, coordinators)
            if tree is None or replacing in tree.everything:
                return None
            return tree

        def describe() -> str:
            return f"children {children(self.popen.pid)}\n{self.describe()}"

        tree = wait_until(complete, timeout=timeout, interval=0.02, message=describe)
        assert tree is not None  # wait_until returns only a truthy value
        self.tree = tree
        self.seen.update(tree.everything)
        return tree

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def interrupt(self) -> None:
        """Press Ctrl-C once shoal up listens for it.

        The ready message is printed before the signal handlers are installed;
        a SIGINT in between would raise KeyboardInterrupt instead of stopping
        the cluster in order. SIGTERM's handler is installed right after
        SIGINT's, and Python catches SIGINT from the start, so the SIGTERM bit
        in SigCgt is the one that says both are in place.
        """
        wait_until(
            lambda: catches_signal(self.popen.pid, signal.SIGTERM),
            timeout=10,
            message="shoal up never installed its signal handlers",
        )
        self.popen.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> int:
        """Wait for shoal up to exit and for its last line of output; return its exit code."""
        returncode = self.popen.wait(timeout=timeout)
        self._reader.join()
        return returncode

    def close(self) -> None:
        """Stop shoal up if the test did not, then kill anything it left behind; idempotent."""
        started = list(self.seen)
        if self.popen.poll() is None:
            # Seen now, in case shoal up dies without stopping them.
            started += descendants(self.popen.pid)
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for proc in started:
            if proc.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        self._reader.join()
        assert self.popen.stdout is not None
        self.popen.stdout.close()
        self._stderr.close()

    def __enter__(self) -> ShoalUp:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
