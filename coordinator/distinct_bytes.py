"""Distinct bytes cached: the size of every digest the cluster holds, counted once.

Operators divide the bytes pulled from the upstream by this number to see
the upstream amplification. The counter is the field ``cached.distinct_bytes``
of ``metrics:cluster``, beside the counters the nodes report, and only the
coordinator writes it.

Its invariant: it equals the sum of ``size`` over every ``meta:<digest>``
hash that has a ``first_cached`` field. A digest counts from the moment its
meta is created (the HSETNX of ``first_cached`` succeeds, on CompleteFetch,
AddContent or AnnounceInventory) until the meta is deleted (the expiry
sweep, or the last holder dropped it). Every script that creates a meta,
changes its size or deletes it does so through the Lua functions below, in
the same script, so the counter moves atomically with the meta. After Redis
lost its data both are gone, and re-announced content counts again as its
metas are created again.
"""

from __future__ import annotations

from protos.metrics import DISTINCT_BYTES

# Lua functions shared by every script that creates, resizes or deletes a
# meta:<digest> hash. ``meta`` is the meta's key and ``cluster`` the key of
# metrics:cluster, both passed in the script's KEYS. Amounts go to HINCRBY
# as integer strings, never as Lua numbers, whose conversion to a string
# Redis versions do differently.
#
# meta_created(meta, cluster, now): stamps first_cached = now unless the
#   meta has it; when it did not (the cluster holds the digest from now on),
#   counts the meta's size. Returns true when the meta was created.
# meta_set_size(meta, cluster, size): sets the size; when the meta already
#   counts, the counter follows the difference.
# meta_delete(meta, cluster): deletes the meta, uncounting its size when it
#   counted. Returns 1 when a meta was deleted, 0 when there was none.
META_FUNCTIONS = f"""
local DISTINCT_BYTES = '{DISTINCT_BYTES}'

local function count_bytes(cluster, amount)
  if amount ~= 0 then
    redis.call('HINCRBY', cluster, DISTINCT_BYTES, string.format('%d', amount))
  end
end

local function meta_created(meta, cluster, now)
  if redis.call('HSETNX', meta, 'first_cached', now) == 0 then
    return false
  end
  count_bytes(cluster, tonumber(redis.call('HGET', meta, 'size') or '0'))
  return true
end

local function meta_set_size(meta, cluster, size)
  local old = redis.call('HMGET', meta, 'first_cached', 'size')
  redis.call('HSET', meta, 'size', size)
  if old[1] then
    count_bytes(cluster, tonumber(size) - tonumber(old[2] or '0'))
  end
end

local function meta_delete(meta, cluster)
  local old = redis.call('HMGET', meta, 'first_cached', 'size')
  if old[1] then
    count_bytes(cluster, -tonumber(old[2] or '0'))
  end
  return redis.call('DEL', meta)
end
"""
