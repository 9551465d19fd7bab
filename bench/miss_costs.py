"""What a pull costs each process, cold, warm and copied between nodes: ``python -m bench.miss_costs``.

On two shared cores a cold pull of many small layers is bound by the CPU
every process spends on it, not by bytes. This starts a docker-registry and
a Shoal cluster of three nodes (the product's defaults), publishes fresh
many-layer images, pulls them one after the other (3 blobs at a time, as
``python -m bench`` does) and reads each process's CPU time (user + system,
all threads, from ``/proc``) before and after every phase:

- ``direct``: straight from the upstream;
- ``cold``: through node 1, every blob a miss;
- ``warm``: the same images through node 1 again;
- ``peer``: the same images through node 2, every blob copied from node 1;
- ``peer, warm``: through node 2 again.

Phases on one image set run in that order; the direct phase pulls images
of its own. Everything is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.client import pull
from bench.publisher import Published, Publisher
from bench.settings import KiB
from bench.stack import shoal_cluster
from node.config import parse_size
from testbed.registry import DistributionRegistry

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.miss_costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6, help="images per phase (default 6)")
    parser.add_argument("--layers", type=int, default=30, help="layers per image (default 30)")
    parser.add_argument("--layer-size", type=parse_size, default=256 * KiB, help="each layer (default 256KiB)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shoal-miss-costs-") as scratch:
        work = Path(scratch)
        with DistributionRegistry(work / "upstream") as upstream:
            publisher = Publisher(upstream.url)
            sizes = (args.layer_size,) * args.layers
            stamp = str(time.time_ns())
            images = [publisher.publish(f"costs/many-{i}", sizes, f"{stamp}-{i}") for i in range(2 * args.images)]
            publisher.close()
            direct, cached = images[: args.images], images[args.images :]
            with shoal_cluster(work / "cluster", upstream.url, 3) as cluster:
                one, two = cluster.nodes[0], cluster.nodes[1]
                processes = {
                    "node 1": one.worker_pids(),
                    "node 2": two.worker_pids(),
                    "coordinator": [cluster.coordinators[0].pid],
                    "redis": [cluster.redis.pid],
                    "upstream": [upstream.pid],
                }
                phases: list[tuple[str, str, list[Published]]] = [
                    ("direct", upstream.url, direct),
                    ("cold", one.url, cached),
                    ("warm", one.url, cached),
                    ("peer", two.url, cached),
                    ("peer, warm", two.url, cached),
                ]
                print(
                    f"{args.images} images of {args.layers} x {args.layer_size // KiB} KiB per phase; "
                    "per pull: wall ms, then CPU ms of each process"
                )
                print(f"{'phase':12} {'wall':>6} " + " ".join(f"{name:>11}" for name in [*processes, "client"]))
                for label, url, pulled in phases:
                    wall, spent = _measure(processes, url, pulled)
                    per_pull = {name: seconds * 1000 / len(pulled) for name, seconds in spent.items()}
                    cells = " ".join(f"{per_pull[name]:11.0f}" for name in [*processes, "client"])
                    print(f"{label:12} {wall * 1000 / len(pulled):6.0f} {cells}  total {sum(per_pull.values()):.0f}")
    return 0


def _measure(processes: dict[str, list[int]], url: str, images: list[Published]) -> tuple[float, dict[str, float]]:
    """Pull ``images`` through ``url``; return the wall seconds and the CPU seconds each group (and this one) spent."""

    def now() -> dict[str, float]:
        return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in processes.items()} | {
            "client": _own_cpu()
        }

    before, started = now(), time.perf_counter()
    for image in images:
        pull(url, image)
    wall, after = time.perf_counter() - started, now()
    return wall, {name: after[name] - before[name] for name in before}


if __name__ == "__main__":
    raise SystemExit(main())
