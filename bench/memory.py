"""Resident memory of a node's gunicorn workers, from /proc.

``VmHWM`` is a process's peak resident set size. Writing ``5`` to
``/proc/<pid>/clear_refs`` (Linux 4.0 and later) resets that peak to the
current size, so a peak can be taken over one request rather than over the
process's whole life.
"""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")


def _status_kib(pid: int, key: str) -> int:
    for line in (_PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def rss(pid: int) -> int:
    """Current resident set size in bytes."""
    return _status_kib(pid, "VmRSS") * 1024


def peak(pid: int) -> int:
    """Peak resident set size in bytes since the process started or the last ``reset_peak``."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak(pid: int) -> None:
    fd = os.open(_PROC / str(pid) / "clear_refs", os.O_WRONLY)
    try:
        os.write(fd, b"5")
    finally:
        os.close(fd)
