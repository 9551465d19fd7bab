"""Metric counters per node and for the cluster, applied exactly once.

Each node process sends deltas (``requests.blobs: +3``) tagged with its
node id, a worker id unique to the process, and a sequence that grows by
one per delta. One script checks the sender's last applied sequence,
records the new one and adds the delta to ``metrics:node:<id>`` and
``metrics:cluster`` with HINCRBY, so a delta retried after a timeout (or
on another coordinator) is acknowledged without being counted twice, and
concurrent senders never lose an increment.

``metrics:cluster`` also holds ``cached.distinct_bytes``, which only the
coordinator writes (see ``distinct_bytes``); a node may not report it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis
from redis.typing import EncodableT

from coordinator.digests import check_name
from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.membership import Membership
from coordinator.redis_client import text_map, texts
from protos.metrics import DISTINCT_BYTES, NodeCounts

# How long a sender's last sequence is remembered after its last delta. A
# retry comes within seconds; a worker id is never reused by a new process,
# so forgetting an idle sender is safe and keeps dead workers from piling up.
SEQUENCE_RETENTION_MS = 24 * 3600 * 1000

_INT64 = 2**63

# KEYS[1] metrics:seq:<node>:<worker>, KEYS[2] metrics:node:<node>,
# KEYS[3] metrics:cluster, KEYS[4] the metrics:nodes index
# ARGV[1] node id, ARGV[2] sequence, ARGV[3] sequence retention (ms),
# then name, delta pairs from ARGV[4]
# Applies the delta unless the sender's sequence was applied already;
# returns 1 when applied, 0 for a repeat.
_REPORT = """
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[4], ARGV[1])
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
"""


@dataclass(frozen=True)
class MetricsSnapshot:
    nodes: list[NodeCounts]
    cluster: dict[str, int]


class Metrics:
    """Applies metric deltas idempotently and reads the counters back."""

    def __init__(self, client: redis.Redis, keys: Keys, membership: Membership) -> None:
        self._redis = client
        self._keys = keys
        self._membership = membership
        self._report = client.register_script(_REPORT)

    def report(self, node_id: str, worker_id: str, sequence: int, counters: Mapping[str, int]) -> bool:
        """Add ``counters`` unless this sender's ``sequence`` was applied; True when applied."""
        check_name(node_id, "node_id")
        check_name(worker_id, "worker_id")
        if sequence < 0:
            raise InvalidArgument("sequence: must not be negative")
        args: list[EncodableT] = [node_id, sequence, SEQUENCE_RETENTION_MS]
        for name, delta in sorted(counters.items()):
            check_name(name, "counters")
            if name == DISTINCT_BYTES:
                raise InvalidArgument(f"counters: {DISTINCT_BYTES} is kept by the coordinator, not reported")
            if not -_INT64 <= delta < _INT64:
                raise InvalidArgument(f"counters: the delta of {name} is out of the int64 range")
            if delta:
                args += [name, delta]
        keys = [
            self._keys.metrics_sequence(node_id, worker_id),
            self._keys.metrics_node(node_id),
            self._keys.metrics_cluster(),
            self._keys.metrics_nodes(),
        ]
        return bool(self._report(keys=keys, args=args))

    def snapshot(self) -> MetricsSnapshot:
        """Every node's counters (with whether it is alive) and the cluster totals."""
        node_ids = sorted(texts(self._redis.smembers(self._keys.metrics_nodes())))
        pipe = self._redis.pipeline(transaction=False)
        for node_id in node_ids:
            pipe.hgetall(self._keys.metrics_node(node_id))
        pipe.hgetall(self._keys.metrics_cluster())
        *per_node, cluster = pipe.execute()
        live = self._membership.live(node_ids)
        return MetricsSnapshot(
            nodes=[
                NodeCounts(node_id=node_id, counters=_ints(counters), live=node_id in live)
                for node_id, counters in zip(node_ids, per_node, strict=True)
            ],
            cluster=_ints(cluster),
        )


def _ints(fields: Mapping[str, str]) -> dict[str, int]:
    return {name: int(value) for name, value in sorted(text_map(fields).items())}
