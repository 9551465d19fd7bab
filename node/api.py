"""The OCI Distribution API, read side, as Flask views.

Views validate what the client sent, ask the proxy store, and shape the
response. Every error, raised anywhere below, is rendered here once as an
OCI error body. A mirror is read-only: every write answers 405 UNSUPPORTED.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
from collections.abc import Iterator, Mapping

from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from node.auth import CATALOG, Client, Scope, Unauthorized, pull
from node.errors import NotFound, PaginationInvalid, RangeInvalid, RegistryUnknown, ShoalError, Unsupported
from node.metrics import Metrics
from node.reference import Digest, is_digest, normalize_name, parse_digest, parse_name, parse_tag
from node.responses import file_body, growing_body
from node.services import services
from node.storage.fill import Followed
from node.storage.proxy import Blob, Manifest, ProxyStore
from node.upstream import TagPage
from protos.metrics import error_key, registry_key

log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
_CONTENT = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")
_TAGS = re.compile(r"(?P<name>.+)/tags/list")
_PAGE_SIZE = re.compile(r"[0-9]{1,9}")
# A byte position has at most 19 digits (Go's int64, as in http.ServeContent).
_POSITION = re.compile(r"[0-9]{1,19}")
PAGE_MAX = 10000
LAST_MAX = 256

api = Blueprint("registry", __name__)


def _route(path: str) -> tuple[ProxyStore, str, bool]:
    node = services()
    return route(node.proxies, node.config.default_upstream, path, request.args.get("ns"))


def route(
    proxies: Mapping[str, ProxyStore], default: str | None, path: str, namespace: str | None
) -> tuple[ProxyStore, str, bool]:
    """Which registry a request is for, and the path within it.

    In this order: containerd's ``ns`` query parameter; a first path
    component that is a registry host (it has a dot or a colon, or is
    localhost, as Docker tells registries from repositories), for podman and
    CRI-O mirrors with a location like ``mirror:5000/ghcr.io``; else the
    default upstream. A registry that is not configured is never answered
    from another one. The flag says whether the request named the registry.
    """
    if namespace is not None:
        return _registry(proxies, namespace.strip().lower()), path, True
    first, _, rest = path.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return _registry(proxies, first.lower()), rest, True
    if default is None:
        raise RegistryUnknown("this mirror has no default registry: name one with ?ns= or a path prefix")
    return proxies[default], path, False


def _registry(proxies: Mapping[str, ProxyStore], name: str) -> ProxyStore:
    store = proxies.get(name)
    if store is None:
        raise RegistryUnknown("this mirror does not mirror that registry", {"registry": name[:255]})
    return store


def _metrics() -> Metrics:
    return services().metrics


@api.route("/v2/", methods=["GET", "HEAD", *WRITE_METHODS])
def base() -> Response:
    if request.method in WRITE_METHODS:
        raise Unsupported("this registry is a read-only mirror")
    admit(None, None)
    return jsonify({})


def admit(scope: Scope | None, registry: str | None) -> None:
    """Raise ``Unauthorized`` unless this request's client may have ``scope`` (``node.auth``)."""
    client = Client(request.remote_addr, request.headers.get("Authorization"))
    services().gate.admit(client, scope, registry)


@api.route("/v2/<path:path>", methods=["GET", "HEAD", *WRITE_METHODS])
def registry(path: str) -> Response:
    if request.method in WRITE_METHODS:
        raise Unsupported("this registry is a read-only mirror: pushes and deletes are not supported")
    store, path, named = _route(path)
    registry_name = store.config.name
    if path == "_catalog":
        g.endpoint = "catalog"
        admit(CATALOG, registry_name)
        return _page_response(store.catalog(*_pagination()), "repositories")
    tags = _TAGS.fullmatch(path)
    if tags:
        g.endpoint = "tags"
        name = _name(store, tags["name"])
        admit(pull(f"{registry_name}/{name}" if named else name), registry_name)
        return _page_response(store.tags(name, *_pagination()), "tags", tags["name"])
    content = _CONTENT.fullmatch(path)
    if not content:
        admit(None, registry_name)
        raise NotFound("no such registry endpoint", {"path": path[:256]})
    name = _name(store, content["name"])
    admit(pull(f"{registry_name}/{name}" if named else name), registry_name)
    g.endpoint = content["kind"]
    if content["kind"] == "blobs":
        return _blob(store, name, parse_digest(content["reference"]))
    return _manifest(store, name, content["reference"])


def _name(store: ProxyStore, raw: str) -> str:
    return normalize_name(parse_name(raw), store.config.is_docker_hub)


def _pagination() -> tuple[int | None, str | None]:
    """``n`` and ``last`` as distribution reads them: an empty one is as good as none.

    ``n`` is a whole number in ASCII digits (``str.isdigit`` would take a
    superscript two) from 0 to ``PAGE_MAX``; 0 answers an empty page.
    """
    n_text = request.args.get("n") or None
    n = None
    if n_text is not None:
        if not _PAGE_SIZE.fullmatch(n_text) or int(n_text) > PAGE_MAX:
            raise PaginationInvalid(f"n must be a whole number from 0 to {PAGE_MAX}", {"n": n_text[:16]})
        n = int(n_text)
    last = request.args.get("last") or None
    if last is not None and len(last) > LAST_MAX:
        raise PaginationInvalid(f"last is longer than {LAST_MAX} characters")
    return n, last


def _page_response(page: TagPage, field: str, name: str | None = None) -> Response:
    body: dict[str, object] = {field: page.tags}
    if name is not None:
        body = {"name": name, **body}
    response = jsonify(body)
    if page.next is not None:
        response.headers["Link"] = _next_link(page.next)
    return response


def _next_link(query: Mapping[str, str]) -> str:
    """The Link to the next page, back at this mirror: the path the client asked for, and its ``ns``.

    The path keeps a registry prefix and the name as the client wrote it
    (``alpine``, not ``library/alpine``); only the page's ``n`` and
    ``last`` come from the page, so an upstream's link never sends a client
    elsewhere.
    """
    params = dict(query)
    namespace = request.args.get("ns")
    if namespace is not None:
        params["ns"] = namespace
    path = urllib.parse.quote(request.path, safe="/:")
    return f'<{path}?{urllib.parse.urlencode(params)}>; rel="next"'


def _manifest(store: ProxyStore, name: str, reference: str) -> Response:
    manifest = store.manifest(name, reference_of(reference))
    headers = manifest_headers(manifest)
    if _not_modified(manifest.digest):
        return Response(status=304, headers=headers)
    if request.method == "GET":
        count(_metrics(), store, "manifest", manifest.outcome, len(manifest.data), joined=False)
    # For HEAD, werkzeug sends the headers of this body and leaves the body out.
    return Response(manifest.data, headers=headers)


def reference_of(reference: str) -> str:
    """A manifest reference, a digest or a tag, once it is valid."""
    if not is_digest(reference):
        parse_tag(reference)
    return reference


def manifest_headers(manifest: Manifest) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(manifest.digest),
        "ETag": f'"{manifest.digest}"',
        "Content-Type": manifest.media_type,
        "Content-Length": str(len(manifest.data)),
    }


def _blob(store: ProxyStore, name: str, digest: Digest) -> Response:
    with store.blob(name, digest, head=request.method == "HEAD") as blob:
        size = blob.size
        headers = {
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        span = _range(request.headers.get("Range"), size, headers["ETag"])
        status = 200
        if span is not None and size is not None:
            headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
            status = 206
        start, end = span or (0, size)
        if end is not None:
            headers["Content-Length"] = str(end - start)
        if _not_modified(digest):
            return Response(status=304, headers=headers)
        if request.method == "HEAD":
            return Response(status=status, headers=headers)
        return _blob_body(store, blob, start, end, status, headers)


def _blob_body(
    store: ProxyStore, blob: Blob, start: int, end: int | None, status: int, headers: dict[str, str]
) -> Response:
    """The response that sends the blob; it takes the blob's open file over."""
    if blob.stored is not None:
        count(_metrics(), store, "blob", blob.outcome, (end or 0) - start, joined=False)
        body = file_body(blob.stored.detach(), start)
        return Response(body, status=status, headers=headers, direct_passthrough=True)
    assert blob.following is not None
    outcome, joined = blob.outcome, blob.following.joined
    followed = store.fills.follow(blob.following.detach(), start, end)
    try:
        followed.begin()
    except BaseException:
        followed.close()
        raise
    if end is None:
        count(_metrics(), store, "blob", outcome, 0, joined=joined)
        return Response(_pushed(followed, _metrics()), status=status, headers=headers, direct_passthrough=True)
    count(_metrics(), store, "blob", outcome, end - start, joined=joined)
    return Response(growing_body(followed), status=status, headers=headers, direct_passthrough=True)


def count(metrics: Metrics, store: ProxyStore, kind: str, outcome: str, pushed: int, *, joined: bool) -> None:
    """Count a GET of content: requests = hits + misses + peer_hits, in all and per registry."""
    metrics.count(kind, "requests")
    metrics.count(kind, outcome)
    metrics.add(registry_key(kind, "requests", store.config.name))
    metrics.add(registry_key(kind, outcome, store.config.name))
    metrics.count(kind, "bytes_pushed", pushed)
    if joined:
        metrics.count(kind, "follower_joins")


def _pushed(body: Followed, metrics: Metrics) -> Iterator[bytes]:
    """Count the bytes of a followed fill of unknown size as they go out.

    ``metrics`` is taken before: the body is sent after the request's
    application context has ended, where ``services()`` is not available.
    """
    try:
        for chunk in body:
            metrics.count("blob", "bytes_pushed", len(chunk))
            yield chunk
    finally:
        body.close()


def _range(header: str | None, size: int | None, etag: str) -> tuple[int, int] | None:
    """The byte span ``[start, end)`` a ``Range`` header asks for, or None for the whole body.

    As Go's ``http.ServeContent`` decides (distribution serves blobs with
    it), with two differences RFC 9110 allows or asks for: a unit other
    than ``bytes`` is ignored, and a suffix of 0 bytes is unsatisfiable.

    - No header, an unknown size (a fill of unknown length), or no range
      in the list (``bytes=``): the whole body.
    - Any malformed range in the list (not ``first-last``, ``-suffix`` or
      ``first-``; a position that is not ASCII digits or has more than 19
      of them; ``last`` before ``first``): 416 ``RANGE_INVALID``.
    - Ranges that all start past the end: 416.
    - One satisfiable range: that range (a 206).
    - Several, or ranges that add up to more than the blob: the whole body
      (Go sends several as multipart/byteranges, which no registry client
      asks for; a 200 of the whole is allowed by RFC 9110). So is a suffix
      of an empty blob.
    - An ``If-Range`` that is not this blob's ETag: the whole body.
    """
    if header is None or size is None:
        return None
    header = header.strip()
    if header[:6].lower() != "bytes=":
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        return None
    spans: list[tuple[int, int]] = []
    beyond = False
    for part in header[6:].split(","):
        part = part.strip(" \t")
        if not part:
            continue
        first, dash, last = part.partition("-")
        first, last = first.strip(" \t"), last.strip(" \t")
        if not dash or not (first or last):
            raise RangeInvalid("invalid range", size)
        if any(position and not _POSITION.fullmatch(position) for position in (first, last)):
            raise RangeInvalid("invalid range", size)
        if not first:
            suffix = int(last)
            if suffix == 0:
                raise RangeInvalid("range not satisfiable", size)
            if size == 0:
                # Nothing to send a part of: the whole (empty) body.
                continue
            spans.append((max(size - suffix, 0), size))
            continue
        start = int(first)
        if last and int(last) < start:
            raise RangeInvalid("invalid range", size)
        if start >= size:
            beyond = True
            continue
        spans.append((start, size if not last else min(int(last) + 1, size)))
    if not spans:
        if beyond:
            raise RangeInvalid("range not satisfiable", size)
        return None
    if len(spans) > 1 or sum(end - start for start, end in spans) > size:
        return None
    return spans[0]


def _not_modified(digest: Digest) -> bool:
    """Whether ``If-None-Match`` names this content: its ETag (weakly compared, RFC 9110), or ``*``."""
    return request.if_none_match.contains_weak(str(digest))


def register(app: Flask) -> None:
    app.register_blueprint(api)
    app.register_error_handler(ShoalError, _shoal_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_started_at)
    app.after_request(_api_version)


def error_response(code: str, message: str, status: int, detail: object | None = None) -> Response:
    return Response(error_body(code, message, detail), status=status, content_type="application/json")


def error_body(code: str, message: str, detail: object | None = None) -> bytes:
    """An OCI error body: ``{"errors": [{"code", "message", "detail"}]}``."""
    # As Flask's jsonify writes it: compact, keys sorted, a newline at the end.
    document = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def shoal_error_parts(error: ShoalError, metrics: Metrics) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body that answer ``error``, counted in ``metrics``."""
    metrics.add(error_key(error.code))
    headers = {}
    if isinstance(error, RangeInvalid):
        headers["Content-Range"] = f"bytes */{error.size}"
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = error.challenge
    return error.status, headers, error_body(error.code, error.message, error.detail)


def _shoal_error(error: ShoalError) -> Response:
    status, headers, body = shoal_error_parts(error, _metrics())
    return Response(body, status=status, headers=headers, content_type="application/json")


def _http_error(error: HTTPException) -> Response:
    code = {405: "UNSUPPORTED", 404: "NOT_FOUND"}.get(error.code or 0, "UNKNOWN")
    _metrics().add(error_key(code))
    if error.code == 405:
        return error_response("UNSUPPORTED", "method not allowed", 405)
    if error.code == 404:
        return error_response("NOT_FOUND", "no such endpoint", 404)
    return error_response("UNKNOWN", error.description or "bad request", error.code or 400)


def _unexpected_error(error: Exception) -> Response:
    _metrics().add(error_key("UNKNOWN"))
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response("UNKNOWN", "internal error", 500)


def _started_at() -> None:
    g.started = time.perf_counter()


def _api_version(response: Response) -> Response:
    response.headers[API_VERSION[0]] = API_VERSION[1]
    endpoint = g.get("endpoint") or (request.blueprint or "other")
    _metrics().observe_request(endpoint, time.perf_counter() - g.get("started", time.perf_counter()))
    return response
