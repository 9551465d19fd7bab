"""The metric counters nodes report and how every output names them.

Part of the contract between nodes and coordinators, like the .proto: a
node sends deltas keyed by the names below (``ReportMetrics``), the
coordinator adds them up in Redis, and both render the same numbers as
Prometheus text with ``families``. Only counters live here; node-local
histograms and gauges are the node's own business.

Counter keys are flat strings:

- ``<type>.<counter>`` with type ``blob`` or ``manifest`` and counter one of
  ``COUNTERS`` (``blob.hits``);
- ``upstream.<kind>.<class>.<registry>``: upstream requests by kind
  (``manifest``, ``blob``, ``tags``, ``token``, ``ping``), status class
  (``2xx``, ``3xx``, ``4xx``, ``5xx``, ``error`` for no answer) and registry
  (the upstream's name, which may itself hold dots: it comes last);
- ``registry.<type>.<counter>.<registry>``: requests, hits, misses and
  peer_hits of content per registry (the registry's name comes last);
- ``evictions.<reason>``: ``ttl`` or ``size``;
- ``errors.<CODE>``: error answers to clients, by OCI code;
- ``tag_checks_skipped.<registry>``: tag requests answered from the node's
  cache, stale, because the upstream's rate-limit budget paused tag checks;
- ``budget_pauses.<reason>.<registry>``: pauses of tag checks a node began,
  by reason: ``429`` (the upstream refused) or ``floor`` (its
  ``ratelimit-remaining`` fell below ``ratelimit_floor``);
- ``binding_checks.<result>.<registry>``: HEADs a node sent the upstream to
  confirm that a repository holds a digest it was asked for under that
  repository (``node.bindings``), by result: ``confirmed`` (200),
  ``unknown`` (404: answered MANIFEST_UNKNOWN or BLOB_UNKNOWN) or ``failed``
  (no usable answer: the request was refused);
- ``access_log.dropped``: access log lines a node dropped because its log
  was written slower than requests arrived;
- ``<type>.degraded`` with type ``blob``, ``manifest`` or ``tag``: misses
  (and tag checks) a node handled without the cluster because no
  coordinator could be used (``DEGRADED``; delivered once one answers);
- ``cached.distinct_bytes`` (cluster only, kept by the coordinator): the
  bytes of every distinct digest the cluster came to hold, counted once per
  digest from the moment the cluster first holds it until it expires.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

TYPES = ("blob", "manifest")
# Requests = hits + misses + peer_hits, for each type.
COUNTERS = (
    "requests",  # client requests for content
    "hits",  # served from the node's own store
    "misses",  # fetched from the upstream by this node
    "peer_hits",  # fetched from another node of the cluster
    "bytes_pulled",  # bytes received from the upstream
    "bytes_pushed",  # bytes sent to clients
    "peer_bytes",  # bytes received from other nodes
    "follower_joins",  # requests that rode on a fetch already running
    "lease_waits",  # requests that waited for another node's fetch lease
    "bad_peer_copies",  # copies from another node that did not match their digest
)
# A miss or tag check decided without the cluster (node/flight.py), by type.
DEGRADED = "degraded"
# A copy from another node that failed verification (node/cluster_source.py), by type.
BAD_PEER_COPIES = "bad_peer_copies"
DEGRADED_TYPES = (*TYPES, "tag")
DISTINCT_BYTES = "cached.distinct_bytes"
ACCESS_LOG_DROPPED = "access_log.dropped"

# Distribution v3's names, so existing dashboards keep working.
_DISTRIBUTION = {
    "requests": "registry_proxy_requests",
    "hits": "registry_proxy_hits",
    "misses": "registry_proxy_misses",
    "bytes_pulled": "registry_proxy_pulled_bytes",
    "bytes_pushed": "registry_proxy_pushed_bytes",
}
_HELP = {
    "requests": "Client requests for content",
    "hits": "Requests served from the node's own store",
    "misses": "Requests fetched from the upstream",
    "peer_hits": "Requests fetched from another node",
    "bytes_pulled": "Bytes received from the upstream",
    "bytes_pushed": "Bytes sent to clients",
    "peer_bytes": "Bytes received from other nodes",
    "follower_joins": "Requests that rode on a fetch already running",
    "lease_waits": "Requests that waited for another node's fetch lease",
    "bad_peer_copies": "Copies from another node that did not match their digest (that node's copy was unlisted)",
}


def key(kind: str, counter: str) -> str:
    """``blob.hits``: a counter of ``COUNTERS`` for a type of ``TYPES``."""
    return f"{kind}.{counter}"


def registry_key(kind: str, counter: str, registry: str) -> str:
    """``registry.blob.hits.ghcr.io``: a content counter of one registry."""
    return f"registry.{kind}.{counter}.{registry}"


def upstream_key(kind: str, status_class: str, registry: str) -> str:
    """``upstream.blob.2xx.docker.io``: requests to an upstream by kind and answer."""
    return f"upstream.{kind}.{status_class}.{registry}"


def eviction_key(reason: str) -> str:
    """``evictions.ttl`` or ``evictions.size``."""
    return f"evictions.{reason}"


def error_key(code: str) -> str:
    """``errors.BLOB_UNKNOWN``: error answers to clients by OCI code."""
    return f"errors.{code}"


def tag_checks_skipped_key(registry: str) -> str:
    """``tag_checks_skipped.docker.io``: tags served stale while the budget paused their checks."""
    return f"tag_checks_skipped.{registry}"


def binding_check_key(result: str, registry: str) -> str:
    """``binding_checks.confirmed.docker.io``: HEADs that confirmed (or not) a digest for a repository."""
    return f"binding_checks.{result}.{registry}"


def budget_pause_key(reason: str, registry: str) -> str:
    """``budget_pauses.429.docker.io``: pauses of tag checks begun, by reason."""
    return f"budget_pauses.{reason}.{registry}"


@dataclass(frozen=True)
class NodeCounts:
    node_id: str
    counters: Mapping[str, int]
    live: bool = True


def _name(counter: str) -> str:
    return _DISTRIBUTION.get(counter, f"shoal_{counter}")


def families(nodes: Iterable[NodeCounts], cluster: Mapping[str, int]) -> list[Metric]:
    """Prometheus families: per node (label ``node``) and cluster totals (``shoal_cluster_*``).

    Cluster totals have names of their own, so summing a per-node family
    over its ``node`` label never counts anything twice.
    """
    nodes = list(nodes)
    result: list[Metric] = []
    for counter in COUNTERS:
        name = _name(counter)
        per_node = CounterMetricFamily(name, _HELP[counter], labels=["type", "node"])
        short = name.removeprefix("registry_proxy_").removeprefix("shoal_")
        total = CounterMetricFamily(f"shoal_cluster_{short}", f"{_HELP[counter]}, whole cluster", labels=["type"])
        for kind in TYPES:
            for node in nodes:
                per_node.add_metric([kind, node.node_id], node.counters.get(key(kind, counter), 0))
            total.add_metric([kind], cluster.get(key(kind, counter), 0))
        result += [per_node, total]
    labels = ["kind", "class", "registry"]
    result += _grouped(nodes, cluster, "upstream", "shoal_upstream_requests", "Requests to the upstream", labels)
    labels = ["type", "counter", "registry"]
    result += _grouped(nodes, cluster, "registry", "shoal_registry_content", "Content requests per registry", labels)
    result += _grouped(nodes, cluster, "evictions", "shoal_evictions", "Content evicted", ["reason"])
    result += _grouped(nodes, cluster, "errors", "shoal_errors", "Error answers to clients", ["code"])
    skipped_help = "Tag requests served stale from the cache because the upstream's rate-limit budget paused tag checks"
    result += _grouped(nodes, cluster, "tag_checks_skipped", "shoal_tag_checks_skipped", skipped_help, ["registry"])
    pauses_help = "Pauses of tag checks begun for the upstream's rate-limit budget (reason 429 or floor)"
    labels = ["reason", "registry"]
    result += _grouped(nodes, cluster, "budget_pauses", "shoal_upstream_budget_pauses", pauses_help, labels)
    binding_help = "HEADs to the upstream asking whether a repository holds a digest (confirmed, unknown, failed)"
    labels = ["result", "registry"]
    result += _grouped(nodes, cluster, "binding_checks", "shoal_binding_checks", binding_help, labels)
    degraded_help = "Misses and tag checks handled without the cluster because no coordinator could be used"
    per_node = CounterMetricFamily("shoal_degraded_decisions", degraded_help, labels=["type", "node"])
    total = CounterMetricFamily("shoal_cluster_degraded_decisions", f"{degraded_help}, whole cluster", labels=["type"])
    for kind in DEGRADED_TYPES:
        for node in nodes:
            per_node.add_metric([kind, node.node_id], node.counters.get(key(kind, DEGRADED), 0))
        total.add_metric([kind], cluster.get(key(kind, DEGRADED), 0))
    result += [per_node, total]
    dropped_help = "Access log lines dropped because the log was written slower than requests arrived"
    result += _grouped(nodes, cluster, ACCESS_LOG_DROPPED, "shoal_access_log_dropped", dropped_help, [])
    up = GaugeMetricFamily("shoal_node_up", "1 while the node heartbeats to the coordinator", labels=["node"])
    for node in nodes:
        up.add_metric([node.node_id], 1 if node.live else 0)
    distinct = GaugeMetricFamily("shoal_cluster_cached_distinct_bytes", "Bytes of distinct content the cluster holds")
    distinct.add_metric([], cluster.get(DISTINCT_BYTES, 0))
    return [*result, up, distinct]


def _grouped(
    nodes: list[NodeCounts], cluster: Mapping[str, int], prefix: str, name: str, help_text: str, labels: list[str]
) -> list[Metric]:
    per_node = CounterMetricFamily(name, help_text, labels=[*labels, "node"])
    total = CounterMetricFamily(
        f"shoal_cluster_{name.removeprefix('shoal_')}", f"{help_text}, whole cluster", labels=labels
    )
    for source, family, extra in [(node.counters, per_node, [node.node_id]) for node in nodes] + [(cluster, total, [])]:
        for counter, value in sorted(source.items()):
            parts = counter.split(".", len(labels))
            if parts[0] == prefix and len(parts) == len(labels) + 1:
                family.add_metric([*parts[1:], *extra], value)
    return [per_node, total]


def expvar(counters: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Distribution's expvar objects, with the seed's field names.

    Distribution counted every request as a hit; Shoal counts a request
    served from anywhere in the cluster as a hit (local or peer), so that
    Requests = Hits + Misses as the names promise.
    """
    objects = {}
    for kind, plural in (("blob", "blobs"), ("manifest", "manifests")):
        objects[plural] = {
            "Requests": counters.get(key(kind, "requests"), 0),
            "Hits": counters.get(key(kind, "hits"), 0) + counters.get(key(kind, "peer_hits"), 0),
            "Misses": counters.get(key(kind, "misses"), 0),
            "BytesPulled": counters.get(key(kind, "bytes_pulled"), 0),
            "BytesPushed": counters.get(key(kind, "bytes_pushed"), 0),
        }
    return objects
