"""Builds a node: the Flask app and the collaborators behind it.

``create_app`` is the only place that wires the node together; nothing is
kept in module-level state. gunicorn imports ``node.wsgi`` in each worker
after the fork, so the threads made here belong to that worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from flask import Flask
from prometheus_client import CollectorRegistry

from node import api
from node.auth import Gate
from node.bindings import Bindings, ClusterLedger, Ledger
from node.breaker import Marks, Observer, Shared
from node.budget import Budget
from node.cluster_source import ClusterSource
from node.config import NodeConfig, UpstreamConfig
from node.coordinator_client import CoordinatorClient
from node.flight import Announcements, Flight
from node.manifest_route import ManifestRoute
from node.membership import Membership
from node.metrics import CoordinatorReachability, CoordinatorSink, LocalSink, Metrics, Sink
from node.offload import run_blocking
from node.peers import PeerClient, internal
from node.services import Services, install
from node.sources import Source
from node.status import guard_listeners, status
from node.storage.fill import Fills
from node.storage.ledger import LocalLedger
from node.storage.local import LocalStore
from node.storage.memory import MemoryCache
from node.storage.proxy import ProxyStore
from node.upstream import Upstream
from protos.metrics import eviction_key

log = logging.getLogger(__name__)

# How often recorded hits are written to the store's access order, and how
# often the store is checked against its size limit and TTL.
FLUSH_INTERVAL = 1.0
SWEEP_INTERVAL = 60.0


class Node:
    """Everything a worker runs besides the views; ``close`` stops it all."""

    def __init__(self, config: NodeConfig, upstream: Upstream | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        # In a cluster the coordinator's scheduler expires content; alone,
        # the store's own sweep does.
        local_ttl = 0.0 if config.cluster.enabled else config.upstream.ttl
        self.local = LocalStore(
            config.cache.dir,
            config.cache.max_size,
            local_ttl,
            clock,
            extend_ttl_on_hit=config.cache.extend_ttl_on_hit,
            min_free=min_free_bytes(config),
        )
        # The client reports its breakers into the node's Prometheus
        # registry, and the metrics send their deltas through the client.
        registry = CollectorRegistry()
        self.coordinator = _coordinator_client(
            config, CoordinatorReachability(registry, config.node_id), Marks(self.local.layout)
        )
        sink: Sink = (
            CoordinatorSink(self.coordinator)
            if self.coordinator is not None
            else LocalSink(self.local.layout.metrics(), config.node_id, clock)
        )
        self.metrics = Metrics(sink, config.node_id, registry, cache=self.local)
        self.fills = Fills(
            self.local,
            timeout=config.upstream.timeout,
            on_commit=lambda _: self._sweep_soon.set(),
            max_fills=config.cache.max_fills,
            needs_room=lambda: self._sweep_soon.set(),
        )
        # One upstream client and one proxy store per registry; the local
        # store, the fills and the cluster are shared (content by digest is
        # the same whichever registry it came from).
        self.upstreams = {
            settings.name: (
                upstream
                if upstream is not None and settings.name == config.upstream.name
                else self._upstream(settings, clock)
            )
            for settings in config.upstreams
        }
        self.membership: Membership | None = None
        self.peers: PeerClient | None = None
        sources: dict[str, Source] = dict(self.upstreams)
        if self.coordinator is not None:
            announcements = Announcements(self.local.layout.unannounced())
            self.membership = Membership(config, self.local, self.coordinator, announcements, self.metrics)
            self.peers = PeerClient(config.cluster.secret or "", config.upstream.timeout, self.metrics)
            flight = Flight(
                self.coordinator,
                config.node_id,
                announcements,
                self.metrics,
                lease_ttl=config.cluster.lease_ttl,
                # How long to wait for another node's fetch before fetching anyway.
                wait_timeout=config.upstream.timeout + config.cluster.lease_ttl,
            )
            sources = {settings.name: self._cluster_source(settings, flight, clock) for settings in config.upstreams}
        # Manifests are the same whichever registry they came from; tags and
        # bindings are kept by registry-scoped name: one memory serves every
        # proxy store.
        self.memory = MemoryCache(memory_per_worker(config))
        # Which digests each repository holds: the cluster's, or the node's own.
        ledger: Ledger = ClusterLedger(self.coordinator, clock) if self.coordinator else LocalLedger(self.local.layout)
        self.proxies = {
            settings.name: ProxyStore(
                self.local,
                self.fills,
                sources[settings.name],
                settings,
                Bindings(
                    settings, self.upstreams[settings.name], ledger, self.memory, clock=clock, counter=self.metrics
                ),
                clock=clock,
                memory=self.memory,
                budget=self.upstreams[settings.name].budget,
            )
            for settings in config.upstreams
        }
        self.services = Services(config, self.proxies, self.local, self.fills, self.metrics, Gate(config))
        self._interval = min(FLUSH_INTERVAL, config.cluster.heartbeat_interval)
        self._stop = threading.Event()
        self._sweep_soon = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._background, name="shoal-background", daemon=True)
        self._thread.start()

    def _upstream(self, settings: UpstreamConfig, clock: Callable[[], float]) -> Upstream:
        # The pause of tag checks is shared by the node's workers through a file.
        budget = Budget(settings, self.local.layout.budget(settings.name), clock=clock, observer=self.metrics)
        return Upstream(
            settings, clock=clock, observer=self.metrics, blob_connections=self.config.cache.max_fills, budget=budget
        )

    def _cluster_source(self, settings: UpstreamConfig, flight: Flight, clock: Callable[[], float]) -> ClusterSource:
        assert self.coordinator is not None and self.peers is not None
        upstream = self.upstreams[settings.name]
        return ClusterSource(
            upstream,
            settings,
            flight,
            self.coordinator,
            self.peers,
            self.local,
            clock,
            budget=upstream.budget,
            counter=self.metrics,
        )

    def _background(self) -> None:
        """Every second: hits, metrics and the heartbeat; a sweep after a fill and every minute."""
        last_sweep = time.monotonic()
        self._tick()
        while not self._stop.wait(self._interval):
            self._flush()
            self._tick()
            if self._sweep_soon.is_set() or time.monotonic() - last_sweep > SWEEP_INTERVAL:
                self._sweep_soon.clear()
                last_sweep = time.monotonic()
                self._sweep()
        self._flush()

    def _tick(self) -> None:
        if self.membership is not None:
            self.membership.tick()

    def _flush(self) -> None:
        touched = self.local.flush_touches()
        if self.membership is not None:
            self.membership.touched(touched)
        self.metrics.flush()

    def _sweep(self) -> None:
        try:
            # Off the event loop: the sweep walks the whole store, and this
            # worker's requests (health checks too) must not wait for that.
            removed = run_blocking(self.local.sweep, self.fills.reserved(), self.fills.take_wanted())
        except OSError:
            log.exception("sweeping the cache failed")
            return
        if removed:
            log.info("evicted %d items from the cache", len(removed))
            for _, reason in removed:
                self.metrics.add(eviction_key(reason))
            if self.membership is not None:
                self.membership.dropped([digest for digest, _ in removed])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        self.fills.close()
        if self.membership is not None:
            self.membership.close()
        if self.peers is not None:
            self.peers.close()
        if self.coordinator is not None:
            self.coordinator.close()
        for client in self.upstreams.values():
            client.close()
        self.local.close()


def min_free_bytes(config: NodeConfig) -> int:
    """``cache.min_free`` in bytes, for the filesystem that holds ``cache.dir``."""
    os.makedirs(config.cache.dir, exist_ok=True)
    info = os.statvfs(config.cache.dir)
    return config.cache.min_free.of(info.f_blocks * info.f_frsize)


def memory_per_worker(config: NodeConfig) -> int:
    """A worker's share of ``cache.memory``: the node's total stays within it."""
    return config.cache.memory // config.server.workers


def _coordinator_client(config: NodeConfig, observer: Observer, shared: Shared) -> CoordinatorClient | None:
    if not config.cluster.enabled:
        return None
    return CoordinatorClient(
        list(config.cluster.coordinators),
        config.cluster.secret or "",
        config.node_id,
        timeout=config.cluster.timeout,
        tls_ca=config.cluster.tls_ca,
        observer=observer,
        shared=shared,
    )


def create_app(
    config: NodeConfig, *, upstream: Upstream | None = None, clock: Callable[[], float] = time.time
) -> Flask:
    node = Node(config, upstream, clock)
    app = Flask("shoal.node")
    install(app, node.services)
    # gunicorn's worker closes the node when it stops (node.wsgi).
    app.extensions["shoal.node"] = node
    api.register(app)
    app.register_blueprint(internal)
    app.register_blueprint(status)
    guard_listeners(app, config)
    # Manifest requests are answered in front of Flask (node/manifest_route.py).
    app.wsgi_app = ManifestRoute(app.wsgi_app, node.services)  # type: ignore[method-assign]
    return app
