"""A real two-node cluster in front of an upstream that drips a blob: ``upstream.min_rate`` ends it.

node-1 fetches the blob for a client while a second client on node-1 and a
third on node-2 (streaming node-1's partial file) follow. The upstream
sends 1 KiB a second; the nodes want 64 KiB a second over 2 s. Every
client must get an OCI error within seconds (the blob is small enough that
a follower answers only once it is complete, so the failure is an error
and not a cut body), nothing may be stored, the upstream must have been
asked once, and the cluster's lease must be free at once.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.storage.fill import SMALL_BODY
from protos.leases import blob_lease
from testbed.cluster import Cluster
from testbed.fake_upstream import FakeUpstream
from testbed.images import random_layer
from testbed.processes import wait_until

pytestmark = pytest.mark.integration

NAME = "slow/layer"
WINDOW = 2.0
SETTINGS = {"upstream": {"min_rate": "64KiB", "min_rate_window": f"{WINDOW}s", "timeout": "10s"}}
DRIP = 1024.0
# Small enough to be answered whole (node.storage.fill.SMALL_BODY), at 1 KiB/s a minute of dripping.
SIZE = SMALL_BODY - 1024


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def _get(url: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    # Without the floor the node answers only after the whole minute: the read times out first.
    with httpx.Client(timeout=20) as http:
        response = http.get(url)
    return time.monotonic() - started, response


def test_a_dripping_upstream_is_aborted_with_its_followers_and_the_lease_is_free_at_once(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    data = random_layer(SIZE, seed="min-rate-drip")
    digest = upstream.add_blob(NAME, data)
    upstream.set_fault(digest, rate=DRIP, chunk_size=1024)
    path = f"/v2/{NAME}/blobs/{digest}"
    with Cluster(tmp_path, upstream.url, nodes=2, node_settings=SETTINGS) as cluster:
        first, second = cluster.nodes
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            leader = pool.submit(_get, first.url + path)
            wait_until(lambda: upstream.bytes_sent(path) > 0, timeout=30, message="node-1 never fetched")
            same_node = pool.submit(_get, first.url + path)
            other_node = pool.submit(_get, second.url + path)
            answers = [future.result() for future in (leader, same_node, other_node)]

        for seconds, response in answers:
            assert response.status_code == 503, response.text
            error = response.json()["errors"][0]
            assert error["code"] == "UPSTREAM_UNAVAILABLE"
            # Every client is told why, on either node.
            assert "below upstream.min_rate (65536 bytes/s)" in error["message"], error["message"]
            # The window, a read, and the followers noticing; generous for a busy machine.
            assert seconds < WINDOW + 8, f"a client waited {seconds:.1f}s"
        assert "the cluster's fetch failed" in answers[2][1].json()["errors"][0]["message"]
        # Released by node-1, not left to run out, and not taken by node-2 to ask the upstream again.
        with cluster.client() as observer:
            lease = observer.acquire_lease(blob_lease(digest), 1000)
            assert lease.granted, f"the lease is still held by {lease.holder}"
            observer.abort_fetch(blob_lease(digest), lease.token)
        assert len(upstream.blob_gets(path)) == 1
        assert "below upstream.min_rate" in first.log_text()
        for node in cluster.nodes:
            wait_until(lambda node=node: node.leftover_fill_files() == [], message="a fill left files behind")
            assert digest not in node.stored_digests()
        assert cluster.holders(digest) == set()
