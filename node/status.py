"""Status endpoints: health for load balancers, and the metrics three ways."""

from __future__ import annotations

import sys

from flask import Blueprint, Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.auth import CATALOG, Client
from node.config import NodeConfig
from node.coordinator_client import CoordinatorError
from node.errors import NotFound, UpstreamUnavailable
from node.metrics import Metrics
from node.services import services
from protos.metrics import expvar

status = Blueprint("status", __name__)

# The endpoints an operator's tools read; server.metrics_bind moves them.
OPERATOR_ENDPOINTS = ("status.prometheus", "status.debug_vars")


def _metrics() -> Metrics:
    metrics: Metrics = services().metrics
    return metrics


@status.route("/healthz", methods=["GET", "HEAD"])
def health() -> Response:
    return jsonify({"status": "ok"})


def guard_listeners(app: Flask, config: NodeConfig) -> None:
    """Keep the operator's endpoints where the configuration puts them.

    Without ``server.metrics_bind`` they are on ``server.bind`` and, with
    auth on, need credentials that may list the catalog (never anonymous).
    With it, its listener serves them and ``/healthz`` without auth, and
    nothing else; ``server.bind`` no longer serves them.
    """
    metrics_bind = config.server.metrics_bind
    metrics_port = int(metrics_bind.rpartition(":")[2]) if metrics_bind else None

    def guard() -> None:
        operator = request.endpoint in OPERATOR_ENDPOINTS
        if metrics_port is None:
            if operator:
                client = Client(request.remote_addr, request.headers.get("Authorization"))
                services().gate.admit(client, CATALOG, None, anonymous=False)
            return
        on_metrics = _listener_port() == metrics_port
        if on_metrics and not (operator or request.endpoint == "status.health"):
            raise NotFound("this listener serves /metrics, /debug/vars and /healthz only")
        if operator and not on_metrics:
            raise NotFound("the metrics are served on server.metrics_bind")

    app.before_request(guard)


def _listener_port() -> int | None:
    """The local port the request came in on: the listener's, whatever the Host header says."""
    sock = request.environ.get("gunicorn.socket")
    try:
        return int(sock.getsockname()[1]) if sock is not None else None
    except (OSError, IndexError, TypeError, ValueError):
        return None


@status.route("/metrics", methods=["GET"])
def prometheus() -> Response:
    """Prometheus text: every node's counters and the cluster's, and this node's histograms and gauges.

    While no coordinator answers, the counters (which the coordinator
    holds) are left out and the node's own families are still served.
    """
    body = generate_latest(_metrics().prometheus_registry())
    return Response(body, content_type=CONTENT_TYPE_LATEST)


@status.route("/debug/vars", methods=["GET"])
def debug_vars() -> Response:
    """expvar-style JSON as distribution serves it, with the cluster's numbers beside this node's."""
    metrics = _metrics()
    try:
        nodes, cluster = metrics.sink.snapshot()
    except CoordinatorError as exc:
        raise UpstreamUnavailable("the coordinator holds the counters and cannot be reached") from exc
    mine = next((node.counters for node in nodes if node.node_id == metrics.node_id), {})
    return jsonify(
        {
            "cmdline": sys.argv,
            "registry": {"proxy": {**expvar(mine), "cluster": expvar(cluster)}},
            "shoal": {
                "node": metrics.node_id,
                "nodes": {node.node_id: {"live": node.live, "counters": dict(node.counters)} for node in nodes},
                "cluster": dict(cluster),
            },
        }
    )
