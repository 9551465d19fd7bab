"""Unit tests for node.upstream_auth: Basic and bearer auth through the client, and where secrets go."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from node.config import UpstreamConfig
from node.errors import (
    ManifestUnknown,
    ShoalError,
    UpstreamDenied,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from node.upstream import Upstream
from node.upstream_auth import Challenge, Credentials, RegistryAuth, parse_token
from testbed.clock import FakeClock
from tests.node.fake_registry import (
    BASIC,
    BLOB,
    BLOB_DIGEST,
    BLOB_PATH,
    CREDENTIALS,
    MANIFEST,
    MANIFEST_PATH,
    REGISTRY,
    SECRET,
    FakeRegistry,
    Handler,
    static,
)

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
        assert b"".join(iter(lambda: blob.read(1 << 20), b"")) == BLOB
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
        assert b"".join(iter(lambda: blob.read(1 << 20), b"")) == BLOB
    # The registry got the token; the CDN got nothing of it.
    assert fake.registry_authorizations()[-1] is not None
    (request,) = cdn_requests
    assert "authorization" not in request.headers


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_a_host_the_upstream_redirects_to_never_gets_the_credentials(
    connect: Callable[..., Upstream], auth: str
) -> None:
    foreign: list[httpx.Request] = []

    def record(status: int, headers: list[tuple[str, str]] | None = None) -> Handler:
        def handler(request: httpx.Request) -> httpx.Response:
            foreign.append(request)
            return httpx.Response(status, headers=headers or [])

        return handler

    fake = FakeRegistry(auth=auth)
    fake.routes["registry.test", BLOB_PATH] = static(307, headers={"Location": "https://cdn.test/blobs/abc"})
    # The CDN asks for credentials, naming a realm of its own, over https.
    challenges = [
        ("WWW-Authenticate", 'Bearer realm="https://collector.test/collect",service="x",scope="y"'),
        ("WWW-Authenticate", 'Basic realm="cdn"'),
    ]
    fake.routes["cdn.test", "/blobs/abc"] = record(401, challenges)
    fake.routes["collector.test", "/collect"] = record(200)
    upstream = connect(fake, **CREDENTIALS)
    # The registry asked for credentials and got them.
    upstream.get_manifest("library/alpine", "latest")
    assert fake.registry_authorizations()[-1] is not None
    with pytest.raises(ShoalError), upstream.open_blob("library/alpine", BLOB_DIGEST):
        pass
    assert [request.url.host for request in foreign] == ["cdn.test"]
    assert "authorization" not in foreign[0].headers


# Refused credentials and broken token realms.


def test_401_after_auth_is_denied(connect: Callable[..., Upstream]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.reject_tokens = True
    with pytest.raises(UpstreamDenied, match=re.escape(REGISTRY)):
        connect(fake, **CREDENTIALS).get_manifest("library/alpine", "latest")
    # One retry with the fresh token, not a loop.
    assert len(fake.requests) == 2


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


# One client, many threads.


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
            return b"".join(iter(lambda: blob.read(1 << 20), b""))

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


def test_reprs_hold_no_secret(connect: Callable[..., Upstream], clock: FakeClock) -> None:
    fake = FakeRegistry(auth="bearer")
    connect(fake, **CREDENTIALS).get_manifest("library/alpine", "latest")
    credentials = Credentials(UpstreamConfig(url=REGISTRY, **CREDENTIALS))  # type: ignore[arg-type]
    request = credentials.token_request(Challenge("https://auth.test/token?account=x", "registry.test", None))
    assert request is not None and request.authorization == BASIC
    auth = RegistryAuth(credentials, lambda challenge: ("issued-token", 60.0), clock)
    secrets = {SECRET, BASIC, BASIC.removeprefix("Basic "), "issued-token", *fake.issued}
    for text in (repr(credentials), repr(request), repr(auth), str(request)):
        assert not any(secret in text for secret in secrets), text


# Token answers.


@pytest.mark.parametrize(
    ("body", "token"),
    [
        (b'{"token": "abc", "expires_in": 300}', ("abc", 300.0)),
        (b'{"access_token": "abc"}', ("abc", 60.0)),
        (b'{"token": "abc", "expires_in": true}', ("abc", 60.0)),
        (b'{"token": "abc", "expires_in": "300"}', ("abc", 60.0)),
        (b'{"token": ""}', None),
        (b'{"token": "two words"}', None),
        (b'{"token": 42}', None),
        (b'["abc"]', None),
        (b"not json", None),
        (b"\xff", None),
    ],
)
def test_token_answers(body: bytes, token: tuple[str, float] | None) -> None:
    assert parse_token(body) == token
