"""Fetch leases: one holder per key for the whole cluster, with fencing.

A lease is the string ``lock:<key>`` = ``"<token> <fence> <node id>"`` with a
PX expiry, set only when absent (SET NX PX), as in redis-py's ``lock.py``.
The token is random per grant and is what every later act on the lease
(renew, release, complete a fetch, move a tag) must present; those acts are
compare-and-act Lua scripts, so a holder whose lease expired and was granted
to someone else can no longer act on it. The fence is a number that grows
with every grant, for anyone downstream who wants to order the holders.

The fence comes from one counter for all keys: it still grows with every
grant of each key, and unlike a counter per key it neither leaves one Redis
key behind per digest ever fetched nor starts again at 1 when such a key
is cleaned up.

Expiry is Redis's own (PX), so nothing here reads a clock.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import redis

from coordinator.digests import check_name
from coordinator.errors import InvalidArgument
from coordinator.keys import Keys
from coordinator.redis_client import text, texts

# The longest lease a caller may ask for; a holder renews long fetches.
MAX_TTL_MS = 10 * 60 * 1000
# How long the failure a fetch was given up with is kept (unless the key is
# granted again first): the followers of that fetch read it as soon as their
# transfer breaks off, within a second or two.
FAILURE_TTL_MS = 60 * 1000
# A failure is a short sentence; a longer one is cut to this many characters.
FAILURE_MAX = 500

_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,128}")

# A Lua function shared by every script that acts on a lease: whether the
# lease value ``value`` (false when the key is absent) was granted under
# ``token``. The token is the value's first word.
OWNS_LEASE = """
local function owns(value, token)
  return value ~= false and string.sub(value, 1, #token + 1) == token .. ' '
end
"""

# KEYS[1] lock:<key>, KEYS[2] the fence counter, KEYS[3] failed:<key>
# ARGV[1] token, ARGV[2] node id, ARGV[3] TTL (ms)
# Grants the lease when nobody holds it; a new grant forgets the failure
# the last fetch of the key was given up with (a new fetch is under way). A
# call presenting the token that already holds it is a retry of the same
# grant: it is granted again, with the same fence and a fresh TTL. Returns
# {1, fence} when granted and {0, current value} when someone else holds
# the lease.
_GRANT = (
    OWNS_LEASE
    + """
local function grant()
  local current = redis.call('GET', KEYS[1])
  if owns(current, ARGV[1]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {1, string.match(current, '^%S+ (%d+)')}
  end
  if current then
    return {0, current}
  end
  local fence = redis.call('INCR', KEYS[2])
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. fence .. ' ' .. ARGV[2], 'NX', 'PX', ARGV[3])
  return {1, tostring(fence)}
end
"""
)
_ACQUIRE = _GRANT + "return grant()\n"

# As _ACQUIRE, with KEYS[4] loc:<digest>: when nodes are registered for
# the digest, grants nothing and returns {2, their ids...}. One atomic step,
# so a fetch completed just before (CompleteFetch registers its node and
# releases the lease together) is found rather than granted again.
_CLAIM = (
    _GRANT
    + """
local registered = redis.call('SMEMBERS', KEYS[4])
if #registered > 0 then
  return {2, unpack(registered)}
end
return grant()
"""
)

# KEYS[1] lock:<key>
# ARGV[1] token, ARGV[2] TTL (ms)
# Extends the lease when it is still held under the token; returns 1 or 0.
_RENEW = (
    OWNS_LEASE
    + """
if owns(redis.call('GET', KEYS[1]), ARGV[1]) then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)

# KEYS[1] lock:<key>, KEYS[2] failed:<key>
# ARGV[1] token, ARGV[2] failure ('' for none), ARGV[3] how long the failure
# is kept (ms)
# Deletes the lease when it is still held under the token, and keeps the
# failure the fetch was given up with, if any, for the followers of the
# fetch to read (Locate). Returns 1 or 0.
_RELEASE = (
    OWNS_LEASE
    + """
if owns(redis.call('GET', KEYS[1]), ARGV[1]) then
  if ARGV[2] ~= '' then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  end
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)


@dataclass(frozen=True)
class Lease:
    """The answer to an acquire, or the current grant of a key.

    When ``granted`` is False, ``token`` is empty and ``fence`` and
    ``holder`` describe the grant that stands in the way.
    """

    granted: bool
    token: str
    fence: int
    holder: str


def parse_value(value: str) -> tuple[str, int, str]:
    """Split a stored lease value into (token, fence, node id)."""
    token, fence, node_id = value.split(" ", 2)
    return token, int(fence), node_id


def check_ttl_ms(ttl_ms: int) -> int:
    if not 0 < ttl_ms <= MAX_TTL_MS:
        raise InvalidArgument(f"ttl_ms: expected 1 to {MAX_TTL_MS} milliseconds")
    return ttl_ms


def check_token(token: str, field: str = "token") -> str:
    if not _TOKEN.fullmatch(token or ""):
        raise InvalidArgument(f"{field}: expected 8 to 128 letters, digits, '-' or '_'")
    return token


class Leases:
    """Grants, renews, releases and looks up leases."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._acquire = client.register_script(_ACQUIRE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self, key: str, node_id: str, ttl_ms: int, token: str = "") -> Lease:
        """Grant the lease on ``key`` to ``node_id`` unless someone holds it.

        ``token`` lets the caller choose the grant's token so that a retried
        call is recognised; empty picks a random one.
        """
        check_name(key, "key")
        check_name(node_id, "node_id")
        check_ttl_ms(ttl_ms)
        token = check_token(token) if token else secrets.token_hex(16)
        reply = self._acquire(
            keys=[self._keys.lock(key), self._keys.fence(), self._keys.failed(key)], args=[token, node_id, ttl_ms]
        )
        return self._lease(reply, token, node_id)

    @staticmethod
    def _lease(reply: Any, token: str, node_id: str) -> Lease:
        granted, detail = reply
        if int(granted):
            return Lease(granted=True, token=token, fence=int(detail), holder=node_id)
        _, fence, holder = parse_value(text(detail))
        return Lease(granted=False, token="", fence=fence, holder=holder)

    def claim(self, key: str, node_id: str, ttl_ms: int, token: str, registered: str) -> Lease | list[str]:
        """``acquire``, unless the set ``registered`` (a ``loc:<digest>``) has members: then those, in one step."""
        check_name(key, "key")
        check_name(node_id, "node_id")
        check_ttl_ms(ttl_ms)
        token = check_token(token) if token else secrets.token_hex(16)
        reply = self._claim(
            keys=[self._keys.lock(key), self._keys.fence(), self._keys.failed(key), registered],
            args=[token, node_id, ttl_ms],
        )
        if int(reply[0]) == 2:
            return texts(reply[1:])
        return self._lease(reply, token, node_id)

    def renew(self, key: str, token: str, ttl_ms: int) -> bool:
        """Extend the lease to ``ttl_ms`` from now; False when it was lost."""
        check_name(key, "key")
        check_ttl_ms(ttl_ms)
        if not token:
            return False
        return bool(self._renew(keys=[self._keys.lock(key)], args=[token, ttl_ms]))

    def release(self, key: str, token: str, failure: str = "") -> bool:
        """Give the lease up; False (and no change) when it is no longer held under ``token``.

        ``failure``, when given, says why the fetch was given up for the
        whole cluster; ``failure`` reports it until the key is granted
        again, for ``FAILURE_TTL_MS`` at most.
        """
        check_name(key, "key")
        if not token:
            return False
        keys = [self._keys.lock(key), self._keys.failed(key)]
        return bool(self._release(keys=keys, args=[token, failure[:FAILURE_MAX], FAILURE_TTL_MS]))

    def failure(self, key: str) -> str:
        """Why the latest fetch under ``key`` was given up (``release``), or empty."""
        check_name(key, "key")
        value = self._redis.get(self._keys.failed(key))
        return "" if value is None else text(value)

    def current(self, key: str) -> Lease | None:
        """The grant that holds ``key`` now, or None when nobody holds it."""
        value = self._redis.get(self._keys.lock(key))
        if value is None:
            return None
        token, fence, holder = parse_value(text(value))
        return Lease(granted=True, token=token, fence=fence, holder=holder)
