"""The node's Flask app with an httpx MockTransport as the upstream."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest
from flask.testing import FlaskClient

from node.app import create_app
from node.config import config_from_dict
from node.upstream import Upstream

MANIFEST = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}'
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
MEDIA = "application/vnd.oci.image.manifest.v1+json"


def make_client(tmp_path, url: str, seen: list[str]) -> Iterator[FlaskClient]:
    def registry(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        headers = {"Content-Type": MEDIA, "Docker-Content-Digest": DIGEST}
        if request.url.path.endswith(("/manifests/3.19", f"/manifests/{DIGEST}")):
            return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else MANIFEST)
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]})

    config = config_from_dict({"upstream": {"url": url}, "cache": {"dir": str(tmp_path)}})
    upstream = Upstream(config.upstream, transport=httpx.MockTransport(registry))
    app = create_app(config, upstream=upstream)
    try:
        yield app.test_client()
    finally:
        app.extensions["shoal.node"].close()


@pytest.fixture
def seen() -> list[str]:
    return []


def test_docker_hub_single_names_get_library(tmp_path, seen: list[str]) -> None:
    for client in make_client(tmp_path, "https://registry-1.docker.io", seen):
        response = client.get("/v2/alpine/manifests/3.19")
        assert response.status_code == 200
        assert response.data == MANIFEST
        assert response.headers["Docker-Content-Digest"] == DIGEST
    assert seen == ["HEAD /v2/library/alpine/manifests/3.19", f"GET /v2/library/alpine/manifests/{DIGEST}"]


def test_other_upstreams_keep_single_names(tmp_path, seen: list[str]) -> None:
    for client in make_client(tmp_path, "https://ghcr.example", seen):
        assert client.get("/v2/alpine/manifests/3.19").status_code == 200
    assert seen[0] == "HEAD /v2/alpine/manifests/3.19"


def test_health_and_api_version(tmp_path, seen: list[str]) -> None:
    for client in make_client(tmp_path, "https://ghcr.example", seen):
        response = client.get("/healthz")
        assert response.status_code == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert client.open("/v2/", method="OPTIONS").status_code in (200, 405)
    assert seen == []
