"""Several upstreams in one cluster: two real registries holding different images under one name."""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testbed.cluster import Cluster
from testbed.images import Image, build_image, push
from testbed.node import NodeProcess
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry

pytestmark = pytest.mark.integration

NAME = "team/app"


@pytest.fixture(scope="module")
def second_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("second-registry"))
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def images(upstream_registry: DistributionRegistry, second_registry: DistributionRegistry) -> tuple[Image, Image]:
    one = build_image([120_000, 3_000], seed="routing-one")
    two = build_image([90_000, 4_000], seed="routing-two")
    push(upstream_registry.url, NAME, "v1", one)
    push(second_registry.url, NAME, "v1", two)
    return one, two


def _settings(one: DistributionRegistry, two: DistributionRegistry) -> dict[str, Any]:
    return {
        "upstreams": {"one.example": {"url": one.url}, "two.example:5000": {"url": two.url}},
        "default_upstream": "one.example",
    }


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory,
    upstream_registry: DistributionRegistry,
    second_registry: DistributionRegistry,
) -> Iterator[NodeProcess]:
    settings = _settings(upstream_registry, second_registry)
    started = NodeProcess(tmp_path_factory.mktemp("routing-node"), upstream_registry.url, settings)
    yield started
    started.stop()


def _pull(http: httpx.Client, prefix: str, query: str, image: Image) -> None:
    manifest = http.get(f"/v2/{prefix}{NAME}/manifests/v1{query}")
    assert manifest.status_code == 200, manifest.text
    assert manifest.content == image.manifest
    assert http.get(f"/v2/{prefix}{NAME}/manifests/{image.digest}{query}").content == image.manifest
    for digest, data in image.blobs.items():
        body = http.get(f"/v2/{prefix}{NAME}/blobs/{digest}{query}").content
        assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
        assert body == data


def test_ns_picks_the_registry(node: NodeProcess, images: tuple[Image, Image]) -> None:
    one, two = images
    with node.client() as http:
        _pull(http, "", "?ns=one.example", one)
        _pull(http, "", "?ns=two.example:5000", two)
        # The same tag of the same name on the two registries stays apart.
        assert http.get(f"/v2/{NAME}/manifests/v1?ns=one.example").content == one.manifest
        assert http.get(f"/v2/{NAME}/manifests/v1?ns=two.example:5000").content == two.manifest


def test_path_prefix_and_default(node: NodeProcess, images: tuple[Image, Image]) -> None:
    one, two = images
    with node.client() as http:
        _pull(http, "two.example:5000/", "", two)
        _pull(http, "one.example/", "", one)
        _pull(http, "", "", one)  # no ns, no prefix: the default upstream


def test_unknown_registries_get_404_never_other_content(node: NodeProcess, images: tuple[Image, Image]) -> None:
    one, _ = images
    with node.client() as http:
        for path in (
            f"/v2/{NAME}/manifests/v1?ns=ghcr.io",
            f"/v2/ghcr.io/{NAME}/manifests/v1",
            f"/v2/{NAME}/blobs/{one.layer_digests[0]}?ns=docker.io",
            f"/v2/localhost/{NAME}/manifests/v1",
        ):
            response = http.get(path)
            assert response.status_code == 404, path
            assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN", path


def test_catalog_is_per_registry(node: NodeProcess, images: tuple[Image, Image]) -> None:
    with node.client() as http:
        http.get(f"/v2/{NAME}/manifests/v1?ns=two.example:5000")
        assert NAME in http.get("/v2/_catalog?ns=two.example:5000").json()["repositories"]


def test_one_fetch_per_upstream_across_the_cluster(
    tmp_path: Path, upstream_registry: DistributionRegistry, second_registry: DistributionRegistry
) -> None:
    one = build_image([800_000, 200_000], seed="routing-burst-one")
    two = build_image([700_000, 100_000], seed="routing-burst-two")
    push(upstream_registry.url, "team/burst", "v1", one)
    push(second_registry.url, "team/burst", "v1", two)
    settings = _settings(upstream_registry, second_registry)
    cluster = Cluster(tmp_path, upstream_registry.url, nodes=2, node_settings=settings)
    try:

        def pull(index: int) -> None:
            node = cluster.nodes[index % 2]
            image, registry = (one, "one.example") if index % 4 < 2 else (two, "two.example:5000")
            with node.client() as http:
                assert http.get(f"/v2/team/burst/manifests/v1?ns={registry}").content == image.manifest
                for digest, data in image.blobs.items():
                    assert http.get(f"/v2/team/burst/blobs/{digest}?ns={registry}").content == data

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(pull, range(16)))
    finally:
        cluster.close()
    for registry, image in ((upstream_registry, one), (second_registry, two)):
        for digest in image.blobs:
            path = f"/v2/team/burst/blobs/{digest}"
            wait_until(lambda path=path, registry=registry: registry.count("GET", path) >= 1, message=path)
            assert registry.count("GET", path) == 1, path
        assert registry.count("GET", f"/v2/team/burst/manifests/{image.digest}") == 1
        assert registry.count("HEAD", "/v2/team/burst/manifests/v1") == 1
