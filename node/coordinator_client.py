"""The node's side of the coordinator contract, in plain dataclasses.

The only node module that imports the generated gRPC code. Everything else
in the node calls ``CoordinatorClient`` and gets dataclasses and the
exceptions defined here back:

- ``CoordinatorUnavailable`` when no coordinator answered (the node then
  runs degraded: local hits, straight upstream fetches, re-announce later);
- ``LeaseLost`` when a fenced act (complete_fetch, put_tag) presented a
  token that no longer holds the lease;
- ``CoordinatorError`` for anything else the coordinator refused.

Failover: the client tries the addresses in turn, starting with the last
one that answered, and moves on when a call fails UNAVAILABLE or
DEADLINE_EXCEEDED. Every call the node makes can be retried safely, with one
exception noted on ``heartbeat``.

Such a failure also opens the address's circuit breaker (``node.breaker``):
later calls skip the address while a background probe, one ``Locate`` of a
digest nobody holds under the same deadline, asks it again every
``cool_off`` seconds; the first answer closes the breaker. With every
breaker open a call raises ``CoordinatorUnavailable`` at once. So a hung
coordinator costs the deadline of the calls that were in flight when it
hung, not one deadline per call.

Channels, breakers and probes are created on first use, never at import,
and again in a forked child (a gunicorn worker), because a gRPC channel must
not cross a fork and a thread does not. A probe runs in a thread of the
process that made it (a greenlet under gevent, whose gRPC calls cooperate
once ``grpc.experimental.gevent.init_gevent`` ran), never waits beyond one
deadline, and ends when its address answers or the client closes.
The cluster secret travels as metadata on every call and is never part of
an exception message or a log line.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from node.breaker import Breakers, Observer, Shared
from protos.metrics import NodeCounts
from protos.shoal.v1 import coordinator_pb2 as pb
from protos.shoal.v1 import coordinator_pb2_grpc as pb_grpc
from protos.values import Content, Holder, TagPointer

log = logging.getLogger(__name__)

# Digests per AnnounceInventory batch: about 150 KiB of message, and two
# steps of the coordinator's scripts (coordinator/locations.py, CHUNK), so
# that a call is answered well within its deadline even on a busy Redis.
INVENTORY_BATCH = 1000

# A coordinator that is restarted comes back within seconds; without these,
# a channel would wait up to gRPC's default two minutes before it tries to
# reconnect, answering UNAVAILABLE all that time.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# What a probe asks: where a digest is that no node holds. It reads two
# Redis keys, so a coordinator that cannot reach Redis (it answers
# UNAVAILABLE) stays skipped too.
PROBE_DIGEST = "sha256:" + "0" * 64
# Seconds an address is skipped before its first probe, and between probes.
COOL_OFF = 1.0


class CoordinatorError(Exception):
    """The coordinator refused a call; ``code`` is the gRPC status name (``INVALID_ARGUMENT``)."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class CoordinatorUnavailable(CoordinatorError):
    """No coordinator answered: every address was unreachable or too slow."""


class LeaseLost(CoordinatorError):
    """The lease token is not the current one: the lease expired and may belong to another node."""


@dataclass(frozen=True)
class Location:
    """Where a digest is: live holders, the node fetching it now, and its meta when known."""

    holders: list[Holder]
    fetcher: Holder | None
    fetching: bool
    content: Content | None
    # Why the latest fetch under the lease key was given up, when it was
    # given up for the whole cluster (``abort_fetch``) and no fetch began since.
    failure: str = ""


@dataclass(frozen=True)
class Claim:
    """A claim's answer: live holders to copy from, or the lease (``Lease``; None when holders are listed)."""

    holders: list[Holder]
    lease: Lease | None


@dataclass(frozen=True)
class Lease:
    """An acquire's answer: the grant (token, fence), or who holds the lease instead.

    ``holder`` is None when granted; when not, it is the current holder,
    whose ``url`` is empty when its membership expired.
    """

    granted: bool
    token: str
    fence: int
    holder: Holder | None


@dataclass(frozen=True)
class ClusterMetrics:
    nodes: list[NodeCounts]
    cluster: dict[str, int] = field(default_factory=dict)


class Coordinator(Protocol):
    """What a node asks of the coordinator: ``CoordinatorClient`` below is the real one.

    Every method may raise the exceptions above; see ``CoordinatorClient``
    for what each call means. ``testbed.fake_coordinator`` keeps the same
    state in memory for unit tests.
    """

    def register(self, url: str, *, capacity_bytes: int = 0, used_bytes: int = 0) -> float: ...

    def heartbeat(self, url: str, *, capacity_bytes: int = 0, used_bytes: int = 0) -> tuple[bool, list[str]]: ...

    def announce_inventory(self, content: Iterable[Content], *, ttl_ms: int | None = None) -> list[str]: ...

    def add_content(self, content: Iterable[Content], *, ttl_ms: int | None = None) -> list[str]: ...

    def drop_content(self, digests: Iterable[str]) -> None: ...

    def report_bad_copy(self, holder_id: str, digest: str) -> bool: ...

    def locate(self, digest: str, lease_key: str = "") -> Location: ...

    def claim(self, digest: str, key: str, ttl_ms: int) -> Claim: ...

    def acquire_lease(self, key: str, ttl_ms: int) -> Lease: ...

    def renew_lease(self, key: str, token: str, ttl_ms: int) -> bool: ...

    def complete_fetch(self, key: str, token: str, digest: str, size: int, media_type: str, ttl_ms: int) -> None: ...

    def abort_fetch(self, key: str, token: str, failure: str = "") -> None: ...

    def touch(self, digests: Iterable[str]) -> None: ...

    def get_tag(self, upstream: str, repository: str, tag: str) -> TagPointer | None: ...

    def put_tag(
        self, upstream: str, repository: str, tag: str, pointer: TagPointer, lease_token: str, *, release: bool = False
    ) -> None: ...

    def confirm_bindings(self, upstream: str, repository: str, digests: list[str], ttl_ms: int) -> None: ...

    def get_bindings(self, upstream: str, repository: str, digests: list[str]) -> dict[str, int]: ...

    def close(self) -> None: ...


class CoordinatorClient:
    """Calls the coordinator(s) at ``addresses`` ("host:port") on behalf of node ``node_id``.

    ``timeout`` is the deadline of one attempt at one address, and of one
    probe, in seconds; ``cool_off`` is how long an address that did not
    answer is skipped before it is probed, and between probes.
    ``tls_ca`` is a PEM file of the CA that signed the coordinators'
    certificates; without it the channels are plaintext. ``observer``
    hears every breaker's state in every process that uses the client;
    through ``shared`` the processes of a node (its workers) skip an
    address that one of them found down.
    Safe to share between threads; ``close`` is idempotent and ends the
    probes.
    """

    def __init__(
        self,
        addresses: list[str],
        secret: str,
        node_id: str,
        *,
        timeout: float = 2.0,
        cool_off: float = COOL_OFF,
        tls_ca: str | None = None,
        observer: Observer | None = None,
        shared: Shared | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one coordinator address is required")
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self.addresses = list(addresses)
        self.node_id = node_id
        self.timeout = timeout
        # Read now, so that a CA file that cannot be read stops the node at
        # start instead of making every later call fail.
        self._tls_ca: bytes | None = None
        if tls_ca is not None:
            with open(tls_ca, "rb") as handle:
                self._tls_ca = handle.read()
        self._metadata = (("authorization", f"Bearer {secret}"),)
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channels: list[grpc.Channel] = []
        self._stubs: list[pb_grpc.CoordinatorStub] = []
        self._preferred = 0
        self._closed = False
        self.cool_off = cool_off
        self._observer = observer
        self._shared = shared
        # Made with the channels, in the process that uses them.
        self._breakers: Breakers | None = None
        self._probes: list[threading.Thread] = []
        self._stopping: threading.Event | None = None

    def __repr__(self) -> str:
        return f"CoordinatorClient(addresses={self.addresses!r}, node_id={self.node_id!r})"

    # Membership.

    def register(self, url: str, *, capacity_bytes: int = 0, used_bytes: int = 0) -> float:
        """Join the cluster; returns how long the membership lives without a heartbeat (seconds)."""
        response = self._call("Register", pb.RegisterRequest(node=self._node(url, capacity_bytes, used_bytes)))
        return float(response.membership_ttl_ms) / 1000

    def heartbeat(self, url: str, *, capacity_bytes: int = 0, used_bytes: int = 0) -> tuple[bool, list[str]]:
        """Keep the membership alive; returns (known, digests to evict).

        ``known`` False: register and announce the inventory again. The
        evictions are handed out once: when a heartbeat times out after the
        coordinator took them, they are lost, and the content stays on
        disk until the node evicts it for space or it expires on announce.
        """
        response = self._call("Heartbeat", pb.HeartbeatRequest(node=self._node(url, capacity_bytes, used_bytes)))
        return bool(response.known), list(response.evict)

    def announce_inventory(self, content: Iterable[Content], *, ttl_ms: int | None = None) -> list[str]:
        """Replace this node's entries with ``content``; returns the digests to delete (expired).

        ``ttl_ms`` is the TTL of content the coordinator has not scheduled
        (None: its default_ttl; 0: never expires). The content goes in
        batches of ``INVENTORY_BATCH``, one call each under one batch id, so
        that any number of digests gets through (one message of them all
        would stop at gRPC's 4 MiB, about 38,000 digests); ``content`` is
        read one batch at a time. After the last batch the coordinator may
        answer ``more`` (it compares a large inventory a bounded piece per
        call), and the last batch is sent again, without content, until it
        has done. A failure part way leaves what the sent batches
        registered, and the next announcement starts afresh.
        """
        batch_id = secrets.token_hex(16)
        evict: list[str] = []
        items = iter(content)
        batch = list(itertools.islice(items, INVENTORY_BATCH))
        while True:
            following = list(itertools.islice(items, INVENTORY_BATCH))
            request = pb.AnnounceInventoryRequest(
                node_id=self.node_id, content=_contents(batch), batch_id=batch_id, last=not following
            )
            if ttl_ms is not None:
                request.ttl_ms = ttl_ms
            response = self._call("AnnounceInventory", request)
            evict += response.evict
            if not following:
                break
            batch = following
        # The coordinator compares the node's entries a bounded piece per call.
        while response.more:
            request = pb.AnnounceInventoryRequest(node_id=self.node_id, batch_id=batch_id, last=True)
            if ttl_ms is not None:
                request.ttl_ms = ttl_ms
            response = self._call("AnnounceInventory", request)
            evict += response.evict
        return evict

    def add_content(self, content: Iterable[Content], *, ttl_ms: int | None = None) -> list[str]:
        """Register content this node got besides its inventory (from a peer, or while degraded).

        Replaces nothing; needs no lease. Returns the digests to delete
        because they already expired. ``ttl_ms`` as in ``announce_inventory``.
        """
        request = pb.AddContentRequest(node_id=self.node_id, content=_contents(content))
        if ttl_ms is not None:
            request.ttl_ms = ttl_ms
        return list(self._call("AddContent", request).evict)

    def drop_content(self, digests: Iterable[str]) -> None:
        """This node deleted ``digests`` on its own (evicted for space, or found them missing)."""
        self._call("DropContent", pb.DropContentRequest(node_id=self.node_id, digests=list(digests)))

    def report_bad_copy(self, holder_id: str, digest: str) -> bool:
        """The copy of ``digest`` that node ``holder_id`` served does not match it: unlist that copy.

        Returns whether the holder was listed for the digest (and is no longer).
        """
        request = pb.ReportBadCopyRequest(node_id=self.node_id, holder_id=holder_id, digest=digest)
        return bool(self._call("ReportBadCopy", request).dropped)

    # The location directory and fetch leases.

    def locate(self, digest: str, lease_key: str = "") -> Location:
        """Who holds ``digest``, and who holds the lease ``lease_key`` (e.g. ``blob:<digest>``)."""
        response = self._call("Locate", pb.LocateRequest(digest=digest, lease_key=lease_key))
        return Location(
            holders=[_holder(holder) for holder in response.holders],
            fetcher=_holder(response.fetcher) if response.HasField("fetcher") else None,
            fetching=bool(response.fetching),
            content=_content(response.content) if response.HasField("content") else None,
            failure=response.failure,
        )

    def claim(self, digest: str, key: str, ttl_ms: int) -> Claim:
        """Live holders of ``digest``, or else the lease on ``key`` (as ``acquire_lease``), in one call.

        Nothing is granted while live nodes hold the digest: copy from them,
        and ``acquire_lease`` only if none of them serves it.
        """
        request = pb.ClaimRequest(
            digest=digest, key=key, node_id=self.node_id, ttl_ms=ttl_ms, token=secrets.token_hex(16)
        )
        response = self._call("Claim", request)
        holders = [_holder(holder) for holder in response.holders]
        if holders:
            return Claim(holders, None)
        if response.granted:
            return Claim([], Lease(granted=True, token=response.token, fence=int(response.fence), holder=None))
        holder = _holder(response.fetcher) if response.HasField("fetcher") else None
        return Claim([], Lease(granted=False, token="", fence=int(response.fence), holder=holder))

    def acquire_lease(self, key: str, ttl_ms: int) -> Lease:
        """Try to become the one fetcher of ``key`` for ``ttl_ms``.

        The token is chosen here, so the retry after a timeout (possibly on
        another coordinator) gets the same grant instead of finding the
        lease taken by this very call.
        """
        request = pb.AcquireLeaseRequest(key=key, node_id=self.node_id, ttl_ms=ttl_ms, token=secrets.token_hex(16))
        response = self._call("AcquireLease", request)
        if response.granted:
            return Lease(granted=True, token=response.token, fence=int(response.fence), holder=None)
        holder = _holder(response.holder) if response.HasField("holder") else None
        return Lease(granted=False, token="", fence=int(response.fence), holder=holder)

    def renew_lease(self, key: str, token: str, ttl_ms: int) -> bool:
        """Extend the lease to ``ttl_ms`` from now; False when it was lost."""
        return bool(self._call("RenewLease", pb.RenewLeaseRequest(key=key, token=token, ttl_ms=ttl_ms)).renewed)

    def complete_fetch(self, key: str, token: str, digest: str, size: int, media_type: str, ttl_ms: int) -> None:
        """Register the fetched content on this node and release the lease, in one step.

        ``ttl_ms`` 0 means the content never expires. Raises ``LeaseLost``
        when the lease expired meanwhile; the content is then not registered.
        """
        request = pb.CompleteFetchRequest(
            key=key,
            token=token,
            node_id=self.node_id,
            content=pb.Content(digest=digest, size=size, media_type=media_type),
            ttl_ms=ttl_ms,
        )
        self._call("CompleteFetch", request)

    def abort_fetch(self, key: str, token: str, failure: str = "") -> None:
        """Release the lease (a no-op when it is no longer held under ``token``); also ends a tag lease.

        ``failure`` says why the fetch was given up when the reason holds for
        the whole cluster; ``locate`` reports it to the fetch's followers.
        """
        self._call("AbortFetch", pb.AbortFetchRequest(key=key, token=token, failure=failure))

    def touch(self, digests: Iterable[str]) -> None:
        """Push the TTL of ``digests`` forward; send hits batched, not one call per hit."""
        self._call("Touch", pb.TouchRequest(node_id=self.node_id, digests=list(digests)))

    # Tags.

    def get_tag(self, upstream: str, repository: str, tag: str) -> TagPointer | None:
        """The cluster's pointer for the tag, or None when it has none."""
        response = self._call("GetTag", pb.GetTagRequest(upstream=upstream, repository=repository, tag=tag))
        if not response.found:
            return None
        pointer = response.pointer
        return TagPointer(
            digest=pointer.digest, media_type=pointer.media_type, size=pointer.size, checked_at=pointer.checked_at
        )

    def put_tag(
        self, upstream: str, repository: str, tag: str, pointer: TagPointer, lease_token: str, *, release: bool = False
    ) -> None:
        """Move the tag; needs the token of the lease ``tag:<upstream>/<repository>:<tag>``.

        Raises ``LeaseLost`` when that token is not the current one. With
        ``release`` the lease is released in the same step; else it stays
        held, to release with ``abort_fetch``.
        """
        request = pb.PutTagRequest(
            upstream=upstream,
            repository=repository,
            tag=tag,
            pointer=pb.TagPointer(
                digest=pointer.digest, media_type=pointer.media_type, size=pointer.size, checked_at=pointer.checked_at
            ),
            lease_token=lease_token,
            release=release,
        )
        self._call("PutTag", request)

    # Content bound to its repository.

    def confirm_bindings(self, upstream: str, repository: str, digests: list[str], ttl_ms: int) -> None:
        """Confirm that ``digests`` belong to the repository for ``ttl_ms`` (0: without expiry); never shortens."""
        request = pb.ConfirmBindingsRequest(upstream=upstream, repository=repository, digests=digests, ttl_ms=ttl_ms)
        self._call("ConfirmBindings", request)

    def get_bindings(self, upstream: str, repository: str, digests: list[str]) -> dict[str, int]:
        """The confirmed ones of ``digests``, each with the milliseconds it stays so (0: without expiry)."""
        request = pb.GetBindingsRequest(upstream=upstream, repository=repository, digests=digests)
        return {binding.digest: int(binding.ttl_ms) for binding in self._call("GetBindings", request).bindings}

    # Metrics.

    def report_metrics(self, worker_id: str, sequence: int, counters: Mapping[str, int]) -> None:
        """Add a delta of counters; resend the same ``sequence`` after a failure, never a new one.

        ``worker_id`` names this process (unique per process lifetime) and
        ``sequence`` grows by one per delta; the coordinator applies each
        (node, worker, sequence) once.
        """
        request = pb.ReportMetricsRequest(
            node_id=self.node_id, worker_id=worker_id, sequence=sequence, counters=dict(counters)
        )
        self._call("ReportMetrics", request)

    def get_metrics(self) -> ClusterMetrics:
        """The counters of every node that reported, and the cluster's totals."""
        response = self._call("GetMetrics", pb.GetMetricsRequest())
        return ClusterMetrics(
            nodes=[
                NodeCounts(node_id=node.node_id, counters=dict(node.counters), live=bool(node.live))
                for node in response.nodes
            ],
            cluster=dict(response.cluster),
        )

    # Plumbing.

    def close(self) -> None:
        """End the probes and close the channels; later calls raise ``CoordinatorError``. Safe to call twice.

        Closing a channel cancels the calls in flight on it, a probe's
        included, so the wait for the probes is short.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels, self._channels, self._stubs = self._channels, [], []
            probes, self._probes = self._probes, []
            owned = self._pid == os.getpid()
            if owned and self._stopping is not None:
                self._stopping.set()
        if owned:
            for channel in channels:
                channel.close()
            for probe in probes:
                probe.join(self.timeout + 1)

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _node(self, url: str, capacity_bytes: int, used_bytes: int) -> pb.NodeInfo:
        return pb.NodeInfo(id=self.node_id, url=url, capacity_bytes=capacity_bytes, used_bytes=used_bytes)

    def _call(self, method: str, request: Any) -> Any:
        stubs, breakers, first = self._current_stubs()
        failures: list[str] = []
        for index in breakers.usable(first):
            try:
                response = getattr(stubs[index], method)(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in _FAILOVER_CODES:
                    log.debug("coordinator %s: %s %s", self.addresses[index], method, code.name)
                    failures.append(f"{self.addresses[index]}: {code.name}")
                    if breakers.failed(index, code.name):
                        self._start_probe(index)
                    continue
                raise _error(method, exc) from None
            breakers.succeeded(index)
            self._preferred = index
            return response
        tried = {failure.split(": ")[0] for failure in failures}
        skipped = [reason for reason in breakers.skipped() if reason.split(": ")[0] not in tried]
        answers = "; ".join(skipped + failures)
        raise CoordinatorUnavailable(f"{method}: no coordinator answered ({answers})", "UNAVAILABLE")

    def _current_stubs(self) -> tuple[list[pb_grpc.CoordinatorStub], Breakers, int]:
        with self._lock:
            if self._closed:
                raise CoordinatorError("the coordinator client is closed", "CANCELLED")
            if self._pid != os.getpid() or self._breakers is None:
                # A fresh process, or a child forked after the parent made
                # channels: the parent's channels are left alone (closing
                # them here would disturb the parent) and new ones are made,
                # with breakers all closed (the parent's probes did not
                # cross the fork). The pid is recorded last, so a failure
                # here is retried.
                self._channels = [self._channel(address) for address in self.addresses]
                self._stubs = [pb_grpc.CoordinatorStub(channel) for channel in self._channels]
                self._breakers = Breakers(
                    self.addresses,
                    cool_off=self.cool_off,
                    probe_timeout=self.timeout,
                    observer=self._observer,
                    shared=self._shared,
                )
                self._probes = []
                self._stopping = threading.Event()
                self._pid = os.getpid()
            return self._stubs, self._breakers, self._preferred

    def _start_probe(self, index: int) -> None:
        with self._lock:
            if self._closed or self._breakers is None or self._stopping is None:
                return
            probe = threading.Thread(
                target=self._probe_until_answered,
                args=(self._stubs[index], self._breakers, index, self._stopping),
                name=f"coordinator-probe-{self.addresses[index]}",
                daemon=True,
            )
            self._probes = [thread for thread in self._probes if thread.is_alive()] + [probe]
        probe.start()

    def _probe_until_answered(
        self, stub: pb_grpc.CoordinatorStub, breakers: Breakers, index: int, stopping: threading.Event
    ) -> None:
        """Probe ``index`` when it is due, until it answers or the client closes."""
        request = pb.LocateRequest(digest=PROBE_DIGEST)
        while (delay := breakers.until_probe(index)) is not None and not stopping.wait(delay):
            try:
                stub.Locate(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in _FAILOVER_CODES:
                    breakers.probe_failed(index, code.name)
                    continue
                if stopping.is_set():
                    return
                # Any other answer (a refusal) comes from a coordinator that answers.
            except ValueError:
                # The client closed the channel between the wait and the call.
                return
            breakers.succeeded(index)

    def _channel(self, address: str) -> grpc.Channel:
        if self._tls_ca is None:
            return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        credentials = grpc.ssl_channel_credentials(root_certificates=self._tls_ca)
        return grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)


def _contents(content: Iterable[Content]) -> list[pb.Content]:
    return [
        pb.Content(digest=item.digest, size=item.size, media_type=item.media_type, accessed_at=item.accessed_at)
        for item in content
    ]


def _holder(message: pb.Holder) -> Holder:
    return Holder(node_id=message.node_id, url=message.url)


def _content(message: pb.Content) -> Content:
    return Content(digest=message.digest, size=message.size, media_type=message.media_type)


def _error(method: str, exc: grpc.RpcError) -> CoordinatorError:
    code = exc.code()
    message = f"{method}: {code.name}: {exc.details()}"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return LeaseLost(message, code.name)
    return CoordinatorError(message, code.name)
