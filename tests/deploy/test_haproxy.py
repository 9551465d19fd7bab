"""deploy/haproxy.cfg, the file docker-compose.cluster.yml mounts, run by the real haproxy.

HAProxy reads the addresses it binds and the nodes it balances from the
environment (the file's defaults are the compose services), so the same
file runs here in front of a real cluster on 127.0.0.1, with a real
registry upstream and skopeo as the client.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from testbed.cluster import Cluster
from testbed.images import Image, build_image, push, random_layer
from testbed.processes import Process, free_port, require_binary, wait_for_http, wait_until
from testbed.registry import DistributionRegistry
from testbed.skopeo import skopeo_copy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "haproxy.cfg"
NODES = ("node-1", "node-2", "node-3")


class HAProxy:
    """``haproxy -db -f deploy/haproxy.cfg`` in front of ``nodes`` (HOST:PORT), on free ports of 127.0.0.1."""

    def __init__(self, workdir: Path, nodes: list[str]) -> None:
        # A missing load balancer is a broken test machine, never a reason to skip.
        self.binary = require_binary("haproxy", "haproxy")
        assert len(nodes) == 3, "deploy/haproxy.cfg balances three nodes"
        self.port = free_port()
        self.stats_port = free_port()
        self.env = dict(
            os.environ,
            SHOAL_LB_BIND=f"127.0.0.1:{self.port}",
            SHOAL_LB_STATS_BIND=f"127.0.0.1:{self.stats_port}",
            **{f"SHOAL_NODE_{index + 1}": address for index, address in enumerate(nodes)},
        )
        self.process = Process([self.binary, "-db", "-f", CONFIG], Path(workdir) / "haproxy.log", env=self.env)
        process = self.process
        wait_for_http(f"{self.stats_url}/stats", alive=process.alive)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}"

    def states(self) -> dict[str, str]:
        """Each node's state as the health checks see it: UP, DOWN, or a transition such as "UP 1/2"."""
        text = httpx.get(f"{self.stats_url}/stats;csv", timeout=5).text.lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "nodes" and row["svname"] != "BACKEND"}

    def wait_for(self, expected: dict[str, str], timeout: float = 20) -> None:
        wait_until(
            lambda: {name: self.states().get(name) for name in expected} == expected,
            timeout=timeout,
            message=lambda: f"node states {self.states()}, expected {expected}\n{self.process.log_text()}",
        )

    def close(self) -> None:
        self.process.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry) -> Iterator[Cluster]:
    """Three nodes and a coordinator, shared by the module; each test keeps to its own repositories."""
    with Cluster(tmp_path_factory.mktemp("lb-cluster"), upstream_registry.url) as started:
        yield started


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[HAProxy]:
    balancer = HAProxy(tmp_path_factory.mktemp("haproxy"), [node.url.removeprefix("http://") for node in cluster.nodes])
    try:
        balancer.wait_for(dict.fromkeys(NODES, "UP"))
        yield balancer
    finally:
        balancer.close()


def _assert_pulled(directory: Path, image: Image) -> None:
    """skopeo's dir: layout holds manifest.json and each blob under the hex part of its digest."""
    assert (directory / "manifest.json").read_bytes() == image.manifest
    for digest, data in image.blobs.items():
        assert (directory / digest.split(":", 1)[1]).read_bytes() == data, digest


def _served_by(cluster: Cluster, path: str) -> list[str]:
    """The nodes whose access log shows a GET of ``path``."""
    return [node.workdir.name for node in cluster.nodes if f'"GET {path}"' in node.log_text()]


def test_the_config_is_valid_as_the_test_runs_it() -> None:
    env = dict(
        os.environ,
        SHOAL_LB_BIND="127.0.0.1:1",
        SHOAL_LB_STATS_BIND="127.0.0.1:2",
        SHOAL_NODE_1="127.0.0.1:3",
        SHOAL_NODE_2="127.0.0.1:4",
        SHOAL_NODE_3="127.0.0.1:5",
    )
    result = subprocess.run(
        [require_binary("haproxy", "haproxy"), "-c", "-f", CONFIG], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr and "ALERT" not in result.stderr, result.stderr


def test_an_image_is_pulled_through_the_load_balancer(
    cluster: Cluster, haproxy: HAProxy, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    repository = f"lb/{uuid.uuid4().hex[:12]}"
    image = build_image([1_500_000, 400_000, 30_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)

    _assert_pulled(skopeo_copy(f"{haproxy.address}/{repository}:v1", tmp_path / "first"), image)
    _assert_pulled(skopeo_copy(f"{haproxy.address}/{repository}:v1", tmp_path / "second"), image)
    paths = [f"/v2/{repository}/blobs/{digest}" for digest in image.blobs]
    wait_until(lambda: all(upstream_registry.count("GET", path) for path in paths), message="no upstream GETs")
    assert {path: upstream_registry.count("GET", path) for path in paths} == dict.fromkeys(paths, 1)
    # The nodes' peer endpoint is not for clients.
    digest = image.layer_digests[0]
    assert httpx.get(f"{haproxy.url}/internal/v1/content/{digest}", timeout=10).status_code == 403

    # shoal warm works through the load balancer as through a node.
    warmed = subprocess.run(
        [sys.executable, "-m", "shoal.warm", "--url", haproxy.url, f"{repository}:v1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert warmed.returncode == 0, warmed.stderr
    assert "Warmed 1 of 1 images" in warmed.stdout


def test_a_stopped_node_is_taken_out_and_pulls_go_on(
    cluster: Cluster, haproxy: HAProxy, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    repository = f"lb/{uuid.uuid4().hex[:12]}"
    image = build_image([800_000, 200_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)
    _assert_pulled(skopeo_copy(f"{haproxy.address}/{repository}:v1", tmp_path / "before"), image)

    # Stop the node the manifest's path goes to, so the next pull must go elsewhere.
    manifest_path = f"/v2/{repository}/manifests/v1"
    (stopped_name,) = wait_until(lambda: _served_by(cluster, manifest_path), message="no node logged the manifest")
    stopped = next(node for node in cluster.nodes if node.workdir.name == stopped_name)
    others = [node.workdir.name for node in cluster.nodes if node is not stopped]
    stopped.stop()
    try:
        haproxy.wait_for({stopped_name: "DOWN", **dict.fromkeys(others, "UP")})

        _assert_pulled(skopeo_copy(f"{haproxy.address}/{repository}:v1", tmp_path / "after"), image)
        wait_until(
            lambda: len(_served_by(cluster, manifest_path)) == 2,
            message=lambda: f"the manifest was served by {_served_by(cluster, manifest_path)}",
        )
        assert stopped_name in _served_by(cluster, manifest_path)

        fresh = build_image([300_000], seed=f"{repository}/fresh")
        push(upstream_registry.url, repository, "fresh", fresh)
        _assert_pulled(skopeo_copy(f"{haproxy.address}/{repository}:fresh", tmp_path / "fresh"), fresh)
    finally:
        # Started again, it is checked back in: the module's other tests see three nodes.
        stopped.start()
    haproxy.wait_for(dict.fromkeys(NODES, "UP"))


class _SlowNode(BaseHTTPRequestHandler):
    """Stands in for three nodes: healthy, and serving one body in two parts with a pause between."""

    protocol_version = "HTTP/1.1"
    server: _SlowServer

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(b'{"status":"ok"}')
            return
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: self.server.first])
        self.wfile.flush()
        self.server.gate.wait(30)
        self.wfile.write(body[self.server.first :])

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _SlowServer(ThreadingHTTPServer):
    daemon_threads = True
    body = random_layer(2 * 1024 * 1024, seed="lb-stream")
    first = 64 * 1024
    gate = threading.Event()


def test_responses_stream_through_the_load_balancer(tmp_path: Path) -> None:
    """The first bytes of a body reach the client while the node has not sent the rest yet."""
    server = _SlowServer(("127.0.0.1", 0), _SlowNode)
    server.gate = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.server_address[1]}"
    balancer = HAProxy(tmp_path, [address] * 3)
    try:
        balancer.wait_for(dict.fromkeys(NODES, "UP"))
        with httpx.Client(timeout=30) as http, http.stream("GET", f"{balancer.url}/v2/lb/stream/blobs/x") as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            received = b""
            while len(received) < server.first:
                received += next(chunks)
            assert not server.gate.is_set()
            assert received == server.body[: server.first], "more than the node sent, or other bytes"
            server.gate.set()
            received += b"".join(chunks)
        assert received == server.body
    finally:
        server.gate.set()
        balancer.close()
        server.shutdown()
        server.server_close()
        thread.join()
