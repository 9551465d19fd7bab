"""Status endpoints: health for load balancers, and the metrics three ways."""

from __future__ import annotations

import sys

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.coordinator_client import CoordinatorError
from node.errors import UpstreamUnavailable
from node.metrics import Metrics
from node.services import services
from protos.metrics import expvar

status = Blueprint("status", __name__)


def _metrics() -> Metrics:
    metrics: Metrics = services().metrics
    return metrics


@status.route("/healthz", methods=["GET", "HEAD"])
def health() -> Response:
    return jsonify({"status": "ok"})


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
