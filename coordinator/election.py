"""Leader election: which coordinator replica runs the scheduler's sweep.

The leader holds the Redis string ``leader`` (its identity) with a PX
expiry of ``lease`` seconds and renews it every scheduler interval. When it
stops cleanly it resigns, so another replica takes over at its next
interval; when it crashes, the lease runs out first. Expiry is Redis's own,
so nothing here reads a clock.

A leader that stalls longer than its lease may sweep once more after a
successor started: the sweep's scripts check their preconditions inside
Redis, so two sweepers only repeat each other's work, never undo it.
"""

from __future__ import annotations

import secrets

import redis

from coordinator.keys import Keys

# KEYS[1] the leader key
# ARGV[1] this coordinator's identity, ARGV[2] lease (ms)
# Renews the lead when this coordinator holds it, takes it when nobody does;
# returns 1 when this coordinator leads afterwards, else 0.
_LEAD = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return 1
"""

# KEYS[1] the leader key
# ARGV[1] this coordinator's identity
# Gives the lead up when this coordinator holds it; returns 1 or 0.
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderElection:
    """One replica's seat in the election."""

    def __init__(self, client: redis.Redis, keys: Keys, lease: float, identity: str | None = None) -> None:
        self._redis = client
        self._key = keys.leader()
        self._lease_ms = max(1, round(lease * 1000))
        self.identity = identity or f"coordinator-{secrets.token_hex(8)}"
        self._lead = client.register_script(_LEAD)
        self._resign = client.register_script(_RESIGN)

    def try_lead(self) -> bool:
        """Take or renew the lead; True when this replica leads for the next ``lease`` seconds."""
        return bool(self._lead(keys=[self._key], args=[self.identity, self._lease_ms]))

    def resign(self) -> bool:
        """Give the lead up now, so another replica need not wait for the lease to run out."""
        return bool(self._resign(keys=[self._key], args=[self.identity]))

    def leader(self) -> str | None:
        """The identity of the current leader, if any."""
        value = self._redis.get(self._key)
        return str(value) if value is not None else None
