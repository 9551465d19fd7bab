"""How gunicorn serves a node: gevent workers, a zero-copy send, and ceilings.

A worker holds every client connection as a greenlet, so a slow download
costs a socket, an open file and a few kilobytes, not a thread
(docs/node.md says why, with the numbers). On top of gunicorn's gevent
worker this adds what a registry mirror needs:

- **Zero copy.** gevent's own ``socket.sendfile`` reads and sends in 8 KiB
  pieces. ``ClientSocket.sendfile`` calls ``os.sendfile`` on the
  non-blocking socket and waits for writability between calls, so hits and
  followers of a fill stay zero-copy. A sender that never has to wait (a
  fast client on loopback) still yields to the others every few MiB.
- **Fair turns.** After every request the connection's greenlet yields,
  so a keep-alive client that always has its next request ready cannot
  keep the worker to itself.
- **Growing files.** A body that is still being written (``GrowingFile``,
  a followed fill) is asked before each sendfile how far it may be sent.
- **Bounded clients.** A client that accepts no bytes for
  ``server.send_timeout`` is disconnected; a connection that does not
  deliver a complete request head within ``server.header_timeout`` (idle
  keep-alive included) is closed; beyond ``server.max_connections`` (shared
  evenly by the workers) a new connection is answered 503 with
  ``Retry-After`` at once and closed.
- **gRPC on gevent.** ``grpc.experimental.gevent.init_gevent`` runs right
  after monkey patching, before the app (and any channel) exists.

- **OCI errors from gunicorn too.** A request gunicorn refuses before the
  app sees it (a request line longer than ``limit_request_line``, a header
  longer than ``limit_request_field_size`` or more than
  ``limit_request_fields`` of them, bytes that are not HTTP) gets
  gunicorn's status (414, 431, 400) with an OCI error body instead of its
  HTML page (``oci_error_page``).

A response cut short on purpose (a client that stalled, a fill that
failed) ends with ``ResponseCutShort``, a connection reset for gunicorn, so
it closes the connection quietly; the node logs the reason once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import resource
import socket
from collections.abc import Iterator
from types import FrameType
from typing import Any

import gevent
from gevent import socket as cooperative
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from node.config import ServerConfig, load_config
from node.errors import ShoalError
from node.responses import GrowingFile

log = logging.getLogger(__name__)

# Connections a worker accepts beyond its ceiling, only to answer them 503.
REFUSE_ROOM = 64
# A sender that never has to wait yields to the worker's other greenlets
# after this many bytes.
YIELD_EVERY = 4 << 20
# The header timeout of a connection that goes idle while the worker stops.
_AT_ONCE = 0.001
# Descriptors a connection may hold (its socket, the file it sends), and
# those kept for everything else (fills, upstream connections, logs).
FDS_PER_CONNECTION = 2
FDS_RESERVED = 512

_REFUSAL_BODY = (
    b'{"errors": [{"code": "UNAVAILABLE", "message": "this node is at its connection limit '
    b'(server.max_connections); try again shortly", "detail": null}]}'
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Docker-Distribution-API-Version: registry/2.0\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


class ResponseCutShort(ConnectionResetError):
    """A response ended before its promised length, on purpose; gunicorn closes the connection."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNRESET, reason)


class ClientSocket(cooperative.socket):
    """A client connection: zero-copy ``sendfile``; every wait bounded by the socket's timeout."""

    # node.responses.SENDS_GROWING_FILES: views may hand this socket growing files.
    sends_growing_files = True

    def sendall(self, data: Any, flags: int = 0) -> None:
        try:
            super().sendall(data, flags)
        except TimeoutError:
            raise self._stalled() from None

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send ``count`` bytes of ``file`` from ``offset`` (to its end when None); return how many."""
        fd = file.fileno()
        growing = file if isinstance(file, GrowingFile) else None
        end = offset + count if count is not None else os.fstat(fd).st_size
        position, unyielded = offset, 0
        while position < end:
            ready = end
            if growing is not None:
                try:
                    ready = min(end, growing.available(position))
                except ShoalError as exc:
                    raise ResponseCutShort(exc.message) from None
                if ready <= position:
                    raise ResponseCutShort("the body ended before its promised length")
            try:
                sent = os.sendfile(self.fileno(), fd, position, ready - position)
            except BlockingIOError:
                self._wait_writable()
                continue
            if sent == 0:
                raise ResponseCutShort("the file ended before its promised length")
            position += sent
            unyielded += sent
            if unyielded >= YIELD_EVERY:
                unyielded = 0
                gevent.sleep(0)
        return position - offset

    def _wait_writable(self) -> None:
        try:
            cooperative.wait_write(self.fileno(), timeout=self.gettimeout(), timeout_exc=TimeoutError)
        except TimeoutError:
            raise self._stalled() from None

    def _stalled(self) -> ResponseCutShort:
        log.info("disconnected a client that accepted no bytes for %ss", self.gettimeout())
        return ResponseCutShort("the client accepted no bytes for server.send_timeout")


class _OciErrorSocket:
    """A client socket as gunicorn's ``handle_error`` sees it: what it sends is rewritten by ``oci_error_page``."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self._client.sendall(oci_error_page(data), flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


# The message of each status gunicorn answers a request it cannot parse
# with. None quotes the request: it may carry a credential.
_GUNICORN_ERRORS = {
    400: "the request is not valid HTTP",
    403: "the request was refused",
    414: "the request line is longer than this server accepts (limit_request_line)",
    417: "the request's Expect header is not supported",
    431: (
        "a request header is longer than this server accepts (limit_request_field_size), "
        "or there are more headers than it accepts (limit_request_fields)"
    ),
    501: "the request's Transfer-Encoding is not supported",
}


def oci_error_page(page: bytes) -> bytes:
    """gunicorn's error answer (``gunicorn.util.write_error``) with an OCI error body in place of its HTML.

    The status line is kept; the body is ``{"errors": [...]}`` with a
    message chosen by the status, so nothing of the request is echoed. An
    answer that does not start with a status line is sent as it is.
    """
    status_line, _, _ = page.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return page
    status = int(parts[1])
    code = "UNSUPPORTED" if status in (417, 501) else "DENIED" if status == 403 else "UNKNOWN"
    message = _GUNICORN_ERRORS.get(status, "the request cannot be served")
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
    return (
        status_line + b"\r\n"
        b"Connection: close\r\n"
        b"Content-Type: application/json\r\n"
        b"Docker-Distribution-API-Version: registry/2.0\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class Worker(GeventWorker):
    """gunicorn's gevent worker with the node's ceilings and its zero-copy socket."""

    def init_process(self) -> None:
        self.server_config: ServerConfig = load_config().server
        share = math.ceil(self.server_config.max_connections / self.server_config.workers)
        self.connection_limit = descriptor_ceiling(share)
        self.worker_connections = self.connection_limit + REFUSE_ROOM
        self.open_connections = 0
        self._idle: dict[Any, gevent.Timeout] = {}
        super().init_process()

    def patch(self) -> None:
        super().patch()
        import grpc.experimental.gevent

        grpc.experimental.gevent.init_gevent()

    @contextlib.contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """Bound the wait for a request head; while it waits, the connection is idle.

        Idle connections are closed when the worker is told to stop, so a
        graceful stop waits only for responses in progress. The timeout is
        raised inside this block and swallowed by it (``False``): gunicorn
        then sees no request and closes the connection.
        """
        timeout = gevent.Timeout(self.server_config.header_timeout if self.alive else _AT_ONCE, False)
        current = gevent.getcurrent()
        self._idle[current] = timeout
        try:
            with timeout:
                yield
        finally:
            self._idle.pop(current, None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle)

    def _close_idle(self) -> None:
        for connection, timeout in list(self._idle.items()):
            connection.kill(timeout, block=False)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        """Answer one request, then let the worker's other connections have their turn.

        A greenlet yields only when a socket would block. A keep-alive
        client whose next request is already in by the time this one is
        answered (any fast client of a fast answer, such as a warm
        manifest) would otherwise be served again and again while the
        other connections wait: measured, a p99 of a second for 16
        connections on one worker, and 9 ms with this.
        """
        try:
            super().handle_request(listener_name, req, sock, addr)
        finally:
            gevent.sleep(0)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's answer to a request it could not parse (or serve), with an OCI error body."""
        super().handle_error(req, _OciErrorSocket(client), addr, exc)

    def handle(self, listener: socket.socket, client: socket.socket, addr: Any) -> None:
        if self.open_connections >= self.connection_limit:
            _refuse(client)
            return
        self.open_connections += 1
        try:
            connection = ClientSocket(client.family, client.type, client.proto, fileno=client.detach())
            connection.settimeout(self.server_config.send_timeout)
            # AsyncWorker's handle, not GeventWorker's: that one makes the
            # socket wait without a bound.
            AsyncWorker.handle(self, listener, connection, addr)
        finally:
            self.open_connections -= 1


def descriptor_ceiling(connections: int) -> int:
    """Raise the open-files limit for ``connections``; the connections it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections * FDS_PER_CONNECTION + FDS_RESERVED
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft >= needed:
        return connections
    allowed = max(1, (soft - FDS_RESERVED) // FDS_PER_CONNECTION)
    log.warning(
        "open files are limited to %d (ulimit -n): a worker holds %d connections, not %d", soft, allowed, connections
    )
    return allowed


def _refuse(client: socket.socket) -> None:
    """Answer 503 and close; the request is read first, so that closing does not reset the answer away."""
    try:
        client.settimeout(1.0)
        client.recv(1 << 16)
        client.sendall(_REFUSAL)
        client.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        client.close()
