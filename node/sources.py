"""Where content comes from on a miss: one small interface, three sources.

``ProxyStore`` fills the local store from a ``Source``:

- ``node.upstream.Upstream``: the registry itself; a node on its own uses it
  directly.
- ``node.peers.PeerClient``: another node of the cluster, by its URL (the
  same context contract, for one blob at a known place).
- ``node.cluster_source.ClusterSource``: decorates the upstream with the
  coordinator and the peers, so that the cluster asks the upstream once per
  blob, manifest and tag check.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from node.reference import Digest

if TYPE_CHECKING:
    from node.upstream import TagPage

# Bytes to be dropped are read in pieces of at most this size.
SKIP_PIECE = 1 << 20


class Origin(enum.Enum):
    """Where the bytes of a miss came from."""

    UPSTREAM = "upstream"
    PEER = "peer"

    @property
    def outcome(self) -> str:
        """The counter a client request served this way counts as."""
        return "misses" if self is Origin.UPSTREAM else "peer_hits"


class BlobStream(Protocol):
    """An open stream of a blob's bytes, valid inside the context that opened it.

    ``size`` is what the source announced (None when unknown); ``joined`` is
    true when the bytes ride on a fetch that was already running elsewhere
    (a peer's fill in progress). ``read`` returns the next bytes, at most
    ``size`` but as many as have arrived, as soon as any have (followers of a
    fill see the first bytes at once); empty at the end. It raises
    ``UpstreamUnavailable`` when the transfer breaks off. The bytes are the
    ones sent, never content-decoded.
    """

    size: int | None
    origin: Origin
    joined: bool

    def read(self, size: int) -> bytes: ...


class Skip:
    """The first ``count`` bytes of a stream, read and dropped, for a stream that must start later.

    An upstream that ignored a Range request, and a peer (which always
    serves from byte 0), send bytes that the reader holds already. ``read``
    takes the stream's own read and returns the next bytes past them,
    reading the dropped ones in pieces of up to ``SKIP_PIECE`` bytes.
    """

    def __init__(self, count: int) -> None:
        self.count = count

    def read(self, read: Callable[[int], bytes], size: int) -> bytes:
        while True:
            data = read(max(size, min(self.count, SKIP_PIECE)) if self.count else size)
            if self.count and data:
                dropped = min(self.count, len(data))
                self.count -= dropped
                data = data[dropped:]
                if not data:
                    continue
            return data


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest's bytes and media type, not yet verified against its digest."""

    data: bytes
    media_type: str
    origin: Origin = Origin.UPSTREAM


@dataclass(frozen=True)
class TagAnswer:
    """What a tag points at; ``manifest`` when the check had to fetch it.

    ``checked_at`` is when the upstream was asked (Unix seconds), when that
    was before now: a node that takes the tag from the cluster's pointer
    keeps it fresh only as long as that pointer is, so that a tag changed
    upstream is seen on every node within ``tag_ttl``. None means now.
    """

    digest: Digest
    manifest: FetchedManifest | None = None
    checked_at: float | None = None


class Source(Protocol):
    """Where a node gets content it does not hold.

    The two ``open_`` methods return a context manager, with one contract:

    - Entering it raises a ``ShoalError`` when the content cannot come from
      here: ``BlobUnknown`` / ``ManifestUnknown`` when the source says it does
      not exist, ``UpstreamUnavailable`` or ``TooManyRequests`` when it cannot
      answer now, ``UpstreamInvalid`` when it answers nonsense.
    - What it yields is valid inside the context only; the source closes
      whatever it opened (responses, streams) when the context exits, with
      or without an error. The caller closes nothing of the source's.
    - The caller verifies the content against its digest and commits it to
      the store inside the context. Leaving the context without an error
      means the content is committed: a source that tells others about
      content (the cluster) does so then, never before. Leaving it with an
      error means nothing was stored, and the source gives back what it
      held (a lease). A source may replace the caller's ``UpstreamInvalid``
      with ``BadCopy`` on the way out: the content came from a copy (a
      peer's) that the source now avoids, and opening it again goes
      elsewhere.

    ``open_blob`` with a ``start`` past 0 carries on a transfer that broke
    off: the stream yields the blob's bytes from that byte on (``size`` is
    still the whole blob's), and the caller holds the bytes before it.
    """

    def open_blob(self, name: str, digest: Digest, start: int = 0) -> AbstractContextManager[BlobStream]: ...

    def open_manifest(self, name: str, digest: Digest) -> AbstractContextManager[FetchedManifest]: ...

    def stat_blob(self, name: str, digest: Digest) -> int | None:
        """The blob's size without its bytes, for a HEAD the node answers without a fill.

        None when the source does not say; ``BlobUnknown`` when it does not
        have it; errors as for entering ``open_blob``.
        """
        ...

    def tags(self, name: str, n: int | None = None, last: str | None = None) -> TagPage:
        """A page of the repository's tag list, always from the upstream (lists are not shared)."""
        ...

    def check_tag(self, name: str, tag: str) -> TagAnswer:
        """What ``tag`` points at now (``ManifestUnknown`` when it does not exist).

        Errors as for entering ``open_manifest``; a manifest the answer
        carries is unverified, like ``open_manifest``'s.
        """
        ...
