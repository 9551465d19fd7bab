"""A real node in front of an upstream that misbehaves on purpose."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed.fake_upstream import FakeUpstream, RateLimit
from testbed.images import build_image, build_multiarch, random_layer, sha256_digest
from testbed.node import NodeProcess
from testbed.processes import wait_until

pytestmark = pytest.mark.integration

BIG = 3 * 1024 * 1024  # Several of the node's 1 MiB chunks.


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def node(tmp_path: Path, upstream: FakeUpstream) -> Iterator[NodeProcess]:
    started = NodeProcess(tmp_path, upstream.url, {"upstream": {"timeout": "5s", "tag_ttl": "0s"}})
    yield started
    started.stop()


def _assert_nothing_stored(node: NodeProcess, digest: str) -> None:
    # The fill thread cleans up after the response was cut; await it.
    wait_until(lambda: node.leftover_fill_files() == [], message=lambda: f"left behind: {node.leftover_fill_files()}")
    assert digest not in node.stored_digests()


def test_corrupt_blob_is_not_cached_and_the_transfer_fails(node: NodeProcess, upstream: FakeUpstream) -> None:
    data = random_layer(BIG, seed="corrupt")
    digest = upstream.add_blob("faults/app", data)
    upstream.set_fault(digest, corrupt=True)
    path = f"/v2/faults/app/blobs/{digest}"
    with node.client() as http, pytest.raises(httpx.RemoteProtocolError), http.stream("GET", path) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_bytes())
        pytest.fail(f"a corrupt blob was served as complete ({len(body)} bytes)")
    _assert_nothing_stored(node, digest)
    # Once the upstream is healthy the same blob is fetched and served intact.
    upstream.clear_faults()
    with node.client() as http:
        assert http.get(f"/v2/faults/app/blobs/{digest}").content == data
    # The client may finish before the verified file is synced and renamed.
    wait_until(lambda: digest in node.stored_digests(), message="the healthy fill was not stored")


def test_small_corrupt_blob_gets_an_error_not_a_body(node: NodeProcess, upstream: FakeUpstream) -> None:
    digest = upstream.add_blob("faults/app", b"tiny layer" * 100)
    upstream.set_fault(digest, corrupt=True)
    with node.client() as http:
        response = http.get(f"/v2/faults/app/blobs/{digest}")
    # Every client follows the fill's file, so the error it sees is that the
    # fill failed; the digest mismatch itself is in the node's log.
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "UPSTREAM_UNAVAILABLE"
    _assert_nothing_stored(node, digest)
    assert "does not match its digest" in node.log_text()


def test_upstream_dying_mid_blob_leaves_nothing_behind(node: NodeProcess, upstream: FakeUpstream) -> None:
    data = random_layer(BIG, seed="dies")
    digest = upstream.add_blob("faults/app", data)
    upstream.set_fault(digest, die_after=BIG // 2)
    path = f"/v2/faults/app/blobs/{digest}"
    with node.client() as http, pytest.raises(httpx.RemoteProtocolError), http.stream("GET", path) as response:
        b"".join(response.iter_bytes())
    _assert_nothing_stored(node, digest)


def test_corrupt_manifest_is_refused(node: NodeProcess, upstream: FakeUpstream) -> None:
    image = build_image([1000], seed="bad-manifest")
    upstream.add_image("faults/app", "bad", image)
    upstream.set_fault(image.digest, corrupt=True)
    with node.client() as http:
        response = http.get("/v2/faults/app/manifests/bad")
    assert response.status_code == 502
    assert response.json()["errors"][0]["code"] == "UPSTREAM_INVALID"
    assert image.digest not in node.stored_digests()


def test_disconnected_client_does_not_abort_the_fill(node: NodeProcess, upstream: FakeUpstream) -> None:
    data = random_layer(BIG, seed="disconnect")
    digest = upstream.add_blob("faults/app", data)
    gate = threading.Event()
    fault = upstream.set_fault(digest, gate=gate)
    with node.client() as http, http.stream("GET", f"/v2/faults/app/blobs/{digest}") as response:
        assert response.status_code == 200
        assert fault.reached.wait(10)
        # The client goes away while the upstream still holds the rest.
    gate.set()
    wait_until(lambda: digest in node.stored_digests(), message="the fill did not complete after the client left")
    with node.client() as http:
        assert http.get(f"/v2/faults/app/blobs/{digest}").content == data
    assert upstream.count("GET", f"/v2/faults/app/blobs/{digest}") == 1


def test_followers_get_bytes_while_the_fill_runs(node: NodeProcess, upstream: FakeUpstream) -> None:
    data = random_layer(BIG, seed="follow")
    digest = upstream.add_blob("faults/app", data)
    gate = threading.Event()
    fault = upstream.set_fault(digest, gate=gate, chunk_size=64 * 1024)
    path = f"/v2/faults/app/blobs/{digest}"
    with node.client() as first, node.client() as second, first.stream("GET", path) as leader:
        assert fault.reached.wait(10)
        with second.stream("GET", path) as follower:
            # Both answers start while the upstream is still held at the gate.
            assert follower.status_code == leader.status_code == 200
            chunks = follower.iter_raw()
            follower_start = next(chunks)
            assert follower_start == data[: len(follower_start)]
            assert not gate.is_set()
            gate.set()
            follower_body = follower_start + b"".join(chunks)
        leader_body = leader.read()
    assert leader_body == follower_body == data
    assert upstream.count("GET", path) == 1


def test_cached_image_pulls_while_the_upstream_is_down(node: NodeProcess, upstream: FakeUpstream) -> None:
    index = build_multiarch([20_000, 30_000], seed="offline")
    upstream.add_image("faults/offline", "v1", index)
    child = index.children["linux/amd64"]

    def pull(http: httpx.Client) -> None:
        tag = http.get("/v2/faults/offline/manifests/v1")
        assert tag.status_code == 200
        assert tag.content == index.manifest
        assert http.get(f"/v2/faults/offline/manifests/{index.digest}").content == index.manifest
        assert http.get(f"/v2/faults/offline/manifests/{child.digest}").content == child.manifest
        for digest, data in child.blobs.items():
            assert http.get(f"/v2/faults/offline/blobs/{digest}").content == data

    with node.client() as http:
        pull(http)
        upstream.down()
        # tag_ttl is 0: every tag request asks the upstream, fails, and is
        # answered from the last known digest (stale-if-error).
        pull(http)
        assert http.get("/v2/faults/offline/tags/list").json()["tags"] == ["v1"]
        missing = http.get(f"/v2/faults/offline/blobs/{sha256_digest(os.urandom(8))}")
        assert missing.status_code == 503
        assert missing.json()["errors"][0]["code"] == "UPSTREAM_UNAVAILABLE"
    assert "serving faults/offline:v1" in node.log_text()


def _skipped_tag_checks(node: NodeProcess, registry: str) -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "shoal_tag_checks_skipped_total" and sample.labels.get("registry") == registry
    )


def test_a_429_pauses_tag_checks_on_every_worker_until_retry_after(node: NodeProcess, upstream: FakeUpstream) -> None:
    image, other = build_image([1000], seed="budget"), build_image([1000], seed="budget-other")
    upstream.add_image("faults/app", "v1", image)
    upstream.add_image("faults/app", "other", other)
    tag_path = "/v2/faults/app/manifests/v1"
    with node.client() as http:
        assert http.get(tag_path).status_code == 200
    # tag_ttl is 0: every request checks the tag. This one meets the 429 and
    # is answered from the cache; Retry-After pauses the checks for 5 s.
    upstream.set_rate_limit(RateLimit(refuse=True, retry_after="5"))
    with node.client() as http:
        response = http.get(tag_path)
    refused_at = time.monotonic()
    assert response.status_code == 200
    assert response.headers["docker-content-digest"] == image.digest
    # The upstream would answer now; for the pause nobody asks it. A fresh
    # connection each time, so that both workers answer some.
    upstream.set_rate_limit(None)
    upstream.reset_requests()
    for _ in range(20):
        with node.client() as http:
            assert http.get(tag_path).headers["docker-content-digest"] == image.digest
    assert time.monotonic() - refused_at < 4, "too slow to tell the pause from its end"
    assert upstream.count("HEAD", tag_path) == upstream.count("GET", tag_path) == 0
    # By digest nothing is paused: a miss goes to the upstream.
    with node.client() as http:
        assert http.get(f"/v2/faults/app/manifests/{other.digest}").status_code == 200
    assert upstream.count("GET", f"/v2/faults/app/manifests/{other.digest}") == 1
    wait_until(lambda: _skipped_tag_checks(node, upstream.host) == 20, message="the skipped checks were not counted")

    def checked() -> bool:
        with node.client() as http:
            http.get(tag_path)
        return upstream.count("HEAD", tag_path) > 0

    wait_until(checked, timeout=15, interval=0.1, message="tag checks did not resume after Retry-After")
    assert time.monotonic() - refused_at > 4


def test_a_tag_never_cached_answers_the_upstreams_429_with_retry_after(
    node: NodeProcess, upstream: FakeUpstream
) -> None:
    upstream.add_image("faults/app", "new", build_image([1000], seed="budget-new"))
    upstream.set_rate_limit(RateLimit(refuse=True, retry_after="40"))
    with node.client() as http:
        response = http.get("/v2/faults/app/manifests/new")
    assert response.status_code == 429
    assert response.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 39 <= int(response.headers["retry-after"]) <= 40
