"""Every Redis key the coordinator uses, built in this one module.

All keys live under one configurable prefix (``shoal:`` by default), so
several clusters, or several test runs, can share one Redis. Lua scripts
never build key names themselves: the caller passes every key a script
touches in KEYS, built here, which keeps the names in one place and keeps
the scripts compatible with a Redis that checks declared keys.

=================================  ======  ==========================================
key                                type    holds
=================================  ======  ==========================================
``nodes``                          set     ids of every node with state to clean up
``node:<id>``                      hash    membership (url, capacity, used); has PX
``held:<id>``                      set     digests the node holds (reverse of loc)
``evict:<id>``                     list    digests the node must delete
``announcing:<id>``                set     digests registered for the node since its
                                           batched announcement began, and ''; has PX
``announcing-id:<id>``             string  the batch id of that announcement; has PX
``announcing-cursor:<id>``         string  where its end has got to in held:<id>; has PX
``announced:<id>:<batch id>``      string  "1": that announcement ended; has PX
``loc:<digest>``                   set     ids of nodes holding the complete content
``meta:<digest>``                  hash    size, media type, first cached, ttl_ms
``ttl``                            zset    member = digest, score = expiry (Unix ms)
``lock:<lease key>``               string  "<token> <fence> <node id>"; has PX
``failed:<lease key>``             string  the failure the latest fetch under the key
                                           was given up with; has PX; deleted by a grant
``fence``                          string  fencing counter, grows with every grant
``leader``                         string  id of the coordinator running the sweep
``tag:<upstream>/<repo>:<tag>``    hash    digest, media type, size, checked_at
``bound:<upstream>/<repo>@<d>``    string  "1": digest <d> belongs to the repository
                                           (confirmed); has PX (the content's TTL)
                                           unless that TTL is 0
``metrics:nodes``                  set     ids of nodes that reported metrics
``metrics:node:<id>``              hash    that node's counters
``metrics:cluster``                hash    counters summed over all nodes, and
                                           ``cached.distinct_bytes`` (coordinator's)
``metrics:seq:<id>:<worker>``      string  last applied sequence of a sender; has PX
=================================  ======  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under ``prefix``; cheap to build and safe to share between threads."""

    prefix: str = "shoal:"

    def nodes(self) -> str:
        return f"{self.prefix}nodes"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def held(self, node_id: str) -> str:
        return f"{self.prefix}held:{node_id}"

    def evict(self, node_id: str) -> str:
        return f"{self.prefix}evict:{node_id}"

    def announcing(self, node_id: str) -> str:
        return f"{self.prefix}announcing:{node_id}"

    def announcing_id(self, node_id: str) -> str:
        return f"{self.prefix}announcing-id:{node_id}"

    def announcing_cursor(self, node_id: str) -> str:
        return f"{self.prefix}announcing-cursor:{node_id}"

    def announced(self, node_id: str, batch_id: str) -> str:
        return f"{self.prefix}announced:{node_id}:{batch_id}"

    def loc(self, digest: str) -> str:
        return f"{self.prefix}loc:{digest}"

    def meta(self, digest: str) -> str:
        return f"{self.prefix}meta:{digest}"

    def ttl(self) -> str:
        return f"{self.prefix}ttl"

    def lock(self, lease_key: str) -> str:
        return f"{self.prefix}lock:{lease_key}"

    def failed(self, lease_key: str) -> str:
        return f"{self.prefix}failed:{lease_key}"

    def fence(self) -> str:
        return f"{self.prefix}fence"

    def leader(self) -> str:
        return f"{self.prefix}leader"

    def tag(self, upstream: str, repository: str, tag: str) -> str:
        return f"{self.prefix}tag:{upstream}/{repository}:{tag}"

    def bound(self, upstream: str, repository: str, digest: str) -> str:
        return f"{self.prefix}bound:{upstream}/{repository}@{digest}"

    def metrics_nodes(self) -> str:
        return f"{self.prefix}metrics:nodes"

    def metrics_node(self, node_id: str) -> str:
        return f"{self.prefix}metrics:node:{node_id}"

    def metrics_cluster(self) -> str:
        return f"{self.prefix}metrics:cluster"

    def metrics_sequence(self, node_id: str, worker_id: str) -> str:
        return f"{self.prefix}metrics:seq:{node_id}:{worker_id}"
