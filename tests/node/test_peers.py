"""The internal peer endpoint, ``GET /internal/v1/content/<digest>``, on real gunicorn nodes.

Nodes serve each other their content there, so it must answer only callers
that present the cluster secret, serve exactly what the node holds, and
never start a fetch of its own. The upstream is the in-process fake, whose
request log is complete the moment a request arrives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testbed.cluster import SECRET, Cluster
from testbed.fake_upstream import FakeUpstream
from testbed.images import random_layer
from testbed.node import NodeProcess
from testbed.processes import wait_until

pytestmark = pytest.mark.integration

REPOSITORY = "peers/content"
HEADER = "X-Shoal-Secret"


def _ask(node: NodeProcess, reference: str, secret: str | None) -> httpx.Response:
    headers = {} if secret is None else {HEADER: secret}
    return httpx.get(f"{node.url}/internal/v1/content/{reference}", headers=headers, timeout=30)


def _error_code(response: httpx.Response) -> str:
    assert response.headers["Content-Type"] == "application/json", response.text
    code: str = response.json()["errors"][0]["code"]
    return code


def _hold(node: NodeProcess, upstream: FakeUpstream, seed: str) -> tuple[str, bytes]:
    """Pull a new blob through ``node``'s registry API, so that the node holds it; return its digest and bytes."""
    data = random_layer(300_000, seed=seed)
    digest = upstream.add_blob(REPOSITORY, data)
    response = httpx.get(f"{node.url}/v2/{REPOSITORY}/blobs/{digest}", timeout=30)
    assert response.status_code == 200, response.text
    assert response.content == data
    wait_until(lambda: digest in node.stored_digests(), message=f"{digest} never committed")
    return digest, data


def _upstream_asked_for(upstream: FakeUpstream, digest: str) -> list[tuple[str, str]]:
    return [(method, path) for method, path in upstream.requests if digest in path]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[NodeProcess]:
    """A node of a real cluster (Redis, a coordinator), configured with the cluster secret."""
    with Cluster(tmp_path_factory.mktemp("peers-cluster"), upstream.url, nodes=1) as cluster:
        yield cluster.nodes[0]


@pytest.fixture(scope="module")
def held(node: NodeProcess, upstream: FakeUpstream) -> tuple[str, bytes]:
    return _hold(node, upstream, "peers/held")


def test_the_cluster_secret_gets_the_exact_bytes(node: NodeProcess, held: tuple[str, bytes]) -> None:
    digest, data = held
    response = _ask(node, digest, SECRET)
    assert response.status_code == 200, response.text
    assert response.content == data
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["X-Shoal-Media-Type"]


def test_a_caller_without_the_secret_is_denied(node: NodeProcess, held: tuple[str, bytes]) -> None:
    digest, data = held
    response = _ask(node, digest, None)
    assert response.status_code == 403
    assert _error_code(response) == "DENIED"
    assert data[:64] not in response.content


@pytest.mark.parametrize(
    "secret",
    ["", "wrong", SECRET[:-1], SECRET + "x", SECRET[:-1] + "g", SECRET.upper(), f"Bearer {SECRET}"],
    ids=["empty", "wrong", "prefix", "longer", "last-character", "other-case", "bearer"],
)
def test_a_wrong_secret_is_denied(node: NodeProcess, held: tuple[str, bytes], secret: str) -> None:
    digest, data = held
    response = _ask(node, digest, secret)
    assert response.status_code == 403
    assert _error_code(response) == "DENIED"
    assert data[:64] not in response.content


def test_content_the_node_does_not_hold_is_unknown_and_not_fetched(node: NodeProcess, upstream: FakeUpstream) -> None:
    # The upstream has it, so a node that fetched on a peer's behalf would succeed.
    digest = upstream.add_blob(REPOSITORY, random_layer(50_000, seed="peers/absent"))

    response = _ask(node, digest, SECRET)
    assert response.status_code == 404, response.text
    assert _error_code(response) == "BLOB_UNKNOWN"
    assert response.json()["errors"][0]["detail"] == {"digest": digest}
    # A fill started in the background would be followed by the next ask,
    # so a second 404 shows that the first one left nothing in progress.
    assert _ask(node, digest, SECRET).status_code == 404
    assert _upstream_asked_for(upstream, digest) == []
    assert digest not in node.stored_digests()
    assert node.leftover_fill_files() == []


@pytest.mark.parametrize(
    "reference",
    ["sha256:abc", "sha256:" + "A" * 64, "sha256:" + "g" * 64, "md5:" + "0" * 32, "latest", "sha256:" + "0" * 65],
    ids=["short", "upper-case", "not-hex", "unsupported-algorithm", "a-tag", "long"],
)
def test_a_malformed_digest_is_invalid(node: NodeProcess, reference: str) -> None:
    response = _ask(node, reference, SECRET)
    assert response.status_code == 400, response.text
    assert _error_code(response) == "DIGEST_INVALID"


def test_a_standalone_node_denies_every_caller(tmp_path: Path, upstream: FakeUpstream) -> None:
    node = NodeProcess(tmp_path / "standalone", upstream.url)
    try:
        digest, data = _hold(node, upstream, "peers/standalone")
        for secret in (None, "", "anything", SECRET):
            response = _ask(node, digest, secret)
            assert response.status_code == 403, (secret, response.text)
            assert _error_code(response) == "DENIED"
            assert data[:64] not in response.content
    finally:
        node.stop()
