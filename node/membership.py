"""The node as a member of the cluster: heartbeat, inventory, expiry.

One worker per node is on duty (it holds the duty lock; the kernel releases
it when that worker dies, and another takes over). The worker on duty
heartbeats on schedule, registers and announces the node's whole inventory
when the coordinator does not know the node or content arrived that it has
not heard of (``Announcements``), and deletes what the coordinator's
scheduler expired. Every worker reports its hits (to push expiry forward)
and the content its store evicted for space.

A coordinator that cannot be reached costs nothing here but a later
announcement: the node keeps serving what it holds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

from node.config import NodeConfig
from node.coordinator_client import Coordinator, CoordinatorError, CoordinatorUnavailable
from node.flight import Announcements
from node.metrics import Metrics
from node.offload import run_blocking
from node.reference import Digest, parse_digest
from node.storage.files import try_lock
from node.storage.local import LocalStore
from protos.metrics import eviction_key
from protos.values import Content

log = logging.getLogger(__name__)


class Membership:
    def __init__(
        self,
        config: NodeConfig,
        local: LocalStore,
        coordinator: Coordinator,
        announcements: Announcements,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = config.advertise_url
        self.local = local
        self.coordinator = coordinator
        self.announcements = announcements
        self.metrics = metrics
        # Content announced without a fetch (inventory) gets the default
        # upstream's TTL; fetched content gets its own upstream's.
        self._inventory_ttl_ms = int(config.upstream.ttl * 1000)
        self._extend_ttl_on_hit = config.cache.extend_ttl_on_hit
        self._interval = config.cluster.heartbeat_interval
        self._clock = clock
        self._duty: int | None = None
        self._last_beat: float | None = None

    def tick(self) -> None:
        """Heartbeat on schedule; register and announce when the coordinator asks."""
        now = self._clock()
        if self._last_beat is not None and now - self._last_beat < self._interval:
            return
        if not self._on_duty():
            return
        self._last_beat = now
        # The size walks the whole store: off the event loop.
        capacity, used = self.local.max_size, run_blocking(self.local.used_bytes)
        try:
            known, evict = self.coordinator.heartbeat(self.url, capacity_bytes=capacity, used_bytes=used)
            self._evict(evict)
            if not known or self.announcements.pending():
                self.coordinator.register(self.url, capacity_bytes=capacity, used_bytes=used)
                self.announcements.clear()
                self._evict(self.coordinator.announce_inventory(self._inventory(), ttl_ms=self._inventory_ttl_ms))
                log.info("announced the inventory to the coordinator")
        except CoordinatorUnavailable:
            self.announcements.mark()
        except CoordinatorError as exc:
            log.warning("heartbeat refused: %s", exc)

    def touched(self, digests: list[Digest]) -> None:
        """These were served from the store: push their expiry forward (``extend_ttl_on_hit``)."""
        if digests and self._extend_ttl_on_hit:
            try:
                self.coordinator.touch([str(digest) for digest in digests])
            except CoordinatorError as exc:
                log.debug("could not report hits: %s", exc)

    def dropped(self, digests: list[Digest]) -> None:
        """The store evicted these on its own (for space)."""
        if digests:
            try:
                self.coordinator.drop_content([str(digest) for digest in digests])
            except CoordinatorError:
                self.announcements.mark()

    def _on_duty(self) -> bool:
        if self._duty is None:
            self._duty = try_lock(self.local.layout.duty_lock())
            if self._duty is None:
                return False
            # A worker taking over duty (at start, or after another worker
            # exited) announces, so the directory matches the disk.
            self.announcements.mark()
        return True

    def _inventory(self) -> Iterator[Content]:
        """What the store holds, read as it is announced: one batch in memory at a time, however large."""
        for digest in self.local.digests():
            content = self.local.content(digest)
            if content is not None:
                yield content

    def _evict(self, digests: list[str]) -> None:
        for text in digests:
            digest = parse_digest(text)
            if self.local.remove(digest):
                self.metrics.add(eviction_key("ttl"))
                log.info("evicted %s (expired)", digest)

    def close(self) -> None:
        if self._duty is not None:
            os.close(self._duty)
            self._duty = None
