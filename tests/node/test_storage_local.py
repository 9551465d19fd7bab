import os

import pytest

from node.reference import digest_of
from node.storage.local import LocalStore
from protos.values import TagPointer
from testbed.clock import FakeClock


def test_put_and_open(tmp_path) -> None:
    store = LocalStore(str(tmp_path), max_size=1 << 20)
    digest = digest_of(b"hello")
    assert store.open(digest) is None
    store.put(digest, b"hello", "application/vnd.oci.image.manifest.v1+json")
    stored = store.open(digest)
    assert stored is not None
    assert stored.size == 5
    assert store.media_type(digest) == "application/vnd.oci.image.manifest.v1+json"
    assert os.read(stored.fileno(), 10) == b"hello"
    stored.close()
    assert store.read(digest) == (b"hello", "application/vnd.oci.image.manifest.v1+json")
    assert os.listdir(store.layout.fills) == []


def test_a_manifest_is_on_disk_before_it_is_in_place(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a fill does for a blob: the bytes are synced, then renamed into place."""
    store = LocalStore(str(tmp_path), max_size=1 << 20)
    data = b'{"schemaVersion": 2}'
    digest = digest_of(data)
    synced: list[tuple[bytes, bool]] = []
    sync = os.fdatasync

    def spy(fd: int) -> None:
        sync(fd)
        synced.append((os.pread(fd, len(data) + 1, 0), store.has(digest)))

    monkeypatch.setattr(os, "fdatasync", spy)
    store.put(digest, data, "application/vnd.oci.image.manifest.v1+json")
    assert synced == [(data, False)]
    assert store.has(digest)


def test_sweep_evicts_least_recently_used_over_the_limit(tmp_path) -> None:
    clock = FakeClock()
    store = LocalStore(str(tmp_path), max_size=250, clock=clock)
    digests = []
    for index in range(3):
        data = bytes([index]) * 100
        digest = digest_of(data)
        store.put(digest, data)
        os.utime(store.layout.content(digest), (clock() + index, clock() + index))
        digests.append(digest)
    # A hit on the oldest moves it to the front once touches are flushed.
    clock.advance(10)
    store.touch(digests[0])
    store.flush_touches()
    assert store.sweep() == [(digests[1], "size")]
    assert store.has(digests[0]) and store.has(digests[2]) and not store.has(digests[1])
    assert store.used_bytes() == 200


def test_sweep_expires_content_older_than_the_ttl(tmp_path) -> None:
    clock = FakeClock()
    store = LocalStore(str(tmp_path), max_size=1 << 20, ttl=60, clock=clock)
    old, new = digest_of(b"old"), digest_of(b"new")
    store.put(old, b"old")
    store.put(new, b"new")
    os.utime(store.layout.content(old), (clock() - 61, clock() - 61))
    os.utime(store.layout.content(new), (clock() - 59, clock() - 59))
    assert store.sweep() == [(old, "ttl")]


def test_ttl_zero_never_expires(tmp_path) -> None:
    clock = FakeClock()
    store = LocalStore(str(tmp_path), max_size=1 << 20, ttl=0, clock=clock)
    digest = digest_of(b"x")
    store.put(digest, b"x")
    os.utime(store.layout.content(digest), (0, 0))
    assert store.sweep() == []


def test_tags_and_repositories(tmp_path) -> None:
    store = LocalStore(str(tmp_path), max_size=1 << 20)
    pointer = TagPointer("sha256:" + "a" * 64, "application/json", 10, 5.0)
    store.write_tag("docker.io/library/alpine", "3.19", pointer)
    store.remember_repository("docker.io/library")
    store.remember_repository("docker.io/team/app")
    store.remember_repository("ghcr.io/other")
    store.write_tag_list("docker.io/library/alpine", ["3.18", "3.19"])
    assert store.read_tag("docker.io/library/alpine", "3.19") == pointer
    assert store.read_tag("docker.io/library/alpine", "nope") is None
    assert store.known_tags("docker.io/library/alpine") == ["3.18", "3.19"]
    assert store.repositories("docker.io") == ["library", "library/alpine", "team/app"]
    assert store.repositories("ghcr.io") == ["other"]
    assert store.repositories("quay.io") == []


def test_hits_extend_the_ttl_unless_told_not_to(tmp_path) -> None:
    clock = FakeClock()
    for extend, expected in ((True, []), (False, ["ttl"])):
        store = LocalStore(str(tmp_path / str(extend)), max_size=1 << 20, ttl=60, clock=clock, extend_ttl_on_hit=extend)
        digest = digest_of(b"popular")
        store.put(digest, b"popular")
        stored_at = clock() - 120
        os.utime(store.layout.content(digest), (stored_at, stored_at))
        store.touch(digest)
        store.flush_touches()
        assert [reason for _, reason in store.sweep()] == expected
