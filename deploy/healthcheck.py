"""The container's health check, for either role: ``python healthcheck.py``.

One image runs a node or a coordinator, so the check first finds which one
runs in the container, from the command lines in ``/proc``:

- a node is gunicorn serving ``node.wsgi:app`` (``shoal node`` execs it);
  it is healthy when ``GET /healthz`` on its ``--bind`` address answers 200.
- a coordinator is ``shoal coordinator`` (or ``python -m coordinator.server``);
  it is healthy when its gRPC port (``--bind``, else ``coordinator.bind`` from
  its configuration) accepts a TCP connection.

Neither check looks at what the process depends on (the coordinator, Redis,
the upstream): a node without its coordinator still serves its cache, and
restarting it would not bring the coordinator back. Exit status 0 means
healthy, 1 unhealthy, as Docker's HEALTHCHECK expects; the one line printed
says why and lands in ``docker inspect``. Pids given as arguments limit the
check to those processes (``healthcheck.py 1``).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

TIMEOUT = 2.0


class Unhealthy(Exception):
    """The check failed; the message says what was found."""


def _command_line(pid: int | str, proc: Path = Path("/proc")) -> list[str]:
    """The argument vector of ``pid``; empty when it is gone or a kernel thread."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")] if raw else []


def command_lines(proc: Path = Path("/proc")) -> Iterator[list[str]]:
    """The argument vector of every process we can see, lowest pid (the container's first) first."""
    for pid in sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()):
        argv = _command_line(pid, proc)
        if argv:
            yield argv


def role_of(argv: Sequence[str]) -> str | None:
    """``node``, ``coordinator`` or None for an argument vector."""
    if "node.wsgi:app" in argv and any("gunicorn" in part for part in argv):
        return "node"
    if "coordinator.server" in argv:
        return "coordinator"
    for index, part in enumerate(argv[:-1]):
        if os.path.basename(part) == "shoal" or (part == "-m" and argv[index + 1] == "shoal"):
            rest = argv[index + 1 :]
            if rest[:1] == ["shoal"]:
                rest = rest[1:]
            if rest[:1] == ["coordinator"]:
                return "coordinator"
            if rest[:1] == ["node"]:
                # Still starting: shoal node has not exec'ed gunicorn yet.
                return "starting node"
    return None


def option(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE``; the last one wins, as argparse does."""
    found = None
    for index, part in enumerate(argv):
        if part == name and index + 1 < len(argv):
            found = argv[index + 1]
        elif part.startswith(name + "="):
            found = part[len(name) + 1 :]
    return found


def local_address(bind: str) -> tuple[str, int]:
    """Where to reach a server bound to ``bind`` (HOST:PORT) from inside its container."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def check_node(argv: Sequence[str]) -> str:
    bind = option(argv, "--bind") or option(argv, "-b") or "127.0.0.1:8000"
    host, port = local_address(bind)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        raise Unhealthy(f"node: GET {url} failed: {exc}") from None
    if status != 200:
        raise Unhealthy(f"node: GET {url} answered {status}")
    return f"node: GET {url} answered 200"


def check_coordinator(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    bind = option(argv, "--bind")
    if bind is None:
        # Imported only here: a node's check needs nothing but the standard library.
        from coordinator.config import load_config

        try:
            bind = load_config(option(argv, "--config"), environ).bind
        except ValueError as exc:
            raise Unhealthy(f"coordinator: cannot read its configuration: {exc}") from None
    host, port = local_address(bind)
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            pass
    except OSError as exc:
        raise Unhealthy(f"coordinator: no connection to {host}:{port}: {exc}") from None
    return f"coordinator: {host}:{port} accepts connections"


def check(commands: Sequence[Sequence[str]], environ: Mapping[str, str]) -> str:
    """Check the first Shoal process among ``commands``; return what was found or raise Unhealthy."""
    for argv in commands:
        role = role_of(argv)
        if role == "node":
            return check_node(argv)
        if role == "coordinator":
            return check_coordinator(argv, environ)
        if role == "starting node":
            raise Unhealthy("node: starting, gunicorn is not running yet")
    raise Unhealthy("no Shoal node or coordinator runs here")


def main(argv: Sequence[str]) -> int:
    """Check the processes with the pids in ``argv``, or else every process in the container."""
    commands = [_command_line(pid) for pid in argv] if argv else list(command_lines())
    try:
        print(check(commands, os.environ))
    except Unhealthy as exc:
        print(f"unhealthy: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
