"""A real node stays within its bounds: lock files, fills in flight, disk, descriptors, leftovers."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from testbed.fake_upstream import FakeUpstream
from testbed.images import build_image, random_layer
from testbed.node import NodeProcess
from testbed.processes import wait_until

pytestmark = pytest.mark.integration

NAME = "bounds/app"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def fill_files(node: NodeProcess) -> list[str]:
    """What is in the node's fills/ besides its fixed files (the fill slots)."""
    fills = node.cache_dir / "fills"
    return sorted(name for name in os.listdir(fills) if not name.startswith("slot-"))


def cache_bytes(node: NodeProcess) -> int:
    """The bytes of every file under the cache's blobs/ and fills/, as listed now."""
    total = 0
    for top in ("blobs", "fills"):
        for folder, _, files in os.walk(node.cache_dir / top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def test_lock_files_do_not_pile_up_over_many_distinct_misses(tmp_path: Path, upstream: FakeUpstream) -> None:
    digests = upstream.add_generated_blobs(NAME, 60, 4096, seed="locks")
    tags = []
    for number in range(10):
        upstream.add_image(NAME, f"v{number}", build_image([512], seed=f"locks-{number}"))
        tags.append(f"v{number}")
    node = NodeProcess(tmp_path, upstream.url, {"upstream": {"tag_ttl": "0s"}, "cache": {"max_fills": 4}})
    try:
        with node.client() as http:
            for digest in digests:
                assert http.get(f"/v2/{NAME}/blobs/{digest}").status_code == 200
            for tag in tags:
                # By tag (the tag's lock), then again by digest (the manifest's lock, on a hit).
                answer = http.get(f"/v2/{NAME}/manifests/{tag}", headers={"Accept": "*/*"})
                assert answer.status_code == 200
                assert http.get(f"/v2/{NAME}/manifests/{answer.headers['Docker-Content-Digest']}").status_code == 200
        # Fills end a moment after their clients are answered.
        wait_until(lambda: fill_files(node) == [], message=lambda: f"left in fills/: {fill_files(node)[:10]}")
        assert len(os.listdir(node.cache_dir / "fills")) <= 4
    finally:
        node.stop()


def test_a_thousand_heads_of_uncached_blobs_stay_within_the_fill_cap_and_the_disk_bound(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    size, max_fills, max_size = 64 * 1024, 4, 256 * 1024
    digests = upstream.add_generated_blobs(NAME, 1000, size, seed="heads")
    for digest in digests:
        # A fill takes over a second: fills the HEADs started are still running.
        upstream.set_fault(digest, rate=size / 1.2)
    node = NodeProcess(tmp_path, upstream.url, {"cache": {"max_fills": max_fills, "max_size": max_size}})
    most = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal most
        while not sampling.is_set():
            most = max(most, cache_bytes(node))
            time.sleep(0.05)

    local = threading.local()
    clients: list[httpx.Client] = []

    def head(digest: str) -> tuple[int, str | None]:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=node.url, timeout=30)
            clients.append(local.http)
        answer = local.http.head(f"/v2/{NAME}/blobs/{digest}")
        return answer.status_code, answer.headers.get("Content-Length")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(head, digests))
        assert answers == [(200, str(size))] * len(digests)
        # The fills the HEADs started end; nothing else was left running.
        wait_until(lambda: fill_files(node) == [], timeout=20, message=lambda: f"left: {fill_files(node)[:10]}")
    finally:
        for client in clients:
            client.close()
        sampling.set()
        sampler.join()
        node.stop()
    fills = sum(len(upstream.blob_gets(f"/v2/{NAME}/blobs/{digest}")) for digest in digests)
    assert upstream.most_blob_bodies_at_once <= max_fills
    # Most HEADs found every slot taken and were answered by a HEAD upstream, at once.
    assert 0 < fills < len(digests) // 4, f"{fills} fills for {len(digests)} HEADs"
    # Complete content and fills in flight within max_size, as the sweep
    # (at most a second behind) keeps it: partial files included.
    assert most <= max_size + 2 * max_fills * size, f"{most} bytes on disk at most"
    assert cache_bytes(node) <= max_size


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs where the node's cache goes (``tmp_path/cache``): as root, or through sudo."""
    cache = tmp_path / "cache"
    cache.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    options = f"size=8m,uid={os.getuid()},gid={os.getgid()}"
    mounted = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs (the disk-full tests need root or sudo): {mounted.stderr.decode()}")
    try:
        yield cache
    finally:
        subprocess.run([*sudo, "umount", "-l", str(cache)], check=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Write a ballast file into ``folder`` until its filesystem has at most ``leave`` bytes free."""
    ballast = folder / "ballast"
    with open(ballast, "ab") as handle:
        while (room := shutil.disk_usage(folder).free - leave) > 0:
            try:
                handle.write(b"\0" * min(room, 1 << 16))
                handle.flush()
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
    return ballast


def descriptors(node: NodeProcess) -> dict[int, int]:
    """How many files each of the node's workers has open."""
    return {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in node.worker_pids()}


def leftovers(cache: Path) -> list[str]:
    """Files of fills and writes in progress anywhere in the cache (fill slots aside)."""
    found = [f"fills/{name}" for name in os.listdir(cache / "fills") if not name.startswith("slot-")]
    for folder, _, files in os.walk(cache):
        found += [os.path.join(folder, name) for name in files if name.endswith((".tmp", ".put"))]
    return sorted(found)


def test_a_full_disk_fails_misses_cleanly_without_leaks_and_recovers(
    tmp_path: Path, small_disk: Path, upstream: FakeUpstream
) -> None:
    # One image whose layers are confirmed by its manifest before the disk fills;
    # a third of them come without a size (the fill learns it only at the end).
    image = build_image([128 * 1024] * 24, seed="full")
    upstream.add_image(NAME, "v1", image)
    for digest in image.layer_digests[::3]:
        upstream.set_fault(digest, no_length=True)
    others = [build_image([1024], seed=f"other-{number}") for number in range(12)]
    for number, other in enumerate(others):
        upstream.add_image(NAME, f"o{number}", other)
    node = NodeProcess(
        tmp_path,
        upstream.url,
        {"cache": {"min_free": 0, "max_fills": 2}, "upstream": {"timeout": "5s"}},
        # prometheus-client's mapped files are sparse: on a disk full to the
        # last block, a worker's first write of a new series is a SIGBUS
        # (docs/node.md, "Bounds"). They live elsewhere here, as they should.
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus")},
    )
    try:
        with node.client() as http:
            assert http.get(f"/v2/{NAME}/manifests/v1", headers={"Accept": "*/*"}).status_code == 200
            assert http.get(f"/v2/{NAME}/blobs/{image.config_digest}").status_code == 200
            before = descriptors(node)
            ballast = fill_disk(small_disk)
            failed = []
            for _ in range(2):
                for digest in image.layer_digests:
                    failed.append(http.get(f"/v2/{NAME}/blobs/{digest}"))
                for other in others:
                    failed.append(http.get(f"/v2/{NAME}/manifests/{other.digest}", headers={"Accept": "*/*"}))
            assert {answer.status_code for answer in failed} == {503}
            assert all(answer.headers.get("Retry-After") for answer in failed)
            assert {answer.json()["errors"][0]["code"] for answer in failed} == {"UNAVAILABLE"}
            wait_until(lambda: leftovers(small_disk) == [], message=lambda: f"left: {leftovers(small_disk)}")
            after = descriptors(node)
            assert after.keys() == before.keys()
            # Upstream connections may differ by a few; a leak per miss would be 72.
            assert all(after[pid] <= before[pid] + 4 for pid in before), (before, after)
            # Room again: the same requests succeed, and store what they fetch.
            ballast.unlink()
            for digest, data in zip(image.layer_digests, image.layers, strict=True):
                assert http.get(f"/v2/{NAME}/blobs/{digest}").content == data
            for other in others:
                answer = http.get(f"/v2/{NAME}/manifests/{other.digest}", headers={"Accept": "*/*"})
                assert answer.content == other.manifest
        wait_until(lambda: set(image.layer_digests) <= node.stored_digests(), message="the layers were not stored")
        assert leftovers(small_disk) == []
    finally:
        node.stop()


def test_min_free_is_kept_by_evicting_the_least_recently_used(
    tmp_path: Path, small_disk: Path, upstream: FakeUpstream
) -> None:
    blobs = {upstream.add_blob(NAME, data): data for data in (random_layer(1 << 20, seed=n) for n in range(5))}
    node = NodeProcess(tmp_path, upstream.url, {"cache": {"min_free": "3MiB"}})
    digests = list(blobs)
    try:
        with node.client() as http:
            for digest in digests[:4]:
                assert http.get(f"/v2/{NAME}/blobs/{digest}").content == blobs[digest]
            wait_until(lambda: set(digests[:4]) <= node.stored_digests(), message="the blobs were not stored")
            # Something else takes the disk: less than min_free is left.
            fill_disk(small_disk, leave=2 << 20)
            refused = http.get(f"/v2/{NAME}/blobs/{digests[4]}")
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            # The refusal woke the sweep, which evicts until min_free is free again.
            answer = wait_until(
                lambda: (got := http.get(f"/v2/{NAME}/blobs/{digests[4]}")).status_code == 200 and got,
                message="the node never made room",
            )
            assert answer.content == blobs[digests[4]]
        # Stored once synced, a moment after the client had it all.
        stored = wait_until(lambda: digests[4] in (now := node.stored_digests()) and now, message="never stored")
        assert digests[0] not in stored
        wait_until(lambda: shutil.disk_usage(small_disk).free >= 3 << 20, message="min_free is not free")
    finally:
        node.stop()


def test_stale_files_of_a_crashed_run_are_removed_at_start(tmp_path: Path, upstream: FakeUpstream) -> None:
    data = random_layer(4096, seed="stale")
    digest = upstream.add_blob(NAME, data)
    node = NodeProcess(tmp_path, upstream.url)
    with node.client() as http:
        assert http.get(f"/v2/{NAME}/blobs/{digest}").content == data
    node.stop()
    cache = node.cache_dir
    hex_digest = "ab" * 32
    stale = [
        f"fills/sha256-{hex_digest}.0123456789abcdef.partial",
        f"fills/sha256-{hex_digest}.json",
        f"fills/sha256-{hex_digest}.lock",
        f"fills/tag-{'cd' * 32}.lock",
        f"fills/{hex_digest}.x1y2z3.put",
        "fills/.abc123.tmp",
        f"blobs/sha256/{hex_digest[:2]}/.def456.tmp",
        "repos/docker.io/bounds/app/_tags/.ghi789.tmp",
        "budget/.jkl012.tmp",
    ]
    for relative in stale:
        (cache / relative).parent.mkdir(parents=True, exist_ok=True)
        (cache / relative).write_bytes(b"half")
    node.start()
    try:
        assert [relative for relative in stale if (cache / relative).exists()] == []
        assert f"sha256:{digest.split(':')[1]}" in node.stored_digests()
        with node.client() as http:
            assert http.get(f"/v2/{NAME}/blobs/{digest}").content == data
    finally:
        node.stop()
