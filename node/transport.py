"""An httpx transport over urllib3, for bodies read in large pieces.

httpx reads a body through httpcore and h11, which hand it over in pieces of
at most 64 KiB and copy each piece twice on the way. A fill reads hundreds of
MiB, and on a fast upstream those copies, not the network, set its speed
(docs/benchmarks.md, "Where the time goes"). urllib3 2 reads a body with
``read1``: one ``recv`` of up to the size asked, straight into the bytes
object it returns, and nothing else.

``Urllib3Transport`` plugs that in below an ``httpx.Client``, so the client
keeps what it does well (authentication flows, redirects, event hooks, the
proxy settings of the environment, which it routes through its own
transports), and a response's ``read1`` (``read1(response, size)``) reaches
urllib3's directly. Bodies are never content-decoded: a fill stores the bytes
the upstream sent, whatever its ``Content-Encoding`` header says.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import httpx
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    EmptyPoolError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

# The response extension that holds the body's ``read1``.
READ1 = "shoal.read1"
# The response extension that closes the connection without reading on.
ABANDON = "shoal.abandon"
# A body this close to its end is read off before the connection goes back
# to the pool; a longer one closes the connection instead.
_DRAIN_MAX = 64 * 1024


def read1(response: httpx.Response, size: int) -> bytes:
    """At most ``size`` bytes of a streamed body, as soon as any arrive; empty at its end.

    Through ``Urllib3Transport`` a piece is as large as what has arrived;
    through any other transport it is one of the transport's own pieces,
    never larger than ``size``.
    """
    reader = response.extensions.get(READ1)
    if reader is None:
        # A response built from bytes (by a mock transport) was read already.
        pieces = iter((response.content,)) if response.is_stream_consumed else response.iter_raw()
        reader = response.extensions[READ1] = _PieceReader(pieces)
    data: bytes = reader(size)
    return data


def abandon(response: httpx.Response) -> None:
    """Close ``response``'s connection at once, never reading the rest of its body first.

    For a body given up because it comes too slowly: closing a response
    otherwise reads off a short rest (``_DRAIN_MAX``) to keep the
    connection, which at the pace of a dripping upstream takes minutes.
    """
    closer = response.extensions.get(ABANDON)
    if closer is not None:
        closer()
    response.close()


class _PieceReader:
    """``read1`` over an iterator of pieces, for transports without one."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._rest = b""

    def __call__(self, size: int) -> bytes:
        while not self._rest:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._rest = piece
        data, self._rest = self._rest[:size], self._rest[size:]
        return data


class Urllib3Transport(httpx.BaseTransport):
    """Sends a client's requests through a ``urllib3.PoolManager`` of ``connections`` per host.

    A request waits for a free connection at most its pool timeout. Errors
    become the httpx errors of the same kind, so callers handle one family.
    """

    def __init__(self, connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool = urllib3.PoolManager(
            num_pools=8,
            maxsize=connections,
            block=True,
            retries=False,
            ssl_context=ssl_context or httpx.create_ssl_context(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        with _mapped_errors():
            answer = self._pool.urlopen(
                request.method,
                str(request.url),
                body=request.read() or None,
                headers=dict(request.headers),
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                timeout=urllib3.Timeout(connect=timeouts.get("connect"), read=timeouts.get("read")),
                pool_timeout=timeouts.get("pool"),
            )
        body = _Body(answer)
        return httpx.Response(
            answer.status,
            headers=list(answer.headers.items()),
            stream=body,
            extensions={READ1: body.read1, ABANDON: body.abandon, "http_version": b"HTTP/1.1"},
        )

    def close(self) -> None:
        self._pool.clear()


class _Body(httpx.SyncByteStream):
    def __init__(self, answer: urllib3.BaseHTTPResponse) -> None:
        self._answer = answer

    def read1(self, size: int) -> bytes:
        with _mapped_errors():
            return self._answer.read1(size)

    def __iter__(self) -> Iterator[bytes]:
        while data := self.read1(_DRAIN_MAX):
            yield data

    def abandon(self) -> None:
        """Close the connection without reading on; ``close`` then only gives it back."""
        self._answer.close()

    def close(self) -> None:
        """Give the connection back to the pool, or close it if the body was not read to its end."""
        answer = self._answer
        remaining = answer.length_remaining
        if not answer.closed and remaining is not None and 0 < remaining <= _DRAIN_MAX:
            answer.drain_conn()
            remaining = answer.length_remaining
        if remaining != 0 and not answer.closed:
            answer.close()
        answer.release_conn()


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except MaxRetryError as exc:
        raise _mapped(exc.reason or exc) from None
    except (Urllib3Error, OSError) as exc:
        raise _mapped(exc) from None


def _mapped(exc: BaseException) -> httpx.HTTPError:
    """The httpx error for a urllib3 one; its text is not kept, it can quote a header."""
    if isinstance(exc, NewConnectionError):
        return httpx.ConnectError(type(exc).__name__)
    if isinstance(exc, ConnectTimeoutError):
        return httpx.ConnectTimeout(type(exc).__name__)
    if isinstance(exc, (ReadTimeoutError, TimeoutError)):
        return httpx.ReadTimeout(type(exc).__name__)
    if isinstance(exc, EmptyPoolError):
        return httpx.PoolTimeout(type(exc).__name__)
    if isinstance(exc, (ProtocolError, OSError)):
        return httpx.RemoteProtocolError(type(exc).__name__)
    return httpx.TransportError(type(exc).__name__)
