"""The test-support layer, proved against the real services it wraps.

If these fail, every integration test built on the helpers would fail for
reasons unrelated to Shoal, so they run first and speak plainly.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.media_types import ACCEPT_MANIFESTS
from testbed.fake_upstream import FakeUpstream
from testbed.images import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    build_image,
    build_index,
    build_multiarch,
    make_layer,
    push,
    random_layer,
    sha256_digest,
)
from testbed.podman import Podman, PodmanError
from testbed.processes import Process, free_port, require_binary, wait_for_http, wait_until
from testbed.registry import DistributionRegistry
from testbed.skopeo import SkopeoError, skopeo_copy, skopeo_inspect_raw

pytestmark = pytest.mark.integration


def unique_name(prefix: str) -> str:
    """A repository name no other test uses, since the session registry is shared."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as http:
        yield http


# Processes.


def test_wait_until_returns_the_truthy_value() -> None:
    values = iter([0, None, "done"])
    assert wait_until(lambda: next(values), timeout=5) == "done"


def test_wait_until_times_out_with_the_message() -> None:
    with pytest.raises(TimeoutError, match="never true"):
        wait_until(lambda: False, timeout=0.1, message="never true")


def test_free_ports_are_bindable() -> None:
    port = free_port()
    assert 1024 <= port < 65536


def test_require_binary_names_the_package() -> None:
    with pytest.raises(RuntimeError, match="Debian package 'no-such-package'"):
        require_binary("shoal-no-such-binary", "no-such-package")


def test_process_logs_output_and_is_killed_when_it_ignores_sigterm(tmp_path: Path) -> None:
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "print('on stderr', file=sys.stderr, flush=True)\n"
        "while True: signal.pause()\n"
    )
    with Process([sys.executable, "-c", script], tmp_path / "child.log") as process:
        wait_until(lambda: "on stderr" in process.log_text(), timeout=10, message="child never became ready")
        assert "ready" in process.log_text()
        started = time.monotonic()
        assert process.stop(timeout=0.3) == -9
        assert time.monotonic() - started < 5
        assert not process.alive()
        # Stopping again is harmless.
        assert process.stop() == -9


def test_process_stops_on_sigterm(tmp_path: Path) -> None:
    script = "import signal, sys\nprint('ready', flush=True)\nsignal.pause()\n"
    process = Process([sys.executable, "-c", script], tmp_path / "child.log")
    wait_until(lambda: "ready" in process.log_text(), timeout=10)
    assert process.stop() == -15


def _is_gone(pid: int) -> bool:
    # A killed grandchild is reparented, and may stay a zombie if nothing
    # reaps it; a zombie runs no code, so it counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_process_kill_takes_its_children_along(tmp_path: Path) -> None:
    script = (
        "import subprocess, sys, signal\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()'])\n"
        "print('child', child.pid, flush=True)\n"
        "signal.pause()\n"
    )
    process = Process([sys.executable, "-c", script], tmp_path / "parent.log")
    line = wait_until(
        lambda: next((line for line in process.log_text().splitlines() if line.startswith("child ")), None),
        timeout=10,
        message=process.describe,
    )
    grandchild = int(line.split()[1])
    assert not _is_gone(grandchild)
    assert process.kill() == -9
    wait_until(lambda: _is_gone(grandchild), timeout=10, message=f"grandchild {grandchild} survived kill()")


# Images and the real registry.


def test_layers_are_deterministic_gzip_tars() -> None:
    layer = make_layer({"etc/hello": b"hi\n"})
    assert layer == make_layer({"etc/hello": b"hi\n"})
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as archive:
        member = archive.getmember("etc/hello")
        assert member.mtime == 0
        content = archive.extractfile(member)
        assert content is not None
        assert content.read() == b"hi\n"


def test_image_config_describes_its_layers() -> None:
    image = build_image([100, 2000], seed="config")
    config = json.loads(image.config)
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["rootfs"]["diff_ids"] == [sha256_digest(gzip.decompress(layer)) for layer in image.layers]
    manifest = json.loads(image.manifest)
    assert manifest["config"] == {"mediaType": DOCKER_CONFIG, "size": len(image.config), "digest": image.config_digest}
    assert [entry["digest"] for entry in manifest["layers"]] == image.layer_digests
    assert image.digest == "sha256:" + hashlib.sha256(image.manifest).hexdigest()
    assert build_image([100, 2000], seed="config") == image
    assert set(build_image([100], seed="other").blobs).isdisjoint(image.blobs)


def test_index_lists_platforms() -> None:
    index = build_multiarch([100], seed="index")
    document = json.loads(index.manifest)
    assert document["mediaType"] == OCI_INDEX == index.media_type
    platforms = [(entry["platform"]["os"], entry["platform"]["architecture"]) for entry in document["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    assert [entry["digest"] for entry in document["manifests"]] == [child.digest for child in index.children.values()]
    with pytest.raises(ValueError, match="built for linux/amd64"):
        build_index({"linux/arm64": build_image([10])})


def assert_served(client: httpx.Client, base: str, name: str, reference: str, media_type: str, manifest: bytes) -> None:
    response = client.get(f"{base}/v2/{name}/manifests/{reference}", headers={"Accept": ACCEPT_MANIFESTS})
    assert response.status_code == 200, response.text
    assert response.content == manifest
    assert response.headers["Content-Type"] == media_type
    assert response.headers["Docker-Content-Digest"] == sha256_digest(manifest)


def assert_blobs_served(client: httpx.Client, base: str, name: str, image: Image) -> None:
    for digest, data in image.blobs.items():
        response = client.get(f"{base}/v2/{name}/blobs/{digest}")
        assert response.status_code == 200, response.text
        assert response.content == data


def test_push_docker_image_and_read_it_back(upstream_registry: DistributionRegistry, client: httpx.Client) -> None:
    name = unique_name("support/docker")
    image = build_image([1000, 300_000], seed=name)
    assert push(upstream_registry.url, name, "v1", image) == image.digest
    assert_served(client, upstream_registry.url, name, "v1", DOCKER_MANIFEST, image.manifest)
    assert_served(client, upstream_registry.url, name, image.digest, DOCKER_MANIFEST, image.manifest)
    assert_blobs_served(client, upstream_registry.url, name, image)
    # Pushing again is a no-op for the blobs, which are already there.
    push(upstream_registry.url, name, "v1", image)


def test_push_oci_index_and_read_it_back(upstream_registry: DistributionRegistry, client: httpx.Client) -> None:
    name = unique_name("support/oci")
    index = build_multiarch([2000, 5000], seed=name)
    push(upstream_registry.url, name, "multi", index)
    assert_served(client, upstream_registry.url, name, "multi", OCI_INDEX, index.manifest)
    for child in index.children.values():
        assert_served(client, upstream_registry.url, name, child.digest, OCI_MANIFEST, child.manifest)
        assert_blobs_served(client, upstream_registry.url, name, child)


def test_access_log_counts_requests(upstream_registry: DistributionRegistry, client: httpx.Client) -> None:
    name = unique_name("support/counted")
    image = build_image([100], seed=name)
    push(upstream_registry.url, name, "latest", image)
    path = f"/v2/{name}/blobs/{image.layer_digests[0]}"
    for _ in range(2):
        assert client.get(f"{upstream_registry.url}{path}").status_code == 200
    wait_until(lambda: upstream_registry.count("GET", path) == 2, message=lambda: str(upstream_registry.requests()))
    assert upstream_registry.requests("GET", path) == [("GET", path, 200), ("GET", path, 200)]
    # The push checked for the blob first, and the registry logged that too.
    assert ("HEAD", path, 404) in upstream_registry.requests(path_prefix=f"/v2/{name}/")
    assert upstream_registry.count("GET", f"/v2/{name}/manifests/latest") == 0


def test_registry_restarts_on_the_same_port_with_its_data(tmp_path: Path, client: httpx.Client) -> None:
    with DistributionRegistry(tmp_path / "registry") as registry:
        image = build_image([100], seed="restart")
        push(registry.url, "restart", "v1", image)
        url = registry.url
        registry.stop()
        with pytest.raises(httpx.ConnectError):
            client.get(f"{url}/v2/")
        registry.start()
        assert registry.url == url
        assert_served(client, url, "restart", "v1", DOCKER_MANIFEST, image.manifest)


def test_registry_in_proxy_mode_pulls_through(upstream_registry: DistributionRegistry, client: httpx.Client) -> None:
    name = unique_name("support/proxied")
    image = build_image([1000], seed=name)
    push(upstream_registry.url, name, "v1", image)
    with DistributionRegistry(proxy_remote_url=upstream_registry.url) as proxy:
        assert_served(client, proxy.url, name, "v1", DOCKER_MANIFEST, image.manifest)
        assert_blobs_served(client, proxy.url, name, image)
    wait_until(
        lambda: upstream_registry.requests("GET", f"/v2/{name}/blobs/{image.layer_digests[0]}"),
        message="the proxy never fetched the layer from its remote",
    )


# skopeo against the real registry.


def test_skopeo_copies_a_pushed_image(upstream_registry: DistributionRegistry, tmp_path: Path) -> None:
    name = unique_name("support/skopeo")
    image = build_image([1000, 200_000], seed=name)
    push(upstream_registry.url, name, "v1", image)
    dest = skopeo_copy(f"{upstream_registry.host}/{name}:v1", tmp_path / "copy")
    assert (dest / "manifest.json").read_bytes() == image.manifest
    for digest, data in image.blobs.items():
        assert (dest / digest.removeprefix("sha256:")).read_bytes() == data
    assert skopeo_inspect_raw(f"{upstream_registry.host}/{name}:v1") == image.manifest
    assert skopeo_inspect_raw(f"{upstream_registry.host}/{name}:v1", config=True) == image.config


def test_skopeo_picks_the_requested_platform(upstream_registry: DistributionRegistry, tmp_path: Path) -> None:
    name = unique_name("support/skopeo-multi")
    index = build_multiarch([1000], seed=name)
    push(upstream_registry.url, name, "multi", index)
    dest = skopeo_copy(f"{upstream_registry.host}/{name}:multi", tmp_path / "arm64", override_arch="arm64")
    arm64 = index.children["linux/arm64"]
    assert (dest / "manifest.json").read_bytes() == arm64.manifest
    assert (dest / arm64.layer_digests[0].removeprefix("sha256:")).read_bytes() == arm64.layers[0]


def test_skopeo_failure_carries_stderr(upstream_registry: DistributionRegistry, tmp_path: Path) -> None:
    with pytest.raises(SkopeoError, match="manifest unknown"):
        skopeo_copy(f"{upstream_registry.host}/support/missing:nope", tmp_path / "missing")


# podman against the real registry.


def test_podman_pulls_into_its_own_storage(upstream_registry: DistributionRegistry, tmp_path: Path) -> None:
    name = unique_name("support/podman")
    image = build_image([3000, 500], seed=name)
    push(upstream_registry.url, name, "v1", image)
    podman = Podman(tmp_path / "podman")
    podman.pull(f"{upstream_registry.host}/{name}:v1")
    assert podman.image_digest(f"{upstream_registry.host}/{name}:v1") == image.digest
    assert podman.run("info", "--format", "{{.Store.GraphRoot}}").strip() == str(tmp_path / "podman" / "root")
    with pytest.raises(PodmanError, match="manifest unknown"):
        podman.pull(f"{upstream_registry.host}/support/missing:nope")


# The fake upstream.


def test_fake_upstream_serves_an_image(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    index = build_multiarch([1000], seed="fake")
    fake_upstream.add_image("library/app", "v1", index)
    base = fake_upstream.url
    assert client.get(f"{base}/v2/").status_code == 200
    assert_served(client, base, "library/app", "v1", OCI_INDEX, index.manifest)
    for child in index.children.values():
        assert_served(client, base, "library/app", child.digest, OCI_MANIFEST, child.manifest)
        assert_blobs_served(client, base, "library/app", child)
    head = client.head(f"{base}/v2/library/app/manifests/v1")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(index.manifest))
    assert head.headers["Docker-Content-Digest"] == index.digest
    assert client.get(f"{base}/v2/library/app/tags/list").json() == {"name": "library/app", "tags": ["v1"]}
    missing = client.get(f"{base}/v2/library/app/manifests/v2")
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert client.get(f"{base}/v2/library/other/blobs/{index.digest}").status_code == 404
    assert fake_upstream.count("HEAD", "/v2/library/app/manifests/v1") == 1
    assert fake_upstream.requests[0] == ("GET", "/v2/")


def test_fake_upstream_corrupts_a_blob(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    image = build_image([5000], seed="corrupt")
    fake_upstream.add_image("app", "v1", image)
    digest = image.layer_digests[0]
    fake_upstream.set_fault(digest, corrupt=True)
    response = client.get(f"{fake_upstream.url}/v2/app/blobs/{digest}")
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert len(response.content) == len(image.layers[0])
    assert sha256_digest(response.content) != digest
    fake_upstream.clear_faults()
    assert client.get(f"{fake_upstream.url}/v2/app/blobs/{digest}").content == image.layers[0]


def test_fake_upstream_dies_mid_blob(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    image = build_image([100_000], seed="die")
    fake_upstream.add_image("app", "v1", image)
    digest = image.layer_digests[0]
    fake_upstream.set_fault(digest, die_after=40_000)
    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("GET", f"{fake_upstream.url}/v2/app/blobs/{digest}") as response,
    ):
        assert response.headers["Content-Length"] == str(len(image.layers[0]))
        for chunk in response.iter_raw():
            received += chunk
    assert bytes(received) == image.layers[0][:40_000]


def test_fake_upstream_answers_a_range_and_counts_bytes(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    data = random_layer(100_000, seed="range")
    digest = fake_upstream.add_blob("app", data)
    path = f"/v2/app/blobs/{digest}"
    ranged = client.get(fake_upstream.url + path, headers={"Range": "bytes=60000-"})
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes 60000-{len(data) - 1}/{len(data)}"
    assert ranged.content == data[60000:]
    fake_upstream.honour_range = False
    ignored = client.get(fake_upstream.url + path, headers={"Range": "bytes=60000-"})
    assert ignored.status_code == 200 and ignored.content == data
    assert fake_upstream.ranges(path) == ["bytes=60000-", "bytes=60000-"]
    assert fake_upstream.bytes_sent(path) == len(data) - 60000 + len(data)


def test_fake_upstream_paces_a_blob(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    data = random_layer(200_000, seed="paced")
    digest = fake_upstream.add_blob("app", data)
    fake_upstream.set_fault(digest, rate=1_000_000, chunk_size=20_000)
    started = time.monotonic()
    assert client.get(f"{fake_upstream.url}/v2/app/blobs/{digest}").content == data
    # 200 kB at 1 MB/s.
    assert time.monotonic() - started >= 0.2


def test_fake_upstream_gate_holds_the_rest_of_the_body(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    image = build_image([100_000], seed="gate")
    fake_upstream.add_image("app", "v1", image)
    digest = image.layer_digests[0]
    gate = threading.Event()
    fault = fake_upstream.set_fault(digest, gate=gate, chunk_size=10_000)
    received = bytearray()
    with client.stream("GET", f"{fake_upstream.url}/v2/app/blobs/{digest}") as response:
        chunks = response.iter_raw()
        received += next(chunks)
        fault.reached.wait(10)
        assert fault.reached.is_set()
        # The first chunk is all the client can have until the gate opens.
        assert len(received) <= 10_000
        gate.set()
        for chunk in chunks:
            received += chunk
    assert bytes(received) == image.layers[0]


def test_fake_upstream_chunk_delay_still_delivers(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    image = build_image([50_000], seed="slow")
    fake_upstream.add_image("app", "v1", image)
    digest = image.layer_digests[0]
    fake_upstream.set_fault(digest, chunk_delay=0.05, chunk_size=10_000)
    started = time.monotonic()
    assert client.get(f"{fake_upstream.url}/v2/app/blobs/{digest}").content == image.layers[0]
    # Six chunks with a pause between each pair.
    assert time.monotonic() - started >= 0.25


def test_fake_upstream_down_refuses_and_up_serves_again(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    image = build_image([100], seed="down")
    fake_upstream.add_image("app", "v1", image)
    url = f"{fake_upstream.url}/v2/app/manifests/v1"
    # A kept-alive connection must be cut too, not just the listener.
    assert client.get(url).status_code == 200
    fake_upstream.down()
    with pytest.raises(httpx.TransportError):
        client.get(url)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)
    fake_upstream.up()
    assert client.get(url).content == image.manifest


def test_fake_upstream_down_releases_a_gated_response(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    image = build_image([100_000], seed="gate-down")
    fake_upstream.add_image("app", "v1", image)
    digest = image.layer_digests[0]
    fault = fake_upstream.set_fault(digest, gate=threading.Event(), chunk_size=10_000)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("GET", f"{fake_upstream.url}/v2/app/blobs/{digest}") as response,
    ):
        chunks = response.iter_raw()
        next(chunks)
        assert fault.reached.wait(10)
        fake_upstream.down()
        for _ in chunks:
            pass


def test_skopeo_pulls_from_the_fake_upstream(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    image = build_image([1000], oci=True, seed="fake-skopeo")
    fake_upstream.add_image("app", "v1", image)
    wait_for_http(f"{fake_upstream.url}/v2/")
    dest = skopeo_copy(f"{fake_upstream.host}/app:v1", tmp_path / "copy")
    assert (dest / "manifest.json").read_bytes() == image.manifest
