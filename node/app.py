"""Builds a node: the Flask app and the collaborators behind it.

``create_app`` is the only place that wires the node together; nothing is
kept in module-level state. gunicorn imports ``node.wsgi`` in each worker
after the fork, so the threads made here belong to that worker.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable

from flask import Flask

from node import api
from node.cluster import Cluster
from node.config import NodeConfig
from node.coordinator_client import CoordinatorClient
from node.directory import Directory, Standalone
from node.metrics import CoordinatorSink, LocalSink, Metrics, Sink
from node.peers import PeerClient, internal
from node.status import status
from node.storage.fill import Fills
from node.storage.local import LocalStore
from node.storage.proxy import ProxyStore
from node.upstream import Upstream

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
        )
        client = _coordinator_client(config)
        sink: Sink = (
            CoordinatorSink(client)
            if client is not None
            else LocalSink(os.path.join(self.local.root, "metrics.json"), config.node_id, clock)
        )
        self.metrics = Metrics(sink, config.node_id)
        self.fills = Fills(
            self.local,
            timeout=config.upstream.timeout,
            on_commit=lambda _: self._sweep_soon.set(),
            max_fills=fills_per_worker(config),
        )
        self.directory: Directory = Standalone()
        if client is not None:
            peers = PeerClient(config.cluster.secret or "", config.upstream.timeout, self.metrics)
            self.directory = Cluster(config, self.local, client, peers, self.metrics, clock)
        # One upstream client and one proxy store per registry; the local
        # store, the fills and the directory are shared (content by digest
        # is the same whichever registry it came from).
        self.upstreams = {
            settings.name: (
                upstream
                if upstream is not None and settings.name == config.upstream.name
                else Upstream(settings, clock=clock, observer=self.metrics, blob_connections=fills_per_worker(config))
            )
            for settings in config.upstreams
        }
        self.proxies = {
            settings.name: ProxyStore(
                self.local, self.fills, self.upstreams[settings.name], settings, self.directory, clock=clock
            )
            for settings in config.upstreams
        }
        self._interval = min(FLUSH_INTERVAL, config.cluster.heartbeat_interval)
        self._stop = threading.Event()
        self._sweep_soon = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._background, name="shoal-background", daemon=True)
        self._thread.start()

    def _background(self) -> None:
        """Every second: hits, metrics and the heartbeat; a sweep after a fill and every minute."""
        last_sweep = time.monotonic()
        self.directory.tick()
        while not self._stop.wait(self._interval):
            self.directory.touched(self.local.flush_touches())
            self.metrics.flush()
            self.directory.tick()
            if self._sweep_soon.is_set() or time.monotonic() - last_sweep > SWEEP_INTERVAL:
                self._sweep_soon.clear()
                last_sweep = time.monotonic()
                self._sweep()
        self.directory.touched(self.local.flush_touches())
        self.metrics.flush()

    def _sweep(self) -> None:
        try:
            removed = self.local.sweep()
        except OSError:
            log.exception("sweeping the cache failed")
            return
        if removed:
            log.info("evicted %d items from the cache", len(removed))
            for _, reason in removed:
                self.metrics.add(f"evictions.{reason}")
            self.directory.dropped([digest for digest, _ in removed])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        self.fills.close()
        self.directory.close()
        for client in self.upstreams.values():
            client.close()


def fills_per_worker(config: NodeConfig) -> int:
    """A worker's share of ``cache.max_fills``, at least one."""
    return max(1, math.ceil(config.cache.max_fills / config.server.workers))


def _coordinator_client(config: NodeConfig) -> CoordinatorClient | None:
    if not config.cluster.enabled:
        return None
    return CoordinatorClient(
        list(config.cluster.coordinators),
        config.cluster.secret or "",
        config.node_id,
        timeout=config.cluster.timeout,
        tls_ca=config.cluster.tls_ca,
    )


def create_app(
    config: NodeConfig, *, upstream: Upstream | None = None, clock: Callable[[], float] = time.time
) -> Flask:
    node = Node(config, upstream, clock)
    app = Flask("shoal.node")
    app.config["SHOAL"] = config
    app.extensions["shoal.node"] = node
    app.extensions["shoal.proxies"] = node.proxies
    app.extensions["shoal.local"] = node.local
    app.extensions["shoal.fills"] = node.fills
    app.extensions["shoal.metrics"] = node.metrics
    app.config["SHOAL_CLUSTER_SECRET"] = config.cluster.secret or ""
    api.register(app)
    app.register_blueprint(internal)
    app.register_blueprint(status)
    return app
