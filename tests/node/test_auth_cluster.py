"""Access control on real nodes: htpasswd on a cluster, tokens, anonymous upstreams, the metrics listener.

Clients are the real ones: skopeo with ``--src-creds`` (straight to the
node for Basic, through the token server for Bearer), containerd with an
``Authorization`` header in ``hosts.toml``, as a Kubernetes node is set up,
and podman with an auth file and Shoal as a ``registries.conf`` mirror.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testbed.cluster import Cluster
from testbed.containerd import Containerd, write_hosts
from testbed.fake_upstream import FakeUpstream
from testbed.images import Image, build_image, push
from testbed.node import NodeProcess
from testbed.podman import Podman, PodmanError, write_registries_conf
from testbed.processes import free_port
from testbed.registry import DistributionRegistry
from testbed.skopeo import SkopeoError, skopeo_copy
from testbed.token_server import TokenServer
from tests.node.test_auth import htpasswd_file

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice", "correct horse battery staple"
REALM = "Shoal test mirror"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _assert_pulled(directory: Path, image: Image) -> None:
    assert (directory / "manifest.json").read_bytes() == image.manifest
    for digest, data in image.blobs.items():
        assert (directory / digest.split(":", 1)[1]).read_bytes() == data, digest


def _assert_refused(response: httpx.Response, challenge: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == challenge
    if response.request.method != "HEAD":
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"


def _endpoints(name: str, image: Image) -> list[str]:
    layer = next(iter(image.blobs))
    return [
        "/v2/",
        f"/v2/{name}/manifests/v1",
        f"/v2/{name}/manifests/{image.digest}",
        f"/v2/{name}/blobs/{layer}",
        f"/v2/{name}/tags/list",
        "/v2/_catalog",
    ]


# htpasswd on a cluster.


@pytest.fixture(scope="module")
def pushed(upstream_registry: DistributionRegistry) -> tuple[str, Image]:
    name = f"auth/{uuid.uuid4().hex[:10]}"
    image = build_image([200_000, 30_000], seed=name)
    push(upstream_registry.url, name, "v1", image)
    return name, image


@pytest.fixture(scope="module")
def htpasswd_cluster(
    tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("auth-cluster")
    path = htpasswd_file(workdir / "htpasswd", USER, PASSWORD)
    # Named docker.io, as containerd names the registry (ns=docker.io).
    settings = {
        "auth": {"htpasswd": {"realm": REALM, "path": str(path)}},
        "upstreams": {"docker.io": {"url": upstream_registry.url}},
    }
    with Cluster(workdir, upstream_registry.url, nodes=3, node_settings=settings) as cluster:
        yield cluster


def test_htpasswd_refuses_every_endpoint_without_the_right_password(
    htpasswd_cluster: Cluster, pushed: tuple[str, Image]
) -> None:
    name, image = pushed
    challenge = f'Basic realm="{REALM}"'
    for node in htpasswd_cluster.nodes:
        with node.client() as http:
            for path in _endpoints(name, image):
                _assert_refused(http.get(path), challenge)
                _assert_refused(http.head(path), challenge)
                _assert_refused(http.get(path, headers={"Authorization": _basic(USER, "wrong")}), challenge)
                _assert_refused(http.get(path, headers={"Authorization": _basic("mallory", PASSWORD)}), challenge)
    # Nothing was fetched for a refused request.
    assert all(node.stored_digests() == set() for node in htpasswd_cluster.nodes)


def test_htpasswd_skopeo_pulls_with_credentials_from_every_node(
    htpasswd_cluster: Cluster, pushed: tuple[str, Image], tmp_path: Path
) -> None:
    name, image = pushed
    with pytest.raises(SkopeoError):
        skopeo_copy(f"{_host(htpasswd_cluster.nodes[0])}/{name}:v1", tmp_path / "anonymous")
    for index, node in enumerate(htpasswd_cluster.nodes):
        pulled = skopeo_copy(f"{_host(node)}/{name}:v1", tmp_path / f"pull-{index}", creds=f"{USER}:{PASSWORD}")
        _assert_pulled(pulled, image)
    with htpasswd_cluster.nodes[0].client() as http:
        authorized = {"Authorization": _basic(USER, PASSWORD)}
        assert http.get("/v2/", headers=authorized).status_code == 200
        assert name in http.get("/v2/_catalog", headers=authorized).json()["repositories"]
    for node in htpasswd_cluster.nodes:
        assert PASSWORD not in node.log_text()


def test_htpasswd_containerd_pulls_with_a_header_in_hosts_toml(
    htpasswd_cluster: Cluster, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    name = f"library/auth-ctr-{uuid.uuid4().hex[:8]}"
    image = build_image([90_000, 10_000], seed=name)
    push(upstream_registry.url, name, "v1", image)
    node = htpasswd_cluster.nodes[1]
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        server = f"https://127.0.0.1:{dead.getsockname()[1]}"
        with Containerd(tmp_path / "containerd") as containerd:
            refused = tmp_path / "refused"
            write_hosts(refused, "docker.io", server, [node.url])
            assert containerd.pull(f"docker.io/{name}:v1", refused).returncode != 0
            allowed = tmp_path / "allowed"
            write_hosts(allowed, "docker.io", server, [node.url], headers={"authorization": _basic(USER, PASSWORD)})
            pulled = containerd.pull(f"docker.io/{name}:v1", allowed)
            assert pulled.returncode == 0, pulled.stderr[-3000:]
            assert containerd.image_digests()[f"docker.io/{name}:v1"] == image.digest
            for digest, data in image.blobs.items():
                assert containerd.content(digest) == data


def test_htpasswd_podman_pulls_through_a_mirror_with_an_auth_file(
    htpasswd_cluster: Cluster, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    name = f"auth/podman-{uuid.uuid4().hex[:8]}"
    image = build_image([60_000, 8_000], seed=name)
    push(upstream_registry.url, name, "v1", image)
    node = htpasswd_cluster.nodes[2]
    podman = Podman(tmp_path / "podman")
    ref = f"docker.io/{name}:v1"
    # docker.io itself is a registry without the image, so the image arrives
    # through the mirror or not at all; it answers at once (a refused
    # connection would make podman retry for seconds). The mirror's path
    # names the registry for Shoal.
    with FakeUpstream() as registry:
        registries = write_registries_conf(
            tmp_path / "registries.conf", "docker.io", registry.host, [f"{_host(node)}/docker.io"]
        )
        with pytest.raises(PodmanError) as anonymous:
            podman.pull(ref, registries=registries)
        assert f"{_host(node)}/docker.io/{name}: unauthorized" in anonymous.value.stderr, anonymous.value.stderr
        # podman looks credentials up by the address of the endpoint it asks,
        # so an entry for the image's registry is not sent to its mirror.
        registry_only = tmp_path / "registry-only.json"
        registry_only.write_text(json.dumps({"auths": {"docker.io": {"auth": _basic(USER, PASSWORD)[6:]}}}))
        with pytest.raises(PodmanError) as misaddressed:
            podman.pull(ref, registries=registries, authfile=registry_only)
        assert f"{_host(node)}/docker.io/{name}: unauthorized" in misaddressed.value.stderr
        with pytest.raises(PodmanError):
            podman.login(_host(node), USER, "wrong", tmp_path / "refused.json")
        assert not (tmp_path / "refused.json").exists()
        assert registry.count("GET", f"/v2/{name}/manifests/v1") == 2

        authfile = podman.login(_host(node), USER, PASSWORD, tmp_path / "auth.json")
        assert list(json.loads(authfile.read_text())["auths"]) == [_host(node)]
        podman.pull(ref, registries=registries, authfile=authfile)
        assert registry.count("GET", f"/v2/{name}/manifests/v1") == 2
    assert podman.image_digest(ref) == image.digest
    # The same entry serves the mirror named in the reference, with its prefix.
    direct = f"{_host(node)}/docker.io/{name}:v1"
    podman.pull(direct, authfile=authfile)
    assert podman.image_digest(direct) == image.digest
    assert PASSWORD not in node.log_text()


def _host(node: NodeProcess) -> str:
    return node.url.split("://", 1)[1]


# Tokens.


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(
        tmp_path_factory.mktemp("token-server"),
        users={USER: PASSWORD, "bob": "bobs password"},
        grants={USER: ["auth/team-app"], "bob": ["auth/other"]},
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_node(
    tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry, token_server: TokenServer
) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp("token-node"), upstream_registry.url, token_server.node_settings())
    yield node
    node.stop()


def test_token_pulls_the_granted_repository_only(
    token_node: NodeProcess, token_server: TokenServer, upstream_registry: DistributionRegistry, tmp_path: Path
) -> None:
    app = build_image([70_000, 9_000], seed="auth/team-app")
    other = build_image([60_000, 8_000], seed="auth/other")
    push(upstream_registry.url, "auth/team-app", "v1", app)
    push(upstream_registry.url, "auth/other", "v1", other)

    _assert_pulled(
        skopeo_copy(f"{_host(token_node)}/auth/team-app:v1", tmp_path / "a", creds=f"{USER}:{PASSWORD}"), app
    )
    _assert_pulled(skopeo_copy(f"{_host(token_node)}/auth/other:v1", tmp_path / "b", creds="bob:bobs password"), other)
    with pytest.raises(SkopeoError):
        skopeo_copy(f"{_host(token_node)}/auth/other:v1", tmp_path / "c", creds=f"{USER}:{PASSWORD}")

    token = token_server.sign(
        token_server.claims(USER, [{"type": "repository", "name": "auth/team-app", "actions": ["pull"]}])
    )
    bearer = {"Authorization": f"Bearer {token}"}
    layer = next(iter(app.blobs))
    with token_node.client() as http:
        assert http.get(f"/v2/auth/team-app/blobs/{layer}", headers=bearer).status_code == 200
        # The same cached bytes, asked for under a repository the token does not grant.
        for path in (f"/v2/auth/other/blobs/{layer}", f"/v2/auth/other/manifests/{app.digest}", "/v2/_catalog"):
            refused = http.get(path, headers=bearer)
            assert refused.status_code == 401
            assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
        expired = token_server.sign(
            token_server.claims(
                USER, [{"type": "repository", "name": "auth/team-app", "actions": ["pull"]}], exp=1, nbf=0, iat=0
            )
        )
        stale = http.get(f"/v2/auth/team-app/blobs/{layer}", headers={"Authorization": f"Bearer {expired}"})
        assert stale.status_code == 401
        assert stale.headers["WWW-Authenticate"] == (
            f'Bearer realm="{token_server.realm}",service="{token_server.service}",'
            'scope="repository:auth/team-app:pull"'
        )
    assert token not in token_node.log_text()


# Anonymous upstreams and networks.


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("private-registry"))
    yield registry
    registry.close()


def test_an_anonymous_upstream_beside_a_private_one(
    tmp_path: Path, upstream_registry: DistributionRegistry, private_registry: DistributionRegistry
) -> None:
    public, private = build_image([40_000], seed="auth/public"), build_image([50_000], seed="auth/private")
    push(upstream_registry.url, "auth/public", "v1", public)
    push(private_registry.url, "auth/private", "v1", private)
    path = htpasswd_file(tmp_path / "htpasswd", USER, PASSWORD)
    settings = {
        "auth": {"htpasswd": {"path": str(path)}},
        "upstreams": {
            "docker.io": {"url": upstream_registry.url, "anonymous": True},
            "private.example": {"url": private_registry.url},
            # Anonymous, but only from a network the tests do not come from.
            "lab.example": {"url": private_registry.url, "anonymous": True, "anonymous_networks": ["10.0.0.0/8"]},
            "loopback.example": {
                "url": private_registry.url,
                "anonymous": True,
                "anonymous_networks": ["127.0.0.0/8", "::1/128"],
            },
        },
        "default_upstream": "docker.io",
    }
    node = NodeProcess(tmp_path / "node", upstream_registry.url, settings)
    try:
        with node.client() as http:
            assert http.get("/v2/").status_code == 200
            assert http.get("/v2/auth/public/manifests/v1").content == public.manifest
            _assert_refused(http.get("/v2/private.example/auth/private/manifests/v1"), 'Basic realm="shoal"')
            _assert_refused(http.get("/v2/auth/private/manifests/v1?ns=private.example"), 'Basic realm="shoal"')
            _assert_refused(http.get("/v2/lab.example/auth/private/manifests/v1"), 'Basic realm="shoal"')
            assert http.get("/v2/loopback.example/auth/private/manifests/v1").content == private.manifest
            authorized = {"Authorization": _basic(USER, PASSWORD)}
            assert http.get("/v2/private.example/auth/private/manifests/v1", headers=authorized).status_code == 200
            # The operator's endpoints are never anonymous.
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers=authorized).status_code == 200
            assert http.get("/healthz").status_code == 200
    finally:
        node.stop()


# The metrics listener.


def test_metrics_bind_moves_the_operator_endpoints_to_a_listener_of_their_own(
    tmp_path: Path, upstream_registry: DistributionRegistry
) -> None:
    path = htpasswd_file(tmp_path / "htpasswd", USER, PASSWORD)
    metrics_port = free_port()
    settings = {"auth": {"htpasswd": {"path": str(path)}}, "server": {"metrics_bind": f"127.0.0.1:{metrics_port}"}}
    node = NodeProcess(tmp_path / "node", upstream_registry.url, settings)
    try:
        metrics = f"http://127.0.0.1:{metrics_port}"
        assert httpx.get(f"{metrics}/metrics", timeout=10).status_code == 200
        assert httpx.get(f"{metrics}/debug/vars", timeout=10).status_code == 200
        assert httpx.get(f"{metrics}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{metrics}/v2/", timeout=10).status_code == 404
        # A Host header naming the main port changes nothing: the listener decides.
        spoofed = httpx.get(f"{metrics}/v2/", headers={"Host": f"127.0.0.1:{node.port}"}, timeout=10)
        assert spoofed.status_code == 404
        with node.client() as http:
            authorized = {"Authorization": _basic(USER, PASSWORD)}
            assert http.get("/metrics", headers=authorized).status_code == 404
            assert http.get("/debug/vars", headers=authorized).status_code == 404
            assert http.get("/v2/", headers=authorized).status_code == 200
    finally:
        node.stop()
