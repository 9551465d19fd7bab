"""Manifest requests answered in front of Flask: the request a pull makes most, at a fraction of the cost.

Every pull asks for manifests before any blob (the tag, then a platform's
manifest by digest), and a CI fleet asks for the same few tags thousands of
times a minute; a warm one comes from the worker's memory
(``node/storage/memory.py``). Flask's request and response machinery cost
several times what the answer itself does (docs/benchmarks.md, "Manifest
requests"), so ``GET`` and ``HEAD`` of ``/v2/<name>/manifests/<reference>``
are answered by this WSGI layer, which the app's ``wsgi_app`` passes
through first. It takes the steps of ``node.api``'s views with their own
functions: ``route``, the name and reference checks, the gate, the proxy
store, ``manifest_headers``, ``count``, and ``shoal_error_parts`` for
every error, so an answer here is the answer Flask would give, byte for byte.

Everything else goes on to Flask, and so does a manifest request Flask
would treat differently: a path with an empty segment (werkzeug redirects
it), one that is not ASCII, and any request on the ``server.metrics_bind``
listener (which serves the operator's endpoints only, ``node.status``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from werkzeug.http import is_entity_header, parse_etags

from node.api import (
    API_VERSION,
    count,
    error_body,
    manifest_headers,
    reference_of,
    route,
    shoal_error_parts,
)
from node.auth import Client, pull
from node.errors import ShoalError
from node.reference import normalize_name, parse_name
from node.services import Services
from node.storage.proxy import ProxyStore
from protos.metrics import error_key

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_PATH = re.compile(r"/v2/(?P<path>[^/].*/manifests/[^/]+)")
_REFERENCE = re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)")


class ManifestRoute:
    """The WSGI app that answers manifest requests and hands every other request to ``app``."""

    def __init__(self, app: WSGIApp, services: Services) -> None:
        self._app = app
        self._services = services
        metrics_bind = services.config.server.metrics_bind
        self._metrics_port = int(metrics_bind.rpartition(":")[2]) if metrics_bind else None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        path_info = environ.get("PATH_INFO", "")
        # A substring test first: every other request (blobs above all) pays only that.
        matched = _PATH.fullmatch(path_info) if "/manifests/" in path_info and method in ("GET", "HEAD") else None
        if matched is None or "//" in path_info or not path_info.isascii() or self._on_metrics_listener(environ):
            return self._app(environ, start_response)
        node, started = self._services, time.perf_counter()
        try:
            store, path, named = route(node.proxies, node.config.default_upstream, matched["path"], _namespace(environ))
            parts = _REFERENCE.fullmatch(path)
            if parts is None:
                # Only a registry prefix before /manifests/: Flask's NotFound, after its admission.
                return self._app(environ, start_response)
            status, headers, body = self._answer(environ, store, parts, named, head=method == "HEAD")
        except ShoalError as error:
            status, headers, body = shoal_error_parts(error, node.metrics)
            headers.update(_json_headers(body))
        except Exception:
            log.exception("unexpected error on %s %s", method, path_info)
            node.metrics.add(error_key("UNKNOWN"))
            body = error_body("UNKNOWN", "internal error")
            status, headers = 500, _json_headers(body)
        headers[API_VERSION[0]] = API_VERSION[1]
        node.metrics.observe_request("manifests", time.perf_counter() - started)
        start_response(f"{status} {HTTPStatus(status).phrase}", list(headers.items()))
        return [] if method == "HEAD" or status == 304 else [body]

    def _answer(
        self, environ: dict[str, Any], store: ProxyStore, parts: re.Match[str], named: bool, *, head: bool
    ) -> tuple[int, dict[str, str], bytes]:
        node = self._services
        name = normalize_name(parse_name(parts["name"]), store.config.is_docker_hub)
        client = Client(environ.get("REMOTE_ADDR"), environ.get("HTTP_AUTHORIZATION"))
        node.gate.admit(client, pull(f"{store.config.name}/{name}" if named else name), store.config.name)
        manifest = store.manifest(name, reference_of(parts["reference"]))
        headers = manifest_headers(manifest)
        if parse_etags(environ.get("HTTP_IF_NONE_MATCH")).contains_weak(str(manifest.digest)):
            # As werkzeug answers a 304: without the body's own headers.
            return 304, {key: value for key, value in headers.items() if not is_entity_header(key)}, b""
        if not head:
            count(node.metrics, store, "manifest", manifest.outcome, len(manifest.data), joined=False)
        return 200, headers, manifest.data

    def _on_metrics_listener(self, environ: dict[str, Any]) -> bool:
        if self._metrics_port is None:
            return False
        sock = environ.get("gunicorn.socket")
        try:
            return sock is None or int(sock.getsockname()[1]) == self._metrics_port
        except (OSError, IndexError, TypeError, ValueError):
            return True


def _json_headers(body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", "Content-Length": str(len(body))}


def _namespace(environ: dict[str, Any]) -> str | None:
    """The first ``ns`` query parameter, as werkzeug's ``request.args`` reads it."""
    query = environ.get("QUERY_STRING", "")
    if "ns" not in query:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True, errors="replace"):
        if key == "ns":
            return value
    return None
