"""A peer whose stored copy went bad is routed around: a real three-node cluster.

A blob is pulled through node A, so that A holds it; then A's file is
corrupted on disk (the same size, bytes flipped in the middle), as a failing
disk or a hand edit would, and the blob is pulled through node B.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testbed.cluster import Cluster, verify_store
from testbed.fake_upstream import FakeUpstream
from testbed.images import random_layer
from testbed.node import NodeProcess
from testbed.processes import wait_until

pytestmark = pytest.mark.integration

NAME = "bad/peer"
# Small enough (at most 64 KiB) that a response waits for the verified
# whole before it begins, so the client never sees the bad copy.
SIZE = 48 * 1024


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as started:
        yield started


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("bad-peer"), upstream.url) as started:
        yield started


def _held_by(cluster: Cluster, upstream: FakeUpstream, seed: str) -> tuple[str, bytes]:
    """A new blob, pulled through node A until A alone holds it, and then corrupted on A's disk."""
    data = random_layer(SIZE, seed=seed)
    digest = upstream.add_blob(NAME, data)
    node_a = cluster.nodes[0]
    assert httpx.get(f"{node_a.url}/v2/{NAME}/blobs/{digest}", timeout=30).content == data
    wait_until(lambda: cluster.holders(digest) == {node_a.node_id}, message="node A never registered the blob")
    _corrupt(node_a.stored_file(digest))
    return digest, data


def _corrupt(path: Path) -> None:
    """Flip 16 bytes in the middle of a stored file, keeping its size (the store keeps it read-only)."""
    size = path.stat().st_size
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        piece = handle.read(16)
        handle.seek(size // 2)
        handle.write(bytes(byte ^ 0xFF for byte in piece))
    os.chmod(path, 0o444)
    assert path.stat().st_size == size


def _blob_gets(upstream: FakeUpstream, digest: str) -> int:
    return upstream.count("GET", f"/v2/{NAME}/blobs/{digest}")


def _bad_copies(node: NodeProcess) -> int:
    """The node's ``blob.bad_peer_copies``, as the coordinator holds it (0 while it cannot be read)."""
    response = httpx.get(f"{node.url}/debug/vars", timeout=10)
    if response.status_code != 200:
        return 0
    counters = response.json()["shoal"]["nodes"].get(node.node_id, {}).get("counters", {})
    return int(counters.get("blob.bad_peer_copies", 0))


def test_a_bad_copy_is_fetched_again_and_its_holder_unlisted(cluster: Cluster, upstream: FakeUpstream) -> None:
    digest, data = _held_by(cluster, upstream, "bad-peer")
    node_a, node_b = cluster.nodes[0], cluster.nodes[1]
    assert _blob_gets(upstream, digest) == 1

    asked = time.perf_counter()
    answer = httpx.get(f"{node_b.url}/v2/{NAME}/blobs/{digest}", timeout=30)
    elapsed = time.perf_counter() - asked

    assert answer.status_code == 200, answer.text
    assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == digest
    assert answer.content == data
    # Node B went back to the upstream, the only other source: one more GET.
    assert _blob_gets(upstream, digest) == 2
    wait_until(lambda: cluster.holders(digest) == {node_b.node_id}, message="node A is still listed, or B is not")
    verify_store(node_b)
    # The fill clears its state just after the client's last byte.
    wait_until(lambda: node_b.leftover_fill_files() == [], message="the fill left files behind")
    assert "does not match its digest" in node_b.log_text()
    wait_until(lambda: _bad_copies(node_b) == 1, message="the bad copy was not counted")
    # Node C is sent to B's good copy now, not to A's.
    node_c = cluster.nodes[2]
    assert httpx.get(f"{node_c.url}/v2/{NAME}/blobs/{digest}", timeout=30).content == data
    assert _blob_gets(upstream, digest) == 2
    assert node_a.node_id not in cluster.holders(digest)
    print(f"\nthe bad copy routed around in {elapsed * 1000:.0f} ms, one more upstream GET")


def test_a_bad_only_copy_with_the_upstream_down_is_a_clear_error(
    cluster: Cluster, upstream: FakeUpstream, tmp_path: Path
) -> None:
    digest, _ = _held_by(cluster, upstream, "bad-peer-alone")
    node_b: NodeProcess = cluster.nodes[1]
    upstream.down()
    try:
        answer = httpx.get(f"{node_b.url}/v2/{NAME}/blobs/{digest}", timeout=30)
    finally:
        upstream.up()

    assert answer.status_code in (502, 503), answer.text
    error = answer.json()["errors"][0]
    assert error["code"] in ("UPSTREAM_UNAVAILABLE", "UPSTREAM_INVALID") and error["message"]
    wait_until(lambda: node_b.leftover_fill_files() == [], message="the failed fill left files behind")
    assert digest not in node_b.stored_digests()
    verify_store(node_b)
    wait_until(lambda: cluster.holders(digest) == set(), message="node A is still listed for its bad copy")
