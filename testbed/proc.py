"""Processes as Linux shows them in /proc: their children, start times, listening ports and signal handlers.

The test bed reads /proc rather than trusting its own bookkeeping, so that a
process it did not start itself (a gunicorn worker, a Redis that ``shoal
up`` started) is seen too, and a reused pid is never taken for the old one.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path


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


def children(pid: int) -> list[Proc]:
    """The processes whose parent is ``pid`` now: a gunicorn master's workers, say."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in path.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return [proc for proc in map(_proc, found) if proc is not None]


def descendants(pid: int) -> list[Proc]:
    """The children of ``pid``, their children, and so on."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child.pid)]
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


def catches_signal(pid: int, signum: int) -> bool:
    """Whether ``pid`` has a handler installed for ``signum`` (the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False
