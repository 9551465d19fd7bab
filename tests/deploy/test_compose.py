"""docker-compose.cluster.yml and the Dockerfile, checked without a Docker engine.

The compose file is read as compose reads it (YAML with merge keys, then
``${VAR}`` interpolation), and every part of it is held against the repo:
each command parses with the real command-line parsers, each mounted file
exists, and the one config file loads for every service with the
environment compose gives that service.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

import coordinator.config
import node.config
from coordinator.server import build_parser as coordinator_parser
from shoal.cli import _parser as shoal_parser
from shoal.cli import run_node

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.cluster.yml"
SECRET = "dummy-secret-for-the-compose-test"
REDIS_PASSWORD = "dummy-redis-password-for-the-compose-test"
ENV = {"SHOAL_CLUSTER_SECRET": SECRET, "SHOAL_REDIS_PASSWORD": REDIS_PASSWORD}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and $$, as compose has them.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-") and unset:
            return arg
        if op in ("?", ":?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def load_compose(env: Mapping[str, str] = ENV) -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    document = {key: value for key, value in document.items() if not key.startswith("x-")}
    loaded: dict[str, Any] = interpolate(document, env)
    return loaded


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def _services(compose: dict[str, Any], role: str) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in compose["services"].items() if spec.get("command", [None])[0] == role}


def _bind_mounts(spec: dict[str, Any]) -> dict[str, str]:
    """Host path -> container path of a service's bind mounts (short syntax, relative host paths)."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[source] = target
    return mounts


def _named_volumes(spec: dict[str, Any]) -> dict[str, str]:
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):
            mounts[source] = target
    return mounts


def _config_path(spec: dict[str, Any]) -> Path:
    """The file in the repo that the service reads as its --config."""
    command = spec["command"]
    target = command[command.index("--config") + 1]
    sources = [source for source, mounted in _bind_mounts(spec).items() if mounted == target]
    assert len(sources) == 1, f"{target} is not mounted from the repo"
    return ROOT / sources[0]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_the_cluster_has_redis_two_coordinators_three_nodes_and_a_load_balancer(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "coordinator-1", "coordinator-2", "node-1", "node-2", "node-3", "lb"}
    assert set(_services(compose, "coordinator")) == {"coordinator-1", "coordinator-2"}
    assert set(_services(compose, "node")) == {"node-1", "node-2", "node-3"}
    assert compose["services"]["redis"]["image"].startswith("redis:")
    assert compose["services"]["lb"]["image"].startswith("haproxy:")
    for name in [*_services(compose, "coordinator"), *_services(compose, "node")]:
        spec = compose["services"][name]
        assert spec["build"] == ".", name
        assert spec["image"] == "shoal:local", name


@pytest.mark.parametrize("variable", ["SHOAL_CLUSTER_SECRET", "SHOAL_REDIS_PASSWORD"])
def test_the_secrets_come_from_the_environment_only(variable: str) -> None:
    with pytest.raises(MissingVariable, match=f"{variable}: set {variable} to a long random string"):
        load_compose({key: value for key, value in ENV.items() if key != variable})
    with pytest.raises(MissingVariable, match=variable):
        load_compose({**ENV, variable: ""})
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, spec in raw["services"].items():
        for key, value in (spec.get("environment") or {}).items():
            if "SECRET" in key:
                assert value.startswith("${SHOAL_CLUSTER_SECRET:?"), (name, key)
            if "PASSWORD" in key or key == "REDISCLI_AUTH":
                assert value.startswith("${SHOAL_REDIS_PASSWORD:?"), (name, key)
    settings = yaml.safe_load((ROOT / "deploy" / "shoal.yml").read_text())
    assert "secret" not in settings["cluster"]
    assert "cluster_secret" not in settings["coordinator"]
    assert "redis_password" not in settings["coordinator"]
    assert "@" not in settings["coordinator"].get("redis_url", "")
    assert "password" not in settings["upstream"]


def test_redis_asks_for_the_password_the_coordinators_are_given(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == REDIS_PASSWORD
    # The health check's redis-cli authenticates with it too.
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    for name, spec in _services(compose, "coordinator").items():
        config = coordinator.config.load_config(str(_config_path(spec)), spec["environment"])
        assert config.redis_password == REDIS_PASSWORD, name
        assert REDIS_PASSWORD not in config.describe_redis()
    for name, spec in _services(compose, "node").items():
        assert REDIS_PASSWORD not in spec["environment"].values(), name


def test_only_the_load_balancer_publishes_a_port(compose: dict[str, Any]) -> None:
    published = {name: spec["ports"] for name, spec in compose["services"].items() if spec.get("ports")}
    assert list(published) == ["lb"]
    assert len(published["lb"]) == 1
    host, _, container = published["lb"][0].rpartition(":")
    assert host == "5000"
    assert load_compose({**ENV, "SHOAL_PORT": "8080"})["services"]["lb"]["ports"] == [f"8080:{container}"]
    haproxy = (ROOT / "deploy" / "haproxy.cfg").read_text()
    bind = re.search(r'^\s*bind "\$\{SHOAL_LB_BIND-(?P<address>[^}]*)\}"', haproxy, re.MULTILINE)
    assert bind is not None
    assert _port(bind["address"]) == int(container)


def test_every_command_is_one_the_cli_accepts(compose: dict[str, Any]) -> None:
    for name, spec in _services(compose, "node").items():
        args = shoal_parser().parse_args(spec["command"])
        assert args.run is run_node, name
        assert args.config == "/etc/shoal/shoal.yml", name
    for name, spec in _services(compose, "coordinator").items():
        # shoal hands everything after "coordinator" to the coordinator's own parser.
        args = coordinator_parser().parse_args(spec["command"][1:])
        assert args.config == "/etc/shoal/shoal.yml", name


def test_every_mounted_file_is_in_the_repo(compose: dict[str, Any]) -> None:
    mounted = 0
    for name, spec in compose["services"].items():
        for source, target in _bind_mounts(spec).items():
            assert (ROOT / source).is_file(), f"{name} mounts {source}, which is not in the repo"
            assert target.startswith("/"), name
            mounted += 1
    assert mounted == 6  # the config file in five Shoal containers, haproxy.cfg in the load balancer


def test_each_node_keeps_its_cache_on_a_volume_of_its_own(compose: dict[str, Any]) -> None:
    volumes: dict[str, str] = {}
    for name, spec in _services(compose, "node").items():
        named = _named_volumes(spec)
        assert len(named) == 1, name
        ((volume, target),) = named.items()
        config = node.config.load_config(str(_config_path(spec)), spec["environment"])
        assert target == config.cache.dir, name
        volumes[name] = volume
    assert len(set(volumes.values())) == 3
    assert set(volumes.values()) <= set(compose["volumes"])


def test_redis_keeps_snapshots_on_a_volume_and_no_append_only_file(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "no"
    assert "--save" in command
    data = command[command.index("--dir") + 1]
    assert data in _named_volumes(redis).values()
    assert set(_named_volumes(redis)) <= set(compose["volumes"])


def test_the_config_file_configures_every_node(compose: dict[str, Any]) -> None:
    coordinators = _services(compose, "coordinator")
    for name, spec in _services(compose, "node").items():
        config = node.config.load_config(str(_config_path(spec)), spec["environment"])
        assert config.cluster.secret == SECRET
        assert config.node_id == name
        # Other nodes reach it by its service name, on the port it listens on.
        advertised = urlsplit(config.advertise_url)
        assert (advertised.hostname, advertised.port) == (name, _port(config.server.bind))
        assert config.cluster.enabled
        for address in config.cluster.coordinators:
            host, _, port = address.rpartition(":")
            assert host in coordinators, address
            coordinator_config = coordinator.config.load_config(
                str(_config_path(coordinators[host])), coordinators[host]["environment"]
            )
            assert int(port) == _port(coordinator_config.bind)
        assert set(address.rpartition(":")[0] for address in config.cluster.coordinators) == set(coordinators)


def test_the_config_file_configures_every_coordinator(compose: dict[str, Any]) -> None:
    for name, spec in _services(compose, "coordinator").items():
        config = coordinator.config.load_config(str(_config_path(spec)), spec["environment"])
        assert config.cluster_secret == SECRET, name
        redis = urlsplit(config.effective_redis_url)
        assert redis.hostname in compose["services"], name
        assert redis.port == 6379
        assert "redis" in compose["services"][name]["depends_on"]


def test_the_load_balancer_defaults_to_the_compose_nodes_and_checks_their_health(compose: dict[str, Any]) -> None:
    haproxy = (ROOT / "deploy" / "haproxy.cfg").read_text()
    servers = re.findall(r'^\s*server (\S+) "\$\{(\w+)-([^}]*)\}"', haproxy, re.MULTILINE)
    nodes = _services(compose, "node")
    assert {default.rpartition(":")[0] for _, _, default in servers} == set(nodes)
    for _, _, default in servers:
        host, _, port = default.rpartition(":")
        config = node.config.load_config(str(_config_path(nodes[host])), nodes[host]["environment"])
        assert int(port) == _port(config.server.bind)
    assert re.search(r"^\s*http-check send meth GET uri /healthz\b", haproxy, re.MULTILINE)
    lb = compose["services"]["lb"]
    assert "/usr/local/etc/haproxy/haproxy.cfg" in _bind_mounts(lb).values()
    assert set(lb["depends_on"]) == set(nodes)


# The Dockerfile.


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed)
    return parsed


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (its simple patterns only)."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    parts = Path(path).parts
    for pattern in patterns:
        pattern = pattern.removeprefix("**/")
        if any(Path(*parts[: index + 1]).match(pattern) for index in range(len(parts))):
            return True
    return False


def test_the_image_is_multi_stage_small_and_runs_as_a_user() -> None:
    instructions = _instructions()
    stages = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert len(stages) >= 2
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in [f"{k} {a}" for k, a in instructions]
    assert all(stage.startswith("${PYTHON_IMAGE}") for stage in stages)
    final = instructions[max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM") :]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_the_image_runs_either_role_through_the_shoal_command(compose: dict[str, Any]) -> None:
    instructions = dict(_instructions())
    assert _exec_form(instructions["ENTRYPOINT"]) == ["shoal"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["shoal"] == "shoal.cli:main"
    default = _exec_form(instructions["CMD"])
    assert shoal_parser().parse_args(default).run is run_node
    exposed = {int(port) for port in instructions["EXPOSE"].split()}
    for spec in _services(compose, "node").values():
        config = node.config.load_config(str(_config_path(spec)), spec["environment"])
        assert _port(config.server.bind) in exposed
    for spec in _services(compose, "coordinator").values():
        config = coordinator.config.load_config(str(_config_path(spec)), spec["environment"])
        assert {_port(config.bind), _port(config.metrics_bind)} <= exposed


def test_the_image_copies_files_that_are_in_the_build_context() -> None:
    copied = []
    for keyword, arguments in _instructions():
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        words = [word for word in shlex.split(arguments) if not word.startswith("--")]
        copied += words[:-1]
    assert "deploy/healthcheck.py" in copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source), f"{source} is excluded by .dockerignore"


def test_the_health_check_runs_the_script_the_image_copies() -> None:
    instructions = _instructions()
    copies = {
        shlex.split(arguments)[-1]: shlex.split(arguments)[0]
        for keyword, arguments in instructions
        if keyword == "COPY" and not arguments.startswith("--")
    }
    health = next(arguments for keyword, arguments in instructions if keyword == "HEALTHCHECK")
    options, _, command = health.partition("CMD ")
    assert "--interval" in options
    script = _exec_form(command)[-1]
    assert copies[script] == "deploy/healthcheck.py"
