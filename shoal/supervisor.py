"""Keeping ``shoal up``'s processes running: restart on exit, with backoff, and stop in order.

The ``Supervisor`` holds one ``Child`` per process (Redis, each coordinator,
each node) in the order they were started. ``poll`` is the body of the one
loop that watches them all, called every fraction of a second from the main
thread; there is no thread per child. On each call:

- a child whose process exited is reported on stderr with its exit status
  (or the signal that ended it) and the path of its log, and its process
  group is killed, so that nothing it forked (a gunicorn master's workers)
  keeps serving or holds its port;
- once its backoff has passed, it is started again with the same command,
  environment and log, hence the same configuration and port: 1 s after its
  first exit, then 2, 4, 8, 16, and 30 s from then on (``Backoff``). A child
  that ran for a minute before it exited counts as healthy and starts over
  at 1 s. Uptime is all that "healthy" means here: the process ran;
- every other child is left alone, so a child that keeps crashing costs the
  others nothing.

``stop`` ends the children last-started first (nodes, then coordinators,
then Redis): SIGTERM, a bounded wait, then SIGKILL to the whole process
group. A child waiting out its backoff has no process and is simply never
started again, and a child that was just started is stopped like any other,
so a stop at any moment leaves nothing running.

Time is injected (``clock``), so tests step through the schedule with the
shared ``FakeClock``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TextIO


@dataclass
class Backoff:
    """How long a child waits before its next start, given how long it ran before it exited.

    The n-th exit in a row waits ``initial * 2**(n-1)`` seconds, at most
    ``maximum``; an exit after ``reset_after`` seconds of running starts the
    count again.
    """

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0
    failures: int = 0

    def delay(self, uptime: float) -> float:
        if uptime >= self.reset_after:
            self.failures = 0
        delay = min(self.maximum, self.initial * 2**self.failures)
        self.failures += 1
        return delay


def describe_exit(returncode: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``, from a ``Popen.returncode``."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


@dataclass
class Child:
    """One supervised process: what starts it, and its current run (``process`` is None while it waits)."""

    name: str
    command: Sequence[str]
    env: Mapping[str, str] = field(repr=False)  # It carries the cluster secret.
    log_path: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Starts children, restarts the ones that exit (``poll``), and stops them all (``stop``, idempotent)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        report: TextIO | None = None,
        stop_timeout: float = 20.0,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self._clock = clock
        self._report = report
        self._stop_timeout = stop_timeout
        self._backoff = backoff
        self._children: list[Child] = []
        self._stopped = False

    @property
    def children(self) -> list[Child]:
        return list(self._children)

    def start(self, name: str, command: Sequence[str], env: Mapping[str, str], log_path: str) -> Child:
        """Start a child now and supervise it from then on."""
        child = Child(name, list(command), dict(env), log_path, backoff=self._backoff())
        self._children.append(child)
        self._spawn(child)
        return child

    def first_exit(self) -> str | None:
        """What became of the first child whose process has exited (and was not restarted yet), if any."""
        for child in self._children:
            if child.process is not None and child.process.poll() is not None:
                return f"{child.name} {describe_exit(child.process.returncode)}; see {child.log_path}"
        return None

    def poll(self) -> None:
        """Notice children that exited, and start those whose backoff has passed."""
        if self._stopped:
            return
        now = self._clock()
        for child in self._children:
            if child.process is not None and child.process.poll() is not None:
                self._exited(child, now)
            elif child.process is None and child.restart_at is not None and now >= child.restart_at:
                process = self._spawn(child)
                child.restarts += 1
                self._say(f"restarted {child.name} (pid {process.pid}, restart {child.restarts})")

    def stop(self) -> None:
        """Nodes first (they flush to the coordinator), then coordinators, then Redis; nothing is left running."""
        self._stopped = True
        for child in reversed(self._children):
            child.restart_at = None
            process = child.process
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                self._kill_group(process)
                process.wait()
            self._kill_group(process)
            self._close_log(child)
            child.process = None

    def _spawn(self, child: Child) -> subprocess.Popen[bytes]:
        log = open(child.log_path, "ab")  # noqa: SIM115 - closed when the process is done with
        try:
            child.process = subprocess.Popen(
                child.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(child.env),
                # Its own session: a Ctrl-C in the terminal reaches only shoal
                # up, which stops the children in order, and the process
                # group lets a stop reach whatever the child forked.
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        child._log = log
        child.started_at = self._clock()
        child.restart_at = None
        return child.process

    def _exited(self, child: Child, now: float) -> None:
        process = child.process
        assert process is not None
        self._kill_group(process)
        self._close_log(child)
        child.process = None
        delay = child.backoff.delay(now - child.started_at)
        child.restart_at = now + delay
        self._say(
            f"{child.name} {describe_exit(process.returncode)} (log: {child.log_path}); restarting it in {delay:g}s"
        )

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        # What the child forked and did not reap (a gunicorn master's
        # workers after the master was killed). Its process group keeps the
        # child's pid as long as any member lives, so the id cannot have been
        # reused by an unrelated group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    @staticmethod
    def _close_log(child: Child) -> None:
        if child._log is not None:
            child._log.close()
            child._log = None

    def _say(self, message: str) -> None:
        print(f"shoal up: {message}", file=self._report or sys.stderr, flush=True)
