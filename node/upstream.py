"""The client Shoal nodes use to read from the upstream registry.

``Upstream`` speaks the read side of the OCI distribution API over two
``httpx.Client`` pools that every greenlet of a worker shares: one for blobs,
capped at the worker's fills, and one kept for manifests, tag checks and
tokens. Blob bodies are read below httpx, in pieces as large as what has
arrived (``node.transport``), and never content-decoded. It maps the upstream's
answers onto the node's domain errors: 404 becomes the matching "unknown"
error, 401/403 ``UpstreamDenied``, 429 ``TooManyRequests``, anything else
that is not a 200 (and every transport failure) ``UpstreamUnavailable``.
A blob can be asked for from a byte on (``open_blob(..., start=N)``), to
carry on a transfer that broke off: see ``open_blob`` for what is trusted.

Every answer is shown to the upstream's ``Budget`` (``node.budget``), which
pauses tag checks on a 429 or a low ``ratelimit-remaining``; the client
itself still sends whatever it is asked to, and a 429 it passes on carries
the pause as its ``Retry-After``.

Authentication follows the upstream's 401 challenges, as
``node.upstream_auth`` decides: HTTP Basic, or a bearer token from the
challenge's realm, which this client fetches for it (``_fetch_token``) so that
the token request is timed, observed and mapped like any other.

Secrets never appear in an error or a log record: messages name the upstream
by its URL and say what happened, and transport failures are described by
their kind only, because an exception's text can quote a header value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from node.budget import Budget
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
from node.min_rate import MinRate
from node.reference import Digest, digest_of, is_digest, parse_digest
from node.sources import FetchedManifest, Origin, Skip, TagAnswer
from node.transport import Urllib3Transport, abandon, read1
from node.upstream_auth import TOKEN_MAX, Challenge, Credentials, RegistryAuth, parse_token

logger = logging.getLogger(__name__)

MANIFEST_MAX = 4 * 1024 * 1024
# Upstream connections per worker for manifests, tag checks and tokens, kept
# apart from the blob connections (one per fill).
METADATA_CONNECTIONS = 16

# A tag list page is a small JSON document; a larger body is a misbehaving
# server, not something worth buffering.
_TAGS_MAX = 16 * 1024 * 1024
_RATE_LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True)
class ManifestHead:
    """The upstream's answer to ``HEAD /v2/<name>/manifests/<ref>``.

    ``media_type`` is empty when the upstream sent no Content-Type (a HEAD
    has no body to read it from); ``digest`` and ``size`` are None when the
    upstream did not send them.
    """

    digest: str | None
    media_type: str
    size: int | None


@dataclass(frozen=True)
class UpstreamManifest:
    data: bytes
    media_type: str
    # The Docker-Content-Digest header, unverified: the caller checks it.
    digest: str | None


@dataclass(frozen=True)
class TagPage:
    tags: list[str]
    # The query of the next page (its ``last``, and ``n`` when it has one),
    # when there is a next page: from the upstream's Link header
    # (rel="next"), or from the cache's own pagination. Never a URL: the view
    # makes the Link header from it, under the path and ``ns`` its client used.
    next: dict[str, str] | None = None


class Observer(Protocol):
    """Where the client reports what it did (``node.metrics.Metrics``)."""

    def upstream_request(self, registry: str, kind: str, status: int | None, seconds: float) -> None: ...

    def count(self, kind: str, counter: str, value: int = 1) -> None: ...

    def rate_limits(self, registry: str, seen: Mapping[str, str]) -> None: ...


class _Unobserved:
    def upstream_request(self, registry: str, kind: str, status: int | None, seconds: float) -> None:
        pass

    def count(self, kind: str, counter: str, value: int = 1) -> None:
        pass

    def rate_limits(self, registry: str, seen: Mapping[str, str]) -> None:
        pass


class BlobStream:
    """An open blob download; valid only inside ``Upstream.open_blob``.

    It yields the blob's bytes from ``start`` on, and ``size`` is the size
    of the whole blob (None when unknown). ``skip`` bytes of the body come
    before ``start`` and are read and dropped: an upstream that ignored a
    Range request sends the whole blob. A body that comes slower than
    ``min_rate`` allows raises ``UpstreamTooSlow`` from ``read``.
    """

    origin = Origin.UPSTREAM
    joined = False

    def __init__(
        self,
        response: httpx.Response,
        on_error: Callable[[httpx.HTTPError], ShoalError],
        observer: Observer,
        *,
        start: int = 0,
        size: int | None = None,
        skip: int = 0,
        min_rate: MinRate | None = None,
    ) -> None:
        self._response = response
        self._on_error = on_error
        self._observer = observer
        self._min_rate = min_rate
        self.start = start
        self.size = _content_length(response) if size is None else size
        self._skip = Skip(skip)

    def read(self, size: int) -> bytes:
        """The bytes as they arrive, at most ``size``; a failure part way raises ``UpstreamUnavailable``."""
        return self._skip.read(self._read, size)

    def _read(self, size: int) -> bytes:
        try:
            data = read1(self._response, size)
        except httpx.HTTPError as exc:
            raise self._on_error(exc) from None
        self._observer.count("blob", "bytes_pulled", len(data))
        if data and self._min_rate is not None:
            try:
                self._min_rate.add(len(data))
            except UpstreamTooSlow:
                # Closing it as usual would read the rest of a short body at the upstream's pace.
                abandon(self._response)
                raise
        return data


class Upstream:
    """A client for the upstream's read API, shared by every thread of a node."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
        blob_connections: int = 16,
        budget: Budget | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = config.url
        self.name = config.name
        self._min_rate, self._min_rate_window = config.min_rate, config.min_rate_window
        self._monotonic = monotonic
        self._observer: Observer = observer or _Unobserved()
        # Without one from the node, the pause is this client's own.
        self.budget = budget or Budget(config, clock=clock)
        self._credentials = Credentials(config)
        # Readers take a snapshot by reading the attribute; updates replace
        # the whole dict under the lock, so a reader never sees it change.
        self.rate_limits: dict[str, str] = {}
        self._rate_lock = threading.Lock()
        self._closed = False
        auth = RegistryAuth(self._credentials, self._fetch_token, clock)
        # Two pools: blobs (at most one connection per fill) and everything
        # else (manifests, tag checks, tokens), so that a burst of fills never
        # makes a tag check wait for a connection.
        # Blob bodies are read below httpx (node.transport), which caps its
        # own connections; httpx's limits apply to the other pool only.
        self._client = self._pool(config, transport, auth, METADATA_CONNECTIONS)
        self._blobs = self._pool(config, transport or Urllib3Transport(blob_connections), auth, blob_connections)

    def _pool(
        self, config: UpstreamConfig, transport: httpx.BaseTransport | None, auth: httpx.Auth, connections: int
    ) -> httpx.Client:
        return httpx.Client(
            base_url=config.url,
            transport=transport,
            auth=auth,
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            # Docker Hub sends blobs to a CDN. httpx drops the Authorization
            # header when a redirect leaves the origin.
            follow_redirects=True,
            # Sizes and digests are of the bytes as stored; a compressed
            # transfer would make Content-Length disagree with them.
            headers={"Accept-Encoding": "identity"},
            event_hooks={"response": [self._record_rate_limits]},
        )

    def head_manifest(self, name: str, reference: str) -> ManifestHead:
        what = f"manifest {_manifest_ref(name, reference)}"
        request = self._client.build_request(
            "HEAD", f"/v2/{name}/manifests/{reference}", headers={"Accept": ACCEPT_MANIFESTS}
        )
        with self._open(request, what, ManifestUnknown, "manifest") as response:
            return ManifestHead(
                digest=response.headers.get("docker-content-digest"),
                media_type=_content_type(response),
                size=_content_length(response),
            )

    def get_manifest(self, name: str, reference: str) -> UpstreamManifest:
        what = f"manifest {_manifest_ref(name, reference)}"
        request = self._client.build_request(
            "GET", f"/v2/{name}/manifests/{reference}", headers={"Accept": ACCEPT_MANIFESTS}
        )
        with self._open(request, what, ManifestUnknown, "manifest") as response:
            length = _content_length(response)
            if length is not None and length > MANIFEST_MAX:
                raise self._too_large(what, MANIFEST_MAX)
            data = _read_limited(response, MANIFEST_MAX, self._floor(what))
            if len(data) > MANIFEST_MAX:
                raise self._too_large(what, MANIFEST_MAX)
            self._observer.count("manifest", "bytes_pulled", len(data))
            media_type = _content_type(response) or _media_type_field(data)
            if not media_type:
                raise self._failure(UpstreamInvalid, f"{what}: no media type in the answer or the manifest")
            return UpstreamManifest(data, media_type, response.headers.get("docker-content-digest"))

    def head_blob(self, name: str, digest: Digest | str) -> int | None:
        """Whether the repository holds the blob (``BlobUnknown`` when not); its size when the upstream says it."""
        request = self._client.build_request("HEAD", f"/v2/{name}/blobs/{digest}")
        with self._open(request, f"blob {name}@{digest}", BlobUnknown, "blob") as response:
            return _content_length(response)

    def stat_blob(self, name: str, digest: Digest) -> int | None:
        return self.head_blob(name, digest)

    def confirm(self, name: str, digest: Digest, kind: str) -> None:
        """One HEAD: return when the repository ``name`` holds ``digest`` (``node.bindings.Confirmer``).

        ``kind`` is ``manifest`` or ``blob``. Raises ``ManifestUnknown`` or
        ``BlobUnknown`` when it does not, and this client's errors when the
        upstream cannot say.
        """
        if kind != "manifest":
            self.head_blob(name, digest)
            return
        head = self.head_manifest(name, str(digest))
        if head.digest is not None and head.digest != str(digest):
            raise self._failure(UpstreamInvalid, f"manifest {name}@{digest}: the answer names another digest")

    # The Source interface (node.sources): a node on its own fills from here.

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: Digest | str, start: int = 0) -> Iterator[BlobStream]:
        """Stream a blob from byte ``start`` on; the response is closed when the block ends.

        From a ``start`` past 0 the request carries ``Range: bytes=<start>-``.
        Only a 206 whose Content-Range runs from ``start`` to the end of the
        blob and names its size is taken as the rest of the blob. A 200 is
        the whole blob: it is read from its first byte and the bytes before
        ``start`` are dropped. A 206 for any other range is not used: the
        blob is asked for again without a Range, as a 200. Either way the
        stream yields the bytes from ``start`` on, and the caller's hash
        over the bytes it had and these covers the blob exactly once.
        """
        what = f"blob {name}@{digest}"
        path = f"/v2/{name}/blobs/{digest}"
        if start > 0:
            ranged = self._blobs.build_request("GET", path, headers={"Range": f"bytes={start}-"})
            with self._open(ranged, what, BlobUnknown, "blob", client=self._blobs, partial=True) as response:
                total = _rest_of_blob(response, start)
                if response.status_code == 200 or total is not None:
                    skip = start if response.status_code == 200 else 0
                    size = total if total is not None else _content_length(response)
                    yield self._blob_stream(response, what, start=start, size=size, skip=skip)
                    return
                logger.warning(
                    "upstream %s: %s: a 206 for another range (%s); asking for the whole blob",
                    self.url,
                    what,
                    response.headers.get("content-range", "no Content-Range"),
                )
        request = self._blobs.build_request("GET", path)
        with self._open(request, what, BlobUnknown, "blob", client=self._blobs) as response:
            yield self._blob_stream(response, what, start=start, skip=start)

    def _blob_stream(
        self, response: httpx.Response, what: str, *, start: int, size: int | None = None, skip: int = 0
    ) -> BlobStream:
        return BlobStream(
            response,
            lambda exc: self._unavailable(what, exc),
            self._observer,
            start=start,
            size=size,
            skip=skip,
            min_rate=self._floor(what),
        )

    def _floor(self, what: str) -> MinRate:
        """The minimum rate of one body from this upstream (``upstream.min_rate``), from now on."""
        return MinRate(
            self._min_rate,
            self._min_rate_window,
            f"upstream {self.url}: {what}",
            {"upstream": self.url},
            self._monotonic,
        )

    @contextlib.contextmanager
    def open_manifest(self, name: str, digest: Digest) -> Iterator[FetchedManifest]:
        answer = self.get_manifest(name, str(digest))
        yield FetchedManifest(answer.data, answer.media_type)

    def check_tag(self, name: str, tag: str) -> TagAnswer:
        """Ask the upstream what the tag points at now.

        A HEAD is cheap and Docker Hub does not count it against the pull
        limit, so the manifest itself is fetched only when the digest is new.
        An upstream that does not say the digest on HEAD gets a GET, and the
        manifest comes with the answer.
        """
        head = self.head_manifest(name, tag)
        if head.digest is not None:
            return TagAnswer(parse_digest(head.digest))
        fetched = self.get_manifest(name, tag)
        digest = digest_of(fetched.data)
        if fetched.digest is not None and fetched.digest != str(digest):
            raise UpstreamInvalid("the upstream sent a manifest that does not match its digest")
        return TagAnswer(digest, FetchedManifest(fetched.data, fetched.media_type))

    def tags(self, name: str, n: int | None = None, last: str | None = None) -> TagPage:
        what = f"tags of {name}"
        params: dict[str, str] = {}
        if n is not None:
            params["n"] = str(n)
        if last is not None:
            params["last"] = last
        request = self._client.build_request("GET", f"/v2/{name}/tags/list", params=params)
        with self._open(request, what, NameUnknown, "tags") as response:
            body = _read_limited(response, _TAGS_MAX, self._floor(what))
            if len(body) > _TAGS_MAX:
                raise self._too_large(what, _TAGS_MAX)
            document = _json_object(body)
            # Distribution answers "tags": null for a repository without tags.
            tags = None if document is None else (document.get("tags") or [])
            if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
                raise self._failure(UpstreamInvalid, f"{what}: the answer is not a tag list")
            return TagPage(tags, _next_page(response))

    def ping(self) -> None:
        """Check that the upstream answers ``GET /v2/`` (with auth) with 200."""
        with self._open(self._client.build_request("GET", "/v2/"), "ping", None, "ping"):
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
            self._blobs.close()

    @contextlib.contextmanager
    def _open(
        self,
        request: httpx.Request,
        what: str,
        not_found: type[ShoalError] | None,
        kind: str,
        *,
        use_auth: bool = True,
        client: httpx.Client | None = None,
        partial: bool = False,
    ) -> Iterator[httpx.Response]:
        """Send ``request`` streaming; yield the response only if it is a 200 (or, when ``partial``, a 206).

        A transport failure, including one while the block reads the body,
        becomes ``UpstreamUnavailable``. Each request is reported to the
        observer with its kind, status and time to the end of the block.
        """
        started = time.monotonic()
        client = client or self._client
        try:
            response = client.send(request, stream=True, auth=httpx.USE_CLIENT_DEFAULT if use_auth else None)
        except httpx.HTTPError as exc:
            self._observer.upstream_request(self.name, kind, None, time.monotonic() - started)
            raise self._unavailable(what, exc) from None
        try:
            if not (partial and response.status_code == 206):
                self._check(response, what, not_found)
            yield response
        except httpx.HTTPError as exc:
            raise self._unavailable(what, exc) from None
        finally:
            if request.method == "HEAD":
                # A HEAD's body is empty, but a response closed before its end
                # is read also closes its connection: every tag check and
                # confirmation would cost the next request a new connection
                # (a TLS handshake, against a real registry).
                with contextlib.suppress(httpx.HTTPError):
                    response.read()
            response.close()
            self._observer.upstream_request(self.name, kind, response.status_code, time.monotonic() - started)

    def _check(self, response: httpx.Response, what: str, not_found: type[ShoalError] | None) -> None:
        status = response.status_code
        if status == 200:
            return
        detail: dict[str, Any] = {"upstream": self.url, "status": status}
        if status == 404 and not_found is not None:
            # The upstream answered; the content just is not there. Not a
            # failure worth a warning.
            logger.debug("upstream %s: %s: not found", self.url, what)
            raise not_found(f"{what} is unknown to upstream {self.url}", detail)
        if status in (401, 403):
            raise self._failure(UpstreamDenied, f"{what}: denied (HTTP {status})", detail)
        if status == 429:
            # The budget read this answer already (the response hook): its
            # pause is how long the client should wait too.
            error = self._failure(TooManyRequests, f"{what}: too many requests (HTTP 429)", detail)
            paused = self.budget.paused()
            if paused > 0:
                error.retry_after = math.ceil(paused)
                detail["retry_after"] = error.retry_after
            raise error
        raise self._failure(UpstreamUnavailable, f"{what}: unexpected answer (HTTP {status})", detail)

    def _fetch_token(self, challenge: Challenge) -> tuple[str, float]:
        """A token and its lifetime in seconds from the challenge's realm (the auth's ``TokenSource``)."""
        asked = self._credentials.token_request(challenge)
        if asked is None:
            raise self._failure(UpstreamInvalid, "the token realm in the upstream's challenge is not an http(s) URL")
        # A fresh request: the token request must never carry the registry's
        # own bearer token, so the client's auth is switched off for it.
        request = self._client.build_request("GET", asked.url, headers=asked.headers)
        with self._open(request, asked.what, None, "token", use_auth=False) as response:
            body = _read_limited(response, TOKEN_MAX, self._floor(asked.what))
        if len(body) > TOKEN_MAX:
            raise self._too_large(asked.what, TOKEN_MAX)
        token = parse_token(body)
        if token is None:
            raise self._failure(UpstreamInvalid, f"{asked.what}: the answer holds no usable token")
        return token

    def _record_rate_limits(self, response: httpx.Response) -> None:
        self.budget.record(response.status_code, response.headers)
        seen = {key: response.headers[key] for key in _RATE_LIMIT_HEADERS if key in response.headers}
        if seen:
            with self._rate_lock:
                self.rate_limits = {**self.rate_limits, **seen}
            self._observer.rate_limits(self.name, seen)

    def _unavailable(self, what: str, exc: httpx.HTTPError) -> ShoalError:
        return self._failure(UpstreamUnavailable, f"{what}: {_describe(exc)}")

    def _too_large(self, what: str, limit: int) -> ShoalError:
        return self._failure(UpstreamInvalid, f"{what}: the answer is larger than {limit} bytes")

    def _failure(self, cls: type[ShoalError], message: str, detail: object | None = None) -> ShoalError:
        """Build the error for a failed exchange and log it; the caller raises it."""
        text = f"upstream {self.url}: {message}"
        logger.warning("%s", text)
        return cls(text, {"upstream": self.url} if detail is None else detail)


def _manifest_ref(name: str, reference: str) -> str:
    return f"{name}@{reference}" if is_digest(reference) else f"{name}:{reference}"


def _content_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _rest_of_blob(response: httpx.Response, start: int) -> int | None:
    """The blob's size, when ``response`` is a 206 of exactly the bytes from ``start`` to the end; else None."""
    if response.status_code != 206:
        return None
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    if match is None:
        return None
    first, last, total = (int(group) for group in match.groups())
    if first != start or last != total - 1:
        return None
    length = _content_length(response)
    if length is not None and length != total - start:
        return None
    return total


def _next_page(response: httpx.Response) -> dict[str, str] | None:
    """The ``n`` and ``last`` of the upstream's next page (Link, rel="next"); None without one.

    Only these two are kept: they are all Shoal passes on to the upstream.
    A next link without a ``last`` cannot be followed through Shoal (it
    would ask for the same page again), so it is dropped.
    """
    url = response.links.get("next", {}).get("url")
    if url is None:
        return None
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    if not query.get("last"):
        logger.debug("upstream tag list: a next link without last; not passed on")
        return None
    return {key: query[key] for key in ("n", "last") if key in query}


def _media_type_field(data: bytes) -> str:
    """The manifest's own ``mediaType``, or empty if it has none."""
    try:
        document = json.loads(data)
    except ValueError:
        return ""
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if isinstance(media_type, str) else ""


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _read_limited(response: httpx.Response, limit: int, floor: MinRate) -> bytes:
    """At most ``limit + 1`` bytes of the body: enough to tell it is too large.

    Memory stays within the limit plus one network chunk, whatever the
    upstream sends or claims in Content-Length, and a body slower than
    ``floor`` raises ``UpstreamTooSlow``.
    """
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        floor.add(len(chunk))
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            break
    return b"".join(chunks)[: limit + 1]


def _describe(exc: httpx.HTTPError) -> str:
    """What went wrong, by kind only: an exception's text can quote a header."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    if isinstance(exc, httpx.TooManyRedirects):
        return "too many redirects"
    return f"request failed ({type(exc).__name__})"
