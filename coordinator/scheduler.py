"""The TTL schedule and the loop that enforces it.

The schedule is the sorted set ``ttl``: member = digest, score = expiry in
Unix milliseconds (as in rq's registries and distribution's proxy
scheduler). Content with TTL 0 is never in it. It lives in Redis, so it
survives coordinator restarts; ``Scheduler`` runs the sweep on the elected
leader only. The sweep removes each due digest from the directory (loc, meta,
the holders' held sets, the schedule) and appends it to each holder's
eviction list in one script, and heartbeats hand those lists out.

Time comes from the injected ``clock``, so tests move a fake clock instead
of waiting for content to expire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

from coordinator.digests import check_digests
from coordinator.distinct_bytes import META_FUNCTIONS
from coordinator.election import LeaderElection
from coordinator.keys import Keys
from coordinator.locations import chunked, to_ms
from coordinator.membership import Membership
from coordinator.redis_client import texts

log = logging.getLogger(__name__)

# Due digests read per round; a sweep runs rounds until none are due or
# MAX_ROUNDS is reached, and the next interval goes on from there.
SWEEP_BATCH = 500
MAX_ROUNDS = 20
# A digest whose holders change between the read and the script is retried
# this often within one sweep, then left for the next.
MAX_ATTEMPTS = 5

# KEYS[1] the ttl schedule, then for each digest i: KEYS[1 + i] meta:<digest>
# ARGV[1] now (Unix ms), ARGV[1 + i] digest i
# Pushes each digest's expiry to now + its TTL. Only digests already in the
# schedule move (XX), and only later (GT): a touch never schedules content
# that never expires or was already swept, and never shortens a TTL.
_TOUCH = """
local now = tonumber(ARGV[1])
for i = 2, #KEYS do
  local ttl = tonumber(redis.call('HGET', KEYS[i], 'ttl_ms') or '0')
  if ttl > 0 then
    redis.call('ZADD', KEYS[1], 'XX', 'GT', now + ttl, ARGV[i])
  end
end
return 0
"""

# KEYS[1] the ttl schedule, KEYS[2] loc:<digest>, KEYS[3] meta:<digest>,
# KEYS[4] metrics:cluster,
# then for each holder i: KEYS[3 + 2i] held:<holder>, KEYS[4 + 2i] evict:<holder>
# ARGV[1] digest, ARGV[2] now (Unix ms), ARGV[2 + i] holder i
# Expires the digest when it is still due and its holders are exactly the
# ones passed (read just before; the keys of a set's members cannot be
# derived inside the script without building key names here). Expired
# content leaves the distinct bytes cached (see distinct_bytes). Returns 1
# when expired, 0 when no longer due (touched meanwhile), -1 when the holders
# changed (read them again and retry).
_EXPIRE = (
    META_FUNCTIONS
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then
  return 0
end
local holders = #ARGV - 2
if redis.call('SCARD', KEYS[2]) ~= holders then
  return -1
end
for i = 3, #ARGV do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    return -1
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
meta_delete(KEYS[3], KEYS[4])
for i = 1, holders do
  redis.call('SREM', KEYS[3 + 2 * i], ARGV[1])
  redis.call('RPUSH', KEYS[4 + 2 * i], ARGV[1])
end
return 1
"""
)


class Schedule:
    """Touches, sweeps and hands out evictions for the TTL schedule."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._keys = keys
        self._clock = clock
        self._touch = client.register_script(_TOUCH)
        self._expire = client.register_script(_EXPIRE)

    def touch(self, digests: Iterable[str]) -> None:
        """Push the expiry of scheduled ``digests`` to now + their TTL."""
        now_ms = to_ms(self._clock())
        for chunk in chunked(check_digests(digests)):
            keys = [self._keys.ttl(), *(self._keys.meta(digest) for digest in chunk)]
            self._touch(keys=keys, args=[now_ms, *chunk])

    def expiry(self, digest: str) -> float | None:
        """When ``digest`` expires (Unix seconds), or None when it is not scheduled."""
        score = self._redis.zscore(self._keys.ttl(), digest)
        return None if score is None else score / 1000

    def sweep(self) -> list[str]:
        """Expire every due digest and queue its eviction on each holder; return the expired digests."""
        now_ms = to_ms(self._clock())
        expired: list[str] = []
        for _ in range(MAX_ROUNDS):
            due = texts(self._redis.zrangebyscore(self._keys.ttl(), "-inf", now_ms, start=0, num=SWEEP_BATCH))
            handled = [digest for digest in due if self._expire_one(digest, now_ms)]
            expired += handled
            if len(due) < SWEEP_BATCH or not handled:
                break
        return expired

    def pop_evictions(self, node_id: str, count: int) -> list[str]:
        """Take up to ``count`` pending evictions of ``node_id``, oldest first."""
        return texts(self._redis.lpop(self._keys.evict(node_id), count) or [])

    def _expire_one(self, digest: str, now_ms: int) -> bool:
        for _ in range(MAX_ATTEMPTS):
            holders = sorted(texts(self._redis.smembers(self._keys.loc(digest))))
            keys = [self._keys.ttl(), self._keys.loc(digest), self._keys.meta(digest), self._keys.metrics_cluster()]
            for node_id in holders:
                keys += [self._keys.held(node_id), self._keys.evict(node_id)]
            result = int(self._expire(keys=keys, args=[digest, now_ms, *holders]))
            if result != -1:
                return result == 1
        log.warning("holders of %s kept changing; its expiry waits for the next sweep", digest)
        return False


class Scheduler:
    """Runs the sweep every ``interval`` seconds on whichever replica leads.

    Every replica runs this loop; each round it takes or renews the lead, and
    only the leader sweeps expired content and cleans up after dead nodes.
    """

    def __init__(
        self,
        schedule: Schedule,
        membership: Membership,
        election: LeaderElection,
        interval: float,
    ) -> None:
        self._schedule = schedule
        self._membership = membership
        self._election = election
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._healthy = True

    @property
    def election(self) -> LeaderElection:
        return self._election

    def run_once(self) -> bool:
        """One round: lead or follow; when leading, sweep. True when this replica swept."""
        if not self._election.try_lead():
            return False
        expired = self._schedule.sweep()
        dropped = self._membership.drop_expired()
        if expired:
            log.info("expired %d digests", len(expired))
        if dropped:
            log.info("dropped nodes whose membership expired: %s", ", ".join(dropped))
        return True

    def start(self) -> None:
        """Run rounds in a background thread until ``close``."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name="shoal-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the loop, wait for it, and resign the lead; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._election.resign()
        except redis.RedisError:
            # Redis is unreachable, so the lead cannot be handed over; it
            # runs out after the lease time instead.
            log.warning("could not resign the scheduler lead; it expires on its own")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except redis.RedisError as exc:
                # Logged once per outage, not once per interval.
                if self._healthy:
                    log.warning("scheduler round failed, retrying every %gs: %s", self._interval, type(exc).__name__)
                self._healthy = False
            except Exception:
                # A bug in one round must not end the loop: the next round
                # may well succeed, and a silently dead scheduler is worse.
                log.exception("scheduler round failed")
            else:
                if not self._healthy:
                    log.info("scheduler rounds succeed again")
                self._healthy = True
            self._stop.wait(self._interval)
