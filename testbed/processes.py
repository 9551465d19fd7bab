"""Starting, awaiting and stopping the real processes that integration tests use.

Every helper here waits on a condition with a deadline instead of sleeping a
fixed time, so a fast machine is never slowed down and a slow one fails with a
message that says what never happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is released before returning, so another process could take it
    in between; binding to port 0 inside the service would avoid that race,
    but the services we start need to be told their address up front.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    Raises ``TimeoutError`` (with ``message``, which may be a callable so that
    it can describe the state at the time of failure) when ``timeout`` seconds
    pass first. The predicate is always tried at least once, and once more at
    the deadline, so a short timeout never fails without looking.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"{text} (after {timeout:g}s)")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def wait_for_http(url: str, timeout: float = 20.0, *, alive: Callable[[], bool] | None = None) -> httpx.Response:
    """Poll ``url`` until the server gives any HTTP answer, whatever its status.

    ``alive`` lets the caller abort early, for instance when the server
    process has already exited and waiting on would only hide its log.
    """
    last_error: Exception | None = None

    def answered() -> httpx.Response | None:
        nonlocal last_error
        if alive is not None and not alive():
            raise RuntimeError(f"server for {url} exited before answering; last error: {last_error!r}")
        try:
            return httpx.get(url, timeout=2.0)
        except httpx.TransportError as exc:
            last_error = exc
            return None

    response = wait_until(
        answered, timeout=timeout, interval=0.05, message=lambda: f"no HTTP answer from {url}: {last_error!r}"
    )
    assert response is not None  # wait_until returns only a truthy answer
    return response


def wait_for_port(port: int, process: Process, what: str, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail with the log if ``process`` exits first.

    For a server whose HTTP answer would come from somewhere else (a load
    balancer's backends) or that speaks no HTTP itself (a TCP forwarder).
    """

    def accepts() -> bool:
        if not process.alive():
            raise RuntimeError(f"{what} exited before listening\n{process.describe()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(accepts, timeout=timeout, message=lambda: f"{what} never listened on {port}\n{process.describe()}")


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its ``SHOAL_*`` variables, and ``extra`` on top.

    A Shoal process the test bed starts reads every setting from its config
    file or from ``extra``: nothing in the caller's shell changes what a test
    checks or what the benchmark measures.
    """
    kept = {key: value for key, value in os.environ.items() if not key.startswith("SHOAL_")}
    return {**kept, **(extra or {})}


def require_binary(name: str, debian_package: str) -> str:
    """Return the path of ``name`` on PATH, or fail naming the package that provides it.

    A missing server is a broken test environment, never a reason to skip.
    """
    # Daemons such as haproxy and nginx live in sbin, which a non-login
    # PATH may lack.
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError(f"{name} not found on PATH; install the Debian package {debian_package!r}")
    return path


class Process:
    """A child process whose output goes to log files, stopped reliably.

    stdout and stderr go to ``log_path``; pass ``stdout_path`` to keep stdout
    apart (docker-registry writes its access log to stdout). Log files are
    opened for appending, so a process started again on the same files keeps
    the history of its earlier runs.
    """

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        log_path: str | os.PathLike[str],
        *,
        stdout_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.args = [os.fspath(arg) for arg in args]
        self.log_path = Path(log_path)
        self.stdout_path = Path(stdout_path) if stdout_path is not None else None
        self._files: list[IO[bytes]] = []
        log = self._open(self.log_path)
        out = self._open(self.stdout_path) if self.stdout_path is not None else log
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                # Its own process group lets stop() and kill() reach the
                # children it forks too (gunicorn workers, say), so none
                # outlives the test; it also keeps a Ctrl-C in the terminal
                # for pytest, whose teardown then stops the process in order.
                start_new_session=True,
            )
        except BaseException:
            self._close_files()
            raise

    def _open(self, path: Path) -> IO[bytes]:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("ab")
        self._files.append(handle)
        return handle

    def _close_files(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def stop(self, timeout: float = 10.0) -> int:
        """Send SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; return the exit code.

        SIGTERM goes to the process alone, so that a server can shut its own
        children down gracefully; SIGKILL then goes to its whole process
        group, which also removes any child left behind. Idempotent: stopping
        a process that has already exited just returns its exit code.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.popen.wait()
        self._kill_group()
        self._close_files()
        return self.popen.returncode

    def kill(self) -> int:
        """Stop the process and its children at once with SIGKILL, as a crash would; return the exit code."""
        self._kill_group()
        self.popen.wait()
        self._close_files()
        return self.popen.returncode

    def _kill_group(self) -> None:
        # The group outlives its leader while any member lives, and its id
        # cannot be reused meanwhile, so this never hits a stranger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def log_text(self) -> str:
        """Return everything written to the log file so far (stderr, and stdout unless kept apart)."""
        return _read_text(self.log_path)

    def stdout_text(self) -> str:
        """Return the separate stdout log, or the shared log when stdout was not kept apart."""
        return _read_text(self.stdout_path or self.log_path)

    def describe(self) -> str:
        """A multi-line description for failure messages: command, exit status and log."""
        status = "running" if self.alive() else f"exited with {self.popen.returncode}"
        return f"$ {' '.join(self.args)}\n({status}; log {self.log_path})\n{self.log_text()}"

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
