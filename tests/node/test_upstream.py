"""Unit tests for node.upstream against a fake registry behind httpx.MockTransport."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest

from node.config import UpstreamConfig
from node.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    ShoalError,
    TooManyRequests,
    UpstreamDenied,
    UpstreamInvalid,
    UpstreamTooSlow,
    UpstreamUnavailable,
)
from node.media_types import ACCEPT_MANIFESTS
from node.reference import parse_digest
from node.upstream import (
    MANIFEST_MAX,
    BlobStream,
    ManifestHead,
    TagPage,
    Upstream,
)
from testbed.clock import FakeClock
from testbed.fake_upstream import FakeUpstream
from testbed.images import build_image
from tests.node.fake_registry import (
    BLOB,
    BLOB_DIGEST,
    BLOB_PATH,
    MANIFEST,
    MANIFEST_DIGEST,
    MANIFEST_PATH,
    OCI_MANIFEST,
    REGISTRY,
    TAGS_PATH,
    FakeRegistry,
    Handler,
    static,
)

# Anonymous access and the shape of answers.


def test_anonymous_manifest(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    manifest = connect(fake).get_manifest("library/alpine", "latest")
    assert (manifest.data, manifest.media_type, manifest.digest) == (MANIFEST, OCI_MANIFEST, MANIFEST_DIGEST)
    (request,) = fake.requests
    assert request.headers["accept"] == ACCEPT_MANIFESTS
    assert "authorization" not in request.headers


def test_head_manifest(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    head = connect(fake).head_manifest("library/alpine", "latest")
    assert head == ManifestHead(digest=MANIFEST_DIGEST, media_type=OCI_MANIFEST, size=len(MANIFEST))
    assert fake.requests[0].method == "HEAD"
    assert fake.requests[0].headers["accept"] == ACCEPT_MANIFESTS


def test_heads_keep_their_connection_for_the_next_request() -> None:
    """Tag checks and confirmations are HEADs; each must not cost the next request a new connection."""
    image = build_image([1000], seed="keep-alive")
    with FakeUpstream() as registry:
        registry.add_image("library/alpine", "latest", image)
        upstream = Upstream(UpstreamConfig(url=registry.url))
        try:
            for _ in range(3):
                assert upstream.check_tag("library/alpine", "latest").digest == parse_digest(image.digest)
            upstream.head_blob("library/alpine", image.config_digest)
            assert upstream.get_manifest("library/alpine", image.digest).data == image.manifest
        finally:
            upstream.close()
        assert registry.count("HEAD", "/v2/library/alpine/manifests/latest") == 3
        assert registry.connections_opened == 1


def test_head_without_headers(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = static(200)
    head = connect(fake).head_manifest("library/alpine", "latest")
    assert head.digest is None
    assert head.media_type == ""


def test_every_timeout_is_configured(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    connect(fake, timeout=7.0).ping()
    assert fake.requests[0].extensions["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}


def test_media_type_parameters_are_stripped(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    headers = {"Content-Type": f"{OCI_MANIFEST}; charset=utf-8"}
    fake.routes["registry.test", MANIFEST_PATH] = static(200, MANIFEST, headers)
    assert connect(fake).get_manifest("library/alpine", "latest").media_type == OCI_MANIFEST


def test_media_type_falls_back_to_the_body(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = static(200, MANIFEST)
    manifest = connect(fake).get_manifest("library/alpine", "latest")
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.digest is None


def test_manifest_without_any_media_type_is_invalid(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = static(200, b'{"schemaVersion": 2}')
    with pytest.raises(UpstreamInvalid):
        connect(fake).get_manifest("library/alpine", "latest")


def test_blob_streams(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert blob.size == len(BLOB)
        chunks = list(iter(lambda: blob.read(1000), b""))
    assert b"".join(chunks) == BLOB
    assert max(len(chunk) for chunk in chunks) == 1000


def test_open_blob_closes_the_response(connect: Callable[..., Upstream]) -> None:
    class Stream(httpx.SyncByteStream):
        closed = False

        def __iter__(self) -> Iterator[bytes]:
            yield BLOB

        def close(self) -> None:
            self.closed = True

    stream = Stream()
    fake = FakeRegistry()
    fake.routes["registry.test", BLOB_PATH] = lambda request: httpx.Response(200, stream=stream)
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert blob.size is None
        assert not stream.closed
    assert stream.closed


def test_blob_error_is_raised_before_the_block(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", BLOB_PATH] = static(500)
    with pytest.raises(UpstreamUnavailable), connect(fake).open_blob("library/alpine", BLOB_DIGEST):
        pytest.fail("the block must not run")


def test_blob_failure_part_way(connect: Callable[..., Upstream]) -> None:
    def body() -> Iterator[bytes]:
        yield b"first"
        raise httpx.ReadError("connection reset")

    fake = FakeRegistry()
    fake.routes["registry.test", BLOB_PATH] = lambda request: httpx.Response(200, content=body())
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert blob.read(5) == b"first"
        with pytest.raises(UpstreamUnavailable, match=re.escape(REGISTRY)):
            blob.read(5)


def test_tags_page(connect: Callable[..., Upstream]) -> None:
    link = '</v2/library/alpine/tags/list?last=latest&n=2>; rel="next"'
    fake = FakeRegistry()
    fake.routes["registry.test", TAGS_PATH] = lambda request: httpx.Response(
        200, json={"name": "library/alpine", "tags": ["3.19", "latest"]}, headers={"Link": link}
    )
    page = connect(fake).tags("library/alpine", n=2, last="3.18")
    assert page == TagPage(tags=["3.19", "latest"], next={"n": "2", "last": "latest"})
    assert dict(fake.requests[0].url.params) == {"n": "2", "last": "3.18"}


@pytest.mark.parametrize(
    "link",
    [
        pytest.param('<https://elsewhere.test/v2/x/tags/list?n=2>; rel="next"', id="no last"),
        pytest.param('</v2/library/alpine/tags/list?last=latest>; rel="prev"', id="not next"),
        pytest.param("garbage", id="garbage"),
    ],
)
def test_a_next_page_needs_a_last(connect: Callable[..., Upstream], link: str) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", TAGS_PATH] = lambda request: httpx.Response(
        200, json={"name": "library/alpine", "tags": ["3.19"]}, headers={"Link": link}
    )
    assert connect(fake).tags("library/alpine", n=1).next is None


def test_tags_without_paging(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    assert connect(fake).tags("library/alpine") == TagPage(tags=["3.19", "latest"])
    assert fake.requests[0].url.query == b""


def test_tags_null_is_an_empty_list(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", TAGS_PATH] = static(200, b'{"name": "library/alpine", "tags": null}')
    assert connect(fake).tags("library/alpine").tags == []


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"tags": [1, 2]}', b'{"tags": "latest"}'])
def test_tags_that_are_not_a_list_are_invalid(connect: Callable[..., Upstream], body: bytes) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", TAGS_PATH] = static(200, body)
    with pytest.raises(UpstreamInvalid):
        connect(fake).tags("library/alpine")


def test_ping(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    connect(fake).ping()
    assert fake.requests[0].url.path == "/v2/"


def test_rate_limits_are_recorded(connect: Callable[..., Upstream]) -> None:
    remaining = iter(["99;w=21600", "98;w=21600"])
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = lambda request: httpx.Response(
        200,
        content=MANIFEST,
        headers={
            "Content-Type": OCI_MANIFEST,
            "RateLimit-Limit": "100;w=21600",
            "RateLimit-Remaining": next(remaining),
        },
    )
    upstream = connect(fake)
    assert upstream.rate_limits == {}
    upstream.get_manifest("library/alpine", "latest")
    assert upstream.rate_limits == {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "99;w=21600"}
    upstream.get_manifest("library/alpine", "latest")
    assert upstream.rate_limits["ratelimit-remaining"] == "98;w=21600"


def test_close_is_idempotent(connect: Callable[..., Upstream]) -> None:
    upstream = connect(FakeRegistry())
    upstream.close()
    upstream.close()


# Errors.


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda upstream: upstream.get_manifest("library/busybox", "latest"), ManifestUnknown),
        (lambda upstream: upstream.head_manifest("library/alpine", MANIFEST_DIGEST), ManifestUnknown),
        (lambda upstream: upstream.open_blob("library/alpine", MANIFEST_DIGEST).__enter__(), BlobUnknown),
        (lambda upstream: upstream.tags("library/busybox"), NameUnknown),
        (lambda upstream: upstream.ping(), UpstreamUnavailable),
    ],
)
def test_not_found(
    connect: Callable[..., Upstream], call: Callable[[Upstream], object], error: type[ShoalError]
) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", "/v2/"] = static(404)
    with pytest.raises(error) as raised:
        call(connect(fake))
    assert type(raised.value) is error


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (403, UpstreamDenied),
        (429, TooManyRequests),
        (500, UpstreamUnavailable),
        (502, UpstreamUnavailable),
        (418, UpstreamUnavailable),
        (204, UpstreamUnavailable),
    ],
)
def test_status_mapping(connect: Callable[..., Upstream], status: int, error: type[ShoalError]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = static(status)
    with pytest.raises(error) as raised:
        connect(fake).get_manifest("library/alpine", "latest")
    assert REGISTRY in str(raised.value)
    assert str(status) in str(raised.value)
    # A 429 says when to come back: without a Retry-After, after the default pause.
    extra = {"retry_after": 60} if status == 429 else {}
    assert raised.value.detail == {"upstream": REGISTRY, "status": status, **extra}


def test_too_many_requests_passes_retry_after(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = static(429, headers={"Retry-After": "30"})
    upstream = connect(fake)
    with pytest.raises(TooManyRequests) as raised:
        upstream.get_manifest("library/alpine", "latest")
    assert raised.value.detail == {"upstream": REGISTRY, "status": 429, "retry_after": 30}
    # The client is told to come back when the upstream's pause ends.
    assert raised.value.retry_after == 30
    assert upstream.budget.paused() == 30


@pytest.mark.parametrize(
    ("retry_after", "seconds"),
    [("999999999", 3600), ("tomorrow", 60), ("9" * 5000, 60), ("Fri, 31 Dec 9999 23:59:59 GMT", 3600)],
)
def test_a_hostile_or_malformed_retry_after_is_capped_or_ignored(
    connect: Callable[..., Upstream], retry_after: str, seconds: int
) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = static(429, headers={"Retry-After": retry_after})
    with pytest.raises(TooManyRequests) as raised:
        connect(fake).head_manifest("library/alpine", "latest")
    assert raised.value.retry_after == seconds


def test_every_answer_reaches_the_budget(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "3;w=21600", "Docker-Content-Digest": "x"}
    fake.routes["registry.test", MANIFEST_PATH] = static(200, headers=headers)
    upstream = connect(fake, ratelimit_floor=5)
    # The client still sends what it is asked; the budget only tells the tag path to pause.
    upstream.head_manifest("library/alpine", "latest")
    upstream.head_manifest("library/alpine", "latest")
    assert len(fake.requests) == 2
    assert upstream.budget.paused() == 60


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (httpx.ConnectError("connection refused"), "cannot connect"),
        (httpx.ReadTimeout("read timed out"), "timed out"),
        (httpx.RemoteProtocolError("garbage"), "RemoteProtocolError"),
    ],
)
def test_transport_failure_is_unavailable(
    connect: Callable[..., Upstream], failure: httpx.HTTPError, says: str
) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise failure

    with pytest.raises(UpstreamUnavailable) as raised:
        connect(broken).get_manifest("library/alpine", "latest")
    assert REGISTRY in str(raised.value)
    assert says in str(raised.value)


def test_manifest_over_the_limit_by_content_length(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    body = b" " * (MANIFEST_MAX + 1)
    fake.routes["registry.test", MANIFEST_PATH] = static(200, body, {"Content-Type": OCI_MANIFEST})
    with pytest.raises(UpstreamInvalid):
        connect(fake).get_manifest("library/alpine", "latest")


def test_manifest_at_the_limit_is_accepted(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    body = b" " * MANIFEST_MAX
    fake.routes["registry.test", MANIFEST_PATH] = static(200, body, {"Content-Type": OCI_MANIFEST})
    assert connect(fake).get_manifest("library/alpine", "latest").data == body


# The minimum rate (node/min_rate.py): a body that drips is aborted.


def _dripping(clock: FakeClock, piece: bytes, pause: float) -> Iterator[bytes]:
    """``piece``, then nothing for ``pause`` seconds of the fake clock, then ``piece`` again."""
    yield piece
    clock.advance(pause)
    yield piece


def test_a_blob_that_drips_below_the_minimum_rate_is_aborted(
    connect: Callable[..., Upstream], clock: FakeClock
) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", BLOB_PATH] = lambda request: httpx.Response(
        200, content=_dripping(clock, b"x" * 1000, 31.0)
    )
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert blob.read(1000) == b"x" * 1000
        with pytest.raises(UpstreamTooSlow, match=r"below upstream\.min_rate \(10240 bytes/s\)"):
            blob.read(1000)


def test_a_blob_at_the_minimum_rate_and_one_without_a_floor_go_through(
    connect: Callable[..., Upstream], clock: FakeClock
) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", BLOB_PATH] = lambda request: httpx.Response(
        200, content=_dripping(clock, b"x" * 200_000, 31.0)
    )
    with connect(fake, min_rate_window=30.0).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert len(b"".join(iter(lambda: blob.read(1 << 20), b""))) == 400_000
    fake.routes["registry.test", BLOB_PATH] = lambda request: httpx.Response(
        200, content=_dripping(clock, b"x", 3600.0)
    )
    with connect(fake, min_rate=0).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert len(b"".join(iter(lambda: blob.read(1 << 20), b""))) == 2


def test_a_manifest_that_drips_below_the_minimum_rate_is_aborted(
    connect: Callable[..., Upstream], clock: FakeClock
) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = lambda request: httpx.Response(
        200, content=_dripping(clock, b" " * 10, 31.0), headers={"Content-Type": OCI_MANIFEST}
    )
    with pytest.raises(UpstreamTooSlow):
        connect(fake).get_manifest("library/alpine", "latest")


def test_endless_manifest_is_read_with_a_limit(connect: Callable[..., Upstream]) -> None:
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        while True:
            sent += 1 << 20
            yield b" " * (1 << 20)

    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = lambda request: httpx.Response(
        200, content=endless(), headers={"Content-Type": OCI_MANIFEST}
    )
    with pytest.raises(UpstreamInvalid):
        connect(fake).get_manifest("library/alpine", "latest")
    assert sent <= MANIFEST_MAX + (1 << 20)


# Carrying on a blob from a byte on (Range).


def _ranged(content_range: Callable[[int], str] | None) -> Handler:
    """A blob route that answers ``Range: bytes=N-`` with a 206 and ``content_range(N)``; None ignores Range."""

    def answer(request: httpx.Request) -> httpx.Response:
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
        if match is None or content_range is None:
            return httpx.Response(200, content=BLOB)
        first = int(match[1])
        return httpx.Response(206, content=BLOB[first:], headers={"Content-Range": content_range(first)})

    return answer


def _read_all(blob: BlobStream) -> bytes:
    return b"".join(iter(lambda: blob.read(1000), b""))


def test_a_blob_from_a_byte_on_is_a_range_request(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", BLOB_PATH] = _ranged(lambda first: f"bytes {first}-{len(BLOB) - 1}/{len(BLOB)}")
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST, 4000) as blob:
        assert blob.size == len(BLOB)
        assert _read_all(blob) == BLOB[4000:]
    (request,) = fake.requests
    assert request.headers["range"] == "bytes=4000-"


def test_an_upstream_that_ignores_range_sends_the_whole_blob_and_the_start_is_dropped(
    connect: Callable[..., Upstream],
) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", BLOB_PATH] = _ranged(None)
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST, 4000) as blob:
        assert blob.size == len(BLOB)
        assert _read_all(blob) == BLOB[4000:]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "content_range",
    [
        lambda first: f"bytes {first + 1}-{len(BLOB) - 1}/{len(BLOB)}",
        lambda first: f"bytes {first}-{len(BLOB) - 2}/{len(BLOB)}",
        lambda first: f"bytes {first}-{len(BLOB) - 1}/*",
        lambda first: "",
    ],
    ids=["another start", "not to the end", "no size", "none"],
)
def test_a_206_for_another_range_is_not_used_and_the_blob_is_asked_for_whole(
    connect: Callable[..., Upstream], content_range: Callable[[int], str]
) -> None:
    fake = FakeRegistry()
    ranged = _ranged(content_range)
    fake.routes["registry.test", BLOB_PATH] = ranged
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST, 4000) as blob:
        assert blob.size == len(BLOB)
        assert _read_all(blob) == BLOB[4000:]
    assert [request.headers.get("range") for request in fake.requests] == ["bytes=4000-", None]


def test_a_blob_from_the_start_sends_no_range(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    with connect(fake).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert _read_all(blob) == BLOB
    assert "range" not in fake.requests[0].headers
