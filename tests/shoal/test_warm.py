"""``shoal warm``: against a real cluster in front of a real registry, and its parts on their own.

The command runs as a user runs it, in a subprocess (``python -m
shoal.warm``, what ``shoal warm`` calls), and the proof that it warmed an
image is the upstream's access log: the pulls that follow, through every
node, with skopeo, add no request to it.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal.warm import Result, Warmer, _warm_one, summary
from shoal.warm_client import RegistryClient
from shoal.warm_progress import LineProgress
from testbed.cluster import Cluster
from testbed.images import Image, build_image, build_multiarch, push
from testbed.processes import free_port, wait_until
from testbed.registry import DistributionRegistry
from testbed.skopeo import skopeo_copy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry) -> Iterator[Cluster]:
    """Three nodes and a coordinator, shared by this module; each test keeps to its own repositories."""
    with Cluster(tmp_path_factory.mktemp("warm-cluster"), upstream_registry.url) as started:
        yield started


def _warm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.warm", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _repository(prefix: str) -> str:
    return f"warm/{prefix}-{uuid.uuid4().hex[:10]}"


def _settled(registry: DistributionRegistry, repository: str) -> list[tuple[str, str, int]]:
    """Every upstream request for ``repository`` so far, once the access log has caught up.

    The registry logs a request after its handler returns, possibly after
    the client got the response; a request sent after everything else, and
    seen in the log, says the lines before it are there too.
    """
    sentinel = f"/v2/warm-sentinel-{uuid.uuid4().hex[:10]}/tags/list"
    httpx.get(registry.url + sentinel, timeout=10)
    wait_until(lambda: registry.count("GET", sentinel) == 1, message="the sentinel request never reached the log")
    return registry.requests(path_prefix=f"/v2/{repository}/")


def _assert_pulled(directory: Path, image: Image) -> None:
    assert (directory / "manifest.json").read_bytes() == image.manifest
    for digest, data in image.blobs.items():
        assert (directory / digest.split(":", 1)[1]).read_bytes() == data, digest


@pytest.mark.integration
def test_a_warmed_image_is_pulled_through_every_node_without_the_upstream(
    cluster: Cluster, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    repository = _repository("app")
    image = build_image([900_000, 300_000, 40_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)

    warmed = _warm("--url", cluster.nodes[0].url, f"{repository}:v1")
    assert warmed.returncode == 0, warmed.stderr
    # Not a terminal: plain lines, one per layer, then the summary.
    assert f"{repository}:v1: 3 layers" in warmed.stdout
    assert f"{repository}:v1: layer 3/3" in warmed.stdout
    assert "Warmed 1 of 1 images" in warmed.stdout
    assert warmed.stderr == ""

    before = _settled(upstream_registry, repository)
    fetched = {path for method, path, _ in before if method == "GET"}
    assert {f"/v2/{repository}/blobs/{digest}" for digest in image.blobs} <= fetched

    for index, node in enumerate(cluster.nodes):
        _assert_pulled(skopeo_copy(f"{node.url.removeprefix('http://')}/{repository}:v1", tmp_path / str(index)), image)
    assert _settled(upstream_registry, repository) == before


@pytest.mark.integration
def test_only_the_platforms_asked_for_are_warmed(
    cluster: Cluster, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    repository = _repository("multi")
    index = build_multiarch([200_000, 30_000], seed=repository)
    push(upstream_registry.url, repository, "v1", index)
    arm, amd = index.children["linux/arm64"], index.children["linux/amd64"]

    warmed = _warm("--url", cluster.nodes[1].url, "--platform", "linux/arm64", "-j", "2", f"{repository}:v1")
    assert warmed.returncode == 0, warmed.stderr
    assert "for linux/arm64" in warmed.stdout

    before = _settled(upstream_registry, repository)
    fetched = {path for method, path, _ in before if method == "GET"}
    assert {f"/v2/{repository}/blobs/{digest}" for digest in arm.blobs} <= fetched
    assert not {f"/v2/{repository}/blobs/{digest}" for digest in amd.blobs} & fetched
    assert f"/v2/{repository}/manifests/{amd.digest}" not in fetched

    pulled = skopeo_copy(
        f"{cluster.nodes[2].url.removeprefix('http://')}/{repository}:v1",
        tmp_path / "arm64",
        override_arch="arm64",
        override_os="linux",
    )
    _assert_pulled(pulled, arm)
    assert _settled(upstream_registry, repository) == before

    missing = _warm("--url", cluster.nodes[1].url, "--platform", "linux/s390x", f"{repository}:v1")
    assert missing.returncode == 1
    assert "no manifest for linux/s390x (the image has linux/amd64, linux/arm64)" in missing.stderr


@pytest.mark.integration
def test_a_missing_image_fails_the_run_and_the_others_are_still_warmed(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    repository = _repository("present")
    image = build_image([50_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)
    absent = f"{_repository('absent')}:v1"

    result = _warm("--url", cluster.nodes[2].url, absent, f"{repository}:v1")
    assert result.returncode == 1
    assert f"shoal warm: {absent}: manifest v1: 404" in result.stderr
    assert "Warmed 1 of 2 images" in result.stdout
    assert f"FAILED  {absent}" in result.stdout
    fetched = {path for method, path, _ in _settled(upstream_registry, repository) if method == "GET"}
    assert f"/v2/{repository}/blobs/{image.layer_digests[0]}" in fetched


@pytest.mark.integration
def test_a_registry_in_the_reference_is_asked_for_by_name(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    """containerd's ?ns= names the registry; one the cluster does not mirror is an error."""
    repository = _repository("named")
    image = build_image([70_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)

    named = _warm("--url", cluster.nodes[0].url, f"{upstream_registry.host}/{repository}:v1")
    assert named.returncode == 0, named.stderr
    fetched = {path for method, path, _ in _settled(upstream_registry, repository) if method == "GET"}
    assert f"/v2/{repository}/blobs/{image.layer_digests[0]}" in fetched

    other = _warm("--url", cluster.nodes[0].url, f"ghcr.io/{repository}:v1")
    assert other.returncode == 1
    assert f"shoal warm: ghcr.io/{repository}:v1: manifest v1: 404" in other.stderr


@pytest.mark.integration
def test_on_a_terminal_each_image_gets_a_progress_bar(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    repository = _repository("tty")
    image = build_image([600_000, 200_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)
    controller, terminal = pty.openpty()
    # 120 columns, 30 rows: the bar must fit in the width it is given.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal.warm", "--url", cluster.nodes[0].url, f"{repository}:v1"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
        )
        os.close(terminal)
        terminal = -1
        output = bytearray()
        while True:
            ready, _, _ = select.select([controller], [], [], 60)
            assert ready, f"no output for 60s; so far: {bytes(output)!r}"
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        process.stderr.close()
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    screen = output.decode()
    # The line is redrawn in place, and ends full.
    assert "\r\x1b[K" in screen
    drawn = [part.split("\r\n")[0] for part in screen.split("\r\x1b[K")[1:]]
    assert max(len(line) for line in drawn) <= 119, drawn
    last = screen.split("\r\x1b[K")[-1]
    assert f"{repository}:v1  [########################] 100%" in last
    assert "2/2 layers" in last
    assert "done in" in last


def test_an_unreachable_url_fails_with_a_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _warm("--url", url, "alpine:3.19", timeout=60)
    assert result.returncode == 1
    assert f"shoal warm: cannot reach a registry at {url}" in result.stderr


def test_bad_options_are_usage_errors() -> None:
    result = _warm("--platform", "arm64", "alpine")
    assert result.returncode == 2
    assert "expected OS/ARCH" in result.stderr


class _Registry:
    """An in-process registry for ``httpx.MockTransport``: content by path, and a log of requests."""

    def __init__(self) -> None:
        self.content: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []

    def add(self, name: str, tag: str, image: Image, *, corrupt: str | None = None, missing: str | None = None) -> None:
        self.content[f"/v2/{name}/manifests/{tag}"] = (image.media_type, image.manifest)
        for digest, data in image.blobs.items():
            if digest == missing:
                continue
            body = data[:-1] + bytes([data[-1] ^ 1]) if digest == corrupt else data
            self.content[f"/v2/{name}/blobs/{digest}"] = ("application/octet-stream", body)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        found = self.content.get(request.url.path)
        if found is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]})
        return httpx.Response(200, content=found[1], headers={"Content-Type": found[0]})


def _warm_with(registry: _Registry, *images: str) -> tuple[list[Result], str]:
    out = io.StringIO()
    with (
        httpx.Client(base_url="http://shoal", transport=httpx.MockTransport(registry.handle)) as http,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        warmer = Warmer(RegistryClient(http), pool, concurrency=2)
        results = [_warm_one(warmer, text, LineProgress(text, out), time.monotonic) for text in images]
    return results, out.getvalue()


def test_a_corrupt_or_missing_blob_fails_the_image() -> None:
    registry = _Registry()
    corrupt = build_image([20_000, 10_000], seed="unit-corrupt")
    missing = build_image([20_000], seed="unit-missing")
    registry.add("app/corrupt", "v1", corrupt, corrupt=corrupt.layer_digests[1])
    registry.add("app/missing", "v1", missing, missing=missing.layer_digests[0])
    results, output = _warm_with(registry, "app/corrupt:v1", "app/missing:v1")
    assert results[0].error == f"blob {corrupt.layer_digests[1]}: the bytes do not match the digest"
    assert results[1].error == f"blob {missing.layer_digests[0]}: 404 BLOB_UNKNOWN: blob unknown"
    assert "app/corrupt:v1: FAILED: blob" in output


def test_a_blob_shared_by_two_images_is_fetched_once() -> None:
    registry = _Registry()
    image = build_image([30_000], seed="unit-shared")
    registry.add("app/one", "v1", image)
    registry.add("app/two", "v1", image)
    results, _ = _warm_with(registry, "app/one:v1", "app/two:v1")
    assert [result.error for result in results] == [None, None]
    layer = image.layer_digests[0]
    assert registry.requests.count(f"/v2/app/one/blobs/{layer}") == 1
    assert registry.requests.count(f"/v2/app/two/blobs/{layer}") == 0


def test_the_summary_lists_every_image() -> None:
    text = summary(
        [Result("a:1", size=2_000_000, layers=2, seconds=1.0), Result("bb:2", error="manifest 2: 404 X: y")],
        "http://lb:5000",
        3.0,
    )
    assert text.splitlines() == [
        "Warmed 1 of 2 images through http://lb:5000: 2.0 MB in 3.0s",
        "  ok      a:1   2 layers  2.0 MB  1.0s",
        "  FAILED  bb:2  manifest 2: 404 X: y",
    ]
