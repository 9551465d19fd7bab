"""Builds a node: the Flask app and the collaborators behind it.

``create_app`` is the only place that wires the node together; nothing is
kept in module-level state. gunicorn imports ``node.wsgi`` in each worker
after the fork, so the threads made here belong to that worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flask import Flask

from node import api
from node.config import NodeConfig
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
        self.local = LocalStore(config.cache.dir, config.cache.max_size, config.upstream.ttl, clock)
        self.upstream = upstream or Upstream(config.upstream, clock=clock)
        self.fills = Fills(self.local, timeout=config.upstream.timeout, on_commit=lambda _: self._sweep_soon.set())
        self.proxy = ProxyStore(self.local, self.fills, self.upstream, config.upstream, clock=clock)
        self._stop = threading.Event()
        self._sweep_soon = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._background, name="shoal-background", daemon=True)
        self._thread.start()

    def _background(self) -> None:
        """Flush hits every second; sweep after a fill and every minute."""
        last_sweep = time.monotonic()
        while not self._stop.wait(FLUSH_INTERVAL):
            self.local.flush_touches()
            if self._sweep_soon.is_set() or time.monotonic() - last_sweep > SWEEP_INTERVAL:
                self._sweep_soon.clear()
                last_sweep = time.monotonic()
                try:
                    removed = self.local.sweep()
                except OSError:
                    log.exception("sweeping the cache failed")
                    continue
                if removed:
                    log.info("evicted %d items from the cache", len(removed))
        self.local.flush_touches()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        self.fills.close()
        self.upstream.close()


def create_app(
    config: NodeConfig, *, upstream: Upstream | None = None, clock: Callable[[], float] = time.time
) -> Flask:
    node = Node(config, upstream, clock)
    app = Flask("shoal.node")
    app.config["SHOAL"] = config
    app.extensions["shoal.node"] = node
    app.extensions["shoal.proxy"] = node.proxy
    api.register(app)
    return app
