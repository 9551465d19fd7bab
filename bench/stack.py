"""Everything the benchmark measures, started on loopback and stopped again.

- the upstream: ``docker-registry`` with filesystem storage, where every
  scenario pushes fresh generated images;
- the anchors: ``docker-registry`` in proxy mode, one instance and three
  instances, each with its own storage;
- Shoal: a coordinator (with its Redis) and three nodes;
- HAProxy with one round-robin frontend per system, so that every system
  is reached through the same load balancer (the single instances too:
  one more hop, the same for all);
- nginx serving node 1's blob files with sendfile.

``close`` stops everything in the reverse order, and is safe to call after
a start that failed half-way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from bench.haproxy import HAProxy
from bench.nginx import Nginx
from bench.publisher import Publisher
from bench.upstream import Upstream
from bench.upstream_log import AccessLog, Usage
from testbed.cluster import Cluster
from testbed.registry import DistributionRegistry

# How the report names each system.
SYSTEMS = {
    "shoal": "Shoal, 3 nodes behind HAProxy",
    "shoal-node": "Shoal node 1, directly",
    "dist1": "distribution proxy x1 (behind HAProxy)",
    "dist3": "distribution proxy x3 behind HAProxy",
    "upstream": "upstream, directly",
    "upstream-lb": "upstream behind HAProxy",
    "nginx": "nginx, sendfile",
}

# The product's settings, but for a cache that never evicts during a run:
# every scenario pushes fresh images, so the default size would fill up.
SHOAL_NODE_SETTINGS = {"cache": {"max_size": "200GiB"}}


def shoal_cluster(workdir: Path, upstream_url: str, nodes: int) -> Cluster:
    """A Shoal cluster started as ``shoal up`` starts one: the product's defaults, on loopback."""
    return Cluster(workdir, upstream_url, nodes=nodes, node_settings=SHOAL_NODE_SETTINGS, product_defaults=True)


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._closers: list[Callable[[], None]] = []

    def _keep(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def start(self) -> None:
        self.upstream = Upstream(self.workdir / "upstream")
        self._keep(self.upstream.close)
        self.dist1 = DistributionRegistry(self.workdir / "dist1", proxy_remote_url=self.upstream.url)
        self._keep(self.dist1.close)
        self.dist3: list[DistributionRegistry] = []
        for index in range(3):
            registry = DistributionRegistry(self.workdir / f"dist3-{index + 1}", proxy_remote_url=self.upstream.url)
            self._keep(registry.close)
            self.dist3.append(registry)
        self.shoal = shoal_cluster(self.workdir / "shoal", self.upstream.url, nodes=3)
        self._keep(self.shoal.close)
        self.lb = HAProxy(
            self.workdir / "haproxy",
            {
                "shoal": self.shoal.urls,
                "dist1": [self.dist1.url],
                "dist3": [registry.url for registry in self.dist3],
                "origin": [self.upstream.url],
            },
        )
        self._keep(self.lb.close)
        self.nginx = Nginx(self.workdir / "nginx", self.shoal.nodes[0].cache_dir)
        self._keep(self.nginx.close)
        self.log = AccessLog(self.upstream.access_log_path)
        self.publisher = Publisher(self.upstream.url)
        self._keep(self.publisher.close)

    def settled(self, repository: str) -> Usage:
        """What ``repository`` asked of the upstream, once the upstream is idle."""
        return self.log.settled(repository, lambda: self.upstream.in_flight() > 0)

    def url(self, system: str) -> str:
        """Where a client reaches ``system`` (nginx serves files, not the registry API)."""
        return {
            "shoal": lambda: self.lb.url("shoal"),
            "shoal-node": lambda: self.shoal.nodes[0].url,
            "dist1": lambda: self.lb.url("dist1"),
            "dist3": lambda: self.lb.url("dist3"),
            "upstream": lambda: self.upstream.url,
            "upstream-lb": lambda: self.lb.url("origin"),
        }[system]()

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except BaseException as exc:
                # Even a second Ctrl-C must not leave the rest running.
                print(f"bench: stopping failed: {exc!r}", file=sys.stderr)

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
