"""py-spy profiles of a node's workers while a scenario runs (``--profile``).

py-spy samples the gunicorn master and its workers from outside, without
changing them. The profile is written as collapsed stacks (one line per
stack, with its sample count), which flamegraph tools read, and summed here
into the functions that take the most samples. Profiling slows the node a
little: the published numbers come from runs without it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from testbed.processes import require_binary


@contextlib.contextmanager
def recording(pid: int, output: Path) -> Iterator[None]:
    """Sample process ``pid`` and its children into ``output`` until the block ends."""
    py_spy = require_binary("py-spy", "py-spy (pip install py-spy)")
    output.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "250", "--format", "raw", "-o", output],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield
    finally:
        # py-spy writes its file when interrupted.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def summary(path: Path, top: int = 25) -> str:
    """The functions with the most samples: on the stack at all (inclusive), and on top of it (self)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if frame]
        # Idle threads (waiting for a request or on a lock) say nothing about cost.
        if not frames or _idle(frames[-1]):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} busy samples in {path.name}", "", "inclusive:"]
    lines += [f"  {count * 100 / total:5.1f}%  {frame}" for frame, count in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {count * 100 / total:5.1f}%  {frame}" for frame, count in own.most_common(top)]
    return "\n".join(lines)


def _idle(frame: str) -> bool:
    return any(word in frame for word in ("wait (threading.py", "select (selectors.py", "_worker (concurrent"))
