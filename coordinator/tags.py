"""Tag pointers shared by the cluster: ``(upstream, repository, tag) -> digest``.

A pointer is the hash ``tag:<upstream>/<repository>:<tag>`` (digest, media
type, size, checked_at). Anyone may read it; only the holder of the lease
``tag:<upstream>/<repository>:<tag>`` may move it, checked in the same script
that writes it, so a node whose lease expired while it asked the upstream
cannot overwrite the answer of the node that holds the lease now.

A pointer nobody refreshed for ``retention`` seconds is dropped (Redis PX),
so tags that are never pulled again do not pile up; 0 keeps pointers forever.

``checked_at`` is stamped by Redis's own clock (``TIME``) when the pointer
is written, whatever the writer sent: a node with a clock running ahead
cannot keep a tag fresh for longer than ``tag_ttl``. A pointer whose stamp
lies more than ``CLOCK_SKEW`` in Redis's future was not written here (someone
wrote the hash straight into Redis) and is read as checked never, so that it
is checked against the upstream at once instead of being fresh forever.
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
from protos.values import CLOCK_SKEW, TagPointer

# KEYS[1] lock:<tag lease key>, KEYS[2] tag:<upstream>/<repository>:<tag>
# ARGV[1] lease token, ARGV[2] digest, ARGV[3] media type, ARGV[4] size,
# ARGV[5] unused (the writer's checked_at), ARGV[6] retention (ms; 0 = forever),
# ARGV[7] '1' to release the lease too
# Writes the pointer, stamped with Redis's clock, when the token holds the
# tag's lease; returns the stamp (Unix microseconds), or 0 when the lease was
# lost. The lease stays held unless ARGV[7] is '1'. A releasing write that
# is retried after it succeeded finds no lease and the pointer at its
# digest: it returns that pointer's stamp and writes nothing.
_PUT = (
    OWNS_LEASE
    + """
local lease = redis.call('GET', KEYS[1])
if not owns(lease, ARGV[1]) then
  if ARGV[7] == '1' and not lease and redis.call('HGET', KEYS[2], 'digest') == ARGV[2] then
    local seconds, fraction = string.match(redis.call('HGET', KEYS[2], 'checked_at') or '', '^(%d+)%.(%d+)$')
    if seconds then
      return tonumber(seconds) * 1000000 + tonumber(fraction)
    end
  end
  return 0
end
local now = redis.call('TIME')
local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
local stamp = string.format('%d.%06d', now[1], now[2])
redis.call('HSET', KEYS[2], 'digest', ARGV[2], 'media_type', ARGV[3], 'size', ARGV[4], 'checked_at', stamp)
if ARGV[6] == '0' then
  redis.call('PERSIST', KEYS[2])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
if ARGV[7] == '1' then
  redis.call('DEL', KEYS[1])
end
return micros
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
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self._key(upstream, repository, tag))
        (seconds, micros), raw = pipe.execute()
        fields = text_map(raw)
        if not fields.get("digest"):
            return None
        checked_at = _number(fields.get("checked_at"))
        if checked_at > seconds + micros / 1e6 + CLOCK_SKEW:
            checked_at = 0.0
        return TagPointer(
            digest=fields["digest"],
            media_type=fields.get("media_type", ""),
            size=int(_number(fields.get("size"))),
            checked_at=checked_at,
        )

    def put(
        self, upstream: str, repository: str, tag: str, pointer: TagPointer, lease_token: str, *, release: bool = False
    ) -> float:
        """Move the tag to ``pointer``, stamped now by Redis; return the stamp.

        Raises ``LeaseLost`` unless ``lease_token`` holds the tag's lease.
        With ``release`` the lease is released in the same step.
        """
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
            int(release),
        ]
        stamp = int(self._put(keys=keys, args=args)) if lease_token else 0
        if not stamp:
            raise LeaseLost(f"the lease on {lease_key} is no longer held under this token")
        return stamp / 1e6

    def _key(self, upstream: str, repository: str, tag: str) -> str:
        check_name(upstream, "upstream")
        check_name(repository, "repository")
        check_name(tag, "tag")
        return self._keys.tag(upstream, repository, tag)


def _number(text: str | None) -> float:
    """A field written by someone else may hold anything: what is not a finite number is 0."""
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0
