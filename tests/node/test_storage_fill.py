"""Fills: one per digest across a node's workers, followed while they grow, never complete unless verified."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator

import pytest

from node.errors import BadCopy, Busy, UpstreamInvalid, UpstreamUnavailable
from node.reference import Digest, digest_of
from node.sources import Origin
from node.storage.fill import MAX_ATTEMPTS, FillFailed, Fills
from node.storage.local import LocalStore

DATA = os.urandom(200_000)
DIGEST = digest_of(DATA)


class Stream:
    """A ``BlobStream`` that sends ``data`` in pieces; ``gate`` holds it back after the first piece."""

    def __init__(self, data: bytes, size: int | None, gate: threading.Event | None, origin: Origin) -> None:
        self.data, self.size, self.gate = data, size, gate
        self.origin = origin
        self.joined = origin is Origin.PEER

        self.sent = 0

    def read(self, size: int) -> bytes:
        if self.sent and self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        piece = self.data[self.sent : self.sent + min(size, 65536)]
        self.sent += len(piece)
        return piece


class Source:
    """A ``Source`` for blobs only; every other call is a test bug."""

    def __init__(self, data: bytes = DATA, *, size: int | None = -1, origin: Origin = Origin.UPSTREAM) -> None:
        self.data = data
        self.size = len(data) if size == -1 else size
        self.origin = origin
        self.gate: threading.Event | None = None
        self.error: Exception | None = None
        self.opened: list[str] = []
        self.left: list[str] = []

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: Digest) -> Iterator[Stream]:
        self.opened.append(str(digest))
        if self.error is not None:
            raise self.error
        try:
            yield Stream(self.data, self.size, self.gate, self.origin)
        except BaseException:
            self.left.append("error")
            raise
        self.left.append("committed")


def leftovers(store: LocalStore) -> list[str]:
    return sorted(name for name in os.listdir(store.layout.fills) if not name.endswith(".lock"))


def test_a_fill_is_followed_to_the_end_and_committed(fills: Fills, store: LocalStore) -> None:
    committed: list[Digest] = []
    fills._on_commit = committed.append
    source = Source()
    following = fills.join(source, "app", DIGEST)
    assert following is not None and following.size == len(DATA) and not following.joined
    with contextlib.closing(fills.follow(following, 0, len(DATA))) as body:
        assert b"".join(body) == DATA
    fills.close()
    assert store.has(DIGEST) and committed == [DIGEST]
    assert source.left == ["committed"]
    assert leftovers(store) == []
    assert fills.join(source, "app", DIGEST) is None
    assert source.opened == [str(DIGEST)]


def test_another_worker_joins_the_running_fill(store: LocalStore) -> None:
    leader, other = Fills(store, timeout=5), Fills(store, timeout=5)
    source = Source(origin=Origin.PEER)
    source.gate = threading.Event()
    try:
        first = leader.join(source, "app", DIGEST)
        joined = other.join(Source(b"never read"), "app", DIGEST)
        assert first is not None and joined is not None
        assert joined.joined and joined.origin is Origin.PEER and joined.size == len(DATA)
        source.gate.set()
        with contextlib.closing(other.follow(joined, 100, 1000)) as body:
            assert b"".join(body) == DATA[100:1000]
        first.close()
    finally:
        source.gate.set()
        leader.close()
        other.close()
    assert source.opened == [str(DIGEST)]


def test_a_source_that_fails_before_any_byte_fails_the_request_and_frees_the_digest(
    fills: Fills, store: LocalStore
) -> None:
    source = Source()
    source.error = UpstreamUnavailable("the upstream is down")
    with pytest.raises(UpstreamUnavailable):
        fills.join(source, "app", DIGEST)
    source.error = None
    following = fills.join(source, "app", DIGEST)
    assert following is not None
    following.close()
    assert source.opened == [str(DIGEST), str(DIGEST)]


def test_an_unexpected_error_before_any_byte_is_a_503(fills: Fills) -> None:
    source = Source()
    source.error = RuntimeError("a bug in a source")
    with pytest.raises(UpstreamUnavailable) as raised:
        fills.join(source, "app", DIGEST)
    assert isinstance(raised.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (os.urandom(len(DATA)), len(DATA)),  # other bytes
        (DATA + b"x", len(DATA)),  # more than announced
        (DATA[:-1], len(DATA)),  # fewer than announced
        (os.urandom(len(DATA)), None),  # other bytes, size unknown
    ],
    ids=["corrupt", "too-long", "too-short", "corrupt-unsized"],
)
def test_a_fill_that_does_not_verify_is_never_complete_and_never_stored(
    fills: Fills, store: LocalStore, data: bytes, size: int | None
) -> None:
    source = Source(data, size=size)
    following = fills.join(source, "app", DIGEST)
    assert following is not None
    received = b""
    with pytest.raises(FillFailed), contextlib.closing(fills.follow(following, 0, size)) as body:
        for chunk in body:
            received += chunk
    assert len(received) < len(DATA)
    fills.close()
    assert not store.has(DIGEST)
    assert source.left == ["error"]
    assert leftovers(store) == []


def test_a_small_body_is_answered_only_once_verified(fills: Fills) -> None:
    small = os.urandom(1000)
    following = fills.join(Source(small), "app", digest_of(small))
    assert following is not None
    body = fills.follow(following, 0, len(small))
    body.begin()
    assert body.available(0) == len(small)
    body.close()
    corrupt = fills.join(Source(os.urandom(1000)), "app", digest_of(b"other"))
    assert corrupt is not None
    with pytest.raises(FillFailed) as failed, contextlib.closing(fills.follow(corrupt, 0, 1000)) as failing:
        failing.begin()
    # The follower is told why the leader failed (written on the partial file, read through its descriptor).
    assert failed.value.message == (
        "the upstream fetch failed before the blob was complete:"
        " the upstream sent a blob that does not match its digest"
    )


def test_a_miss_beyond_the_fill_slots_is_busy(store: LocalStore) -> None:
    fills = Fills(store, timeout=0.2, max_fills=1)
    running = Source()
    running.gate = threading.Event()
    try:
        first = fills.join(running, "app", DIGEST)
        assert first is not None
        other = os.urandom(10)
        with pytest.raises(Busy):
            fills.join(Source(other), "app", digest_of(other))
        first.close()
    finally:
        running.gate.set()
        fills.close()


def test_leftovers_of_a_dead_leader_are_removed_by_the_next(fills: Fills, store: LocalStore) -> None:
    stale = store.layout.fill_partial(DIGEST, "deadbeef")
    with open(stale, "wb") as handle:
        handle.write(b"half")
    # Its followers found the partial file through its state, which names it.
    with open(store.layout.fill_state(DIGEST), "w") as handle:
        json.dump({"size": len(DATA), "partial": os.path.basename(stale), "origin": "upstream"}, handle)
    following = fills.join(Source(), "app", DIGEST)
    assert following is not None
    following.close()
    fills.close()
    assert not os.path.exists(stale)
    assert store.has(DIGEST)


def test_closing_a_following_is_idempotent_and_detaching_hands_it_over(fills: Fills) -> None:
    following = fills.join(Source(), "app", DIGEST)
    assert following is not None
    moved = following.detach()
    following.close()
    os.fstat(moved.file)
    moved.close()
    moved.close()
    with pytest.raises(OSError):
        os.fstat(moved.file)


class Rejecting(Source):
    """Sends ``bad`` bytes on the first ``rejections`` openings and then rejects them as a peer's bad copy.

    As ``node.cluster_source`` does: the fill's ``UpstreamInvalid`` leaves
    the context as ``BadCopy``. Later openings send the real bytes.
    """

    def __init__(self, data: bytes, bad: bytes, rejections: int = 1) -> None:
        super().__init__(data, origin=Origin.PEER)
        self.bad, self.rejections = bad, rejections

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: Digest) -> Iterator[Stream]:
        self.opened.append(str(digest))
        rejected = len(self.opened) <= self.rejections
        try:
            yield Stream(self.bad if rejected else self.data, self.size, self.gate if rejected else None, self.origin)
        except UpstreamInvalid as exc:
            if rejected:
                raise BadCopy("the peer's copy does not match") from exc
            raise


def corrupted(data: bytes) -> bytes:
    """``data`` with bytes in the middle flipped: the same size, another digest."""
    middle = len(data) // 2
    return data[:middle] + bytes(byte ^ 0xFF for byte in data[middle : middle + 16]) + data[middle + 16 :]


def test_a_rejected_copy_is_fetched_again_and_a_body_not_begun_gets_the_good_one(
    fills: Fills, store: LocalStore
) -> None:
    small = os.urandom(40_000)
    source = Rejecting(small, corrupted(small))
    following = fills.join(source, "app", digest_of(small))
    assert following is not None
    with contextlib.closing(fills.follow(following, 0, len(small))) as body:
        body.begin()
        assert b"".join(body) == small
    fills.close()
    assert len(source.opened) == 2
    assert store.has(digest_of(small))
    assert leftovers(store) == []


def test_a_fill_rejected_every_time_fails_the_body_and_stores_nothing(fills: Fills, store: LocalStore) -> None:
    small = os.urandom(40_000)
    source = Rejecting(small, corrupted(small), rejections=MAX_ATTEMPTS)
    following = fills.join(source, "app", digest_of(small))
    assert following is not None
    with pytest.raises(FillFailed), contextlib.closing(fills.follow(following, 0, len(small))) as body:
        body.begin()
    fills.close()
    assert len(source.opened) == MAX_ATTEMPTS
    assert not store.has(digest_of(small))
    assert leftovers(store) == []


def test_a_body_that_began_with_a_rejected_copy_is_cut_short_and_the_store_gets_the_good_one(
    fills: Fills, store: LocalStore
) -> None:
    source = Rejecting(DATA, corrupted(DATA))
    source.gate = threading.Event()
    following = fills.join(source, "app", DIGEST)
    assert following is not None
    received = b""
    with pytest.raises(FillFailed), contextlib.closing(fills.follow(following, 0, len(DATA))) as body:
        body.begin()
        for chunk in body:
            received += chunk
            source.gate.set()
    assert 0 < len(received) < len(DATA)
    fills.close()
    assert len(source.opened) == 2
    assert store.has(DIGEST)
    assert leftovers(store) == []
