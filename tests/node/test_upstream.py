"""Unit tests for node.upstream against a fake registry behind httpx.MockTransport."""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

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
    UpstreamUnavailable,
)
from node.reference import digest_of
from node.upstream import (
    ACCEPT_MANIFESTS,
    MANIFEST_MAX,
    ManifestHead,
    TagPage,
    Upstream,
)
from testbed.clock import FakeClock

REGISTRY = "http://registry.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
MANIFEST_DIGEST = str(digest_of(MANIFEST))
BLOB = b"layer bytes" * 1000
BLOB_DIGEST = str(digest_of(BLOB))
MANIFEST_PATH = "/v2/library/alpine/manifests/latest"
BLOB_PATH = f"/v2/library/alpine/blobs/{BLOB_DIGEST}"
TAGS_PATH = "/v2/library/alpine/tags/list"
# Unique per run, so finding it anywhere can only mean it leaked.
SECRET = f"pw-{uuid.uuid4().hex}"
BASIC = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()

Handler = Callable[[httpx.Request], httpx.Response]


class FakeRegistry:
    """registry.test plus a token server on every host's ``/token`` path.

    ``auth`` is "none", "basic" or "bearer". In bearer mode the registry
    accepts a token only for the scope it was issued for, like distribution.
    ``routes`` overrides single ``(host, path)`` pairs; the challenge still
    applies to registry.test routes.
    """

    def __init__(self, auth: str = "none", realm: str = "https://auth.test/token") -> None:
        self.auth = auth
        self.realm = realm
        self.expires_in: float | None = 300
        self.token_field = "token"
        self.token_status = 200
        self.token_value: str | None = None
        self.reject_tokens = False
        self.requests: list[httpx.Request] = []
        self.token_requests: list[httpx.Request] = []
        self.issued: dict[str, str] = {}
        self.routes: dict[tuple[str, str], Handler] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        # A snapshot: the client may reuse one request object for its retry.
        request = httpx.Request(
            request.method, request.url, headers=request.headers.copy(), extensions=request.extensions
        )
        if request.url.path == "/token":
            self.token_requests.append(request)
            return self.issue(request)
        route = self.routes.get((request.url.host, request.url.path))
        if request.url.host != "registry.test":
            assert route is not None, f"unexpected request to {request.url}"
            return route(request)
        self.requests.append(request)
        challenge = self.challenge(request)
        if challenge is not None:
            return challenge
        if route is not None:
            return route(request)
        return self.content(request)

    def challenge(self, request: httpx.Request) -> httpx.Response | None:
        authorization = request.headers.get("authorization", "")
        if self.auth == "basic" and authorization != BASIC:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth == "bearer":
            scope = scope_of(request.url.path)
            token = authorization.removeprefix("Bearer ")
            accepted = not self.reject_tokens and self.issued.get(token) == (scope or "")
            if authorization.startswith("Bearer ") and accepted:
                return None
            challenge = f'Bearer realm="{self.realm}",service="registry.test"'
            if scope:
                challenge += f',scope="{scope}"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge}, json={"errors": []})
        return None

    def issue(self, request: httpx.Request) -> httpx.Response:
        authorization = request.headers.get("authorization")
        if self.token_status != 200:
            return httpx.Response(self.token_status)
        if authorization is not None and authorization != BASIC:
            return httpx.Response(401)
        token = self.token_value or f"token-{uuid.uuid4().hex}"
        self.issued[token] = " ".join(request.url.params.get_list("scope"))
        body: dict[str, object] = {self.token_field: token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)

    def content(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        if path == MANIFEST_PATH:
            headers = {
                "Content-Type": OCI_MANIFEST,
                "Docker-Content-Digest": MANIFEST_DIGEST,
                "Content-Length": str(len(MANIFEST)),
            }
            return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else MANIFEST)
        if path == BLOB_PATH:
            return httpx.Response(200, content=BLOB)
        if path == TAGS_PATH:
            return httpx.Response(200, json={"name": "library/alpine", "tags": ["3.19", "latest"]})
        return httpx.Response(404, json={"errors": [{"code": "NOT_FOUND"}]})

    def registry_authorizations(self) -> list[str | None]:
        return [request.headers.get("authorization") for request in self.requests]


def scope_of(path: str) -> str | None:
    for marker in ("/manifests/", "/blobs/", "/tags/"):
        if marker in path:
            name = path.removeprefix("/v2/").split(marker)[0]
            return f"repository:{name}:pull"
    return None


def static(status: int, content: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(status, content=content, headers=headers)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def connect(clock: FakeClock) -> Iterator[Callable[..., Upstream]]:
    """Build Upstreams on a fake transport; all are closed after the test."""
    made: list[Upstream] = []

    def connect(handler: Handler, **config: object) -> Upstream:
        upstream = Upstream(
            UpstreamConfig(url=REGISTRY, **config),  # type: ignore[arg-type]
            transport=httpx.MockTransport(handler),
            clock=clock,
        )
        made.append(upstream)
        return upstream

    yield connect
    for upstream in made:
        upstream.close()


CREDENTIALS = {"username": "user", "password": SECRET}


# Anonymous access and the shape of answers.


def test_anonymous_manifest(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    manifest = connect(fake).get_manifest("library/alpine", "latest")
    assert (manifest.data, manifest.media_type, manifest.digest) == (MANIFEST, OCI_MANIFEST, MANIFEST_DIGEST)
    (request,) = fake.requests
    assert request.headers["accept"] == ACCEPT_MANIFESTS
    assert "authorization" not in request.headers


def test_accept_lists_every_manifest_type() -> None:
    assert ACCEPT_MANIFESTS.split(", ") == [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]


def test_head_manifest(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    head = connect(fake).head_manifest("library/alpine", "latest")
    assert head == ManifestHead(digest=MANIFEST_DIGEST, media_type=OCI_MANIFEST, size=len(MANIFEST))
    assert fake.requests[0].method == "HEAD"
    assert fake.requests[0].headers["accept"] == ACCEPT_MANIFESTS


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
        chunks = list(blob.iter_bytes(chunk_size=1000))
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
        chunks = blob.iter_bytes(chunk_size=5)
        assert next(chunks) == b"first"
        with pytest.raises(UpstreamUnavailable, match=re.escape(REGISTRY)):
            next(chunks)


def test_tags_page(connect: Callable[..., Upstream]) -> None:
    link = '</v2/library/alpine/tags/list?last=latest&n=2>; rel="next"'
    fake = FakeRegistry()
    fake.routes["registry.test", TAGS_PATH] = lambda request: httpx.Response(
        200, json={"name": "library/alpine", "tags": ["3.19", "latest"]}, headers={"Link": link}
    )
    page = connect(fake).tags("library/alpine", n=2, last="3.18")
    assert page == TagPage(tags=["3.19", "latest"], link=link)
    assert dict(fake.requests[0].url.params) == {"n": "2", "last": "3.18"}


def test_tags_without_paging(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    assert connect(fake).tags("library/alpine") == TagPage(tags=["3.19", "latest"], link=None)
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


# Basic authentication.


def test_basic_auth(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="basic")
    upstream = connect(fake, **CREDENTIALS)
    upstream.get_manifest("library/alpine", "latest")
    assert fake.registry_authorizations() == [None, BASIC]
    # Once the upstream asked for Basic, it goes with every request.
    upstream.get_manifest("library/alpine", "latest")
    assert fake.registry_authorizations() == [None, BASIC, BASIC]


def test_basic_challenge_without_credentials_is_denied(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="basic")
    with pytest.raises(UpstreamDenied, match=re.escape(REGISTRY)):
        connect(fake).get_manifest("library/alpine", "latest")
    assert fake.registry_authorizations() == [None]


def test_wrong_basic_credentials_are_denied(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="basic")
    with pytest.raises(UpstreamDenied):
        connect(fake, username="user", password="wrong").get_manifest("library/alpine", "latest")
    assert len(fake.requests) == 2


# The bearer-token flow.


def test_bearer_flow_caches_the_token(connect: Callable[..., Upstream], clock: FakeClock) -> None:
    fake = FakeRegistry(auth="bearer")
    upstream = connect(fake, **CREDENTIALS)

    upstream.get_manifest("library/alpine", "latest")
    (token_request,) = fake.token_requests
    assert token_request.url.host == "auth.test"
    assert token_request.url.params.get_list("service") == ["registry.test"]
    assert token_request.url.params.get_list("scope") == ["repository:library/alpine:pull"]
    assert token_request.headers["authorization"] == BASIC
    first, retry = fake.registry_authorizations()
    assert first is None
    assert retry is not None and retry.startswith("Bearer ")

    # The second request carries the cached token up front: no 401, no token request.
    clock.advance(200)
    upstream.get_manifest("library/alpine", "latest")
    assert fake.registry_authorizations()[2:] == [retry]
    assert len(fake.token_requests) == 1

    # Past expiry the token is not sent; the 401 leads to a new one.
    clock.advance(101)
    upstream.get_manifest("library/alpine", "latest")
    assert len(fake.token_requests) == 2
    assert fake.registry_authorizations()[3] is None


def test_token_defaults_to_60_seconds_and_expires_early(connect: Callable[..., Upstream], clock: FakeClock) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.expires_in = None
    fake.token_field = "access_token"
    upstream = connect(fake)
    upstream.get_manifest("library/alpine", "latest")
    clock.advance(45)
    upstream.get_manifest("library/alpine", "latest")
    assert len(fake.token_requests) == 1
    # Still inside the 60 seconds, but too close to their end to trust.
    clock.advance(10)
    upstream.get_manifest("library/alpine", "latest")
    assert len(fake.token_requests) == 2


def test_token_scope_is_remembered_per_repository(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    upstream = connect(fake)
    upstream.get_manifest("library/alpine", "latest")
    alpine_token = fake.registry_authorizations()[-1]

    # Another repository has its own scope: a 401 and a token of its own.
    fake.requests.clear()
    with pytest.raises(ManifestUnknown):
        upstream.get_manifest("library/busybox", "latest")
    assert fake.token_requests[-1].url.params["scope"] == "repository:library/busybox:pull"
    busybox_token = fake.registry_authorizations()[-1]
    assert fake.registry_authorizations()[0] is None
    assert busybox_token != alpine_token

    # Each repository's requests, whatever the endpoint, now go out authorized.
    fake.requests.clear()
    with upstream.open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert b"".join(blob.iter_bytes()) == BLOB
    upstream.tags("library/alpine")
    with pytest.raises(ManifestUnknown):
        upstream.head_manifest("library/busybox", "latest")
    assert fake.registry_authorizations() == [alpine_token, alpine_token, busybox_token]
    assert len(fake.token_requests) == 2


def test_rejected_cached_token_is_replaced(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    upstream = connect(fake)
    upstream.get_manifest("library/alpine", "latest")
    old = fake.registry_authorizations()[-1]
    fake.issued.clear()
    fake.requests.clear()
    upstream.get_manifest("library/alpine", "latest")
    sent, retried = fake.registry_authorizations()
    assert sent == old
    assert retried is not None and retried != old
    assert len(fake.token_requests) == 2


def test_token_request_never_carries_the_registry_token(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    upstream = connect(fake)
    upstream.get_manifest("library/alpine", "latest")
    with pytest.raises(ManifestUnknown):
        upstream.get_manifest("library/busybox", "latest")
    assert len(fake.token_requests) == 2
    assert all("authorization" not in request.headers for request in fake.token_requests)


def test_ping_takes_a_token_without_scope(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    connect(fake).ping()
    (token_request,) = fake.token_requests
    assert "scope" not in token_request.url.params


def test_realm_query_is_kept(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer", realm="https://auth.test/token?account=shoal")
    connect(fake).get_manifest("library/alpine", "latest")
    params = fake.token_requests[0].url.params
    assert params["account"] == "shoal"
    assert params["scope"] == "repository:library/alpine:pull"


@pytest.mark.parametrize(
    ("realm", "token_realms", "gets_credentials"),
    [
        ("https://auth.test/token", (), True),
        ("http://registry.test/token", (), True),
        ("http://registry.test:5001/token", (), True),
        ("http://evil.test/token", (), False),
        ("http://evil.test/token", ("other.test",), False),
        ("http://evil.test/token", ("evil.test",), True),
        ("http://evil.test:8080/token", ("evil.test:8080",), True),
    ],
)
def test_realm_credential_policy(
    connect: Callable[..., Upstream], realm: str, token_realms: tuple[str, ...], gets_credentials: bool
) -> None:
    fake = FakeRegistry(auth="bearer", realm=realm)
    connect(fake, token_realms=token_realms, **CREDENTIALS).get_manifest("library/alpine", "latest")
    (token_request,) = fake.token_requests
    assert str(token_request.url).startswith(realm)
    assert token_request.headers.get("authorization") == (BASIC if gets_credentials else None)


def test_redirect_to_another_host_drops_authorization(connect: Callable[..., Upstream]) -> None:
    cdn_requests: list[httpx.Request] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        cdn_requests.append(request)
        return httpx.Response(200, content=BLOB)

    fake = FakeRegistry(auth="bearer")
    fake.routes["registry.test", BLOB_PATH] = static(307, headers={"Location": "http://cdn.test/blobs/abc?sig=1"})
    fake.routes["cdn.test", "/blobs/abc"] = cdn
    with connect(fake, **CREDENTIALS).open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert blob.size == len(BLOB)
        assert b"".join(blob.iter_bytes()) == BLOB
    # The registry got the token; the CDN got nothing of it.
    assert fake.registry_authorizations()[-1] is not None
    (request,) = cdn_requests
    assert "authorization" not in request.headers


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


def test_401_after_auth_is_denied(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.reject_tokens = True
    with pytest.raises(UpstreamDenied, match=re.escape(REGISTRY)):
        connect(fake, **CREDENTIALS).get_manifest("library/alpine", "latest")
    # One retry with the fresh token, not a loop.
    assert len(fake.requests) == 2


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
    assert raised.value.detail == {"upstream": REGISTRY, "status": status}


def test_too_many_requests_passes_retry_after(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry()
    fake.routes["registry.test", MANIFEST_PATH] = static(429, headers={"Retry-After": "30"})
    with pytest.raises(TooManyRequests) as raised:
        connect(fake).get_manifest("library/alpine", "latest")
    assert raised.value.detail == {"upstream": REGISTRY, "status": 429, "retry_after": "30"}


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


def test_token_realm_refusing_credentials_is_denied(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.token_status = 401
    with pytest.raises(UpstreamDenied, match=r"auth\.test"):
        connect(fake, **CREDENTIALS).get_manifest("library/alpine", "latest")


def test_token_realm_failing_is_unavailable(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.token_status = 503
    with pytest.raises(UpstreamUnavailable, match=r"auth\.test"):
        connect(fake).get_manifest("library/alpine", "latest")


@pytest.mark.parametrize("token", ["", "two words", "line\nX-Injected: 1"])
def test_unusable_token_is_invalid(connect: Callable[..., Upstream], token: str) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.token_value = token or None
    fake.token_field = "something_else" if not token else "token"
    with pytest.raises(UpstreamInvalid):
        connect(fake).get_manifest("library/alpine", "latest")


@pytest.mark.parametrize("realm", ["ftp://auth.test/token", "/token", "http://:80/token"])
def test_realm_that_is_not_http_is_invalid(connect: Callable[..., Upstream], realm: str) -> None:
    fake = FakeRegistry(auth="bearer", realm=realm)
    with pytest.raises(UpstreamInvalid):
        connect(fake).get_manifest("library/alpine", "latest")
    assert fake.token_requests == []


def test_threads_share_one_upstream(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    upstream = connect(fake, **CREDENTIALS)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: upstream.get_manifest("library/alpine", "latest").data, range(32)))
    assert results == [MANIFEST] * 32


# Secrets never leak.


def test_no_secret_in_errors_or_logs(connect: Callable[..., Upstream], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[ShoalError] = []

    def expect_error(upstream: Upstream, call: Callable[[Upstream], object]) -> None:
        with pytest.raises(ShoalError) as raised:
            call(upstream)
        errors.append(raised.value)

    def get(upstream: Upstream) -> object:
        return upstream.get_manifest("library/alpine", "latest")

    def read_blob(upstream: Upstream) -> object:
        with upstream.open_blob("library/alpine", BLOB_DIGEST) as blob:
            return b"".join(blob.iter_bytes())

    # The registry refuses the token it was given.
    denying = FakeRegistry(auth="bearer")
    denying.reject_tokens = True
    expect_error(connect(denying, **CREDENTIALS), get)

    # The token server refuses the credentials.
    refusing = FakeRegistry(auth="bearer")
    refusing.token_status = 401
    expect_error(connect(refusing, **CREDENTIALS), get)

    # The token server answers a token that cannot be a header value.
    garbled = FakeRegistry(auth="bearer")
    garbled.token_value = f"{SECRET}\nX: y"
    expect_error(connect(garbled, **CREDENTIALS), get)

    # Transport failures whose text quotes the Authorization header.
    def quoting(failure: type[httpx.HTTPError]) -> Handler:
        def handler(request: httpx.Request) -> httpx.Response:
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
            raise failure(f"failed with {request.headers['authorization']} {SECRET}")

        return handler

    expect_error(connect(quoting(httpx.ConnectError), **CREDENTIALS), get)
    expect_error(connect(quoting(httpx.ReadTimeout), **CREDENTIALS), get)

    def failing_body(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            yield b"x"
            raise httpx.ReadError(f"reset while sending {request.headers['authorization']}")

        if request.headers.get("authorization") != BASIC:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        return httpx.Response(200, content=body())

    expect_error(connect(failing_body, **CREDENTIALS), read_blob)

    # Plain HTTP failures after authenticating.
    for status in (403, 429, 500):
        failing = FakeRegistry(auth="basic")
        failing.routes["registry.test", MANIFEST_PATH] = static(status)
        expect_error(connect(failing, **CREDENTIALS), get)

    tokens = set(denying.issued) | set(refusing.issued)
    secrets = {SECRET, BASIC, BASIC.removeprefix("Basic "), *tokens}
    assert len(errors) == 9
    assert any(record.levelno == logging.WARNING for record in caplog.records)
    for error in errors:
        for text in (str(error), repr(error), error.message, repr(error.detail)):
            assert not any(secret in text for secret in secrets), text
    for record in caplog.records:
        assert not any(secret in record.getMessage() for secret in secrets), record.getMessage()
    assert not any(secret in caplog.text for secret in secrets)
