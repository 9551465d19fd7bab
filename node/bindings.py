"""Content bound to its repository: a digest is served under a name only once confirmed there.

The store holds content by digest, once, whichever repository brought it.
Serving it under any name would let ``/v2/someone/else/blobs/<digest>``
answer what only ``team/app`` holds, and put ``someone/else`` in the
catalog. So ``ProxyStore`` serves a digest under ``(registry, repository)``
only while that pair is *confirmed*:

- the upstream vouched for it: it answered the digest for that repository
  (a manifest fetched from it, or a tag of it pointing at the digest), or a
  HEAD for that repository answered 200;
- or a manifest confirmed for the repository references it: an image's
  config and layers, an index's manifests, whose own references are
  confirmed when they are served in turn.

An ordinary pull (a tag, its manifest, the manifest's blobs) thus confirms
everything it needs on the way, without an extra upstream request. A pair
that is not confirmed costs one HEAD to the upstream for that repository,
with its credentials (``Confirmer``): a 200 confirms it; a 404 is answered
``MANIFEST_UNKNOWN`` or ``BLOB_UNKNOWN``; an upstream that cannot answer
refuses the request (503 ``UPSTREAM_UNAVAILABLE``), never serving on
faith. A 404 is not remembered, as an unknown tag is not.

A confirmation lasts the content's TTL (``upstream.ttl``; 0: forever) from
when the upstream vouched, and a reference's lasts as long as its
manifest's. Each is kept in the worker's memory (``MemoryCache``), so a
warm request is a local lookup, and in a ``Ledger`` that every worker
reads on a miss of its memory: files on a node on its own
(``node.storage.ledger``), the coordinator in a cluster (``ClusterLedger``:
Redis, shared by every node). A ledger that cannot be reached is not asked:
its pairs are asked of the upstream, and what is confirmed meanwhile stays
in the worker's memory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from node.config import UpstreamConfig
from node.coordinator_client import Coordinator, CoordinatorError
from node.errors import BlobUnknown, DigestInvalid, ManifestUnknown, ShoalError, UpstreamUnavailable
from node.reference import DIGEST, Digest, parse_digest
from node.storage.memory import MemoryCache, RememberedBinding
from protos.metrics import binding_check_key

log = logging.getLogger(__name__)

# A vouching that moves a kept binding's expiry by less than this share of
# the TTL is not written again: a tag checked every few minutes refreshes
# its bindings in the ledger a few times per TTL, not at every check.
REFRESH_SHARE = 0.1
# Digests per call to the coordinator (it accepts at most 1000).
BATCH = 500


class Confirmer(Protocol):
    """Asks the upstream whether it holds a digest under a name (``node.upstream.Upstream``)."""

    def confirm(self, name: str, digest: Digest, kind: str) -> None:
        """Return when it does (one HEAD); ``kind`` is ``manifest`` or ``blob``.

        Raises ``ManifestUnknown`` / ``BlobUnknown`` when it does not, and
        the upstream client's errors when it cannot say.
        """
        ...


class Ledger(Protocol):
    """The confirmations every worker of a node (or every node) shares."""

    def confirmed(self, registry: str, repository: str, digests: list[Digest]) -> dict[Digest, float]:
        """The confirmed ones of ``digests`` with their expiry (Unix seconds; ``math.inf``: never).

        Raises nothing: a ledger that cannot answer answers none.
        """
        ...

    def confirm(self, registry: str, repository: str, digests: list[Digest], expires_at: float) -> None:
        """Confirm ``digests`` until ``expires_at`` at least; raises nothing."""
        ...


class Counter(Protocol):
    def add(self, counter: str, value: int = 1) -> None: ...


class ClusterLedger:
    """``Ledger`` in the coordinator (Redis), for every node of the cluster."""

    def __init__(self, coordinator: Coordinator, clock: Callable[[], float] = time.time) -> None:
        self._coordinator = coordinator
        self._clock = clock

    def confirmed(self, registry: str, repository: str, digests: list[Digest]) -> dict[Digest, float]:
        by_text = {str(digest): digest for digest in digests}
        found: dict[Digest, float] = {}
        try:
            for batch in _batches(list(by_text)):
                now = self._clock()
                for text, ttl_ms in self._coordinator.get_bindings(registry, repository, batch).items():
                    if text in by_text:
                        found[by_text[text]] = math.inf if ttl_ms == 0 else now + ttl_ms / 1000
        except CoordinatorError as exc:
            log.debug("cannot read bindings of %s/%s from the coordinator: %s", registry, repository, exc)
        return found

    def confirm(self, registry: str, repository: str, digests: list[Digest], expires_at: float) -> None:
        ttl_ms = 0 if math.isinf(expires_at) else math.ceil((expires_at - self._clock()) * 1000)
        if ttl_ms < 0 or (ttl_ms == 0 and not math.isinf(expires_at)):
            return
        try:
            for batch in _batches([str(digest) for digest in digests]):
                self._coordinator.confirm_bindings(registry, repository, batch, ttl_ms)
        except CoordinatorError as exc:
            log.debug("bindings of %s/%s stay in this worker: %s", registry, repository, exc)


class Bindings:
    """Which digests one registry's repositories may be served; ``ProxyStore`` asks it before serving."""

    def __init__(
        self,
        config: UpstreamConfig,
        confirmer: Confirmer,
        ledger: Ledger,
        memory: MemoryCache,
        *,
        clock: Callable[[], float] = time.time,
        counter: Counter | None = None,
    ) -> None:
        self.config = config
        self._confirmer = confirmer
        self._ledger = ledger
        self._memory = memory
        self._clock = clock
        self._counter = counter

    def bind_blob(self, name: str, digest: Digest) -> None:
        """Return when ``digest`` may be served under ``name``; else raise (see the module docstring)."""
        if self.binding(name, digest) is None:
            self._ask(name, digest, "blob")

    def bind_manifest(self, name: str, digest: Digest, data: bytes, vouched_at: float | None = None) -> bool:
        """Return when the manifest may be served under ``name``, its references confirmed with it; else raise.

        ``data`` are its verified bytes. ``vouched_at`` is when the upstream
        answered it for ``name`` (a fetch, or a tag), if it just did. True
        when this worker had bound it and its references already, so that
        nothing was asked or written: it served it under ``name`` before.
        """
        now = self._clock()
        kept = self._memory.binding(self._scoped(name), digest, now)
        fresh_enough = vouched_at is None or (
            kept is not None and kept.expires_at >= self._expiry(vouched_at) - self._slack
        )
        if kept is not None and kept.references_bound and fresh_enough:
            # The warm path: one lookup in the worker's memory.
            return True
        if vouched_at is not None and (expires_at := self._expiry(vouched_at)) > now:
            self._confirm(name, [digest, *references(data)], expires_at).references_bound = True
            return False
        binding = kept or self.binding(name, digest) or self._ask(name, digest, "manifest")
        if not binding.references_bound:
            self._confirm(name, references(data), binding.expires_at)
            binding.references_bound = True
        return False

    def binding(self, name: str, digest: Digest) -> RememberedBinding | None:
        """The pair's confirmation: from the worker's memory, else from the ledger; None when unconfirmed."""
        scoped, now = self._scoped(name), self._clock()
        kept = self._memory.binding(scoped, digest, now)
        if kept is not None:
            return kept
        expires_at = self._ledger.confirmed(self.config.name, name, [digest]).get(digest)
        if expires_at is None or expires_at <= now:
            return None
        binding = RememberedBinding(expires_at)
        self._memory.keep_binding(scoped, digest, binding)
        return binding

    def _ask(self, name: str, digest: Digest, kind: str) -> RememberedBinding:
        """One HEAD to the upstream for ``name``: confirmed, or the reason it is not."""
        try:
            self._confirmer.confirm(name, digest, kind)
        except (BlobUnknown, ManifestUnknown):
            self._count("unknown")
            raise
        except UpstreamUnavailable as exc:
            self._count("failed")
            raise UpstreamUnavailable(
                f"cannot confirm that {name} holds {digest}: {exc.message}", {"name": name, "digest": str(digest)}
            ) from None
        except ShoalError:
            self._count("failed")
            raise
        self._count("confirmed")
        return self._confirm(name, [digest], self._expiry(self._clock()))

    def _confirm(self, name: str, digests: list[Digest], expires_at: float) -> RememberedBinding:
        """Keep ``digests`` confirmed until ``expires_at`` (or later, if they were); return the first's binding."""
        scoped, now = self._scoped(name), self._clock()
        first = RememberedBinding(expires_at)
        for index, digest in enumerate(digests):
            kept = self._memory.binding(scoped, digest, now)
            if kept is not None and kept.expires_at >= expires_at:
                binding = kept
            else:
                binding = RememberedBinding(expires_at, kept.references_bound if kept is not None else False)
                self._memory.keep_binding(scoped, digest, binding)
            if index == 0:
                first = binding
        if digests:
            self._ledger.confirm(self.config.name, name, digests, expires_at)
        return first

    def _expiry(self, vouched_at: float) -> float:
        return vouched_at + self.config.ttl if self.config.ttl > 0 else math.inf

    @property
    def _slack(self) -> float:
        return self.config.ttl * REFRESH_SHARE

    def _scoped(self, name: str) -> str:
        return f"{self.config.name}/{name}"

    def _count(self, result: str) -> None:
        if self._counter is not None:
            self._counter.add(binding_check_key(result, self.config.name))


def references(data: bytes) -> list[Digest]:
    """The digests a manifest refers to: config and layers (and an artifact's blobs), or an index's manifests.

    ``data`` are verified bytes; a document that is not a manifest refers
    to nothing, and an entry that is not a digest Shoal can verify is left out.
    """
    try:
        document = json.loads(data)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    found: list[object] = []
    config = document.get("config")
    if isinstance(config, dict):
        found.append(config.get("digest"))
    for field in ("layers", "manifests", "blobs"):
        items = document.get(field)
        if isinstance(items, list):
            found += [item.get("digest") for item in items if isinstance(item, dict)]
    # Docker's schema 1.
    layers = document.get("fsLayers")
    if isinstance(layers, list):
        found += [item.get("blobSum") for item in layers if isinstance(item, dict)]
    digests: dict[Digest, None] = {}
    for value in found:
        if isinstance(value, str) and DIGEST.fullmatch(value):
            try:
                digests[parse_digest(value)] = None
            except DigestInvalid:
                continue
    return list(digests)


def _batches(items: list[str]) -> list[list[str]]:
    return [items[start : start + BATCH] for start in range(0, len(items), BATCH)]
