"""``python -m bench.coordinator_faults``: a fresh pull while the coordinator is hung or dead, and its return.

A cluster as ``shoal up`` starts one (the product's defaults: two workers
per node, a 2 s deadline per coordinator call, a heartbeat every 2 s), two
nodes, Debian's docker-registry as the upstream. For each fault, a fresh
image of 6 blobs (about 7 MB) is pulled through node 1 right after the
fault (the first calls may pay their deadline), then a second fresh image
(the breakers are open by then). The coordinator then comes back (SIGCONT,
or a restart), and the script times how long until every node's breakers
let calls through again (``shoal_coordinator_reachable`` is 1 on each) and
until what node 1 fetched meanwhile is registered (locate names it).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.client import pull
from bench.publisher import Published, Publisher
from bench.stack import shoal_cluster
from bench.upstream import Upstream
from testbed.cluster import Cluster, CoordinatorProcess
from testbed.node import NodeProcess
from testbed.processes import wait_until

KiB, MiB = 1024, 1024 * 1024
# Five layers and a config: 6 blobs, about 7 MB.
LAYERS = (4 * MiB, 2 * MiB, 512 * KiB, 256 * KiB, 64 * KiB)
WAIT = 60.0


def _reachable(node: NodeProcess, address: str) -> bool:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    pattern = rf'^shoal_coordinator_reachable\{{address="{re.escape(address)}",node="{node.node_id}"\}} (\S+)$'
    values = re.findall(pattern, text, re.MULTILINE)
    return bool(values) and all(float(value) == 1 for value in values)


def _recovery(cluster: Cluster, coordinator: CoordinatorProcess, fetched: list[Published]) -> tuple[float, float]:
    """Seconds until every node uses ``coordinator`` again, and until node 1's fetches are registered."""
    back = time.perf_counter()
    wait_until(
        lambda: all(_reachable(node, coordinator.address) for node in cluster.nodes), timeout=WAIT, interval=0.05
    )
    used = time.perf_counter() - back
    holder = cluster.nodes[0].node_id
    digests = [digest for image in fetched for digest, _ in image.blobs]
    wait_until(lambda: all(holder in cluster.holders(digest) for digest in digests), timeout=WAIT, interval=0.05)
    return used, time.perf_counter() - back


def run(workdir: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    upstream = Upstream(workdir / "upstream")
    publisher = Publisher(upstream.url)
    try:
        with shoal_cluster(workdir / "cluster", upstream.url, nodes=2) as cluster:
            node, coordinator = cluster.nodes[0], cluster.coordinators[0]
            seeds = iter(range(100))

            def fresh() -> Published:
                seed = next(seeds)
                return publisher.publish(f"faults/coordinator-{seed}", LAYERS, seed=str(seed))

            image = fresh()
            rows.append(("fresh pull, coordinator healthy", f"{pull(node.url, image, verify=True):.2f} s"))

            for fault in ("hung (SIGSTOP)", "killed (SIGKILL)"):
                first, second = fresh(), fresh()
                if fault.startswith("hung"):
                    coordinator.pause()
                else:
                    assert coordinator.process is not None
                    coordinator.process.kill()
                try:
                    rows.append((f"fresh pull, coordinator {fault}, first", f"{pull(node.url, first):.2f} s"))
                    rows.append((f"fresh pull, coordinator {fault}, next", f"{pull(node.url, second):.2f} s"))
                finally:
                    if fault.startswith("hung"):
                        coordinator.resume()
                    else:
                        # Returns once the coordinator answers a call.
                        coordinator.start()
                used, announced = _recovery(cluster, coordinator, [first, second])
                rows.append((f"{fault}: back to every node using it", f"{used:.2f} s"))
                rows.append((f"{fault}: back to node 1's fetches registered", f"{announced:.2f} s"))
    finally:
        publisher.close()
        upstream.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coordinator_faults", description=__doc__)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement (a fresh cluster each)")
    args = parser.parse_args(argv)
    # The harness's own coordinator clients (waiting for a restarted
    # coordinator to answer) would print every breaker they open.
    logging.getLogger("node").setLevel(logging.ERROR)
    for index in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="shoal-faults-") as workdir:
            rows = run(Path(workdir))
        width = max(len(label) for label, _ in rows)
        print(f"run {index + 1}:")
        for label, value in rows:
            print(f"  {label:<{width}}  {value}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
