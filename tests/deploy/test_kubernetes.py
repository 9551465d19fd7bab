"""deploy/kubernetes/: rendered by kubectl's kustomize, held against the API schemas and the repo.

Each kustomization (the base and every overlay) is rendered with the real
``kubectl kustomize``; every object must validate, strictly (no unknown
fields), against the OpenAPI schemas of a current Kubernetes version that
kubernetes-validate ships. Then the invariants that matter: probes and
requests on every container, secrets only referenced, the headless Service
matching the StatefulSet, and Shoal's own configuration loading for each
role with the environment Kubernetes would give that container.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import coordinator.config
import node.config

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/external-redis", "overlays/sentinel"]
# The newest version whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSION = "1.37.0"
SECRET_NAME = "shoal-secrets"
SECRET_KEYS = {"cluster-secret", "redis-password", "redis-url"}
DUMMY = {
    "cluster-secret": "dummy-cluster-secret-for-the-kubernetes-test",
    "redis-password": "dummy-redis-password-for-the-kubernetes-test",
    "redis-url": "rediss://default:dummy-redis-password@redis.example.com:6380/0",
}
# Environment variables whose values are secrets: they must come from the Secret.
SECRET_VARIABLES = re.compile(r"SECRET|PASSWORD|REDISCLI_AUTH")


def _kubectl() -> str:
    """kubectl with kustomize 5 built in, which components and ``labels:`` need."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not on PATH (.ci/run installs kubernetes-client where it is missing)")
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"Kustomize Version: v(\d+)", version)
    if match is None or int(match[1]) < 5:
        raise RuntimeError(f"{kubectl} lacks kustomize 5 (kubectl 1.27 or later has it): {version.strip()!r}")
    return kubectl


def render(kustomization: str) -> list[dict[str, Any]]:
    kubectl = _kubectl()
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render("base")


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] in ("Deployment", "StatefulSet"))


def _containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in _workloads(objects):
        spec = workload["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_every_object_validates_against_the_kubernetes_schemas(objects: list[dict[str, Any]]) -> None:
    for document in objects:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_every_container_has_probes_and_resource_requests(objects: list[dict[str, Any]]) -> None:
    containers = list(_containers(objects))
    assert containers
    for workload, container in containers:
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert "readinessProbe" in container, f"{where}: no readiness probe"
        assert "livenessProbe" in container, f"{where}: no liveness probe"
        requests = container.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), f"{where}: requests {requests}"


def test_secrets_are_referenced_from_the_secret_never_inlined(objects: list[dict[str, Any]]) -> None:
    assert not [o for o in objects if o["kind"] == "Secret"], "a Secret object would put the secret in the repo"
    referenced = set()
    for workload, container in _containers(objects):
        for variable in container.get("env", []):
            if variable["name"].endswith("REDIS_URL") and "value" in variable:
                # A URL in the open must not carry credentials.
                assert "@" not in variable["value"] and "password" not in variable["value"], variable
            elif SECRET_VARIABLES.search(variable["name"]) or variable["name"].endswith("REDIS_URL"):
                where = f"{workload['metadata']['name']}/{container['name']} {variable['name']}"
                assert "value" not in variable, f"{where}: inlined"
                reference = variable["valueFrom"]["secretKeyRef"]
                assert reference["name"] == SECRET_NAME, where
                referenced.add(reference["key"])
        # A password on a command line must be a $(VAR) Kubernetes fills in from the Secret.
        arguments = container.get("command", []) + container.get("args", [])
        for flag, value in itertools.pairwise(arguments):
            if "pass" in flag or "secret" in flag:
                variable = next((v for v in container["env"] if f"$({v['name']})" == value), None)
                assert variable is not None and "secretKeyRef" in variable["valueFrom"], f"{flag} {value}"
    assert referenced and referenced <= SECRET_KEYS, referenced
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    text = "\n".join(config["data"].values())
    assert not re.search(r"(secret|password)\s*:", text), "the ConfigMap holds a secret"


def test_the_headless_service_matches_the_node_statefulset(base: list[dict[str, Any]]) -> None:
    nodes = _one(base, "StatefulSet", "shoal-node")
    template = nodes["spec"]["template"]
    service = _one(base, "Service", nodes["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == nodes["spec"]["selector"]["matchLabels"]
    assert _matches(service["spec"]["selector"], template["metadata"]["labels"])
    container = template["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    advertise = f"http://$(POD_NAME).{service['metadata']['name']}.$(POD_NAMESPACE).svc:{ports['registry']}"
    assert env["SHOAL_CLUSTER__ADVERTISE_URL"] == advertise
    assert env["SHOAL_CLUSTER__NODE_ID"] == "$(POD_NAME)"
    claims = [claim["metadata"]["name"] for claim in nodes["spec"]["volumeClaimTemplates"]]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert "cache" in claims and "cache" in mounts


def test_every_selector_finds_its_pods(objects: list[dict[str, Any]]) -> None:
    pods = [workload["spec"]["template"]["metadata"]["labels"] for workload in _workloads(objects)]
    for document in objects:
        if document["kind"] == "Service":
            selector = document["spec"]["selector"]
        elif document["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = document["spec"].get("selector", document["spec"].get("podSelector"))["matchLabels"]
        else:
            continue
        assert any(_matches(selector, labels) for labels in pods), f"{document['metadata']['name']}: no pods"


def _environment(container: dict[str, Any], namespace: str, pod: str) -> dict[str, str]:
    """The environment Kubernetes gives the container, with dummy secrets."""
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        source = variable.get("valueFrom", {})
        if "secretKeyRef" in source:
            value = DUMMY[source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            value = {"metadata.name": pod, "metadata.namespace": namespace}[source["fieldRef"]["fieldPath"]]
        else:
            # $(NAME) refers to a variable defined earlier in the list.
            value = re.sub(r"\$\((\w+)\)", lambda match: env[match[1]], variable["value"])
        env[variable["name"]] = value
    return env


def _config_file(objects: list[dict[str, Any]], workload: dict[str, Any], tmp_path: Path) -> Path:
    spec = workload["spec"]["template"]["spec"]
    container = spec["containers"][0]
    path = container["args"][container["args"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config_map = _one(objects, "ConfigMap", volume["configMap"]["name"])
    target = tmp_path / Path(path).name
    target.write_text(config_map["data"][Path(path).name])
    return target


def test_the_configuration_loads_for_each_role_and_the_addresses_agree(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    namespace = _one(objects, "Namespace", "shoal")["metadata"]["name"]
    coordinators = _one(objects, "StatefulSet", "shoal-coordinator")
    container = coordinators["spec"]["template"]["spec"]["containers"][0]
    config = coordinator.config.load_config(
        str(_config_file(objects, coordinators, tmp_path)), _environment(container, namespace, "c")
    )
    assert config.cluster_secret == DUMMY["cluster-secret"]
    if config.sentinels:
        assert config.redis_url is None and config.sentinel_service
    else:
        assert config.redis_url
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert config.bind.endswith(f":{ports['grpc']}") and (config.metrics_bind or "").endswith(f":{ports['metrics']}")
    service = _one(objects, "Service", coordinators["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    grpc = next(port for port in service["spec"]["ports"] if port["targetPort"] == "grpc")
    replicas = coordinators["spec"]["replicas"]
    # One address per replica, by its stable name in the headless Service.
    expected = [
        f"{coordinators['metadata']['name']}-{i}.{service['metadata']['name']}:{grpc['port']}" for i in range(replicas)
    ]

    nodes = _one(objects, "StatefulSet", "shoal-node")
    container = nodes["spec"]["template"]["spec"]["containers"][0]
    environment = _environment(container, namespace, "shoal-node-0")
    settings = node.config.load_config(str(_config_file(objects, nodes, tmp_path)), environment)
    assert settings.cluster.secret == DUMMY["cluster-secret"]
    assert settings.cluster.node_id == "shoal-node-0"
    assert settings.cluster.advertise_url == "http://shoal-node-0.shoal-node-peers.shoal.svc:5000"
    assert list(settings.cluster.coordinators) == expected
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert settings.server.bind.endswith(f":{ports['registry']}")
    assert (settings.server.metrics_bind or "").endswith(f":{ports['metrics']}")
    cache = next(m for m in container["volumeMounts"] if m["name"] == "cache")
    assert settings.cache.dir == cache["mountPath"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] == "registry"


def test_only_nodes_reach_the_coordinators_and_only_coordinators_reach_redis(base: list[dict[str, Any]]) -> None:
    def sources(policy: str, port: int) -> list[dict[str, Any]]:
        rules = _one(base, "NetworkPolicy", policy)["spec"]["ingress"]
        return [peer for rule in rules if port in [p["port"] for p in rule["ports"]] for peer in rule.get("from", [])]

    node_pods = _one(base, "StatefulSet", "shoal-node")["spec"]["template"]["metadata"]["labels"]
    coordinator_pods = _one(base, "StatefulSet", "shoal-coordinator")["spec"]["template"]["metadata"]["labels"]
    grpc = sources("shoal-coordinator", 7000)
    assert len(grpc) == 1 and _matches(grpc[0]["podSelector"]["matchLabels"], node_pods)
    assert not _matches(grpc[0]["podSelector"]["matchLabels"], coordinator_pods)
    redis = sources("shoal-redis", 6379)
    assert len(redis) == 1 and _matches(redis[0]["podSelector"]["matchLabels"], coordinator_pods)
    for policy, port in (("shoal-coordinator", 7001), ("shoal-node", 5001)):
        (peer,) = sources(policy, port)
        assert set(peer) == {"namespaceSelector"}, f"{policy}: /metrics open beyond Prometheus's namespace"
