"""An in-process fake upstream registry whose failures tests can script.

The real registry (``testbed.registry``) cannot be told to corrupt a
blob, drop a connection half-way, or hold a response until the test says so;
this one can. It speaks just enough of the distribution API for a pull:
``/v2/``, manifests by tag or digest, blobs and tag lists, on GET and HEAD.

Faults are keyed by the digest of the content they affect, so they apply to
blobs and to manifests alike (a manifest fetched by tag is affected by the
fault on its digest). They only change GET bodies; headers, including
``Content-Length`` and ``Docker-Content-Digest``, always describe the true
content, as they would from a real upstream that fails mid-transfer.

A ``RateLimit`` (``set_rate_limit``) plays Docker Hub's rate limits on the
whole registry: the ``ratelimit-*`` headers on every answer, and 429s.

A tag list honours ``n`` and ``last`` and links to the next page, as
distribution 3 does. A peer's content endpoint
(``/internal/v1/content/<digest>``) serves any blob the fake holds, faults
and all, so a test can play a misbehaving peer.

A blob GET with ``Range: bytes=<first>-`` is answered 206 with the bytes
from there on, as distribution answers it, unless ``honour_range`` is off
(then it is a 200 of the whole blob, as from an upstream that ignores
Range). ``bytes_sent`` counts the body bytes written per path, so a test can
tell how much of a blob the upstream sent in all. A piece is counted before
it is written (and taken back if the write fails), so the count is complete
by the time the client has read the body.

``add_generated_blobs`` serves many blobs made up on the fly (a test of a
thousand misses holds their digests, not their bytes), and
``most_blob_bodies_at_once`` says how many blob bodies were being sent at
the same time at most, so a test can check a client's cap on its fetches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from testbed.images import Image, Index, sha256_digest

_MANIFEST_OR_BLOB = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")
_TAGS_LIST = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
_CDN = re.compile(r"^/cdn/(?P<digest>[^/]+)$")
_PEER = re.compile(r"^/internal/v1/content/(?P<digest>[^/]+)$")
_RANGE = re.compile(r"bytes=(?P<first>\d+)-")


@dataclass
class Fault:
    """How to misbehave when serving the body of one piece of content.

    The body is written in ``chunk_size`` pieces. ``corrupt`` flips the last
    byte, so the length is right and the digest is not. ``die_after`` closes
    the connection once that many body bytes are out, although the headers
    promised the full length. ``gate`` holds everything after the first chunk
    until the event is set; ``reached`` is set when a response is waiting
    there, so a test can await that point instead of guessing. ``chunk_delay``
    pauses between chunks to make a slow upstream. ``content_encoding`` is
    sent as the ``Content-Encoding`` header (a wrong one: the body is the
    content as it is). ``redirect`` answers a GET with a 307 to
    ``/cdn/<digest>``, which serves the content as a CDN would. ``rate``
    paces the body at that many bytes a second. ``no_length`` leaves
    ``Content-Length`` out and ends the body by closing the connection, as
    an upstream that does not know the size would.
    """

    corrupt: bool = False
    die_after: int | None = None
    gate: threading.Event | None = None
    chunk_delay: float = 0.0
    chunk_size: int = 16 * 1024
    content_encoding: str | None = None
    redirect: bool = False
    rate: float | None = None
    no_length: bool = False
    # A gate never opened must not keep a handler thread forever.
    gate_timeout: float = 60.0
    reached: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class RateLimit:
    """Docker Hub's rate-limit answers, for every request but ``/v2/``.

    ``remaining`` (with ``limit`` and the window ``window``) is sent on every
    answer as ``ratelimit-limit: <limit>;w=<window>`` and ``ratelimit-remaining:
    <remaining>;w=<window>``; None sends neither. ``refuse`` answers manifest
    requests by tag (``refuse_digests`` also those by digest) with 429
    TOOMANYREQUESTS, with ``retry_after`` as the ``Retry-After`` header when
    given; blobs are never refused. ``headers`` are sent as they are on every
    answer, malformed ones included.
    """

    remaining: int | None = None
    limit: int = 100
    window: int = 21600
    refuse: bool = False
    refuse_digests: bool = False
    retry_after: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BlobGet:
    """A GET of a blob: when it arrived (``time.monotonic``) and its Range header, if any."""

    at: float
    range: str | None


class FakeUpstream:
    """A registry on 127.0.0.1 served from dicts, with per-digest faults and a request log.

    The port is chosen at construction and kept: ``down()`` closes the
    listening socket and every open connection, so clients get connection
    errors, and ``up()`` listens on the same port again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Content by repository: manifests and blobs by digest, tags to digests.
        self._manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._blobs: dict[tuple[str, str], bytes] = {}
        # Blobs made on request from (seed, size): see add_generated_blobs.
        self._generated: dict[tuple[str, str], tuple[bytes, int]] = {}
        self._bodies_now = 0
        self._bodies_most = 0
        self._tags: dict[str, dict[str, str]] = {}
        self._faults: dict[str, Fault] = {}
        self._rate_limit = RateLimit()
        self._requests: list[tuple[str, str]] = []
        self._sent: dict[str, int] = {}
        self._blob_gets: list[tuple[str, BlobGet]] = []
        # Whether a blob GET with a Range header gets a 206 of that range.
        self.honour_range = True
        self._connections: set[socket.socket] = set()
        # Every connection a client opened, since the start.
        self.connections_opened = 0
        self.server_log: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Set while the server is down, so handlers parked at a gate give up.
        self._stopping = threading.Event()
        self.port = 0
        self.up()

    # Content.

    def add_image(self, name: str, tag: str, image: Image | Index) -> None:
        """Serve ``image`` (with its children and blobs) as ``name:tag``; a later call may move the tag."""
        with self._lock:
            for digest, (media_type, manifest) in image.manifests.items():
                self._manifests[(name, digest)] = (media_type, manifest)
            for digest, data in image.blobs.items():
                self._blobs[(name, digest)] = data
            self._tags.setdefault(name, {})[tag] = image.digest

    def add_blob(self, name: str, data: bytes) -> str:
        """Serve ``data`` as a blob of ``name``; return its digest."""
        digest = sha256_digest(data)
        with self._lock:
            self._blobs[(name, digest)] = data
        return digest

    def add_generated_blobs(self, name: str, count: int, size: int, seed: str = "") -> list[str]:
        """Serve ``count`` distinct blobs of ``size`` bytes as blobs of ``name``; return their digests.

        Their bytes are made again for each request (``generated_blob``), so
        a thousand of them cost the test their digests only.
        """
        digests = []
        for number in range(count):
            key = f"{seed}/{number}".encode()
            digest = sha256_digest(generated_blob(key, size))
            with self._lock:
                self._generated[(name, digest)] = (key, size)
            digests.append(digest)
        return digests

    @property
    def most_blob_bodies_at_once(self) -> int:
        """The most blob bodies (GETs of blobs) that were being sent at the same time."""
        with self._lock:
            return self._bodies_most

    def remove_tag(self, name: str, tag: str) -> None:
        with self._lock:
            self._tags.get(name, {}).pop(tag, None)

    # Faults.

    def set_fault(
        self,
        digest: str,
        *,
        corrupt: bool = False,
        die_after: int | None = None,
        gate: threading.Event | None = None,
        chunk_delay: float = 0.0,
        chunk_size: int = 16 * 1024,
        content_encoding: str | None = None,
        redirect: bool = False,
        rate: float | None = None,
        no_length: bool = False,
    ) -> Fault:
        """Make every later GET of the content with ``digest`` misbehave; replaces an earlier fault."""
        fault = Fault(
            corrupt=corrupt,
            die_after=die_after,
            gate=gate,
            chunk_delay=chunk_delay,
            chunk_size=chunk_size,
            content_encoding=content_encoding,
            redirect=redirect,
            rate=rate,
            no_length=no_length,
        )
        with self._lock:
            self._faults[digest] = fault
        return fault

    def clear_faults(self, digest: str | None = None) -> None:
        """Remove the fault on ``digest``, or all faults."""
        with self._lock:
            if digest is None:
                self._faults.clear()
            else:
                self._faults.pop(digest, None)

    def set_rate_limit(self, rate_limit: RateLimit | None) -> None:
        """Answer as ``rate_limit`` says from now on; None sends no rate-limit headers and refuses nothing."""
        with self._lock:
            self._rate_limit = rate_limit or RateLimit()

    # Requests.

    @property
    def requests(self) -> list[tuple[str, str]]:
        """A copy of every ``(method, path)`` received so far, oldest first; path as sent."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self._requests.count((method, path))

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._sent.clear()
            self._blob_gets.clear()

    def blob_gets(self, path: str) -> list[BlobGet]:
        """Every GET of the blob at ``path`` (as sent), oldest first."""
        with self._lock:
            return [get for seen, get in self._blob_gets if seen == path]

    def ranges(self, path: str) -> list[str | None]:
        """The Range header of every blob GET of ``path`` (None where it had none), oldest first."""
        return [get.range for get in self.blob_gets(path)]

    def bytes_sent(self, path: str) -> int:
        """Body bytes written so far in answers to GETs of ``path`` (as sent), all requests together."""
        with self._lock:
            return self._sent.get(path, 0)

    # Lifecycle.

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def up(self) -> None:
        """Listen again (on the same port after the first time). Idempotent."""
        if self._server is not None:
            return
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.upstream = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def down(self) -> None:
        """Stop listening and cut every open connection, so clients see connection errors. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop serving for good. Idempotent."""
        self.down()

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Used by the handler.

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def _record_blob_get(self, path: str, asked: str | None) -> None:
        with self._lock:
            self._blob_gets.append((path, BlobGet(time.monotonic(), asked)))

    def _count_sent(self, path: str, size: int) -> None:
        with self._lock:
            self._sent[path] = self._sent.get(path, 0) + size

    def _track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
                self.connections_opened += 1
            else:
                self._connections.discard(connection)

    def _lookup_manifest(self, name: str, reference: str) -> tuple[str, bytes] | None:
        with self._lock:
            digest = reference if ":" in reference else self._tags.get(name, {}).get(reference)
            return self._manifests.get((name, digest)) if digest is not None else None

    def _lookup_blob(self, name: str, digest: str) -> bytes | None:
        with self._lock:
            found = self._blobs.get((name, digest))
            generated = self._generated.get((name, digest))
        if found is None and generated is not None:
            found = generated_blob(*generated)
        return found

    @contextlib.contextmanager
    def _sending_blob(self) -> Iterator[None]:
        with self._lock:
            self._bodies_now += 1
            self._bodies_most = max(self._bodies_most, self._bodies_now)
        try:
            yield
        finally:
            with self._lock:
                self._bodies_now -= 1

    def _lookup_any_blob(self, digest: str) -> bytes | None:
        with self._lock:
            return next((data for (_, known), data in self._blobs.items() if known == digest), None)

    def _lookup_tags(self, name: str) -> list[str] | None:
        with self._lock:
            if name not in self._tags:
                return None
            return sorted(self._tags[name])

    def _rate_limits(self) -> RateLimit:
        with self._lock:
            return self._rate_limit

    def _fault(self, digest: str) -> Fault | None:
        with self._lock:
            return self._faults.get(digest)


def _page(name: str, tags: list[str], query: dict[str, list[str]]) -> tuple[list[str], str | None]:
    """The page of ``tags`` that ``n`` and ``last`` ask for, and the Link to the next, as distribution 3 sends them."""
    last = query.get("last", [""])[0]
    after = [tag for tag in tags if tag > last]
    n_text = query.get("n", [""])[0]
    if not n_text.isdecimal() or len(after) <= int(n_text):
        return after, None
    page = after[: int(n_text)]
    if not page:
        return page, None
    next_query = urllib.parse.urlencode({"last": page[-1], "n": n_text})
    return page, f'</v2/{name}/tags/list?{next_query}>; rel="next"'


def generated_blob(key: bytes, size: int) -> bytes:
    """The bytes of a blob of ``add_generated_blobs``: ``size`` bytes that only ``key`` makes."""
    block = hashlib.sha256(key).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: FakeUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response are part of the tests, not errors
        # worth a traceback on stderr; keep it for debugging instead.
        self.upstream.server_log.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    @property
    def upstream(self) -> FakeUpstream:
        return self.server.upstream

    def setup(self) -> None:
        super().setup()
        self.upstream._track(self.connection, open_=True)

    def finish(self) -> None:
        self.upstream._track(self.connection, open_=False)
        # Flushing to a client that already hung up is not an error here.
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        self.upstream.server_log.append(format % args)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _unsupported(self) -> None:
        self.upstream._record(self.command, self.path)
        self._send_error(405, "UNSUPPORTED", "the fake upstream is read-only", send_body=True)

    do_POST = do_PUT = do_PATCH = do_DELETE = _unsupported

    def _serve(self, *, send_body: bool) -> None:
        self.upstream._record(self.command, self.path)
        path = self.path.split("?", 1)[0]
        if path in ("/v2/", "/v2"):
            self._send(200, "application/json", b"{}", digest=None, send_body=send_body)
            return
        if match := _TAGS_LIST.match(path):
            tags = self.upstream._lookup_tags(match["name"])
            if tags is None:
                self._send_error(404, "NAME_UNKNOWN", "repository name not known to registry", send_body=send_body)
                return
            tags, link = _page(match["name"], tags, urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
            body = json.dumps({"name": match["name"], "tags": tags}).encode()
            self._send(200, "application/json", body, digest=None, send_body=send_body, link=link)
            return
        if match := _CDN.match(path) or _PEER.match(path):
            data = self.upstream._lookup_any_blob(match["digest"])
            if data is None:
                self._send_error(404, "BLOB_UNKNOWN", "blob unknown to the CDN", send_body=send_body)
                return
            self._send(
                200, "application/octet-stream", data, digest=None, send_body=send_body, fault_of=match["digest"]
            )
            return
        if match := _MANIFEST_OR_BLOB.match(path):
            name, reference = match["name"], match["reference"]
            rate_limit = self.upstream._rate_limits()
            by_digest = ":" in reference
            refused = rate_limit.refuse_digests if by_digest else rate_limit.refuse
            if match["kind"] == "manifests" and refused:
                self._send_error(429, "TOOMANYREQUESTS", "you have reached your pull rate limit", send_body=send_body)
                return
            if match["kind"] == "manifests":
                found = self.upstream._lookup_manifest(name, reference)
                if found is None:
                    self._send_error(404, "MANIFEST_UNKNOWN", "manifest unknown", send_body=send_body)
                    return
                media_type, data = found
            else:
                blob = self.upstream._lookup_blob(name, reference)
                if blob is None:
                    self._send_error(404, "BLOB_UNKNOWN", "blob unknown to registry", send_body=send_body)
                    return
                media_type, data = "application/octet-stream", blob
                fault = self.upstream._fault(reference)
                if fault is not None and fault.redirect and self.command == "GET":
                    self.send_response(307)
                    self.send_header("Location", f"/cdn/{reference}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.command == "GET":
                    self.upstream._record_blob_get(self.path, self.headers.get("Range"))
                first = self._range_start(len(blob))
                with self.upstream._sending_blob() if send_body else contextlib.nullcontext():
                    self._send(
                        200 if first is None else 206,
                        media_type,
                        data,
                        digest=sha256_digest(data),
                        send_body=send_body,
                        first=first or 0,
                    )
                return
            self._send(200, media_type, data, digest=sha256_digest(data), send_body=send_body)
            return
        self._send_error(404, "NOT_FOUND", "no such endpoint", send_body=send_body)

    def _range_start(self, size: int) -> int | None:
        """The first byte a Range header asks for, when the answer is to be a 206 of it."""
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if match is None or not self.upstream.honour_range:
            return None
        first = int(match["first"])
        return first if first < size else None

    def _send_error(self, status: int, code: str, message: str, *, send_body: bool) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
        self._send(status, "application/json", body, digest=None, send_body=send_body)

    def _send(
        self,
        status: int,
        content_type: str,
        body: bytes,
        *,
        digest: str | None,
        send_body: bool,
        fault_of: str | None = None,
        first: int = 0,
        link: str | None = None,
    ) -> None:
        """Answer with ``body``, or with its bytes from ``first`` on as a 206; ``link`` is a Link header."""
        fault_of = fault_of or digest
        fault = self.upstream._fault(fault_of) if fault_of is not None else None
        if fault is not None and fault.corrupt and body:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        total = len(body)
        body = body[first:]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if fault is not None and fault.no_length and send_body:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{total - 1}/{total}")
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        if self.path.split("?", 1)[0] not in ("/v2/", "/v2"):
            self._send_rate_limit_headers(status)
        if digest is not None:
            self.send_header("Docker-Content-Digest", digest)
        if link is not None:
            self.send_header("Link", link)
        if fault is not None and fault.content_encoding is not None:
            self.send_header("Content-Encoding", fault.content_encoding)
        self.end_headers()
        if not send_body:
            return
        try:
            if fault is None:
                self._write_counted(body)
            else:
                self._send_faulty(body, fault)
        except OSError:
            # The client went away, or down() cut the connection.
            self.close_connection = True

    def _write_counted(self, piece: bytes) -> None:
        self.upstream._count_sent(self.path, len(piece))
        try:
            self.wfile.write(piece)
        except OSError:
            self.upstream._count_sent(self.path, -len(piece))
            raise

    def _send_rate_limit_headers(self, status: int) -> None:
        rate_limit = self.upstream._rate_limits()
        if rate_limit.remaining is not None:
            self.send_header("ratelimit-limit", f"{rate_limit.limit};w={rate_limit.window}")
            self.send_header("ratelimit-remaining", f"{rate_limit.remaining};w={rate_limit.window}")
        if status == 429 and rate_limit.retry_after is not None:
            self.send_header("Retry-After", rate_limit.retry_after)
        for header, value in rate_limit.headers:
            self.send_header(header, value)

    def _send_faulty(self, body: bytes, fault: Fault) -> None:
        limit = len(body) if fault.die_after is None else min(fault.die_after, len(body))
        offset = 0
        started = time.monotonic()
        while offset < limit:
            end = min(offset + fault.chunk_size, limit)
            self._write_counted(body[offset:end])
            self.wfile.flush()
            if fault.rate and end < limit:
                # The pace is the behaviour under test: an upstream of that bandwidth.
                # (Not after the last piece: the client has the whole body then.)
                time.sleep(max(0.0, started + end / fault.rate - time.monotonic()))
            if offset == 0 and fault.gate is not None and not self._wait_at_gate(fault):
                self.close_connection = True
                return
            offset = end
            if fault.chunk_delay and offset < limit:
                # The delay is the behaviour under test: a slow upstream.
                time.sleep(fault.chunk_delay)
        if limit < len(body):
            # Closing after a short body, with Content-Length already sent,
            # is exactly what a client sees when an upstream dies mid-blob.
            self.close_connection = True

    def _wait_at_gate(self, fault: Fault) -> bool:
        """Wait until the gate opens; False if the server goes down or the gate timeout passes."""
        assert fault.gate is not None
        fault.reached.set()
        deadline = time.monotonic() + fault.gate_timeout
        # Polled in short waits so that down() can release a parked handler.
        while not fault.gate.wait(0.05):
            if self.upstream._stopping.is_set() or time.monotonic() > deadline:
                return False
        return True
