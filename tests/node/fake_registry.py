"""A fake registry and token server for the upstream client's tests, behind ``httpx.MockTransport``.

``tests/node/conftest.py`` builds ``Upstream`` clients on it (the ``connect``
fixture); the tests of ``node.upstream`` and ``node.upstream_auth`` share it.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable

import httpx

from node.reference import digest_of

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


CREDENTIALS = {"username": "user", "password": SECRET}
