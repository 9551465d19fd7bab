"""A real containerd pulls through a ``shoal up`` cluster, as a Kubernetes node does.

A private containerd (testbed.containerd) gets a ``hosts.toml`` per
registry that lists node 1 as a mirror in front of the registry's own
server, and that server is a port of 127.0.0.1 where nothing listens: a pull
that succeeds was served by the mirror. (Docker Hub's real address would do
the same on a machine without a network, but would send the test's traffic
out of the machine wherever there is one.)

containerd names the registry in an ``ns`` query parameter, and the cluster's
default upstream is a decoy registry holding other images under the same
names, so the right digests prove that Shoal routed by ``ns``. Three sources
tell where the traffic went: ctr's own dump of the requests it sent, the
upstream registry's access log (it hears only from the mirror, which alone
knows its address), and the nodes' counters in ``/debug/vars``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from testbed.containerd import Containerd, Pull, Request, chain_ids, write_hosts
from testbed.images import Image, Index, build_image, build_multiarch, push
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry
from testbed.shoal_up import ShoalUp, consecutive_free_ports

pytestmark = pytest.mark.integration

PLAIN = "library/shoaltest"
MULTI = "shoaltest/multiplatform"
# Held by both upstreams, and asked for as ghcr.io/shoaltest/app, which the cluster does not mirror.
FOREIGN = "shoaltest/app"
DECOY = "quay.io"
NODES = 2
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d{3}) ')


@dataclass(frozen=True)
class Images:
    plain: Image
    multi: Index
    foreign: Image


@dataclass(frozen=True)
class Mirror:
    """The cluster as containerd sees it: node 1 as the mirror of docker.io and ghcr.io."""

    up: ShoalUp
    nodes: list[str]
    state: Path
    hosts_dir: Path
    # Where the hosts.toml files send a pull that the mirror does not serve.
    server: str

    @property
    def host(self) -> str:
        return urlsplit(self.nodes[0]).netloc


@pytest.fixture(scope="module")
def dead_server() -> Iterator[str]:
    """host:port of a socket bound but never listening: it refuses connections, and no server can take the port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture(scope="module")
def decoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("decoy-registry"))
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def images(upstream_registry: DistributionRegistry, decoy: DistributionRegistry) -> Images:
    pushed = Images(
        plain=build_image([120_000, 20_000], seed=PLAIN),
        multi=build_multiarch([90_000, 10_000], seed=MULTI),
        foreign=build_image([30_000], seed=FOREIGN),
    )
    push(upstream_registry.url, PLAIN, "v1", pushed.plain)
    push(upstream_registry.url, MULTI, "v1", pushed.multi)
    push(upstream_registry.url, FOREIGN, "v1", pushed.foreign)
    for name in (PLAIN, MULTI, FOREIGN):
        push(decoy.url, name, "v1", build_image([5_000], seed=f"decoy/{name}"))
    return pushed


@pytest.fixture(scope="module")
def mirror(
    tmp_path_factory: pytest.TempPathFactory,
    upstream_registry: DistributionRegistry,
    decoy: DistributionRegistry,
    dead_server: str,
) -> Iterator[Mirror]:
    workdir = tmp_path_factory.mktemp("containerd-mirror")
    state = workdir / "state"
    base = consecutive_free_ports(NODES)
    args = [
        "--nodes",
        str(NODES),
        # The first is the default upstream, for requests that name no registry.
        "--upstream",
        f"{DECOY}={decoy.url}",
        "--upstream",
        f"docker.io={upstream_registry.url}",
        "--port",
        str(base),
        "--state-dir",
        str(state),
    ]
    with ShoalUp(args, workdir / "shoal-up.stderr") as up:
        nodes = up.wait_ready()
        hosts_dir = workdir / "certs.d"
        for registry in ("docker.io", "ghcr.io"):
            write_hosts(hosts_dir, registry, f"https://{dead_server}", [nodes[0]])
        yield Mirror(up, nodes, state, hosts_dir, dead_server)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


def _counters(mirror: Mirror) -> dict[str, dict[str, int]]:
    """Every node's counters, by node id, as /debug/vars shows them."""
    answer = httpx.get(f"{mirror.nodes[0]}/debug/vars", timeout=5).json()
    return {node: dict(seen["counters"]) for node, seen in answer["shoal"]["nodes"].items()}


def _await_counts(mirror: Mirror, before: dict[str, dict[str, int]], added: dict[str, int]) -> None:
    """Wait until node 1 has counted ``added`` more of each counter, then check: exactly that, and node 2 nothing.

    Workers flush their counts once a second, so the numbers arrive late.
    """

    def added_on(counters: dict[str, dict[str, int]], node: str) -> dict[str, int]:
        mine, earlier = counters.get(node, {}), before.get(node, {})
        return {counter: mine.get(counter, 0) - earlier.get(counter, 0) for counter in added}

    wait_until(
        lambda: all(count >= added[counter] for counter, count in added_on(_counters(mirror), "node-1").items()),
        timeout=15,
        interval=0.2,
        message=lambda: f"node-1 never counted {added} more: {_counters(mirror)}",
    )
    after = _counters(mirror)
    assert added_on(after, "node-1") == added
    assert added_on(after, "node-2") == dict.fromkeys(added, 0)


def _await_upstream_gets(registry: DistributionRegistry, paths: list[str], before: dict[str, int]) -> None:
    """Wait for the registry to log one GET of each path since ``before``, and no second one."""

    def fetched() -> dict[str, int]:
        return {path: registry.count("GET", path) - before[path] for path in paths}

    wait_until(
        lambda: all(fetched().values()),
        message=lambda: f"the mirror never fetched {fetched()} from {registry.url}",
    )
    assert fetched() == dict.fromkeys(paths, 1)


def _node_requests(mirror: Mirror, path_prefix: str) -> list[tuple[str, str, int]]:
    """``(method, path, status)`` of node 1's access log lines for paths under ``path_prefix``."""
    text = (mirror.state / "node-1.log").read_text(errors="replace")
    found = [(m["method"], m["path"], int(m["status"])) for m in _ACCESS.finditer(text)]
    return [entry for entry in found if entry[1].startswith(path_prefix)]


def _pulled_from(pull: Pull, mirror: Mirror, registry: str) -> set[tuple[str, str]]:
    """``(method, path)`` of every request of a pull, checking that each went to the mirror naming ``registry``."""
    assert pull.requests, f"ctr dumped no requests\n{pull.stderr[-3000:]}"
    strays = [
        request
        for request in pull.requests
        if request.host != mirror.host or parse_qs(urlsplit(request.target).query) != {"ns": [registry]}
    ]
    assert strays == []
    return {(request.method, urlsplit(request.target).path) for request in pull.requests}


def _reads(registry: DistributionRegistry, name: str) -> list[tuple[str, str, int]]:
    """Requests that read ``name`` from ``registry``; pushing it only HEADs blobs, POSTs and PUTs."""
    return [
        entry
        for entry in registry.requests(path_prefix=f"/v2/{name}/")
        if entry[0] == "GET" or (entry[0] == "HEAD" and "/manifests/" in entry[1])
    ]


def _assert_in_containerd(containerd: Containerd, image: Image) -> None:
    """The manifest, config and layers are in the content store, byte for byte, and the layers are unpacked."""
    for digest, data in {image.digest: image.manifest, **image.blobs}.items():
        assert containerd.content(digest) == data, digest
    assert set(chain_ids(image.config)) <= containerd.snapshots()


def test_plain_image_is_pulled_through_the_mirror(
    mirror: Mirror,
    containerd: Containerd,
    images: Images,
    upstream_registry: DistributionRegistry,
    decoy: DistributionRegistry,
) -> None:
    image = images.plain
    blob_paths = [f"/v2/{PLAIN}/blobs/{digest}" for digest in image.blobs]
    upstream_before = {path: upstream_registry.count("GET", path) for path in blob_paths}
    counters_before = _counters(mirror)

    pull = containerd.pull(f"docker.io/{PLAIN}:v1", mirror.hosts_dir)

    assert pull.returncode == 0, pull.stderr[-3000:]
    assert _pulled_from(pull, mirror, "docker.io") == {
        ("HEAD", f"/v2/{PLAIN}/manifests/v1"),
        ("GET", f"/v2/{PLAIN}/manifests/{image.digest}"),
        *(("GET", path) for path in blob_paths),
    }
    assert containerd.image_digests()[f"docker.io/{PLAIN}:v1"] == image.digest
    _assert_in_containerd(containerd, image)
    _await_upstream_gets(upstream_registry, blob_paths, upstream_before)
    # Counted per upstream by its name: these blobs came from the registry called docker.io.
    blobs = len(image.blobs)
    _await_counts(mirror, counters_before, {"blob.requests": blobs, "upstream.blob.2xx.docker.io": blobs})
    assert _reads(decoy, PLAIN) == []


def test_index_pull_fetches_only_the_chosen_platform(
    mirror: Mirror,
    containerd: Containerd,
    images: Images,
    upstream_registry: DistributionRegistry,
    decoy: DistributionRegistry,
) -> None:
    index = images.multi
    chosen, other = index.children["linux/amd64"], index.children["linux/arm64"]
    blob_paths = [f"/v2/{MULTI}/blobs/{digest}" for digest in chosen.blobs]
    upstream_before = {path: upstream_registry.count("GET", path) for path in blob_paths}
    counters_before = _counters(mirror)

    pull = containerd.pull(f"docker.io/{MULTI}:v1", mirror.hosts_dir, platform="linux/amd64")

    assert pull.returncode == 0, pull.stderr[-3000:]
    assert _pulled_from(pull, mirror, "docker.io") == {
        ("HEAD", f"/v2/{MULTI}/manifests/v1"),
        ("GET", f"/v2/{MULTI}/manifests/{index.digest}"),
        ("GET", f"/v2/{MULTI}/manifests/{chosen.digest}"),
        *(("GET", path) for path in blob_paths),
    }
    assert containerd.image_digests()[f"docker.io/{MULTI}:v1"] == index.digest
    assert containerd.content(index.digest) == index.manifest
    _assert_in_containerd(containerd, chosen)
    unwanted = {other.digest, *other.blobs}
    assert containerd.content_digests() & unwanted == set()
    _await_upstream_gets(upstream_registry, blob_paths, upstream_before)
    assert [entry for entry in _reads(upstream_registry, MULTI) if entry[1].rsplit("/", 1)[1] in unwanted] == []
    blobs = len(chosen.blobs)
    _await_counts(mirror, counters_before, {"blob.requests": blobs, "upstream.blob.2xx.docker.io": blobs})
    assert _reads(decoy, MULTI) == []


def test_a_registry_the_mirror_does_not_mirror_falls_back_and_fails(
    mirror: Mirror,
    containerd: Containerd,
    images: Images,
    upstream_registry: DistributionRegistry,
    decoy: DistributionRegistry,
) -> None:
    ref = f"ghcr.io/{FOREIGN}:v1"
    counters_before = _counters(mirror)

    pull = containerd.pull(ref, mirror.hosts_dir)

    assert pull.returncode != 0, f"the pull succeeded: {pull.requests}"
    # The mirror first, which answers 404; then ghcr.io's own server, which is not there.
    target = f"/v2/{FOREIGN}/manifests/v1?ns=ghcr.io"
    assert pull.requests == [Request("HEAD", mirror.host, target), Request("HEAD", mirror.server, target)]
    wait_until(
        lambda: _node_requests(mirror, f"/v2/{FOREIGN}/"),
        message=lambda: f"node 1 logged no request for {FOREIGN}",
    )
    assert _node_requests(mirror, f"/v2/{FOREIGN}/") == [("HEAD", f"/v2/{FOREIGN}/manifests/v1", 404)]
    _await_counts(mirror, counters_before, {"errors.NAME_UNKNOWN": 1})
    assert ref not in containerd.image_digests()
    assert images.foreign.digest not in containerd.content_digests()
    # Never served from another upstream: neither holder of the name was asked for it.
    assert _reads(upstream_registry, FOREIGN) == []
    assert _reads(decoy, FOREIGN) == []
