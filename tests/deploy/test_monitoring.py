"""A real Prometheus with deploy/prometheus/ scraping a ``shoal up`` cluster while it serves pulls.

The shipped scrape configuration is used as it is, with its targets pointed
at the cluster and its intervals shortened to a second; the rules beside it
are loaded unchanged. Then every expression of the recording rules, the
alert rules and the dashboard's panels is evaluated through Prometheus's
HTTP API, every metric name they use is one Shoal really exports, and the
dashboard's core panels show what ``shoal stats --json`` reports for the
same pulls.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from node.metrics import CoordinatorReachability, Metrics
from node.storage.local import LocalStore
from protos import metrics as keys
from protos.metrics import NodeCounts
from testbed.images import build_image, push
from testbed.processes import wait_until
from testbed.prometheus import Prometheus, PrometheusError
from testbed.pulls import pull
from testbed.registry import DistributionRegistry
from testbed.shoal_up import ShoalUp, consecutive_free_ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "shoal.json"
NODES = 2
_COORDINATOR_METRICS = re.compile(r"^\s*coordinator \d+ metrics: http://([^/]+)/metrics$")
# What Grafana puts in place of the dashboard's variables: every node, and a
# rate window of a few scrapes.
_GRAFANA = {'"$node"': '".*"', "$__rate_interval": "1m"}
# Dashboard panels whose numbers shoal stats --json prints for the cluster.
CORE_PANELS = {
    "Requests": "requests",
    "Hit ratio": "hit_ratio",
    "Upstream amplification": "upstream_amplification",
    "Bytes pushed": "bytes_pushed",
    "Bytes pulled": "bytes_pulled",
    "Distinct bytes cached": "distinct_bytes_cached",
}
# Time series panels that must show data once pulls went through.
LIVE_PANELS = ["Requests per second", "Hit ratio and peer share", "Bytes pushed and pulled", "Requests per node"]


@dataclass
class Monitored:
    nodes: list[str]
    prometheus: Prometheus
    requests: int


def _scrape_config(nodes: list[str], coordinators: list[str], directory: Path) -> Path:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    targets = {"shoal-node": [url.split("://", 1)[1] for url in nodes], "shoal-coordinator": coordinators}
    for job in config["scrape_configs"]:
        (static,) = job["static_configs"]
        static["targets"] = targets.pop(job["job_name"])
    assert not targets, f"prometheus.yml lacks the jobs {sorted(targets)}"
    for name in config["rule_files"]:
        shutil.copy(PROMETHEUS / name, directory / name)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry) -> Iterator[Monitored]:
    directory = tmp_path_factory.mktemp("monitoring")
    repository = f"monitoring/{uuid.uuid4().hex[:12]}"
    image = build_image([300_000, 50_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)
    base = consecutive_free_ports(NODES)
    args = ["--nodes", str(NODES), "--upstream", upstream_registry.url, "--port", str(base)]
    with ShoalUp([*args, "--state-dir", str(directory / "state")], directory / "shoal-up.stderr") as up:
        nodes = up.wait_ready()
        coordinators = [match[1] for line in up.lines if (match := _COORDINATOR_METRICS.match(line))]
        assert coordinators, up.lines
        with Prometheus(_scrape_config(nodes, coordinators, directory), directory) as prometheus:
            # Scraped once at least: every target answered, and its samples can be queried.
            wait_until(
                lambda: len(prometheus.query("up == 1")) == len(nodes) + len(coordinators),
                timeout=15,
                message=lambda: f"targets not up: {prometheus.targets()}",
            )
            # The workload, scraped as it runs: misses on the first node;
            # once Prometheus holds the per-node series (a node's appear with
            # its first counts, and a rate needs them to grow while scraped),
            # peer hits on the second node and hits on the first again.
            requests = 3 * (1 + len(image.blobs))
            with httpx.Client(timeout=30) as client:
                pull(client, nodes[0], repository, "v1", image)
                wait_until(
                    lambda: prometheus.query("registry_proxy_requests_total > 0"),
                    timeout=30,
                    interval=0.2,
                    message="Prometheus never scraped the first pull's counters",
                )
                for url in (nodes[1], nodes[0]):
                    pull(client, url, repository, "v1", image)
            # The nodes flush their counts once a second; then Prometheus
            # scrapes them, and rates need two scrapes of a series.
            wait_until(
                lambda: (
                    prometheus.query(f"sum(max by (type) (shoal_cluster_requests_total)) == {requests}")
                    and prometheus.query("sum(max by (node, type) (rate(registry_proxy_requests_total[1m]))) > 0")
                ),
                timeout=30,
                interval=0.2,
                message=lambda: (
                    "Prometheus never scraped the workload's counters: "
                    f"{prometheus.query('shoal_cluster_requests_total')} "
                    f"{prometheus.query('rate(registry_proxy_requests_total[1m])')}"
                ),
            )
            yield Monitored(nodes, prometheus, requests=requests)


def _stats(node: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "stats", "--url", node, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    cluster: dict[str, Any] = json.loads(result.stdout)["cluster"]
    return cluster


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def _grafana(expr: str) -> str:
    for variable, value in _GRAFANA.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a variable the test does not fill in: {expr}"
    return expr


def _expressions() -> dict[str, str]:
    """Every PromQL expression shipped: name -> expression."""
    found = {}
    for name in ("rules.yml", "alerts.yml"):
        for group in yaml.safe_load((PROMETHEUS / name).read_text())["groups"]:
            for rule in group["rules"]:
                found[f"{name} {rule.get('record') or rule['alert']}"] = rule["expr"]
    for panel in _panels():
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = _grafana(target["expr"])
    return found


def _recorded() -> set[str]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"]}


def _metric_names(expr: str) -> set[str]:
    """The series names an expression selects (Shoal's own and recorded ones), without strings and ranges."""
    bare = re.sub(r'"[^"]*"|\[[^\]]*\]', "", expr)
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare))
    return {token for token in tokens if token.startswith(("shoal_", "registry_proxy_")) or ":" in token}


def _exported_names(tmp_path: Path) -> set[str]:
    """Every series name a node's /metrics can carry (a coordinator's are a subset), one of each key kind set."""
    counters = {keys.key(kind, counter): 1 for kind in keys.TYPES for counter in keys.COUNTERS}
    counters |= {
        keys.upstream_key("blob", "2xx", "r"): 1,
        keys.registry_key("blob", "hits", "r"): 1,
        keys.eviction_key("size"): 1,
        keys.error_key("UPSTREAM_INVALID"): 1,
        keys.tag_checks_skipped_key("r"): 1,
        keys.budget_pause_key("429", "r"): 1,
        keys.binding_check_key("confirmed", "r"): 1,
        keys.key("tag", keys.DEGRADED): 1,
        keys.ACCESS_LOG_DROPPED: 1,
        keys.DISTINCT_BYTES: 1,
    }

    class Everything:
        def send(self, worker_id: str, sequence: int, counters: Mapping[str, int]) -> None:
            pass

        def snapshot(self) -> tuple[list[NodeCounts], dict[str, int]]:
            return [NodeCounts("n", counters)], counters

    registry = CollectorRegistry()
    CoordinatorReachability(registry, "n").coordinator_reachable("c:7000", True)
    metrics = Metrics(Everything(), "n", registry, cache=LocalStore(str(tmp_path / "cache"), 1024))
    metrics.upstream_request("r", "blob", 200, 0.1)
    metrics.rate_limits("r", {"ratelimit-limit": "100", "ratelimit-remaining": "90"})
    metrics.request_seconds.labels("blob", "n").observe(0.1)
    return {sample.name for family in metrics.prometheus_registry().collect() for sample in family.samples}


def test_every_rule_and_panel_expression_is_valid_and_uses_metrics_that_exist(
    monitored: Monitored, tmp_path: Path
) -> None:
    prometheus = monitored.prometheus
    expressions = _expressions()
    for where, expr in expressions.items():
        try:
            prometheus.query(expr)
        except PrometheusError as exc:
            raise AssertionError(f"{where}: {exc}") from None
    wait_until(
        lambda: all(rule["health"] == "ok" and rule["lastEvaluation"][:4] != "0001" for rule in prometheus.rules()),
        timeout=15,
        message=lambda: f"rules not evaluated cleanly: {[r for r in prometheus.rules() if r['health'] != 'ok']}",
    )
    scraped = prometheus.names()
    known = scraped | _exported_names(tmp_path) | _recorded()
    for where, expr in expressions.items():
        unknown = _metric_names(expr) - known
        assert not unknown, f"{where} uses {sorted(unknown)}, which Shoal does not export"
    # The families every panel of the first row reads arrive from a live cluster.
    for name in (
        "shoal_cluster_requests_total",
        "shoal_cluster_cached_distinct_bytes",
        "registry_proxy_requests_total",
    ):
        assert name in scraped, name


def test_the_core_panels_show_what_shoal_stats_reports(monitored: Monitored) -> None:
    prometheus = monitored.prometheus
    panels = {panel["title"]: panel for panel in _panels()}
    seen: dict[str, Any] = {}

    def agree() -> bool:
        stats = _stats(monitored.nodes[1])
        if stats["requests"] != monitored.requests:
            seen.update(stats=stats)
            return False
        shown = {}
        for title, field in CORE_PANELS.items():
            (target,) = panels[title]["targets"]
            samples = prometheus.query(_grafana(target["expr"]))
            shown[field] = float(samples[0]["value"][1]) if samples else None
        seen.update(stats=stats, shown=shown)
        return all(
            shown[field] is not None and round(shown[field], 4) == stats[field] for field in CORE_PANELS.values()
        )

    wait_until(agree, timeout=30, interval=0.5, message=lambda: f"the panels never matched shoal stats: {seen}")
    stats = seen["stats"]
    # The workload had every kind of answer, so the ratios are not trivial.
    assert 0 < stats["hit_ratio"] < 1 and stats["peer_hits"] > 0 and stats["upstream_amplification"] == 1.0
    # Recording rules run once a second here: the rates show once they ran after two scrapes.
    for title in LIVE_PANELS:
        for target in panels[title]["targets"]:
            expr = _grafana(target["expr"])
            wait_until(
                lambda expr=expr: prometheus.query(expr), timeout=15, message=f"panel {title!r} shows no data: {expr}"
            )
