"""Waiting for a child process to listen on its port."""

from __future__ import annotations

import socket

from testbed.processes import Process, wait_until


def wait_for_port(port: int, process: Process, what: str, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail with the log if ``process`` exits first."""

    def accepts() -> bool:
        if not process.alive():
            raise RuntimeError(f"{what} exited before listening\n{process.describe()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(accepts, timeout=timeout, message=lambda: f"{what} never listened on {port}\n{process.describe()}")
