"""deploy/prometheus/ and deploy/grafana/, checked by promtool and against the Kubernetes base.

``promtool check config`` and ``check rules`` load the files as Prometheus
does; ``promtool test rules`` runs the unit tests beside the rules, which
must cover every alert both firing and quiet. Debian's Prometheus is built
without Kubernetes service discovery, so kubernetes.yml is checked with its
discovery replaced by the labels it would find on the base's pods. The live
check, a real Prometheus scraping a cluster, is tests/deploy/test_monitoring.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from testbed.processes import require_binary
from tests.deploy.test_kubernetes import render

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "shoal.json"


def promtool(*args: str) -> str:
    result = subprocess.run(
        [require_binary("promtool", "prometheus"), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_scrape_configuration_and_the_rules() -> None:
    promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    output = promtool("check", "rules", str(PROMETHEUS / "rules.yml"), str(PROMETHEUS / "alerts.yml"))
    assert "SUCCESS" in output


def test_the_unit_tests_pass_and_cover_every_alert_firing_and_quiet() -> None:
    promtool("test", "rules", str(PROMETHEUS / "tests" / "rules_test.yml"))
    tests = yaml.safe_load((PROMETHEUS / "tests" / "rules_test.yml").read_text())["tests"]
    checks = [check for test in tests for check in test.get("alert_rule_test", [])]
    for rule in _alerts():
        name = rule["alert"]
        assert any(c["alertname"] == name and c["exp_alerts"] for c in checks), f"{name}: never tested firing"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in checks), f"{name}: never tested quiet"


def test_every_alert_has_a_severity_a_summary_and_a_runbook() -> None:
    for rule in _alerts():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 100, rule["alert"]


def test_the_kubernetes_jobs_match_the_static_ones_and_the_base(tmp_path: Path) -> None:
    static = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    kubernetes = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    assert [job["job_name"] for job in kubernetes["scrape_configs"]] == [
        job["job_name"] for job in static["scrape_configs"]
    ]
    assert kubernetes["rule_files"] == static["rule_files"]

    # What Kubernetes discovery would find: each container port of the base's pods.
    pods = {}
    for workload in render("base"):
        if workload["kind"] in ("Deployment", "StatefulSet"):
            template = workload["spec"]["template"]
            for container in template["spec"]["containers"]:
                for port in container.get("ports", []):
                    labels = {
                        re.sub(r"[^a-zA-Z0-9_]", "_", f"__meta_kubernetes_pod_label_{key}"): value
                        for key, value in template["metadata"]["labels"].items()
                    }
                    labels["__meta_kubernetes_pod_container_port_name"] = port["name"]
                    pods[(workload["metadata"]["name"], port["name"])] = labels
    for job in kubernetes["scrape_configs"]:
        kept = [labels for labels in pods.values() if _kept(job["relabel_configs"], labels)]
        component = job["job_name"].removeprefix("shoal-")
        assert len(kept) == 1, f"{job['job_name']}: keeps {kept}"
        assert kept[0]["__meta_kubernetes_pod_label_app_kubernetes_io_component"] == component
        assert kept[0]["__meta_kubernetes_pod_container_port_name"] == "metrics"
        # promtool cannot load kubernetes_sd_configs from Debian's build: the
        # rest of the job is checked with static targets in its place.
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    for name in kubernetes["rule_files"]:
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    (tmp_path / "kubernetes.yml").write_text(yaml.safe_dump(kubernetes))
    promtool("check", "config", str(tmp_path / "kubernetes.yml"))


def _kept(relabel_configs: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    """Whether the keep rules of ``relabel_configs`` let a target with ``labels`` through."""
    for rule in relabel_configs:
        if rule.get("action") == "keep":
            value = ";".join(labels.get(label, "") for label in rule["source_labels"])
            if not re.fullmatch(rule["regex"], value):
                return False
    return True


def test_the_dashboard_is_grafana_json_over_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "shoal" and dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]
        assert panel["description"], panel["title"]
