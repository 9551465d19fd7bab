"""Tag pointers shared by the cluster: ``(upstream, repository, tag) -> digest``.

A pointer is the hash ``tag:<upstream>/<repository>:<tag>`` (digest, media
type, size, checked_at). Anyone may read it; only the holder of the lease
``tag:<upstream>/<repository>:<tag>`` may move it, checked in the same script
that writes it, so a node whose lease expired while it asked the upstream
cannot overwrite the answer of the node that holds the lease now.

A pointer nobody refreshed for ``retention`` seconds is dropped (Redis PX),
so tags that are never pulled again do not pile up; 0 keeps pointers forever.
"""

from __future__ import annotations

import math

import redis
from redis.typing import EncodableT

from coordinator.digests import check_digest, check_name
from coordinator.errors import InvalidArgument, LeaseLost
from coordinator.keys import Keys
from coordinator.leases import OWNS_LEASE
from coordinator.redis_client import text_map
from protos.leases import tag_lease
from protos.values import TagPointer

# KEYS[1] lock:<tag lease key>, KEYS[2] tag:<upstream>/<repository>:<tag>
# ARGV[1] lease token, ARGV[2] digest, ARGV[3] media type, ARGV[4] size,
# ARGV[5] checked_at (Unix seconds), ARGV[6] retention (ms; 0 = forever)
# Writes the pointer when the token holds the tag's lease; returns 1, or 0
# when the lease was lost. The lease stays held: the caller releases it.
_PUT = (
    OWNS_LEASE
    + """
if not owns(redis.call('GET', KEYS[1]), ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[2], 'digest', ARGV[2], 'media_type', ARGV[3], 'size', ARGV[4], 'checked_at', ARGV[5])
if ARGV[6] == '0' then
  redis.call('PERSIST', KEYS[2])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return 1
"""
)


class Tags:
    """Reads and writes tag pointers, writes fenced by the tag's lease."""

    def __init__(self, client: redis.Redis, keys: Keys, retention: float = 0.0) -> None:
        self._redis = client
        self._keys = keys
        self._retention_ms = round(retention * 1000)
        self._put = client.register_script(_PUT)

    def get(self, upstream: str, repository: str, tag: str) -> TagPointer | None:
        """The shared pointer for the tag, or None when the cluster has none."""
        fields = text_map(self._redis.hgetall(self._key(upstream, repository, tag)))
        if not fields.get("digest"):
            return None
        return TagPointer(
            digest=fields["digest"],
            media_type=fields.get("media_type", ""),
            size=int(fields.get("size", 0)),
            checked_at=float(fields.get("checked_at", 0.0)),
        )

    def put(self, upstream: str, repository: str, tag: str, pointer: TagPointer, lease_token: str) -> None:
        """Move the tag to ``pointer``; raises ``LeaseLost`` unless ``lease_token`` holds the tag's lease."""
        key = self._key(upstream, repository, tag)
        check_digest(pointer.digest, "pointer.digest")
        if pointer.size < 0 or not math.isfinite(pointer.checked_at) or pointer.checked_at < 0:
            raise InvalidArgument("pointer: size and checked_at must be non-negative numbers")
        lease_key = tag_lease(upstream, repository, tag)
        keys = [self._keys.lock(lease_key), key]
        args: list[EncodableT] = [
            lease_token,
            pointer.digest,
            pointer.media_type,
            pointer.size,
            repr(float(pointer.checked_at)),
            self._retention_ms,
        ]
        if not lease_token or not int(self._put(keys=keys, args=args)):
            raise LeaseLost(f"the lease on {lease_key} is no longer held under this token")

    def _key(self, upstream: str, repository: str, tag: str) -> str:
        check_name(upstream, "upstream")
        check_name(repository, "repository")
        check_name(tag, "tag")
        return self._keys.tag(upstream, repository, tag)
