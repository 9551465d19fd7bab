"""The coordinator client against in-process gRPC servers that run a fake coordinator.

Every test drives the real ``CoordinatorClient`` over real channels; only
the coordinator is fake: a subclass of the generated servicer that answers
what the test scripted, records each request with its metadata, aborts with
a chosen status code, or hangs until released. Each server binds to
``127.0.0.1:0``, so tests never compete for ports.

Forking a process that runs gRPC threads is unreliable (a child sometimes
finds its fresh channel UNAVAILABLE), so the fork tests stand in for the
child by changing what ``os.getpid`` returns.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from node.breaker import Marks
from node.coordinator_client import (
    INVENTORY_BATCH,
    PROBE_DIGEST,
    Claim,
    ClusterMetrics,
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnavailable,
    Lease,
    LeaseLost,
    Location,
)
from node.storage.layout import Layout
from protos.metrics import NodeCounts
from protos.shoal.v1 import coordinator_pb2 as pb
from protos.shoal.v1 import coordinator_pb2_grpc as pb_grpc
from protos.values import Content, Holder, TagPointer
from testbed.processes import require_binary, wait_until

SECRET = "cluster-secret-for-client-tests-91c2"
NODE = "node-a"
URL = "http://a:5000"
LAYER = "sha256:" + "ab" * 32
LAYER_KEY = f"blob:{LAYER}"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# Generous, so that a call to a local server never times out on a busy
# machine; the deadline tests pass a short timeout of their own.
TIMEOUT = 5.0
SHORT_TIMEOUT = 0.3
# A breaker's cool-off for the tests that wait for a probe.
COOL_OFF = 0.05
# How long a hanging servicer waits to be released. A client that ignored
# its deadline would wait this long and then get an answer, which the
# deadline tests would notice.
HANG_LIMIT = 5.0

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]


@dataclass(frozen=True)
class Received:
    """One call as the fake coordinator saw it."""

    method: str
    request: Any
    metadata: dict[str, str]
    time_remaining: float | None


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    """Answers every method from a script and records what it received.

    ``answers[method]`` is the response (default: the empty response), or
    a function of the request that returns it.
    ``failures`` holds status codes the next calls abort with, one per call.
    While ``hang`` is set, calls set ``entered`` and wait for ``release``
    (at most ``HANG_LIMIT``) before they answer. The client's breaker
    probes (a ``Locate`` of ``PROBE_DIGEST``) are treated the same, but
    recorded apart, in ``probes``: ``methods`` lists the other calls.
    """

    def __init__(self) -> None:
        self.address = ""
        self.answers: dict[str, Any] = {}
        self.failures: deque[grpc.StatusCode] = deque()
        self.hang = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.received: list[Received] = []
        self.probes: list[Received] = []
        self._lock = threading.Lock()

    def methods(self) -> list[str]:
        with self._lock:
            return [call.method for call in self.received]

    def probed(self) -> int:
        with self._lock:
            return len(self.probes)

    def last(self, method: str) -> Received:
        with self._lock:
            calls = [call for call in self.received if call.method == method]
        assert calls, f"{method} never reached {self.address}"
        return calls[-1]

    def answer(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            metadata = {item.key: item.value for item in context.invocation_metadata()}
            received = Received(method, request, metadata, context.time_remaining())
            probe = method == "Locate" and request.digest == PROBE_DIGEST
            (self.probes if probe else self.received).append(received)
            failure = self.failures.popleft() if self.failures else None
        if failure is not None:
            context.abort(failure, f"scripted {failure.name}")
        if self.hang:
            self.entered.set()
            self.release.wait(HANG_LIMIT)
        if method in self.answers:
            answer = self.answers[method]
            return answer(request) if callable(answer) else answer
        return getattr(pb, SERVICE.methods_by_name[method].output_type.name)()


def _rpc(method: str) -> Callable[[FakeCoordinator, Any, grpc.ServicerContext], Any]:
    def handle(self: FakeCoordinator, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer(method, request, context)

    handle.__name__ = method
    return handle


# Every method of the service, overridden the same way: the generated base
# class would answer UNIMPLEMENTED.
for _method in SERVICE.methods_by_name:
    setattr(FakeCoordinator, _method, _rpc(_method))
del _method


StartCoordinator = Callable[..., FakeCoordinator]


class Breakers:
    """The client's breaker observer: every state reported, in order, per address."""

    def __init__(self) -> None:
        self.reported: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def coordinator_reachable(self, address: str, reachable: bool) -> None:
        with self._lock:
            self.reported.append((address, reachable))

    def states(self, address: str) -> list[bool]:
        with self._lock:
            return [reachable for reported, reachable in self.reported if reported == address]

    def wait(self, address: str, *, reachable: bool) -> None:
        """Until the last state reported for ``address`` is ``reachable``."""
        wait_until(
            lambda: self.states(address)[-1:] == [reachable],
            timeout=HANG_LIMIT,
            message=lambda: f"{address}: reported {self.states(address)}",
        )


@pytest.fixture
def start_coordinator() -> Iterator[StartCoordinator]:
    """Starts fake coordinators on free ports; all are released and stopped at teardown."""
    running: list[tuple[FakeCoordinator, grpc.Server]] = []

    def start(credentials: grpc.ServerCredentials | None = None) -> FakeCoordinator:
        fake = FakeCoordinator()
        server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_CoordinatorServicer_to_server(fake, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        fake.address = f"127.0.0.1:{port}"
        server.start()
        running.append((fake, server))
        return fake

    yield start
    for fake, server in running:
        fake.release.set()
        assert server.stop(grace=None).wait(HANG_LIMIT), f"the fake coordinator at {fake.address} did not stop"


@pytest.fixture
def coordinator(start_coordinator: StartCoordinator) -> FakeCoordinator:
    return start_coordinator()


@pytest.fixture
def down_address() -> Iterator[str]:
    """An address nobody listens on: the port stays bound (so nobody takes it) but refuses connections."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def connect(*coordinators: FakeCoordinator | str, timeout: float = TIMEOUT, **options: Any) -> CoordinatorClient:
    addresses = [item if isinstance(item, str) else item.address for item in coordinators]
    return CoordinatorClient(addresses, SECRET, NODE, timeout=timeout, **options)


@pytest.fixture
def client(coordinator: FakeCoordinator) -> Iterator[CoordinatorClient]:
    with connect(coordinator) as connected:
        yield connected


# Calls and the dataclasses they return.


def test_register_sends_the_node_and_returns_the_membership_ttl_in_seconds(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    coordinator.answers["Register"] = pb.RegisterResponse(membership_ttl_ms=10500)

    assert client.register(URL, capacity_bytes=1000, used_bytes=250) == 10.5
    assert coordinator.last("Register").request == pb.RegisterRequest(
        node=pb.NodeInfo(id=NODE, url=URL, capacity_bytes=1000, used_bytes=250)
    )


def test_heartbeat_returns_whether_the_node_is_known_and_the_evictions(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    coordinator.answers["Heartbeat"] = pb.HeartbeatResponse(known=True, evict=[LAYER, "sha256:" + "cd" * 32])

    assert client.heartbeat(URL, capacity_bytes=1000, used_bytes=250) == (True, [LAYER, "sha256:" + "cd" * 32])
    assert coordinator.last("Heartbeat").request == pb.HeartbeatRequest(
        node=pb.NodeInfo(id=NODE, url=URL, capacity_bytes=1000, used_bytes=250)
    )

    coordinator.answers["Heartbeat"] = pb.HeartbeatResponse(known=False)
    assert client.heartbeat(URL) == (False, [])


ANNOUNCED = [Content(LAYER, 1234, LAYER_TYPE, accessed_at=1700000000.5), Content("sha256:" + "cd" * 32)]
ANNOUNCED_PB = [
    pb.Content(digest=LAYER, size=1234, media_type=LAYER_TYPE, accessed_at=1700000000.5),
    pb.Content(digest="sha256:" + "cd" * 32),
]


@pytest.mark.parametrize("ttl_ms", [None, 0, 3600000], ids=["default-ttl", "never-expires", "one-hour"])
def test_announce_inventory_sends_the_content_and_a_ttl_only_when_given(
    coordinator: FakeCoordinator, client: CoordinatorClient, ttl_ms: int | None
) -> None:
    coordinator.answers["AnnounceInventory"] = pb.AnnounceInventoryResponse(evict=[LAYER])

    assert client.announce_inventory(ANNOUNCED, ttl_ms=ttl_ms) == [LAYER]
    request = coordinator.last("AnnounceInventory").request
    assert request.node_id == NODE
    assert list(request.content) == ANNOUNCED_PB
    # Absent and 0 differ: absent is the coordinator's default TTL, 0 never expires.
    assert request.HasField("ttl_ms") == (ttl_ms is not None)
    assert request.ttl_ms == (ttl_ms or 0)


def test_a_large_inventory_goes_in_batches_under_one_id_and_the_last_says_so(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    coordinator.answers["AnnounceInventory"] = pb.AnnounceInventoryResponse(evict=[LAYER])
    inventory = (Content(f"sha256:{i:064x}", i) for i in range(2 * INVENTORY_BATCH + 1))

    # Each batch's evictions come back together.
    assert client.announce_inventory(inventory, ttl_ms=0) == [LAYER] * 3
    requests = [call.request for call in coordinator.received if call.method == "AnnounceInventory"]
    assert [len(request.content) for request in requests] == [INVENTORY_BATCH, INVENTORY_BATCH, 1]
    assert [request.last for request in requests] == [False, False, True]
    assert len({request.batch_id for request in requests}) == 1 and requests[0].batch_id
    assert [item.digest for request in requests for item in request.content] == [
        f"sha256:{i:064x}" for i in range(2 * INVENTORY_BATCH + 1)
    ]
    assert all(request.HasField("ttl_ms") and request.ttl_ms == 0 for request in requests)
    # The next announcement is a new one.
    client.announce_inventory([])
    assert coordinator.last("AnnounceInventory").request.batch_id != requests[0].batch_id
    assert coordinator.last("AnnounceInventory").request.last


def test_the_end_of_an_announcement_is_asked_for_again_while_the_coordinator_says_more(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    ends = 0

    def answer(request: pb.AnnounceInventoryRequest) -> pb.AnnounceInventoryResponse:
        nonlocal ends
        ends += request.last
        return pb.AnnounceInventoryResponse(evict=[LAYER] if request.content else [], more=request.last and ends < 3)

    coordinator.answers["AnnounceInventory"] = answer
    assert client.announce_inventory(ANNOUNCED) == [LAYER]
    requests = [call.request for call in coordinator.received if call.method == "AnnounceInventory"]
    assert [(len(request.content), request.last) for request in requests] == [(2, True), (0, True), (0, True)]
    assert len({request.batch_id for request in requests}) == 1


@pytest.mark.parametrize("ttl_ms", [None, 0, 3600000], ids=["default-ttl", "never-expires", "one-hour"])
def test_add_content_sends_the_content_and_a_ttl_only_when_given(
    coordinator: FakeCoordinator, client: CoordinatorClient, ttl_ms: int | None
) -> None:
    coordinator.answers["AddContent"] = pb.AddContentResponse(evict=[LAYER])

    assert client.add_content(ANNOUNCED, ttl_ms=ttl_ms) == [LAYER]
    request = coordinator.last("AddContent").request
    assert request.node_id == NODE
    assert list(request.content) == ANNOUNCED_PB
    assert request.HasField("ttl_ms") == (ttl_ms is not None)
    assert request.ttl_ms == (ttl_ms or 0)


def test_drop_content_sends_the_digests(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    client.drop_content(iter([LAYER, "sha256:" + "cd" * 32]))
    assert coordinator.last("DropContent").request == pb.DropContentRequest(
        node_id=NODE, digests=[LAYER, "sha256:" + "cd" * 32]
    )


def test_report_bad_copy_names_this_node_the_holder_and_the_digest(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    coordinator.answers["ReportBadCopy"] = pb.ReportBadCopyResponse(dropped=True)
    assert client.report_bad_copy("node-b", LAYER)
    assert coordinator.last("ReportBadCopy").request == pb.ReportBadCopyRequest(
        node_id=NODE, holder_id="node-b", digest=LAYER
    )


def test_locate_returns_holders_fetcher_and_content(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    coordinator.answers["Locate"] = pb.LocateResponse(
        holders=[pb.Holder(node_id="node-b", url="http://b:5000"), pb.Holder(node_id="node-c", url="http://c:5000")],
        fetcher=pb.Holder(node_id="node-d", url="http://d:5000"),
        fetching=True,
        content=pb.Content(digest=LAYER, size=1234, media_type=LAYER_TYPE),
    )

    assert client.locate(LAYER, LAYER_KEY) == Location(
        holders=[Holder("node-b", "http://b:5000"), Holder("node-c", "http://c:5000")],
        fetcher=Holder("node-d", "http://d:5000"),
        fetching=True,
        content=Content(LAYER, 1234, LAYER_TYPE),
    )
    assert coordinator.last("Locate").request == pb.LocateRequest(digest=LAYER, lease_key=LAYER_KEY)


def test_locate_without_fetcher_or_content_returns_none_for_them(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    # Fetching with no fetcher: the lease holder's membership expired.
    coordinator.answers["Locate"] = pb.LocateResponse(fetching=True)

    assert client.locate(LAYER) == Location(holders=[], fetcher=None, fetching=True, content=None)
    assert coordinator.last("Locate").request == pb.LocateRequest(digest=LAYER, lease_key="")


def test_acquire_lease_granted_returns_the_token_and_fence(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    coordinator.answers["AcquireLease"] = pb.AcquireLeaseResponse(
        granted=True, token="granted-token", fence=7, holder=pb.Holder(node_id=NODE, url=URL)
    )

    assert client.acquire_lease(LAYER_KEY, 30000) == Lease(granted=True, token="granted-token", fence=7, holder=None)
    request = coordinator.last("AcquireLease").request
    assert (request.key, request.node_id, request.ttl_ms) == (LAYER_KEY, NODE, 30000)
    assert len(request.token) == 32 and int(request.token, 16) >= 0, "the client picks a random hex token"


def test_acquire_lease_picks_a_new_token_per_call_and_keeps_it_across_failover(
    start_coordinator: StartCoordinator,
) -> None:
    first, second = start_coordinator(), start_coordinator()
    first.failures.append(grpc.StatusCode.UNAVAILABLE)
    with connect(first, second) as client:
        client.acquire_lease(LAYER_KEY, 30000)
        client.acquire_lease(LAYER_KEY, 30000)

    tried, retried = first.last("AcquireLease").request, second.received[0].request
    assert tried.token == retried.token, "the retry on another coordinator must get the same grant"
    assert second.last("AcquireLease").request.token != tried.token


@pytest.mark.parametrize(
    ("answer", "holder"),
    [
        (pb.Holder(node_id="node-b", url="http://b:5000"), Holder("node-b", "http://b:5000")),
        (pb.Holder(node_id="node-b", url=""), Holder("node-b", "")),
        (None, None),
    ],
    ids=["live-holder", "expired-holder", "no-holder"],
)
def test_acquire_lease_held_returns_the_holder_and_no_token(
    coordinator: FakeCoordinator, client: CoordinatorClient, answer: pb.Holder | None, holder: Holder | None
) -> None:
    coordinator.answers["AcquireLease"] = pb.AcquireLeaseResponse(granted=False, token="not-ours", fence=3)
    if answer is not None:
        coordinator.answers["AcquireLease"].holder.CopyFrom(answer)

    assert client.acquire_lease(LAYER_KEY, 30000) == Lease(granted=False, token="", fence=3, holder=holder)


def test_claim_with_holders_returns_them_and_no_lease(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    coordinator.answers["Claim"] = pb.ClaimResponse(holders=[pb.Holder(node_id="node-b", url="http://b:5000")])

    assert client.claim(LAYER, LAYER_KEY, 30000) == Claim([Holder("node-b", "http://b:5000")], None)
    request = coordinator.last("Claim").request
    assert (request.digest, request.key, request.node_id, request.ttl_ms) == (LAYER, LAYER_KEY, NODE, 30000)
    assert len(request.token) == 32 and int(request.token, 16) >= 0, "the client picks a random hex token"


def test_claim_granted_returns_the_lease(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    coordinator.answers["Claim"] = pb.ClaimResponse(granted=True, token="granted-token", fence=7)

    assert client.claim(LAYER, LAYER_KEY, 30000) == Claim(
        [], Lease(granted=True, token="granted-token", fence=7, holder=None)
    )


def test_claim_held_elsewhere_returns_the_fetcher(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    coordinator.answers["Claim"] = pb.ClaimResponse(fence=3, fetcher=pb.Holder(node_id="node-b", url="http://b:5000"))

    assert client.claim(LAYER, LAYER_KEY, 30000) == Claim(
        [], Lease(granted=False, token="", fence=3, holder=Holder("node-b", "http://b:5000"))
    )


def test_claim_keeps_its_token_across_failover(start_coordinator: StartCoordinator) -> None:
    first, second = start_coordinator(), start_coordinator()
    first.failures.append(grpc.StatusCode.UNAVAILABLE)
    with connect(first, second) as client:
        client.claim(LAYER, LAYER_KEY, 30000)

    assert first.last("Claim").request.token == second.last("Claim").request.token


@pytest.mark.parametrize("renewed", [True, False])
def test_renew_lease_returns_whether_it_was_renewed(
    coordinator: FakeCoordinator, client: CoordinatorClient, renewed: bool
) -> None:
    coordinator.answers["RenewLease"] = pb.RenewLeaseResponse(renewed=renewed)

    assert client.renew_lease(LAYER_KEY, "token-1", 30000) is renewed
    assert coordinator.last("RenewLease").request == pb.RenewLeaseRequest(key=LAYER_KEY, token="token-1", ttl_ms=30000)


def test_complete_fetch_sends_the_content_and_the_token(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    client.complete_fetch(LAYER_KEY, "token-1", LAYER, 1234, LAYER_TYPE, 3600000)
    assert coordinator.last("CompleteFetch").request == pb.CompleteFetchRequest(
        key=LAYER_KEY,
        token="token-1",
        node_id=NODE,
        content=pb.Content(digest=LAYER, size=1234, media_type=LAYER_TYPE),
        ttl_ms=3600000,
    )


def test_abort_fetch_sends_key_and_token(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    client.abort_fetch(LAYER_KEY, "token-1")
    assert coordinator.last("AbortFetch").request == pb.AbortFetchRequest(key=LAYER_KEY, token="token-1")


def test_touch_sends_the_digests(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    client.touch(iter([LAYER]))
    assert coordinator.last("Touch").request == pb.TouchRequest(node_id=NODE, digests=[LAYER])


POINTER = TagPointer(LAYER, "application/vnd.oci.image.manifest.v1+json", 512, checked_at=1700000000.25)
POINTER_PB = pb.TagPointer(
    digest=LAYER, media_type="application/vnd.oci.image.manifest.v1+json", size=512, checked_at=1700000000.25
)


def test_get_tag_returns_the_pointer_when_found(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    coordinator.answers["GetTag"] = pb.GetTagResponse(found=True, pointer=POINTER_PB)

    assert client.get_tag("docker.io", "library/alpine", "3.20") == POINTER
    assert coordinator.last("GetTag").request == pb.GetTagRequest(
        upstream="docker.io", repository="library/alpine", tag="3.20"
    )


def test_get_tag_returns_none_when_not_found(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    # A stale pointer next to found=False must not be taken for an answer.
    coordinator.answers["GetTag"] = pb.GetTagResponse(found=False, pointer=POINTER_PB)

    assert client.get_tag("docker.io", "library/alpine", "3.20") is None


def test_put_tag_sends_the_pointer_and_the_lease_token(coordinator: FakeCoordinator, client: CoordinatorClient) -> None:
    client.put_tag("docker.io", "library/alpine", "3.20", POINTER, "tag-token")
    assert coordinator.last("PutTag").request == pb.PutTagRequest(
        upstream="docker.io", repository="library/alpine", tag="3.20", pointer=POINTER_PB, lease_token="tag-token"
    )
    client.put_tag("docker.io", "library/alpine", "3.20", POINTER, "tag-token", release=True)
    assert coordinator.last("PutTag").request.release


@pytest.mark.parametrize(
    "fenced",
    [
        lambda client: client.complete_fetch(LAYER_KEY, "stale", LAYER, 1, LAYER_TYPE, 0),
        lambda client: client.put_tag("docker.io", "library/alpine", "3.20", POINTER, "stale"),
    ],
    ids=["complete_fetch", "put_tag"],
)
def test_a_fenced_act_with_a_stale_token_raises_lease_lost(
    coordinator: FakeCoordinator, client: CoordinatorClient, fenced: Callable[[CoordinatorClient], None]
) -> None:
    coordinator.failures.append(grpc.StatusCode.FAILED_PRECONDITION)

    with pytest.raises(LeaseLost) as raised:
        fenced(client)
    assert raised.value.code == "FAILED_PRECONDITION"


def test_report_metrics_sends_the_delta_with_its_sequence(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    client.report_metrics("worker-1", 42, {"hits": 3, "misses": 1})
    assert coordinator.last("ReportMetrics").request == pb.ReportMetricsRequest(
        node_id=NODE, worker_id="worker-1", sequence=42, counters={"hits": 3, "misses": 1}
    )


def test_get_metrics_returns_every_node_and_the_cluster_totals(
    coordinator: FakeCoordinator, client: CoordinatorClient
) -> None:
    coordinator.answers["GetMetrics"] = pb.GetMetricsResponse(
        nodes=[
            pb.NodeMetrics(node_id="node-a", counters={"hits": 3}, live=True),
            pb.NodeMetrics(node_id="node-b", counters={"hits": 4, "misses": 2}, live=False),
        ],
        cluster={"hits": 7, "misses": 2},
    )

    assert client.get_metrics() == ClusterMetrics(
        nodes=[NodeCounts("node-a", {"hits": 3}, True), NodeCounts("node-b", {"hits": 4, "misses": 2}, False)],
        cluster={"hits": 7, "misses": 2},
    )
    assert coordinator.last("GetMetrics").request == pb.GetMetricsRequest()


# One harmless call per method, for the tests that hold for every call.
CALLS: dict[str, Callable[[CoordinatorClient], object]] = {
    "Register": lambda client: client.register(URL),
    "Heartbeat": lambda client: client.heartbeat(URL),
    "AnnounceInventory": lambda client: client.announce_inventory([]),
    "AddContent": lambda client: client.add_content([]),
    "DropContent": lambda client: client.drop_content([LAYER]),
    "ReportBadCopy": lambda client: client.report_bad_copy("node-b", LAYER),
    "Locate": lambda client: client.locate(LAYER),
    "Claim": lambda client: client.claim(LAYER, LAYER_KEY, 1000),
    "AcquireLease": lambda client: client.acquire_lease(LAYER_KEY, 1000),
    "RenewLease": lambda client: client.renew_lease(LAYER_KEY, "token-1", 1000),
    "CompleteFetch": lambda client: client.complete_fetch(LAYER_KEY, "token-1", LAYER, 1, LAYER_TYPE, 0),
    "AbortFetch": lambda client: client.abort_fetch(LAYER_KEY, "token-1"),
    "Touch": lambda client: client.touch([LAYER]),
    "GetTag": lambda client: client.get_tag("docker.io", "library/alpine", "3.20"),
    "PutTag": lambda client: client.put_tag("docker.io", "library/alpine", "3.20", POINTER, "token-1"),
    "ConfirmBindings": lambda client: client.confirm_bindings("docker.io", "library/alpine", [LAYER], 1000),
    "GetBindings": lambda client: client.get_bindings("docker.io", "library/alpine", [LAYER]),
    "ReportMetrics": lambda client: client.report_metrics("worker-1", 1, {}),
    "GetMetrics": lambda client: client.get_metrics(),
}


def test_the_call_table_covers_every_method_of_the_service() -> None:
    assert sorted(CALLS) == sorted(SERVICE.methods_by_name)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_call_carries_the_secret_and_the_deadline(
    coordinator: FakeCoordinator, client: CoordinatorClient, method: str
) -> None:
    CALLS[method](client)

    received = coordinator.last(method)
    assert received.metadata["authorization"] == f"Bearer {SECRET}"
    # The server's clock reads the deadline a little differently; a call without one would see None.
    assert received.time_remaining is not None and abs(received.time_remaining - TIMEOUT) < 1


# Errors.


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, CoordinatorUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, CoordinatorUnavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, LeaseLost),
        (grpc.StatusCode.INVALID_ARGUMENT, CoordinatorError),
        (grpc.StatusCode.UNAUTHENTICATED, CoordinatorError),
        (grpc.StatusCode.PERMISSION_DENIED, CoordinatorError),
        (grpc.StatusCode.NOT_FOUND, CoordinatorError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, CoordinatorError),
        (grpc.StatusCode.INTERNAL, CoordinatorError),
        (grpc.StatusCode.UNKNOWN, CoordinatorError),
    ],
    ids=lambda item: item.name if isinstance(item, grpc.StatusCode) else item.__name__,
)
def test_status_codes_map_to_the_client_errors(
    coordinator: FakeCoordinator, client: CoordinatorClient, code: grpc.StatusCode, kind: type[CoordinatorError]
) -> None:
    coordinator.failures.append(code)

    with pytest.raises(CoordinatorError) as raised:
        client.locate(LAYER)
    error = raised.value
    assert type(error) is kind
    assert "Locate" in str(error) and code.name in str(error)
    if kind is CoordinatorUnavailable:
        # Whatever each address answered, the node only needs to know that none did.
        assert error.code == "UNAVAILABLE"
    else:
        assert error.code == code.name
        assert f"scripted {code.name}" in str(error), "the coordinator's details are part of the message"
    # The node logs one domain error, not the gRPC exception behind it.
    assert "RpcError" not in "".join(traceback.format_exception(error))


def test_the_error_code_defaults_to_unknown() -> None:
    assert CoordinatorError("refused").code == "UNKNOWN"


def test_the_secret_appears_in_no_error_and_no_log_line(
    start_coordinator: StartCoordinator, down_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = start_coordinator()
    refusing.failures.extend([grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION])
    errors: list[CoordinatorError] = []
    caplog.set_level("DEBUG", logger="node.coordinator_client")
    with connect(refusing) as client:
        for _ in range(2):
            with pytest.raises(CoordinatorError) as raised:
                client.register(URL)
            errors.append(raised.value)
    with pytest.raises(CoordinatorError) as raised:
        client.register(URL)
    errors.append(raised.value)
    with connect(down_address) as down, pytest.raises(CoordinatorUnavailable) as unavailable:
        down.register(URL)
    errors.append(unavailable.value)

    assert [type(error) for error in errors] == [CoordinatorError, LeaseLost, CoordinatorError, CoordinatorUnavailable]
    for error in errors:
        assert SECRET not in str(error) and SECRET not in repr(error)
        assert SECRET not in "".join(traceback.format_exception(error))
    assert SECRET not in repr(client) and NODE in repr(client)
    assert caplog.records, "the failover was logged"
    assert SECRET not in caplog.text


# Failover.


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_failing_coordinator_fails_over_and_the_next_call_starts_at_the_one_that_answered(
    start_coordinator: StartCoordinator, code: grpc.StatusCode
) -> None:
    first, second = start_coordinator(), start_coordinator()
    first.failures.append(code)
    second.answers["Register"] = pb.RegisterResponse(membership_ttl_ms=10000)
    with connect(first, second) as client:
        assert client.register(URL) == 10.0
        client.heartbeat(URL)

    assert first.methods() == ["Register"]
    assert second.methods() == ["Register", "Heartbeat"]
    assert second.last("Register").request == first.last("Register").request


def test_a_coordinator_that_is_down_fails_over_to_the_next(
    start_coordinator: StartCoordinator, down_address: str
) -> None:
    up = start_coordinator()
    with connect(down_address, up) as client:
        client.register(URL)
        client.heartbeat(URL)

    assert up.methods() == ["Register", "Heartbeat"]


def test_failover_wraps_around_to_the_first_address(start_coordinator: StartCoordinator) -> None:
    first, second = start_coordinator(), start_coordinator()
    first.failures.append(grpc.StatusCode.UNAVAILABLE)
    breakers = Breakers()
    with connect(first, second, cool_off=COOL_OFF, observer=breakers) as client:
        client.register(URL)
        # The first is used again once it answered a probe.
        breakers.wait(first.address, reachable=True)
        # Now the second is preferred; when it fails, the first is next.
        second.failures.append(grpc.StatusCode.UNAVAILABLE)
        client.heartbeat(URL)
        client.touch([LAYER])

    assert first.methods() == ["Register", "Heartbeat", "Touch"]
    assert second.methods() == ["Register", "Heartbeat"]


def test_when_no_coordinator_answers_the_call_raises_unavailable_naming_each_failure(
    start_coordinator: StartCoordinator, down_address: str
) -> None:
    refusing = start_coordinator()
    refusing.failures.append(grpc.StatusCode.UNAVAILABLE)
    with connect(down_address, refusing) as client, pytest.raises(CoordinatorUnavailable) as raised:
        client.locate(LAYER)

    assert raised.value.code == "UNAVAILABLE"
    assert str(raised.value) == (
        f"Locate: no coordinator answered ({down_address}: UNAVAILABLE; {refusing.address}: UNAVAILABLE)"
    )


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED]
)
def test_a_refusal_is_final_and_does_not_fail_over(start_coordinator: StartCoordinator, code: grpc.StatusCode) -> None:
    first, second = start_coordinator(), start_coordinator()
    first.failures.append(code)
    with connect(first, second) as client:
        with pytest.raises(CoordinatorError) as raised:
            client.register(URL)
        assert raised.value.code == code.name
        client.heartbeat(URL)

    assert first.methods() == ["Register", "Heartbeat"], "the refusing coordinator stays preferred"
    assert second.methods() == []


# Deadlines.


def test_the_timeout_bounds_a_call_to_a_coordinator_that_hangs(coordinator: FakeCoordinator) -> None:
    coordinator.hang = True
    started = time.monotonic()
    with connect(coordinator, timeout=SHORT_TIMEOUT) as client, pytest.raises(CoordinatorUnavailable) as raised:
        client.register(URL)
    elapsed = time.monotonic() - started

    assert coordinator.entered.is_set()
    assert "DEADLINE_EXCEEDED" in str(raised.value)
    assert SHORT_TIMEOUT <= elapsed < HANG_LIMIT / 2


def test_a_coordinator_that_hangs_fails_over_to_the_next(start_coordinator: StartCoordinator) -> None:
    hanging, answering = start_coordinator(), start_coordinator()
    hanging.hang = True
    answering.answers["Register"] = pb.RegisterResponse(membership_ttl_ms=10000)
    started = time.monotonic()
    with connect(hanging, answering, timeout=SHORT_TIMEOUT) as client:
        assert client.register(URL) == 10.0
    elapsed = time.monotonic() - started

    assert hanging.entered.is_set()
    assert answering.methods() == ["Register"]
    assert elapsed < HANG_LIMIT / 2


# Circuit breakers.


def test_after_a_deadline_the_next_calls_fail_at_once_without_reaching_the_coordinator(
    coordinator: FakeCoordinator,
) -> None:
    coordinator.hang = True
    with connect(coordinator, timeout=SHORT_TIMEOUT) as client:
        with pytest.raises(CoordinatorUnavailable):
            client.locate(LAYER)
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(CoordinatorUnavailable) as raised:
                client.acquire_lease(LAYER_KEY, 1000)
        elapsed = time.monotonic() - started

    assert coordinator.methods() == ["Locate"]
    assert elapsed < SHORT_TIMEOUT, "a later call waited for the hung coordinator"
    assert raised.value.code == "UNAVAILABLE"
    assert str(raised.value) == (
        f"AcquireLease: no coordinator answered ({coordinator.address}: DEADLINE_EXCEEDED, "
        "skipped until it answers a probe)"
    )


def test_a_hung_coordinator_is_not_tried_again_when_the_other_fails(start_coordinator: StartCoordinator) -> None:
    hanging, answering = start_coordinator(), start_coordinator()
    hanging.hang = True
    with connect(hanging, answering, timeout=SHORT_TIMEOUT) as client:
        client.register(URL)
        client.heartbeat(URL)
        answering.failures.append(grpc.StatusCode.UNAVAILABLE)
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable) as raised:
            client.heartbeat(URL)
        elapsed = time.monotonic() - started

    assert hanging.methods() == ["Register"]
    assert answering.methods() == ["Register", "Heartbeat", "Heartbeat"]
    assert elapsed < SHORT_TIMEOUT
    assert str(raised.value) == (
        f"Heartbeat: no coordinator answered ({hanging.address}: DEADLINE_EXCEEDED, skipped until it answers a probe; "
        f"{answering.address}: UNAVAILABLE)"
    )


def test_a_probe_brings_the_address_back_once_it_answers(coordinator: FakeCoordinator) -> None:
    coordinator.failures.extend([grpc.StatusCode.UNAVAILABLE] * 3)
    breakers = Breakers()
    with connect(coordinator, cool_off=COOL_OFF, observer=breakers) as client:
        with pytest.raises(CoordinatorUnavailable):
            client.register(URL)
        # Two probes fail (the scripted failures), the third answers.
        breakers.wait(coordinator.address, reachable=True)
        client.heartbeat(URL)

    assert coordinator.methods() == ["Register", "Heartbeat"]
    assert coordinator.probed() == 3
    assert breakers.states(coordinator.address) == [True, False, True]
    probe = coordinator.probes[-1]
    assert probe.request == pb.LocateRequest(digest=PROBE_DIGEST)
    assert probe.metadata["authorization"] == f"Bearer {SECRET}"
    assert probe.time_remaining is not None and abs(probe.time_remaining - TIMEOUT) < 1


def test_a_probe_waits_for_the_cool_off(coordinator: FakeCoordinator) -> None:
    coordinator.failures.append(grpc.StatusCode.UNAVAILABLE)
    breakers = Breakers()
    cool_off = 0.5
    with connect(coordinator, cool_off=cool_off, observer=breakers) as client:
        with pytest.raises(CoordinatorUnavailable):
            client.register(URL)
        failed = time.monotonic()
        breakers.wait(coordinator.address, reachable=True)
        back = time.monotonic() - failed

    assert coordinator.probed() == 1
    assert cool_off <= back < cool_off + HANG_LIMIT / 2


def test_a_refusal_answers_a_probe(coordinator: FakeCoordinator) -> None:
    """The breaker tracks whether the coordinator answers; a refusal is an answer."""
    coordinator.failures.extend([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED])
    breakers = Breakers()
    with connect(coordinator, cool_off=COOL_OFF, observer=breakers) as client:
        with pytest.raises(CoordinatorUnavailable):
            client.register(URL)
        breakers.wait(coordinator.address, reachable=True)
        client.register(URL)

    assert coordinator.probed() == 1


def test_a_call_that_answers_closes_the_breaker_too(start_coordinator: StartCoordinator) -> None:
    """A call that was in flight when another call opened the breaker, and then answered."""
    slow = start_coordinator()
    slow.hang = True
    breakers = Breakers()
    # A cool-off longer than the test: only the call can close the breaker.
    with connect(slow, timeout=HANG_LIMIT / 2, cool_off=HANG_LIMIT * 2, observer=breakers) as client:
        thread, outcome = _call_in_thread(lambda: client.register(URL))
        assert slow.entered.wait(HANG_LIMIT)
        slow.hang = False
        slow.failures.append(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(CoordinatorUnavailable):
            client.heartbeat(URL)
        slow.release.set()
        thread.join(HANG_LIMIT)
        assert outcome == [0.0]
        client.touch([LAYER])

    assert breakers.states(slow.address) == [True, False, True]
    assert slow.methods() == ["Register", "Heartbeat", "Touch"]


def test_closing_ends_a_probe_that_waits_for_a_hung_coordinator(coordinator: FakeCoordinator) -> None:
    coordinator.hang = True
    client = connect(coordinator, timeout=SHORT_TIMEOUT, cool_off=COOL_OFF)
    with pytest.raises(CoordinatorUnavailable):
        client.register(URL)
    wait_until(lambda: coordinator.probed() >= 2, timeout=HANG_LIMIT, message="the hung coordinator was not probed")
    started = time.monotonic()
    client.close()

    assert time.monotonic() - started < HANG_LIMIT / 2
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("coordinator-probe-")]


def test_a_forked_child_starts_with_every_breaker_closed(
    coordinator: FakeCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator.failures.append(grpc.StatusCode.UNAVAILABLE)
    breakers = Breakers()
    # A cool-off longer than the test: the parent's breaker stays open.
    with connect(coordinator, cool_off=HANG_LIMIT * 2, observer=breakers) as client:
        with pytest.raises(CoordinatorUnavailable):
            client.register(URL)
        with pytest.raises(CoordinatorUnavailable):
            client.register(URL)
        parent = os.getpid()
        monkeypatch.setattr(os, "getpid", lambda: parent + 1)
        client.register(URL)

    assert coordinator.methods() == ["Register", "Register"]
    assert breakers.states(coordinator.address) == [True, False, True]


def test_the_workers_of_a_node_skip_what_one_of_them_found_down(coordinator: FakeCoordinator, tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    layout.create()
    coordinator.hang = True
    # Two clients on one cache directory stand in for two workers of a node.
    with (
        connect(coordinator, timeout=SHORT_TIMEOUT, cool_off=COOL_OFF, shared=Marks(layout)) as first,
        connect(coordinator, timeout=SHORT_TIMEOUT, cool_off=COOL_OFF, shared=Marks(layout)) as second,
    ):
        with pytest.raises(CoordinatorUnavailable):
            first.register(URL)
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable) as raised:
            second.heartbeat(URL)
        assert time.monotonic() - started < SHORT_TIMEOUT
        assert str(raised.value) == (
            f"Heartbeat: no coordinator answered ({coordinator.address}: skipped, another worker found it down)"
        )
        assert coordinator.methods() == ["Register"]

        coordinator.hang = False
        coordinator.release.set()

        def answered() -> bool:
            try:
                second.heartbeat(URL)
            except CoordinatorUnavailable:
                return False
            return True

        # The first worker's probe answers and lifts the mark.
        wait_until(answered, timeout=HANG_LIMIT, message="the second worker never used the coordinator again")
    assert coordinator.methods() == ["Register", "Heartbeat"]


# Construction and closing.


def test_at_least_one_address_is_required() -> None:
    with pytest.raises(ValueError, match="address"):
        CoordinatorClient([], SECRET, NODE)


def test_the_secret_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="secret"):
        CoordinatorClient(["127.0.0.1:1"], "", NODE)


def test_the_addresses_are_copied(coordinator: FakeCoordinator) -> None:
    addresses = [coordinator.address]
    with CoordinatorClient(addresses, SECRET, NODE, timeout=TIMEOUT) as client:
        addresses.clear()
        client.register(URL)

    assert client.addresses == [coordinator.address]


def test_close_is_idempotent_and_later_calls_raise(coordinator: FakeCoordinator) -> None:
    client = connect(coordinator)
    client.register(URL)
    client.close()
    client.close()

    with pytest.raises(CoordinatorError) as raised:
        client.register(URL)
    assert type(raised.value) is CoordinatorError and raised.value.code == "CANCELLED"
    assert coordinator.methods() == ["Register"]


def test_close_before_any_call(coordinator: FakeCoordinator) -> None:
    client = connect(coordinator)
    client.close()

    with pytest.raises(CoordinatorError):
        client.register(URL)
    assert coordinator.methods() == []


def test_leaving_the_context_closes_the_client(coordinator: FakeCoordinator) -> None:
    with connect(coordinator) as client:
        assert isinstance(client, CoordinatorClient)
        client.register(URL)

    with pytest.raises(CoordinatorError, match="closed"):
        client.register(URL)


def _call_in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException | object]]:
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="coordinator-call")
    thread.start()
    return thread, outcome


def test_close_closes_the_channels_and_cancels_calls_in_flight(coordinator: FakeCoordinator) -> None:
    coordinator.hang = True
    client = connect(coordinator)
    thread, outcome = _call_in_thread(lambda: client.register(URL))
    assert coordinator.entered.wait(HANG_LIMIT)

    client.close()
    thread.join(HANG_LIMIT / 2)

    assert not thread.is_alive(), "closing the channel did not end the call"
    [error] = outcome
    assert isinstance(error, CoordinatorError) and error.code == "CANCELLED"


# Forks.


def _count_channels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the address of every channel the client makes."""
    made: list[str] = []
    real = grpc.insecure_channel

    def insecure_channel(target: str, *args: Any, **kwargs: Any) -> grpc.Channel:
        made.append(target)
        return real(target, *args, **kwargs)

    monkeypatch.setattr(grpc, "insecure_channel", insecure_channel)
    return made


def test_channels_are_made_on_first_use_and_kept(
    start_coordinator: StartCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = start_coordinator(), start_coordinator()
    made = _count_channels(monkeypatch)
    with connect(first, second) as client:
        assert made == []
        client.register(URL)
        client.heartbeat(URL)

    assert made == [first.address, second.address]


def test_a_forked_child_makes_channels_of_its_own(
    coordinator: FakeCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _count_channels(monkeypatch)
    parent = os.getpid()
    with connect(coordinator) as client:
        client.register(URL)
        monkeypatch.setattr(os, "getpid", lambda: parent + 1)
        client.heartbeat(URL)
        client.touch([LAYER])

    assert made == [coordinator.address, coordinator.address]
    assert coordinator.methods() == ["Register", "Heartbeat", "Touch"]


def test_a_child_closing_the_client_leaves_the_parents_channels_alone(coordinator: FakeCoordinator) -> None:
    coordinator.hang = True
    client = connect(coordinator)
    coordinator.answers["Register"] = pb.RegisterResponse(membership_ttl_ms=10000)
    thread, outcome = _call_in_thread(lambda: client.register(URL))
    assert coordinator.entered.wait(HANG_LIMIT)

    parent = os.getpid()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "getpid", lambda: parent + 1)
        client.close()
    # Closing the parent's channels would have cancelled its call.
    coordinator.release.set()
    thread.join(HANG_LIMIT)

    assert not thread.is_alive()
    assert outcome == [10.0]


# TLS.


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (EC, which is quick to make)."""
    openssl = require_binary("openssl", "openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "1", "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_with_a_ca_the_channels_use_tls(start_coordinator: StartCoordinator, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    secure = start_coordinator(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    secure.answers["Register"] = pb.RegisterResponse(membership_ttl_ms=10000)

    with connect(secure, tls_ca=str(cert)) as client:
        assert client.register(URL) == 10.0
    assert secure.last("Register").metadata["authorization"] == f"Bearer {SECRET}"
    # Without the CA the client speaks plaintext, which a TLS server does not answer.
    with connect(secure) as plaintext, pytest.raises(CoordinatorUnavailable):
        plaintext.register(URL)


def test_a_ca_file_that_cannot_be_read_stops_the_client_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CoordinatorClient(["127.0.0.1:1"], SECRET, "node-a", tls_ca=str(tmp_path / "missing.pem"))


def test_channels_that_could_not_be_made_are_made_on_the_next_call(
    coordinator: FakeCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(coordinator) as client:
        made = client._channel

        def broken(address: str) -> grpc.Channel:
            raise OSError("no more file descriptors")

        monkeypatch.setattr(client, "_channel", broken)
        with pytest.raises(OSError):
            client.register(URL)
        with pytest.raises(OSError):
            client.register(URL)
        monkeypatch.setattr(client, "_channel", made)
        client.register(URL)
