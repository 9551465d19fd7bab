"""Counting what a node does, without a round trip per request.

Each worker process counts into ``Metrics`` (a lock and a dict: nothing on
the request path leaves the process). The node's background thread flushes
the counts as one delta a second, and at shutdown, to a ``Sink``: the
coordinator in a cluster (Redis adds them up per node and for the
cluster), a file beside the cache when the node runs alone.

A delta is idempotent: it carries the worker's id and a sequence number
that grows by one per delta. A delta whose sending failed is sent again
unchanged, with the same number, until it is acknowledged; counts made
meanwhile wait for the next delta. So a retry after a timeout that did
land is recognised and never counted twice, and nothing is lost while the
coordinator is away.

Latency histograms, the upstream's rate-limit gauges and whether each
coordinator address is reachable stay on the node (prometheus-client, in
its multiprocess mode under gunicorn), so that a node whose coordinators
are all away still answers ``/metrics`` with them (and without the shared
counters, which are the coordinator's). So do the cache's size, its limit,
the free space of its filesystem and the fills in progress, read from the
disk at each scrape.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from node.coordinator_client import CoordinatorClient, CoordinatorError
from node.offload import run_blocking
from node.storage.files import write_atomic
from protos.metrics import NodeCounts, families, key, upstream_key

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class CacheUsage(Protocol):
    """What ``/metrics`` reports of the node's store (``node.storage.local.LocalStore``)."""

    root: str
    max_size: int

    def used_bytes(self) -> int:
        """The bytes of content the store holds now."""
        ...

    def fills_in_progress(self) -> int:
        """Fills (upstream or peer transfers) whose bytes are still arriving."""
        ...


class Sink(Protocol):
    def send(self, worker_id: str, sequence: int, counters: Mapping[str, int]) -> None:
        """Apply a delta once per (worker, sequence); raise if it may not have landed."""
        ...

    def snapshot(self) -> tuple[list[NodeCounts], dict[str, int]]:
        """The counters of every node, and the cluster's totals."""
        ...


class CoordinatorSink:
    def __init__(self, client: CoordinatorClient) -> None:
        self._client = client

    def send(self, worker_id: str, sequence: int, counters: Mapping[str, int]) -> None:
        self._client.report_metrics(worker_id, sequence, counters)

    def snapshot(self) -> tuple[list[NodeCounts], dict[str, int]]:
        answer = self._client.get_metrics()
        return answer.nodes, dict(answer.cluster)


class LocalSink:
    """A node on its own adds its workers' deltas up in a JSON file, under a lock."""

    # Sequences of workers idle this long are forgotten (their ids never return).
    RETENTION = 24 * 3600.0

    def __init__(self, path: str, node_id: str, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._node_id = node_id
        self._clock = clock

    def send(self, worker_id: str, sequence: int, counters: Mapping[str, int]) -> None:
        with open(self._path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            last = state["workers"].get(worker_id)
            if last is not None and last[0] >= sequence:
                return
            state["workers"][worker_id] = [sequence, self._clock()]
            totals = Counter(state["counters"])
            totals.update(counters)
            state["counters"] = dict(totals)
            cutoff = self._clock() - self.RETENTION
            state["workers"] = {w: seen for w, seen in state["workers"].items() if seen[1] >= cutoff}
            # Atomic, and leaves no temporary file behind when the disk is full.
            write_atomic(self._path, json.dumps(state).encode())

    def snapshot(self) -> tuple[list[NodeCounts], dict[str, int]]:
        counters = self._read()["counters"]
        return [NodeCounts(self._node_id, counters)], dict(counters)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self._path, encoding="utf-8") as handle:
                state: dict[str, dict[str, Any]] = json.load(handle)
                return state
        except (FileNotFoundError, ValueError):
            return {"workers": {}, "counters": {}}


class CoordinatorReachability:
    """``shoal_coordinator_reachable{address,node}``: what the breakers of this node's workers say.

    Each worker sets 1 while its breaker lets calls through to the address
    and 0 while it skips it (``node.breaker``); the node reports the
    lowest value of its live workers, so 0 means at least one worker
    treats the address as down. A worker that never called the
    coordinator reports nothing.
    """

    def __init__(self, registry: CollectorRegistry, node_id: str) -> None:
        self.node_id = node_id
        self._gauge = Gauge(
            "shoal_coordinator_reachable",
            "1 while the node's calls go to this coordinator address, 0 while its circuit breaker skips it",
            ["address", "node"],
            multiprocess_mode="livemin",
            registry=registry,
        )

    def coordinator_reachable(self, address: str, reachable: bool) -> None:
        self._gauge.labels(address, self.node_id).set(1 if reachable else 0)


class Metrics:
    """One worker's counters, flushed as idempotent deltas; and its histograms."""

    def __init__(
        self, sink: Sink, node_id: str, registry: CollectorRegistry | None = None, cache: CacheUsage | None = None
    ) -> None:
        self.sink = sink
        self.node_id = node_id
        self.cache = cache
        self.worker_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._current: Counter[str] = Counter()
        self._pending: tuple[int, dict[str, int]] | None = None
        self._sequence = 0
        self.registry = registry or CollectorRegistry()
        self.request_seconds = Histogram(
            "shoal_request_duration_seconds",
            "Time to answer a client request (until the body starts)",
            ["endpoint", "node"],
            registry=self.registry,
        )
        self._request_series: dict[str, Any] = {}
        self.upstream_seconds = Histogram(
            "shoal_upstream_fetch_duration_seconds",
            "Time of an upstream request, to the end of its body",
            ["registry", "kind", "node"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self._rate_limit = Gauge(
            "shoal_upstream_ratelimit",
            "The last rate-limit header the upstream sent (ratelimit-limit, ratelimit-remaining)",
            ["registry", "header", "node"],
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )

    # Counting, from any thread.

    def add(self, counter: str, value: int = 1) -> None:
        if value:
            with self._lock:
                self._current[counter] += value

    def count(self, kind: str, counter: str, value: int = 1) -> None:
        self.add(key(kind, counter), value)

    def observe_request(self, endpoint: str, seconds: float) -> None:
        """One client request's time, in the histogram of its endpoint."""
        series = self._request_series.get(endpoint)
        if series is None:
            # labels() looks the child up under a lock: once per endpoint, not per request.
            series = self._request_series[endpoint] = self.request_seconds.labels(endpoint, self.node_id)
        series.observe(seconds)

    def upstream_request(self, registry: str, kind: str, status: int | None, seconds: float) -> None:
        status_class = f"{status // 100}xx" if status is not None else "error"
        self.add(upstream_key(kind, status_class, registry))
        self.upstream_seconds.labels(registry, kind, self.node_id).observe(seconds)

    def rate_limits(self, registry: str, seen: Mapping[str, str]) -> None:
        for header, value in seen.items():
            number = value.split(";", 1)[0].strip()
            if number.isdigit():
                self._rate_limit.labels(registry, header, self.node_id).set(int(number))

    # Flushing, from the background thread and at shutdown.

    def flush(self) -> bool:
        """Send what was counted; False when the sink could not be reached (retried next time)."""
        with self._flush_lock:
            with self._lock:
                if self._pending is None and self._current:
                    self._sequence += 1
                    self._pending = (self._sequence, dict(self._current))
                    self._current.clear()
            if self._pending is None:
                return True
            try:
                self.sink.send(self.worker_id, *self._pending)
            except (CoordinatorError, OSError) as exc:
                log.debug("metrics flush failed, will retry: %s", exc)
                return False
            self._pending = None
            return True

    # Reading.

    def prometheus_registry(self) -> CollectorRegistry:
        """A registry for one scrape: the shared counters and this node's histograms."""
        registry = CollectorRegistry()
        registry.register(_CountersCollector(self.sink))
        if self.cache is not None:
            registry.register(_CacheCollector(self.cache, self.node_id))
        if os.environ.get(MULTIPROC_ENV):
            MultiProcessCollector(registry)
        else:
            registry.register(_RegistryCollector(self.registry))
        return registry


class _CountersCollector(Collector):
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def collect(self) -> Iterable[Metric]:
        try:
            nodes, cluster = self._sink.snapshot()
        except CoordinatorError as exc:
            # The counters live in the coordinator; this node's own families
            # are still worth a scrape (shoal_coordinator_reachable above all).
            log.info("/metrics without the shared counters: %s", exc)
            return []
        return families(nodes, cluster)


class _CacheCollector(Collector):
    """The store's size against its limit and its filesystem, measured when scraped.

    Read in the worker that answers the scrape, from the disk every worker
    shares, so no multiprocess bookkeeping is needed; off the event loop,
    since the size walks the whole store and the worker's other requests
    must not wait for that. The filesystem's free space is what an
    unprivileged process may still write (``f_bavail``).
    """

    def __init__(self, cache: CacheUsage, node_id: str) -> None:
        self._cache = cache
        self._node_id = node_id

    def collect(self) -> Iterable[Metric]:
        labels = ["node"]
        used = GaugeMetricFamily("shoal_cache_used_bytes", "Bytes of content in the node's cache", labels=labels)
        used.add_metric([self._node_id], run_blocking(self._cache.used_bytes))
        limit = GaugeMetricFamily(
            "shoal_cache_max_bytes", "The cache's size limit (cache.max_size); above it the node evicts", labels=labels
        )
        limit.add_metric([self._node_id], self._cache.max_size)
        fills = GaugeMetricFamily(
            "shoal_fills_in_progress", "Fills (from the upstream or a peer) still receiving bytes", labels=labels
        )
        fills.add_metric([self._node_id], run_blocking(self._cache.fills_in_progress))
        result: list[Metric] = [used, limit, fills]
        try:
            disk = run_blocking(os.statvfs, self._cache.root)
        except OSError as exc:
            log.warning("cannot measure the cache's filesystem: %s", exc)
            return result
        free = GaugeMetricFamily(
            "shoal_cache_filesystem_free_bytes", "Bytes free for the node on its cache's filesystem", labels=labels
        )
        free.add_metric([self._node_id], disk.f_bavail * disk.f_frsize)
        size = GaugeMetricFamily("shoal_cache_filesystem_size_bytes", "Size of the cache's filesystem", labels=labels)
        size.add_metric([self._node_id], disk.f_blocks * disk.f_frsize)
        return [*result, free, size]


class _RegistryCollector(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()
