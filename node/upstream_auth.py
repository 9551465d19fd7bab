"""How the upstream client authenticates: HTTP Basic, or a bearer token from the challenge's realm.

``RegistryAuth`` is the ``httpx.Auth`` of ``node.upstream.Upstream``. It
answers a 401 by the response's ``WWW-Authenticate`` challenges, with one
retry; a 401 to that retry is the upstream's answer, and the client's.

- Basic: the credentials go with the retry and, once the upstream has asked
  for them, with every request after it.
- Bearer: a token for the challenge (realm, service, scope), cached until
  shortly before it expires. Each repository remembers the challenge it last
  received, so its next request carries the token without a 401 round trip.

Getting a token is shared with the client. This module decides what to ask
for and what the answer means (``Credentials.token_request``,
``parse_token``); the client sends the request (``TokenSource``), so that it
is timed, observed and mapped onto the node's errors like any other
request. Only the upstream's own origin (scheme, host, port) gets
credentials or has its challenges answered: a host it redirects to (a CDN)
gets neither, so it cannot name a realm to collect them. Credentials reach
a token realm only over https, on the upstream's own host, or on a host
listed in ``upstream.token_realms``; elsewhere the token is asked for
anonymously.

Secrets (the password, the Basic value, tokens) leave this module only as an
Authorization header. The reprs of ``Credentials``, ``TokenRequest`` and
``RegistryAuth`` leave them out, and nothing here logs or raises. A token is
accepted only as printable ASCII without spaces, so that it can neither
smuggle in another header nor reach an exception's text.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from node.config import UpstreamConfig

# A token answer is a small JSON document; a larger body is a misbehaving
# server, not something worth buffering. The client reads at most this much.
TOKEN_MAX = 1024 * 1024
# The distribution token spec: a token without expires_in lasts 60 seconds.
_DEFAULT_TOKEN_LIFETIME = 60.0
# Tokens are dropped this long before they expire (at most half their
# lifetime), so a request never leaves with a token that dies on the way.
_EXPIRY_MARGIN = 10.0
# A token becomes a header value: printable ASCII without spaces keeps it
# from smuggling in another header, and from reaching an exception's text.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
_AUTH_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')
# The repository is everything between /v2/ and the last API segment; a
# reference, digest or "list" never holds a slash, so the greedy match is exact.
_REPOSITORY_PATH = re.compile(r"/v2/(.+)/(?:manifests|blobs|tags)/[^/]*$")


@dataclass(frozen=True)
class Challenge:
    """A bearer challenge; tokens are cached per challenge."""

    realm: str
    service: str | None
    scope: str | None


@dataclass(frozen=True)
class TokenRequest:
    """How to ask a token realm for a token.

    ``url`` is the realm with the challenge's scope and service merged into
    its query; ``what`` names the realm without query or userinfo, for
    messages; ``authorization`` is the Basic value when the credentials may
    go to this realm. Only ``what`` is in the repr.
    """

    url: httpx.URL = field(repr=False)
    what: str
    authorization: str | None = field(repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.authorization is None else {"Authorization": self.authorization}


class Credentials:
    """The upstream's username and password as a Basic value, and the hosts that may receive them."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.basic: str | None = None
        if config.username is not None:
            raw = f"{config.username}:{config.password or ''}".encode()
            self.basic = "Basic " + base64.b64encode(raw).decode("ascii")
        url = httpx.URL(config.url)
        self._host = (url.host or "").lower()
        self.origin = _origin(url)
        self._token_realms = frozenset(host.lower() for host in config.token_realms)

    def __repr__(self) -> str:
        return f"Credentials(host={self._host!r}, basic={'set' if self.basic else 'none'})"

    def token_request(self, challenge: Challenge) -> TokenRequest | None:
        """What to send to the challenge's realm; None when the realm is not an http(s) URL."""
        try:
            realm = httpx.URL(challenge.realm)
        except httpx.InvalidURL:
            return None
        if realm.scheme not in ("http", "https") or not realm.host:
            return None
        what = f"token from {realm.scheme}://{realm.netloc.decode('ascii')}{realm.path}"
        # A challenge's scope may name several, space separated; the realm
        # takes each as its own scope parameter.
        params: dict[str, str | list[str]] = {"scope": (challenge.scope or "").split()}
        if challenge.service:
            params["service"] = challenge.service
        authorization = self.basic if self._may_receive(realm) else None
        # Merged, not passed as params: httpx would replace a query the realm
        # already has.
        return TokenRequest(realm.copy_merge_params(params), what, authorization)

    def _may_receive(self, realm: httpx.URL) -> bool:
        if realm.scheme == "https":
            return True
        host = realm.host.lower()
        if host == self._host:
            return True
        return host in self._token_realms or f"{host}:{realm.port}" in self._token_realms


def parse_token(body: bytes) -> tuple[str, float] | None:
    """The token and its lifetime in seconds from a realm's answer; None when it holds no usable token."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
        return None
    lifetime = document.get("expires_in", _DEFAULT_TOKEN_LIFETIME)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
        lifetime = _DEFAULT_TOKEN_LIFETIME
    return token, float(lifetime)


class TokenSource(Protocol):
    """Where ``RegistryAuth`` gets a token it does not hold (``Upstream._fetch_token``).

    It returns the token and its lifetime in seconds, asked for as
    ``Credentials.token_request`` says and never with the registry's own
    token. When there is none to be had it raises the client's error
    (``UpstreamDenied``, ``UpstreamInvalid``, ``UpstreamUnavailable``), which
    ``RegistryAuth`` lets through to the caller of the request that met the
    challenge.
    """

    def __call__(self, challenge: Challenge) -> tuple[str, float]: ...


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float


class RegistryAuth(httpx.Auth):
    """Answers the upstream's 401 challenges and remembers what worked.

    One instance serves every thread. The lock guards the caches only, never
    a network call, so two threads missing the same token may both fetch it,
    which costs a request and nothing else. ``clock`` is the wall clock that
    token lifetimes are measured against.
    """

    def __init__(self, credentials: Credentials, tokens: TokenSource, clock: Callable[[], float]) -> None:
        self._origin = credentials.origin
        self._basic = credentials.basic
        self._fetch_token = tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._basic_wanted = False
        self._tokens: dict[Challenge, _Token] = {}
        self._challenges: dict[str, Challenge] = {}

    def __repr__(self) -> str:
        return f"RegistryAuth(basic={'set' if self._basic else 'none'}, tokens={len(self._tokens)})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) != self._origin:
            yield request
            return
        repository = _repository_of(request.url.path)
        sent = self._known_authorization(repository)
        if sent is not None:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401 or _origin(response.request.url) != self._origin:
            # A 401 from a host the upstream redirected to (a CDN, or anyone)
            # is not answered: it must not name a realm for the credentials.
            # (httpx drops the Authorization header when a redirect leaves
            # the origin.)
            return
        challenges = _challenges(response)
        bearer = challenges.get("bearer")
        if bearer is not None and bearer.get("realm"):
            challenge = Challenge(bearer["realm"], bearer.get("service"), bearer.get("scope"))
            # Free the connection before the token request may want one.
            response.read()
            authorization = f"Bearer {self._token(challenge, rejected=sent)}"
            with self._lock:
                self._challenges[repository] = challenge
        elif "basic" in challenges and self._basic is not None and sent != self._basic:
            authorization = self._basic
            with self._lock:
                self._basic_wanted = True
        else:
            # Nothing to answer the challenge with: the 401 is the answer.
            return
        # One retry only: a 401 to fresh credentials means they are refused.
        request.headers["Authorization"] = authorization
        yield request

    def _known_authorization(self, repository: str) -> str | None:
        with self._lock:
            challenge = self._challenges.get(repository)
            token = self._tokens.get(challenge) if challenge is not None else None
            if token is not None and token.expires_at > self._clock():
                return f"Bearer {token.value}"
            return self._basic if self._basic_wanted else None

    def _token(self, challenge: Challenge, rejected: str | None) -> str:
        """A live token for ``challenge``, other than the one just rejected."""
        with self._lock:
            cached = self._tokens.get(challenge)
            if cached is not None and cached.expires_at > self._clock() and f"Bearer {cached.value}" != rejected:
                return cached.value
        value, lifetime = self._fetch_token(challenge)
        now = self._clock()
        expires_at = now + lifetime - min(_EXPIRY_MARGIN, lifetime / 2)
        with self._lock:
            # Drop expired tokens here so the cache cannot grow without bound.
            self._tokens = {key: token for key, token in self._tokens.items() if token.expires_at > now}
            if expires_at > now:
                self._tokens[challenge] = _Token(value, expires_at)
        return value


def _challenges(response: httpx.Response) -> dict[str, dict[str, str]]:
    """The WWW-Authenticate challenges by lower-case scheme, first one wins."""
    found: dict[str, dict[str, str]] = {}
    for value in response.headers.get_list("www-authenticate"):
        scheme, _, rest = value.strip().partition(" ")
        params = {}
        for match in _AUTH_PARAM.finditer(rest):
            quoted, plain = match.group(2), match.group(3)
            params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
        found.setdefault(scheme.lower(), params)
    return found


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """Scheme, host and port, the port spelled out: what the credentials are bound to."""
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, (url.host or "").lower(), url.port or default


def _repository_of(path: str) -> str:
    """The repository a request is for; empty for ``/v2/`` itself."""
    match = _REPOSITORY_PATH.search(path)
    return match.group(1) if match else ""
