"""Content bound to its repository: which digests the cluster confirmed for ``(upstream, repository)``.

A node serves a digest under a repository only once the pair is confirmed:
the upstream returned the digest for that repository, or a manifest
confirmed for it references the digest (``node.bindings``). The nodes share
what they confirmed here, so that a pair confirmed on one node is served by
every node without asking the upstream again.

A confirmation is the string ``bound:<upstream>/<repository>@<digest>``
whose PX is the content's TTL (``upstream.ttl`` on the node; 0 keeps it
until Redis forgets it). Confirming again extends the expiry, never
shortens it: a pair confirmed by the upstream a minute ago stays confirmed
for a whole TTL even when a node then confirms it again as the reference of
a manifest whose own confirmation ends sooner.
"""

from __future__ import annotations

import redis
from redis.typing import EncodableT

from coordinator.digests import check_digests, check_name
from coordinator.errors import InvalidArgument
from coordinator.keys import Keys

# Digests in one call, either way: an index with this many children is
# far beyond any real one, and the node sends larger sets in batches.
MAX_DIGESTS = 1000

# KEYS[i] bound:<upstream>/<repository>@<digest i>
# ARGV[1] TTL (ms; 0 = never expires)
# Confirms every pair: a missing key is set with the TTL; an existing one
# gets the TTL only when that ends later than what it has; 0 removes the
# expiry. Returns nothing.
_CONFIRM = """
local ttl = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  if ttl == 0 then
    redis.call('SET', key, '1')
  else
    local left = redis.call('PTTL', key)
    if left == -2 or (left >= 0 and left < ttl) then
      redis.call('SET', key, '1', 'PX', ttl)
    end
  end
end
return 0
"""


class Bindings:
    """Reads and writes confirmations; safe to share between threads."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._confirm = client.register_script(_CONFIRM)

    def confirm(self, upstream: str, repository: str, digests: list[str], ttl_ms: int) -> None:
        """Confirm that ``digests`` belong to the repository, for ``ttl_ms`` (0: without expiry)."""
        if ttl_ms < 0:
            raise InvalidArgument("ttl_ms: must not be negative")
        keys = self._pairs(upstream, repository, digests)
        if keys:
            args: list[EncodableT] = [ttl_ms]
            self._confirm(keys=keys, args=args)

    def confirmed(self, upstream: str, repository: str, digests: list[str]) -> dict[str, int]:
        """The confirmed ones of ``digests``, each with the milliseconds it stays so (0: without expiry)."""
        checked = _checked(digests)
        keys = self._pairs(upstream, repository, checked)
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        found: dict[str, int] = {}
        for digest, left in zip(checked, pipe.execute(), strict=True):
            if left == -1:
                found[digest] = 0
            elif left > 0:
                found[digest] = int(left)
        return found

    def _pairs(self, upstream: str, repository: str, digests: list[str]) -> list[str]:
        check_name(upstream, "upstream")
        check_name(repository, "repository")
        return [self._keys.bound(upstream, repository, digest) for digest in _checked(digests)]


def _checked(digests: list[str]) -> list[str]:
    if len(digests) > MAX_DIGESTS:
        raise InvalidArgument(f"digests: at most {MAX_DIGESTS} in one call")
    return check_digests(digests)
