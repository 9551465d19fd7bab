"""Metric counters against a real Redis: exactly-once deltas, concurrency, the snapshot."""

from __future__ import annotations

import threading

import pytest
import redis

from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.membership import Membership, NodeInfo
from coordinator.metrics import Metrics
from testbed.clock import FakeClock
from testbed.redis_server import RedisServer


@pytest.fixture
def membership(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Membership:
    return Membership(redis_client, keys, 10.0, clock)


@pytest.fixture
def metrics(redis_client: redis.Redis, keys: Keys, membership: Membership) -> Metrics:
    return Metrics(redis_client, keys, membership)


def test_a_retried_sequence_is_applied_once(metrics: Metrics) -> None:
    assert metrics.report("node-a", "worker-1", 1, {"blobs.requests": 3, "blobs.hits": 2})
    assert not metrics.report("node-a", "worker-1", 1, {"blobs.requests": 3, "blobs.hits": 2})
    assert metrics.report("node-a", "worker-1", 2, {"blobs.requests": 1})
    assert not metrics.report("node-a", "worker-1", 1, {"blobs.requests": 3}), "an old delta arriving late"

    snapshot = metrics.snapshot()
    assert snapshot.cluster == {"blobs.hits": 2, "blobs.requests": 4}
    assert snapshot.nodes[0].counters == {"blobs.hits": 2, "blobs.requests": 4}


def test_workers_and_nodes_have_their_own_sequences(metrics: Metrics, membership: Membership) -> None:
    membership.register(NodeInfo("node-a", "http://a:5000"))
    metrics.report("node-a", "worker-1", 1, {"requests": 1})
    metrics.report("node-a", "worker-2", 1, {"requests": 10})
    metrics.report("node-b", "worker-1", 1, {"requests": 100})

    snapshot = metrics.snapshot()

    assert snapshot.cluster == {"requests": 111}
    by_node = {node.node_id: node for node in snapshot.nodes}
    assert by_node["node-a"].counters == {"requests": 11} and by_node["node-a"].live
    assert by_node["node-b"].counters == {"requests": 100} and not by_node["node-b"].live


def test_no_increment_is_lost_under_concurrency(
    redis_server: RedisServer, keys: Keys, membership: Membership, metrics: Metrics
) -> None:
    threads, deltas = 8, 100
    errors: list[BaseException] = []

    def sender(worker: int) -> None:
        # Each thread has its own connection, as separate processes would.
        with redis_server.client() as client:
            own = Metrics(client, keys, membership)
            try:
                for sequence in range(1, deltas + 1):
                    delta = {"requests": 1, "bytes": 10}
                    own.report(f"node-{worker % 2}", f"worker-{worker}", sequence, delta)
                    # Every delta is also sent twice, as after a lost answer.
                    own.report(f"node-{worker % 2}", f"worker-{worker}", sequence, delta)
            except BaseException as exc:
                errors.append(exc)

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert errors == []
    snapshot = metrics.snapshot()
    assert snapshot.cluster == {"bytes": threads * deltas * 10, "requests": threads * deltas}
    assert sum(node.counters["requests"] for node in snapshot.nodes) == threads * deltas


def test_zero_deltas_and_bad_input(metrics: Metrics) -> None:
    assert metrics.report("node-a", "worker-1", 1, {"requests": 0})
    assert metrics.snapshot().cluster == {}
    with pytest.raises(InvalidArgument, match="worker_id"):
        metrics.report("node-a", "", 1, {"requests": 1})
    with pytest.raises(InvalidArgument, match="int64"):
        metrics.report("node-a", "worker-1", 2, {"requests": 2**63})
