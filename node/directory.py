"""Where content comes from on a miss: the node alone, or the cluster.

``ProxyStore`` asks a ``Directory`` for every miss. ``Standalone`` goes
straight to the upstream (the node's own single flight is in ``Fills`` and
the proxy store's locks). ``node.cluster.Cluster`` asks the coordinator
first: a peer that holds the content, a peer that is fetching it now, or a
cluster-wide lease to fetch it from the upstream once; and it falls back to
``Standalone``'s behaviour whenever the coordinator is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from node.config import UpstreamConfig
from node.reference import Digest
from node.storage.fill import Source

UpstreamOpener = Callable[[], AbstractContextManager[Source]]
# Fetches a manifest (from wherever) and returns its bytes and media type.
ManifestFetch = Callable[[], tuple[bytes, str]]
# Verifies and stores a manifest; raises if the bytes do not match the digest.
ManifestStore = Callable[[bytes, str], None]
# Asks the upstream what a tag points at now; returns the digest.
TagCheck = Callable[[], str]


class Directory(Protocol):
    def blob_source(
        self, upstream: UpstreamConfig, digest: Digest, from_upstream: UpstreamOpener
    ) -> AbstractContextManager[Source]:
        """A source of the blob's bytes for a fill.

        The fill commits the verified content inside the returned context;
        leaving it without an exception means the content is in the store.
        """
        ...

    def fetch_manifest(
        self, upstream: UpstreamConfig, digest: Digest, from_upstream: ManifestFetch, store: ManifestStore
    ) -> str:
        """Get the manifest from a peer or the upstream and ``store`` it; say which (``peer``, ``upstream``)."""
        ...

    def resolve_tag(self, upstream: UpstreamConfig, name: str, tag: str, check: TagCheck) -> str:
        """The digest the tag points at, asking the upstream (``check``) only when needed."""
        ...

    def touched(self, digests: list[Digest]) -> None:
        """These were served from the store (batched, in the background)."""
        ...

    def dropped(self, digests: list[Digest]) -> None:
        """The store evicted these on its own."""
        ...

    def tick(self) -> None:
        """Periodic upkeep, from the node's background thread."""
        ...

    def close(self) -> None: ...


class Standalone:
    """A node on its own: every miss goes to the upstream."""

    @contextmanager
    def blob_source(self, upstream: UpstreamConfig, digest: Digest, from_upstream: UpstreamOpener) -> Iterator[Source]:
        with from_upstream() as source:
            yield source

    def fetch_manifest(
        self, upstream: UpstreamConfig, digest: Digest, from_upstream: ManifestFetch, store: ManifestStore
    ) -> str:
        store(*from_upstream())
        return "upstream"

    def resolve_tag(self, upstream: UpstreamConfig, name: str, tag: str, check: TagCheck) -> str:
        return check()

    def touched(self, digests: list[Digest]) -> None:
        pass

    def dropped(self, digests: list[Digest]) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass
