"""What the systems asked of the upstream, read from its access log.

The upstream (``docker-registry``) writes one combined-log line per request
to stdout, with the response's size in bytes. Every system pulls its own
repositories, so a repository's path prefix says who caused a request.
Requests outside any repository (``GET /v2/`` pings) are not counted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# 127.0.0.1 - - [27/Nov/2026:23:57:22 +0000] "GET /v2/foo/blobs/sha256:... HTTP/1.1" 200 1048576 "" "ua"
_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) (?P<size>\d+|-)'
)
_REPOSITORY = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/[^/]+$")


@dataclass(frozen=True)
class Usage:
    """The pulls (GET and HEAD) of one repository at the upstream."""

    requests: int = 0
    # Body bytes of GET responses: what crossed the link. HEADs carry none.
    bytes: int = 0
    blob_gets: int = 0
    manifest_gets: int = 0
    heads: int = 0

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.requests - other.requests,
            self.bytes - other.bytes,
            self.blob_gets - other.blob_gets,
            self.manifest_gets - other.manifest_gets,
            self.heads - other.heads,
        )


class AccessLog:
    """Reads the log incrementally and keeps a tally per repository."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._tally: dict[str, Usage] = {}

    def usage(self, repository: str) -> Usage:
        self._read_new_lines()
        return self._tally.get(repository, Usage())

    def _read_new_lines(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        # Only whole lines; a line being written is read next time.
        data = data[: data.rfind(b"\n") + 1]
        self._offset += len(data)
        for line in data.decode(errors="replace").splitlines():
            match = _LINE.match(line)
            if match is None:
                continue
            found = _REPOSITORY.match(match["path"].split("?", 1)[0])
            # Pushes (the harness filling the upstream) are not pulls.
            if found is None or match["method"] not in ("GET", "HEAD"):
                continue
            method, get = match["method"], match["method"] == "GET"
            size = int(match["size"]) if get and match["size"] != "-" else 0
            before = self._tally.get(found["name"], Usage())
            self._tally[found["name"]] = Usage(
                before.requests + 1,
                before.bytes + size,
                before.blob_gets + (get and found["kind"] == "blobs"),
                before.manifest_gets + (get and found["kind"] == "manifests"),
                before.heads + (method == "HEAD"),
            )

    def settled(self, repository: str, busy: Callable[[], bool], quiet: float = 0.2, timeout: float = 60.0) -> Usage:
        """The usage once the upstream is idle and no new line has come for ``quiet`` seconds.

        The registry logs a request after its handler returns, a moment after
        the client has the last byte; ``busy`` says whether it is still
        serving requests (a cache finishing a fetch in the background).
        """
        deadline = time.monotonic() + timeout
        last = self.usage(repository)
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.03)
            current = self.usage(repository)
            if current != last or busy():
                last, since = current, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last
