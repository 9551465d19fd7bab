"""The gRPC servicer: messages in, plain calls, messages out.

The only coordinator module that imports the generated code. Each method
turns its request into arguments for a domain object, and its result into a
response; ``_rpc`` maps what can go wrong to status codes in one table:

==========================  ===================
domain error / cause        status
==========================  ===================
InvalidArgument             INVALID_ARGUMENT
LeaseLost                   FAILED_PRECONDITION
Redis unreachable/readonly  UNAVAILABLE (a node fails over or degrades)
anything else               INTERNAL (logged with its traceback)
==========================  ===================
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
import redis

from coordinator.bindings import Bindings
from coordinator.errors import CoordinatorError, InvalidArgument, LeaseLost
from coordinator.fetches import Fetches
from coordinator.inventory import BatchedInventory
from coordinator.leases import Leases
from coordinator.locations import ContentInfo, Locations
from coordinator.membership import Membership, NodeInfo
from coordinator.metrics import Metrics
from coordinator.scheduler import Schedule
from coordinator.tags import Tags
from protos.shoal.v1 import coordinator_pb2 as pb
from protos.shoal.v1 import coordinator_pb2_grpc as pb_grpc
from protos.values import Holder, TagPointer

log = logging.getLogger(__name__)

_STATUS: dict[type[CoordinatorError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    LeaseLost: grpc.StatusCode.FAILED_PRECONDITION,
}

# Redis errors that mean "not now" rather than "never": connection loss,
# timeouts, a master still loading its data, or a Sentinel failover that
# left us talking to a replica. The caller may try another coordinator.
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError)

Request = TypeVar("Request")


def _rpc(method: Callable[[Any, Request], Any]) -> Callable[[Any, Request, grpc.ServicerContext], Any]:
    """Wrap a servicer method so that failures become status codes."""

    @functools.wraps(method)
    def handler(self: Any, request: Request, context: grpc.ServicerContext) -> Any:
        try:
            response = method(self, request)
        except CoordinatorError as exc:
            code = next((status for kind, status in _STATUS.items() if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
            message = str(exc)
        except _UNAVAILABLE as exc:
            # Logged once per outage: every node calls every second or so.
            if not self._redis_down:
                log.warning("Redis is unavailable (%s); answering UNAVAILABLE", type(exc).__name__)
            self._redis_down = True
            code, message = grpc.StatusCode.UNAVAILABLE, "the coordinator cannot reach Redis"
        except Exception:
            log.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, "internal error in the coordinator"
        else:
            if self._redis_down:
                log.info("Redis is reachable again")
                self._redis_down = False
            return response
        # Aborting raises, so it happens outside the try above.
        context.abort(code, message)

    return handler


def add_to_server(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    """Register ``servicer`` with ``server`` (the generated registration, kept here)."""
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Implements shoal.v1.Coordinator on top of the domain objects."""

    def __init__(
        self,
        *,
        membership: Membership,
        locations: Locations,
        inventory: BatchedInventory,
        leases: Leases,
        fetches: Fetches,
        schedule: Schedule,
        tags: Tags,
        bindings: Bindings,
        metrics: Metrics,
        max_evictions: int,
    ) -> None:
        self._membership = membership
        self._locations = locations
        self._inventory = inventory
        self._leases = leases
        self._fetches = fetches
        self._schedule = schedule
        self._tags = tags
        self._bindings = bindings
        self._metrics = metrics
        self._max_evictions = max_evictions
        self._redis_down = False

    @_rpc
    def Register(self, request: pb.RegisterRequest) -> pb.RegisterResponse:
        self._membership.register(_node(request.node))
        return pb.RegisterResponse(membership_ttl_ms=self._membership.ttl_ms)

    @_rpc
    def Heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        node = _node(request.node)
        if not self._membership.heartbeat(node):
            return pb.HeartbeatResponse(known=False)
        return pb.HeartbeatResponse(known=True, evict=self._schedule.pop_evictions(node.id, self._max_evictions))

    @_rpc
    def AnnounceInventory(self, request: pb.AnnounceInventoryRequest) -> pb.AnnounceInventoryResponse:
        ttl_ms = request.ttl_ms if request.HasField("ttl_ms") else None
        content = _contents(request.content)
        if request.batch_id:
            answer = self._inventory.announce(request.node_id, request.batch_id, content, ttl_ms, request.last)
            return pb.AnnounceInventoryResponse(evict=answer.evict, more=answer.more)
        return pb.AnnounceInventoryResponse(evict=self._locations.announce(request.node_id, content, ttl_ms))

    @_rpc
    def AddContent(self, request: pb.AddContentRequest) -> pb.AddContentResponse:
        ttl_ms = request.ttl_ms if request.HasField("ttl_ms") else None
        return pb.AddContentResponse(evict=self._locations.add(request.node_id, _contents(request.content), ttl_ms))

    @_rpc
    def DropContent(self, request: pb.DropContentRequest) -> pb.DropContentResponse:
        self._locations.drop(request.node_id, request.digests)
        return pb.DropContentResponse()

    @_rpc
    def ReportBadCopy(self, request: pb.ReportBadCopyRequest) -> pb.ReportBadCopyResponse:
        dropped = self._locations.report_bad_copy(request.node_id, request.holder_id, request.digest)
        # Kept in the log: the report is one node's word against another's.
        log.warning(
            "node %s reported a bad copy of %s from node %s (%s)",
            request.node_id,
            request.digest,
            request.holder_id,
            "unlisted it" if dropped else "it was not listed",
        )
        return pb.ReportBadCopyResponse(dropped=dropped)

    @_rpc
    def Locate(self, request: pb.LocateRequest) -> pb.LocateResponse:
        found = self._locations.locate(request.digest, request.lease_key)
        response = pb.LocateResponse(
            holders=[_holder(holder) for holder in found.holders], fetching=found.fetching, failure=found.failure
        )
        if found.fetcher is not None:
            response.fetcher.CopyFrom(_holder(found.fetcher))
        if found.content is not None:
            response.content.CopyFrom(_content(found.content))
        return response

    @_rpc
    def Claim(self, request: pb.ClaimRequest) -> pb.ClaimResponse:
        claimed = self._locations.claim(request.digest, request.key, request.node_id, request.ttl_ms, request.token)
        response = pb.ClaimResponse(holders=[_holder(holder) for holder in claimed.holders])
        if claimed.lease is not None and claimed.lease.granted:
            response.granted, response.token, response.fence = True, claimed.lease.token, claimed.lease.fence
        elif claimed.lease is not None:
            response.fence = claimed.lease.fence
        if claimed.fetcher is not None:
            response.fetcher.CopyFrom(_holder(claimed.fetcher))
        return response

    @_rpc
    def AcquireLease(self, request: pb.AcquireLeaseRequest) -> pb.AcquireLeaseResponse:
        lease = self._leases.acquire(request.key, request.node_id, request.ttl_ms, request.token)
        if lease.granted:
            return pb.AcquireLeaseResponse(granted=True, token=lease.token, fence=lease.fence)
        url = self._membership.urls([lease.holder]).get(lease.holder, "")
        return pb.AcquireLeaseResponse(
            granted=False, fence=lease.fence, holder=pb.Holder(node_id=lease.holder, url=url)
        )

    @_rpc
    def RenewLease(self, request: pb.RenewLeaseRequest) -> pb.RenewLeaseResponse:
        return pb.RenewLeaseResponse(renewed=self._leases.renew(request.key, request.token, request.ttl_ms))

    @_rpc
    def CompleteFetch(self, request: pb.CompleteFetchRequest) -> pb.CompleteFetchResponse:
        content = ContentInfo(
            digest=request.content.digest, size=request.content.size, media_type=request.content.media_type
        )
        self._fetches.complete(request.key, request.token, request.node_id, content, request.ttl_ms)
        return pb.CompleteFetchResponse()

    @_rpc
    def AbortFetch(self, request: pb.AbortFetchRequest) -> pb.AbortFetchResponse:
        self._leases.release(request.key, request.token, request.failure)
        return pb.AbortFetchResponse()

    @_rpc
    def Touch(self, request: pb.TouchRequest) -> pb.TouchResponse:
        self._schedule.touch(request.digests)
        return pb.TouchResponse()

    @_rpc
    def GetTag(self, request: pb.GetTagRequest) -> pb.GetTagResponse:
        pointer = self._tags.get(request.upstream, request.repository, request.tag)
        if pointer is None:
            return pb.GetTagResponse(found=False)
        return pb.GetTagResponse(
            found=True,
            pointer=pb.TagPointer(
                digest=pointer.digest,
                media_type=pointer.media_type,
                size=pointer.size,
                checked_at=pointer.checked_at,
            ),
        )

    @_rpc
    def PutTag(self, request: pb.PutTagRequest) -> pb.PutTagResponse:
        pointer = TagPointer(
            digest=request.pointer.digest,
            media_type=request.pointer.media_type,
            size=request.pointer.size,
            checked_at=request.pointer.checked_at,
        )
        self._tags.put(
            request.upstream, request.repository, request.tag, pointer, request.lease_token, release=request.release
        )
        return pb.PutTagResponse()

    @_rpc
    def ConfirmBindings(self, request: pb.ConfirmBindingsRequest) -> pb.ConfirmBindingsResponse:
        self._bindings.confirm(request.upstream, request.repository, list(request.digests), request.ttl_ms)
        return pb.ConfirmBindingsResponse()

    @_rpc
    def GetBindings(self, request: pb.GetBindingsRequest) -> pb.GetBindingsResponse:
        found = self._bindings.confirmed(request.upstream, request.repository, list(request.digests))
        return pb.GetBindingsResponse(
            bindings=[pb.Binding(digest=digest, ttl_ms=ttl_ms) for digest, ttl_ms in found.items()]
        )

    @_rpc
    def ReportMetrics(self, request: pb.ReportMetricsRequest) -> pb.ReportMetricsResponse:
        self._metrics.report(request.node_id, request.worker_id, request.sequence, dict(request.counters))
        return pb.ReportMetricsResponse()

    @_rpc
    def GetMetrics(self, request: pb.GetMetricsRequest) -> pb.GetMetricsResponse:
        snapshot = self._metrics.snapshot()
        return pb.GetMetricsResponse(
            nodes=[
                pb.NodeMetrics(node_id=node.node_id, counters=node.counters, live=node.live) for node in snapshot.nodes
            ],
            cluster=snapshot.cluster,
        )


def _node(message: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(
        id=message.id, url=message.url, capacity_bytes=message.capacity_bytes, used_bytes=message.used_bytes
    )


def _contents(messages: Iterable[pb.Content]) -> list[ContentInfo]:
    return [
        ContentInfo(digest=item.digest, size=item.size, media_type=item.media_type, accessed_at=item.accessed_at)
        for item in messages
    ]


def _content(content: ContentInfo) -> pb.Content:
    return pb.Content(digest=content.digest, size=content.size, media_type=content.media_type)


def _holder(holder: Holder) -> pb.Holder:
    return pb.Holder(node_id=holder.node_id, url=holder.url)
