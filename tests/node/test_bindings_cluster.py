"""Content bound to its repository on real nodes, in front of a real docker-registry.

What each pull costs upstream is counted in the registry's access log. A
line is written a moment after its response, so a count is read only after
a marker request sent afterwards has been logged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testbed.cluster import Cluster
from testbed.images import Image, Index, build_image, build_multiarch, push
from testbed.node import NodeProcess
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry
from testbed.skopeo import skopeo_copy

pytestmark = pytest.mark.integration

Request = tuple[str, str, int]


def _settled(registry: DistributionRegistry, name: str) -> list[Request]:
    """Every request the registry logged for ``name``, once those sent before now are all logged."""
    marker = f"/v2/marker/{uuid.uuid4().hex}/tags/list"
    httpx.get(f"{registry.url}{marker}", timeout=10)
    wait_until(lambda: registry.count("GET", marker) == 1, timeout=10, message="the marker was never logged")
    return registry.requests(path_prefix=f"/v2/{name}/")


def _push(registry: DistributionRegistry, image: Image | Index, *names: str) -> None:
    for name in names:
        push(registry.url, name, "v1", image)


def _pull_by_api(http: httpx.Client, name: str, reference: str, image: Image) -> None:
    manifest = http.get(f"/v2/{name}/manifests/{reference}")
    assert manifest.status_code == 200, manifest.text
    assert manifest.content == image.manifest
    for digest, data in image.blobs.items():
        blob = http.get(f"/v2/{name}/blobs/{digest}")
        assert blob.status_code == 200, (digest, blob.text)
        assert blob.content == data


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["errors"][0]["code"] == code


def _counter(http: httpx.Client, result: str, node_id: str | None = None) -> float:
    """``shoal_binding_checks_total`` of every node (or the node's sample of ``node_id``) for ``result``."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        ours = node_id is None or f'node="{node_id}"' in line
        if line.startswith("shoal_binding_checks_total{") and f'result="{result}"' in line and ours:
            total += float(line.rsplit(" ", 1)[1])
    return total


# A node on its own.


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry) -> Iterator[NodeProcess]:
    started = NodeProcess(tmp_path_factory.mktemp("bindings-node"), upstream_registry.url)
    yield started
    started.stop()


def test_a_cached_digest_under_a_repository_the_upstream_lacks_is_404_after_one_head(
    node: NodeProcess, upstream_registry: DistributionRegistry
) -> None:
    name = f"team/{uuid.uuid4().hex[:8]}"
    image = build_image([40_000, 3_000], seed=name)
    _push(upstream_registry, image, name)
    layer = image.layer_digests[0]
    someone, zzz = f"someone/{uuid.uuid4().hex[:8]}", f"zzz{uuid.uuid4().hex[:8]}"
    with node.client() as http:
        _pull_by_api(http, name, "v1", image)
        for _ in range(2):
            _assert_error(http.get(f"/v2/{someone}/manifests/{image.digest}"), 404, "MANIFEST_UNKNOWN")
            _assert_error(http.get(f"/v2/{zzz}/blobs/{layer}"), 404, "BLOB_UNKNOWN")
        assert http.head(f"/v2/{zzz}/manifests/{image.digest}").status_code == 404
        # A 404 is not remembered: one HEAD for each request.
        assert _settled(upstream_registry, someone) == [("HEAD", f"/v2/{someone}/manifests/{image.digest}", 404)] * 2
        assert _settled(upstream_registry, zzz) == [
            ("HEAD", f"/v2/{zzz}/blobs/{layer}", 404),
            ("HEAD", f"/v2/{zzz}/blobs/{layer}", 404),
            ("HEAD", f"/v2/{zzz}/manifests/{image.digest}", 404),
        ]
        repositories = http.get("/v2/_catalog").json()["repositories"]
        assert name in repositories
        assert someone not in repositories and zzz not in repositories
        _assert_error(http.get(f"/v2/{zzz}/tags/list"), 404, "NAME_UNKNOWN")
        wait_until(lambda: _counter(http, "unknown") == 5, timeout=10, message="binding checks were not counted")


def test_what_a_pull_costs_upstream(node: NodeProcess, upstream_registry: DistributionRegistry, tmp_path: Path) -> None:
    name, mirror = f"cost/{uuid.uuid4().hex[:8]}", f"mirror/{uuid.uuid4().hex[:8]}"
    image = build_image([60_000, 5_000], seed=name)
    _push(upstream_registry, image, name, mirror)
    pushed, mirrored = len(_settled(upstream_registry, name)), len(_settled(upstream_registry, mirror))
    address = node.url.removeprefix("http://")
    blobs = [("GET", f"/v2/{name}/blobs/{digest}", 200) for digest in image.blobs]

    skopeo_copy(f"{address}/{name}:v1", tmp_path / "cold")
    cold = _settled(upstream_registry, name)[pushed:]
    # Cold: the tag, the manifest, every blob once; nothing asked to confirm them.
    assert sorted(cold) == sorted(
        [("HEAD", f"/v2/{name}/manifests/v1", 200), ("GET", f"/v2/{name}/manifests/{image.digest}", 200), *blobs]
    )

    skopeo_copy(f"{address}/{name}:v1", tmp_path / "warm")
    skopeo_copy(f"{address}/{name}@{image.digest}", tmp_path / "by-digest")
    assert _settled(upstream_registry, name)[pushed:] == cold, "a warm pull asks the upstream nothing"

    # By digest under another repository that holds it too: one HEAD for the whole image.
    copied = skopeo_copy(f"{address}/{mirror}@{image.digest}", tmp_path / "mirror")
    assert (copied / "manifest.json").read_bytes() == image.manifest
    assert _settled(upstream_registry, mirror)[mirrored:] == [("HEAD", f"/v2/{mirror}/manifests/{image.digest}", 200)]


def test_a_multi_platform_pull_confirms_its_child_and_the_childs_blobs(
    node: NodeProcess, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    name, mirror = f"multi/{uuid.uuid4().hex[:8]}", f"mirror/{uuid.uuid4().hex[:8]}"
    index = build_multiarch([20_000, 3_000], seed=name)
    _push(upstream_registry, index, name, mirror)
    pushed, mirrored = len(_settled(upstream_registry, name)), len(_settled(upstream_registry, mirror))
    arm = index.children["linux/arm64"]
    address = node.url.removeprefix("http://")

    copied = skopeo_copy(f"{address}/{name}:v1", tmp_path / "cold", override_arch="arm64", override_os="linux")
    assert (copied / "manifest.json").read_bytes() == arm.manifest
    assert sorted(_settled(upstream_registry, name)[pushed:]) == sorted(
        [
            ("HEAD", f"/v2/{name}/manifests/v1", 200),
            ("GET", f"/v2/{name}/manifests/{index.digest}", 200),
            ("GET", f"/v2/{name}/manifests/{arm.digest}", 200),
            *(("GET", f"/v2/{name}/blobs/{digest}", 200) for digest in arm.blobs),
        ]
    )
    # Under another repository: one HEAD for the index; the child and its blobs follow from it.
    skopeo_copy(f"{address}/{mirror}@{index.digest}", tmp_path / "mirror", override_arch="arm64", override_os="linux")
    assert _settled(upstream_registry, mirror)[mirrored:] == [("HEAD", f"/v2/{mirror}/manifests/{index.digest}", 200)]


def test_with_the_upstream_stopped_confirmed_pairs_are_served_and_others_refused(tmp_path: Path) -> None:
    with DistributionRegistry(tmp_path / "upstream") as registry:
        image = build_image([30_000, 2_000], seed="stopped")
        _push(registry, image, "team/app", "team/copy")
        node = NodeProcess(tmp_path / "node", registry.url)
        try:
            with node.client() as http:
                _pull_by_api(http, "team/app", "v1", image)
                registry.stop()
                _pull_by_api(http, "team/app", image.digest, image)
                _assert_error(http.get(f"/v2/team/copy/manifests/{image.digest}"), 503, "UPSTREAM_UNAVAILABLE")
                _assert_error(http.get(f"/v2/team/copy/blobs/{image.layer_digests[0]}"), 503, "UPSTREAM_UNAVAILABLE")
                assert "team/copy" not in http.get("/v2/_catalog").json()["repositories"]
                # Once the upstream answers again, it confirms the pair.
                registry.start()
                _pull_by_api(http, "team/copy", image.digest, image)
                assert "team/copy" in http.get("/v2/_catalog").json()["repositories"]
        finally:
            node.stop()


# A cluster: confirmations shared through the coordinator.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("bindings-cluster"), upstream_registry.url, nodes=3) as started:
        yield started


def test_a_pair_confirmed_on_one_node_is_served_by_another_without_a_head(
    cluster: Cluster, upstream_registry: DistributionRegistry
) -> None:
    name, mirror = f"cluster/{uuid.uuid4().hex[:8]}", f"shared/{uuid.uuid4().hex[:8]}"
    zzz = f"zzz{uuid.uuid4().hex[:8]}"
    image = build_image([50_000, 4_000], seed=name)
    _push(upstream_registry, image, name, mirror)
    pushed, mirrored = len(_settled(upstream_registry, name)), len(_settled(upstream_registry, mirror))
    first, second, third = cluster.nodes
    with first.client() as http:
        _pull_by_api(http, name, "v1", image)
        assert http.get(f"/v2/{mirror}/manifests/{image.digest}").status_code == 200
    assert _settled(upstream_registry, mirror)[mirrored:] == [("HEAD", f"/v2/{mirror}/manifests/{image.digest}", 200)]
    for node in (second, third):
        with node.client() as http:
            # The manifest from a peer, its confirmation and its blobs' from the coordinator.
            _pull_by_api(http, mirror, image.digest, image)
            _pull_by_api(http, name, image.digest, image)
            _assert_error(http.get(f"/v2/{zzz}/blobs/{image.layer_digests[0]}"), 404, "BLOB_UNKNOWN")
            assert zzz not in http.get("/v2/_catalog").json()["repositories"]
    assert _settled(upstream_registry, mirror)[mirrored:] == [("HEAD", f"/v2/{mirror}/manifests/{image.digest}", 200)]
    assert [request for request in _settled(upstream_registry, name)[pushed:] if request[0] == "HEAD"] == [
        ("HEAD", f"/v2/{name}/manifests/v1", 200)
    ]
    assert _settled(upstream_registry, zzz) == [("HEAD", f"/v2/{zzz}/blobs/{image.layer_digests[0]}", 404)] * 2
    with first.client() as http:
        wait_until(
            lambda: _counter(http, "confirmed", first.node_id) == 1 and _counter(http, "unknown") == 2,
            timeout=10,
            message="the cluster's binding checks were not counted",
        )
