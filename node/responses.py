"""Response bodies the registry API and the peer endpoint share."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from flask import request

CHUNK = 1 << 20


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


def _read(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk
