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
class Proc:
    """A process as seen in /proc; ``started`` (clock ticks after boot) tells a reused pid apart."""

    pid: int
    started: str
    command: tuple[str, ...]

    def running(self) -> bool:
        """Alive, and the same process: a zombie has already exited, a new start time is someone else."""
        state = _stat(self.pid)
        return state is not None and state[1] == self.started and state[0] != "Z"


def _stat(pid: int) -> tuple[str, str] | None:
    """The state and the start time of ``pid``, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in parentheses may hold spaces; fields 3 and 22 follow it.
    fields = text.rpartition(")")[2].split()
    return fields[0], fields[19]


def _proc(pid: int) -> Proc | None:
    state = _stat(pid)
    if state is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return Proc(pid, state[1], tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part))


def _children(pid: int) -> list[Proc]:
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in path.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return [proc for proc in map(_proc, found) if proc is not None]


def _descendants(pid: int) -> list[Proc]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child.pid)]
    return found


def listening_ports(pids: list[int]) -> set[tuple[str, int]]:
    """The TCP addresses (host, port) that the processes ``pids`` listen on, found by their sockets' inodes."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            # Counted from 0, field 3 is the state (0A is LISTEN) and field 9 the inode.
            if fields[3] == "0A" and fields[9] in inodes:
                host, _, port = fields[1].partition(":")
                found.add((_host(host), int(port, 16)))
    return found


def _host(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} prints it (32-bit words in host byte order), as text."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[index : index + 4][::-1] for index in range(0, len(raw), 4))
    text = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return text.removeprefix("::ffff:")


def _catches(pid: int, signum: int) -> bool:
    """Whether ``pid`` has a handler installed for ``signum`` (the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@dataclass(frozen=True)
class Tree:
    """What ``shoal up`` started: Redis, the coordinator, and each node's gunicorn master and workers."""

    redis: Proc
    coordinator: Proc
    nodes: list[Proc]
    workers: list[Proc]

    @property
    def everything(self) -> list[Proc]:
        return [self.redis, self.coordinator, *self.nodes, *self.workers]


class ShoalUp:
    """``python -m shoal up`` in a subprocess whose stdout is read line by line."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self._stderr: IO[bytes] = stderr_path.open("ab")
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self.tree: Tree | None = None
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
        stderr = self.stderr_path.read_text(errors="replace")
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

    def wait_for_tree(self, nodes: int, workers_per_node: int) -> Tree:
        """Wait until every process is there and keep the list.

        A node answers as soon as one of its workers does; the others may
        still be on their way.
        """

        def complete() -> Tree | None:
            children = _children(self.popen.pid)
            redis = [child for child in children if "redis-server" in os.path.basename(child.command[0])]
            coordinator = [child for child in children if "coordinator.server" in child.command]
            masters = [child for child in children if child not in redis + coordinator]
            workers = [worker for master in masters for worker in _children(master.pid)]
            if len(children) != 2 + nodes or len(redis) != 1 or len(coordinator) != 1:
                return None
            if len(workers) != nodes * workers_per_node:
                return None
            return Tree(redis[0], coordinator[0], masters, workers)

        def describe() -> str:
            return f"children {_children(self.popen.pid)}\n{self.describe()}"

        tree = wait_until(complete, timeout=30, interval=0.05, message=describe)
        assert tree is not None  # wait_until returns only a truthy value
        self.tree = tree
        return tree

    def interrupt(self) -> None:
        """Press Ctrl-C once shoal up listens for it.

        The ready message is printed before the signal handlers are installed;
        a SIGINT in between would raise KeyboardInterrupt instead of stopping
        the cluster in order. SIGTERM's handler is installed right after
        SIGINT's, and Python catches SIGINT from the start, so the SIGTERM bit
        in SigCgt is the one that says both are in place.
        """
        wait_until(
            lambda: _catches(self.popen.pid, signal.SIGTERM),
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
        started = list(self.tree.everything) if self.tree is not None else []
        if self.popen.poll() is None:
            # Seen now, in case shoal up dies without stopping them.
            started += _descendants(self.popen.pid)
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
