"""deploy/healthcheck.py, the image's HEALTHCHECK, against a real node and a real coordinator."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from shoal.cli import gunicorn_command
from testbed.cluster import SECRET, CoordinatorProcess
from testbed.node import NodeProcess
from testbed.redis_server import RedisServer
from testbed.registry import DistributionRegistry

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "healthcheck.py"


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shoal_healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _command_line(pid: int) -> list[str]:
    return [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")]


def _run(pid: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The script as Docker runs it, limited to one process (the test machine runs many)."""
    return subprocess.run(
        [sys.executable, SCRIPT, str(pid)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (gunicorn_command("0.0.0.0:5000", 2), "node"),
        (
            ["/opt/shoal/bin/python", "/opt/shoal/bin/shoal", "coordinator", "--config", "/etc/shoal/shoal.yml"],
            "coordinator",
        ),
        (["python", "-m", "shoal", "coordinator"], "coordinator"),
        (["python", "-m", "coordinator.server", "--config", "x.yml"], "coordinator"),
        (["/opt/shoal/bin/python", "/opt/shoal/bin/shoal", "node", "--config", "x.yml"], "starting node"),
        (["redis-server", "*:6379"], None),
        (["/opt/shoal/bin/python", "/opt/shoal/healthcheck.py"], None),
        ([], None),
    ],
)
def test_the_role_is_read_from_the_command_line(healthcheck: ModuleType, argv: list[str], role: str | None) -> None:
    assert healthcheck.role_of(argv) == role


def test_a_wildcard_address_is_reached_on_the_loopback(healthcheck: ModuleType) -> None:
    assert healthcheck.local_address("0.0.0.0:5000") == ("127.0.0.1", 5000)
    assert healthcheck.local_address("[::]:7000") == ("::1", 7000)
    assert healthcheck.local_address("10.1.2.3:5001") == ("10.1.2.3", 5001)
    assert healthcheck.option(["x", "--bind", "a:1", "--bind=b:2"], "--bind") == "b:2"


def test_a_node_without_gunicorn_yet_is_unhealthy(healthcheck: ModuleType) -> None:
    with pytest.raises(healthcheck.Unhealthy, match="starting"):
        healthcheck.check([["/opt/shoal/bin/python", "/opt/shoal/bin/shoal", "node"]], {})
    with pytest.raises(healthcheck.Unhealthy, match="no Shoal node or coordinator"):
        healthcheck.check([["sleep", "1"]], {})


@pytest.fixture
def node(tmp_path: Path, upstream_registry: DistributionRegistry) -> Iterator[NodeProcess]:
    started = NodeProcess(tmp_path / "node", upstream_registry.url)
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.integration
def test_a_serving_node_is_healthy_and_a_stopped_one_is_not(healthcheck: ModuleType, node: NodeProcess) -> None:
    assert node.process is not None
    argv = _command_line(node.process.pid)
    result = _run(node.process.pid)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"node: GET http://127.0.0.1:{node.port}/healthz answered 200\n"

    node.stop()
    with pytest.raises(healthcheck.Unhealthy, match=f"node: GET http://127.0.0.1:{node.port}/healthz failed"):
        healthcheck.check([argv], {})


@pytest.mark.integration
def test_a_serving_coordinator_is_healthy_and_a_stopped_one_is_not(healthcheck: ModuleType, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        coordinator = CoordinatorProcess(tmp_path / "coordinator", redis.url)
        try:
            assert coordinator.process is not None
            argv = _command_line(coordinator.process.pid)
            # The check reads the coordinator's configuration with the container's environment.
            env = dict(os.environ, SHOAL_COORDINATOR__CLUSTER_SECRET=SECRET)
            result = _run(coordinator.process.pid, env)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout == f"coordinator: 127.0.0.1:{coordinator.port} accepts connections\n"
        finally:
            coordinator.stop()
        with pytest.raises(healthcheck.Unhealthy, match=f"no connection to 127.0.0.1:{coordinator.port}"):
            healthcheck.check([argv], env)
        result = _run(coordinator.process.pid, env)
        assert result.returncode == 1
        assert result.stdout.startswith("unhealthy: ")
