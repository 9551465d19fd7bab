"""``/metrics``: the cluster's counters as Prometheus text, read from Redis on each scrape.

Any replica answers with the same numbers, since the counters live in Redis:
point Prometheus at one replica, or at all of them behind one job, and use
the ``shoal_cluster_*`` families for totals. A collector registered on a
registry of the server's own (never the process-global one) turns a
``Metrics`` snapshot into the families of ``protos.metrics``, so the
coordinator renders them exactly as nodes do. prometheus-client's WSGI app
writes the text (and gzips it when asked); a small threaded WSGI server
runs it in a thread of its own.

When Redis cannot be reached the scrape fails with 503 rather than answering
without counters, which Prometheus would take for counter resets.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIEnvironment

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from coordinator.metrics import Metrics
from protos.metrics import families

log = logging.getLogger(__name__)

PATH = "/metrics"
# A client that connects and sends nothing holds a thread this long at most.
REQUEST_TIMEOUT = 10.0


class CountersCollector(Collector):
    """Every node's counters (with whether it is alive) and the cluster's, as Prometheus families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        snapshot = self._metrics.snapshot()
        return families(snapshot.nodes, snapshot.cluster)


class _Server(ThreadingMixIn, WSGIServer):
    # Scrapes in progress never hold up a stopping coordinator.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _QuietHandler)


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        # One line per scrape is noise at INFO; wsgiref would write it to stderr.
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """Serves ``/metrics`` on ``bind`` (HOST:PORT; port 0 picks a free one).

    The constructor binds, so ``port`` is known before ``start``, and an
    address in use fails at once with ``OSError``. ``close`` stops serving
    and frees the port; it is safe to call twice, and before ``start``.
    """

    def __init__(self, metrics: Metrics, bind: str) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CountersCollector(metrics))
        self._exposition = make_wsgi_app(registry)
        host, _, port = bind.rpartition(":")
        host = host.strip("[]")
        try:
            family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]
            self._server = _Server((host, int(port)), family)
        except OSError as exc:
            raise OSError(f"cannot serve /metrics on {bind}: {exc.strerror or exc}") from None
        self._server.set_app(self._app)
        self.port: int = self._server.server_address[1]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._redis_down = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._server.serve_forever, name="shoal-metrics", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            # shutdown() waits for serve_forever to notice, so only when it runs.
            self._server.shutdown()
            thread.join()
        self._server.server_close()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return _plain(start_response, "404 Not Found", f"not found; the counters are at {PATH}")
        try:
            response = self._exposition(environ, start_response)
        except redis.RedisError as exc:
            # Logged once per outage, not once per scrape.
            if not self._redis_down:
                log.warning("cannot read the counters from Redis (%s); /metrics answers 503", type(exc).__name__)
            self._redis_down = True
            return _plain(start_response, "503 Service Unavailable", "the coordinator cannot reach Redis")
        except Exception:
            log.exception("rendering /metrics failed")
            return _plain(start_response, "500 Internal Server Error", "internal error in the coordinator")
        if self._redis_down:
            log.info("/metrics reads the counters from Redis again")
            self._redis_down = False
        return list(response)


def _plain(start_response: StartResponse, status: str, message: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [f"{message}\n".encode()]
