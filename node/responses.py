"""Response bodies the registry API and the peer endpoint share.

Both kinds of body are handed to gunicorn as ``wsgi.file_wrapper`` so that
they go out with ``sendfile(2)``:

- ``file_body``: complete content; gunicorn sends ``Content-Length`` bytes
  from the file's current offset.
- ``growing_body``: a file still being written (a fill being followed). Only
  a server whose client socket says ``sends_growing_files`` (the node's own
  worker, ``node.serving``) may get it as a file: that socket asks the body
  how far it may send (``GrowingFile.available``) before each sendfile. Any
  other server iterates the body instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Protocol, runtime_checkable

from flask import request

CHUNK = 1 << 20
# The attribute a client socket sets to say it sends ``GrowingFile`` bodies.
SENDS_GROWING_FILES = "sends_growing_files"


@runtime_checkable
class GrowingFile(Protocol):
    """A file whose bytes are still arriving, as a response body.

    ``available(position)`` blocks until bytes past ``position`` may be sent
    and returns where they end (``position`` itself once the body is
    complete there); it raises a ``ShoalError`` when the body can never be
    completed, and the response must then be cut short. Iterating yields the
    same bytes; ``close`` releases the file.
    """

    def fileno(self) -> int: ...

    def available(self, position: int) -> int: ...

    def read(self, size: int) -> bytes: ...

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


def file_body(fd: int, start: int = 0) -> Iterable[bytes]:
    """Hand an open file to the server; gunicorn sends it with sendfile(2).

    gunicorn sends ``Content-Length`` bytes from the file's current offset,
    which is how a range is served with sendfile too. The server closes the
    file when the response is done.
    """
    os.lseek(fd, start, os.SEEK_SET)
    handle = os.fdopen(fd, "rb")
    wrapper = request.environ.get("wsgi.file_wrapper")
    if wrapper is not None:
        return wrapper(handle, CHUNK)
    return _read(handle)


def growing_body(body: GrowingFile) -> Iterable[bytes]:
    """Hand a growing file to a server that can send it with sendfile; else iterate it.

    The response must carry a ``Content-Length``: that is how far the server
    sends. The file's offset must be at the body's start.
    """
    wrapper = request.environ.get("wsgi.file_wrapper")
    client = request.environ.get("gunicorn.socket")
    if wrapper is not None and getattr(client, SENDS_GROWING_FILES, False):
        return wrapper(body, CHUNK)
    return body


def _read(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk
