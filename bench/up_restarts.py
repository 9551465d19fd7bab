"""``python -m bench.up_restarts``: how long ``shoal up`` takes to bring a killed child back into service.

Runs ``shoal up`` (three nodes, one coordinator) against a local
docker-registry, pulls an image through every node, then kills each node's
gunicorn master with SIGKILL in turn and times how long until that node
serves the cached image again (manifest by tag and every blob, right bytes),
and kills the coordinator and times how long until its port accepts
connections and until a miss is fetched once for the cluster again (two
nodes asked for a fresh blob at once, one upstream GET). Each child is
killed once per run, so every restart waits the first backoff (1 s), which
the figures include. Prints one line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from statistics import median

import httpx

from testbed.images import build_image, push
from testbed.proc import Proc, children, listening_ports
from testbed.pulls import coordinated_miss, pull, serves
from testbed.registry import DistributionRegistry
from testbed.shoal_up import ShoalUp, State, consecutive_free_ports

NODES = 3
WORKERS = 2
LIMIT = 60.0


def _gone_then(old: list[Proc], condition: Callable[..., bool], *args: object) -> bool:
    """``condition(*args)``, once none of the ``old`` processes runs any more."""
    return not any(proc.running() for proc in old) and condition(*args)


def _listens_anew(up: ShoalUp, old: Proc, port: int) -> bool:
    """Whether a coordinator other than ``old`` listens on ``port`` now."""
    tree = up.tree_now(NODES, WORKERS)
    if tree is None or tree.coordinator == old:
        return False
    return ("127.0.0.1", port) in listening_ports([tree.coordinator.pid])


def _until(condition: Callable[[], bool], since: float, interval: float = 0.02) -> float:
    """Seconds from ``since`` until ``condition`` holds; fails after LIMIT seconds."""
    while not condition():
        if time.monotonic() - since > LIMIT:
            raise TimeoutError(f"not back within {LIMIT:g}s")
        time.sleep(interval)
    return time.monotonic() - since


def _run(number: int, upstream: DistributionRegistry, workdir: Path, found: dict[str, list[float]]) -> None:
    repository = f"restarts/{uuid.uuid4().hex[:12]}"
    image = build_image([300_000, 50_000], seed=repository)
    push(upstream.url, repository, "v1", image)
    base = consecutive_free_ports(NODES)
    state_dir = workdir / f"state-{number}"
    args = ["--nodes", str(NODES), "--upstream", upstream.url, "--port", str(base), "--state-dir", str(state_dir)]
    misses = (f"miss-{index}" for index in itertools.count())
    with ShoalUp(args, workdir / f"shoal-up-{number}.stderr") as up:
        urls = up.wait_ready()
        tree = up.wait_for_tree(NODES, WORKERS)
        state = State.read(state_dir)
        with httpx.Client(timeout=10.0) as client:
            for url in urls:
                pull(client, url, repository, "v1", image)
        for index, url in enumerate(urls):
            victim = tree.nodes[index]
            # Its workers serve on until the supervisor notices the master's
            # death and kills them: only an answer after they are gone is the
            # restarted node's.
            old = [victim, *children(victim.pid)]
            killed = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            took = _until(functools.partial(_gone_then, old, serves, url, repository, "v1", image), killed)
            found["node serves again"].append(took)
            print(f"run {number}: node-{index + 1} killed, serving again after {took:.2f}s", flush=True)
            tree = up.wait_for_tree(NODES, WORKERS, replacing=victim)

        (port,) = state.coordinator_ports
        old = [tree.coordinator]
        killed = time.monotonic()
        os.kill(tree.coordinator.pid, signal.SIGKILL)
        listening = _until(functools.partial(_listens_anew, up, old[0], port), killed, interval=0.01)
        coordinated = _until(
            functools.partial(
                _gone_then, old, lambda: coordinated_miss(upstream, repository, next(misses), (urls[0], urls[1]))
            ),
            killed,
        )
        found["coordinator listens again"].append(listening)
        found["a miss is coordinated again"].append(coordinated)
        print(
            f"run {number}: coordinator killed, listening after {listening:.2f}s, "
            f"a miss coordinated again after {coordinated:.2f}s",
            flush=True,
        )
        up.interrupt()
        up.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.up_restarts", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="how many times to start shoal up and kill (default 3)")
    args = parser.parse_args()
    found: dict[str, list[float]] = {
        "node serves again": [],
        "coordinator listens again": [],
        "a miss is coordinated again": [],
    }
    with tempfile.TemporaryDirectory(prefix="shoal-up-restarts-") as temp:
        workdir = Path(temp)
        with DistributionRegistry(workdir / "upstream") as upstream:
            for number in range(1, args.runs + 1):
                _run(number, upstream, workdir, found)
    print("\nseconds from kill -9 until (first restart, 1 s backoff included):")
    for what, values in found.items():
        print(f"  {what:28} median {median(values):.2f}  min {min(values):.2f}  max {max(values):.2f}  n={len(values)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
