"""RedisSharedState: drain marks, heartbeats and locks on the Redis of the pin store.

Why the pin store's Redis: one pool and one circuit breaker per process, so a Redis outage is seen
(and logged, counted in ``affinity_store_errors_total{op}``, reflected in ``affinity_store_up``)
once, whichever part hit it. Every call goes through ``RedisPinStore.call``.

Key schema, next to the pin schema of ``pins.redis`` (``P`` = ``store.key_prefix`` followed by the
hash tag ``{m}``, so every key below is in one Redis Cluster slot):

- ``P drain``          set of drained instance ids (SADD / SREM / SMEMBERS).
- ``P hb:<instance>``  hash, field = node, value = ``<expires unix ms>|<HeartbeatInfo JSON>``. Redis
                       has no per-field expiry (before 7.4), so the expiry is stamped by the publish
                       script from the *Redis server clock* (``TIME``) and the read script drops
                       fields past it, so node clock skew never keeps a dead report alive. The hash
                       itself gets PEXPIRE = the longest ttl published into it, so it vanishes when
                       every node stops publishing.
- ``P hb-instances``   set of instance ids with a ``hb:`` hash, so reading all reports needs no
                       SCAN; members whose hash is gone are removed by the read script. PEXPIRE'd
                       like the hashes.
- ``P lock:<name>``    string token, ``SET NX PX ttl``; released by a Lua compare-and-delete so only
                       the holder (not a successor after expiry) can release it.
- ``P val:<name>``     string, ``SET PX ttl``: a small shared value (the Machines API poller's answer).

Scripts compute ``hb:`` key names from ``ARGV``; the shared hash tag keeps them in the slot of
``KEYS[1]``, so this works on one Redis, Sentinel and Redis Cluster alike.
Imports ``pins.redis``, ``pins.store`` and ``membership.shared``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from affinity_proxy.membership.shared import HeartbeatInfo, new_token
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.routing.model import InstanceId

log = logging.getLogger("affinity_proxy.membership.redis_shared")

#: Hash tag of every shared-state key: all of them live in one Redis Cluster slot, so the heartbeat
#: scripts (which name ``hb:`` keys read from ARGV or from the index) touch one slot.
SLOT_TAG = "{m}"

_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: hb-instances. ARGV: prefix, node, ttl_ms, then instance, json pairs. Reply: reports written.
PUBLISH = _NOW + """
local ttl = tonumber(ARGV[3])
local stamp = string.format('%d', now + ttl) .. '|'
local n = 0
for i = 4, #ARGV, 2 do
  local key = ARGV[1] .. 'hb:' .. ARGV[i]
  redis.call('HSET', key, ARGV[2], stamp .. ARGV[i + 1])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  redis.call('SADD', KEYS[1], ARGV[i])
  n = n + 1
end
if n > 0 and redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return n
"""

# KEYS: hb-instances. ARGV: prefix. Drops expired fields. Reply: flat {instance, json, ...}.
READ = _NOW + """
local out = {}
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. 'hb:' .. instance
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local value = fields[i + 1]
    local sep = string.find(value, '|', 1, true)
    local expires = sep and tonumber(string.sub(value, 1, sep - 1))
    if expires and expires > now then
      out[#out + 1] = instance
      out[#out + 1] = string.sub(value, sep + 1)
    else
      redis.call('HDEL', key, fields[i])
    end
  end
  if redis.call('EXISTS', key) == 0 then redis.call('SREM', KEYS[1], instance) end
end
return out
"""

# KEYS: lock. ARGV: token. Reply: 1 released, 0 not the holder (or already expired).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisSharedState:
    """SharedState on the pin store's Redis. One round trip per call; raises ``PinStoreUnavailable``
    while Redis is down (fast, without I/O, while the store's circuit is open)."""

    kind = "redis"

    def __init__(self, store: RedisPinStore) -> None:
        self._store = store
        prefix = store.prefix + SLOT_TAG
        self._prefix = prefix
        self._drain_key = f"{prefix}drain"
        self._hb_index = f"{prefix}hb-instances"
        client = store.client
        self._publish = client.register_script(PUBLISH)
        self._read = client.register_script(READ)
        self._release = client.register_script(RELEASE)

    def _lock_key(self, name: str) -> str:
        return f"{self._prefix}lock:{name}"

    async def drain(self, instance: InstanceId) -> None:
        await self._store.call("drain", lambda: self._store.client.sadd(self._drain_key, instance))

    async def undrain(self, instance: InstanceId) -> None:
        await self._store.call("undrain", lambda: self._store.client.srem(self._drain_key, instance))

    async def drained(self) -> set[InstanceId]:
        members = await self._store.call("drained", lambda: self._store.client.smembers(self._drain_key))
        return {InstanceId(str(m)) for m in members}  # decode_responses: str

    async def publish_heartbeat(self, node: str, instances: Mapping[InstanceId, HeartbeatInfo], ttl: float) -> None:
        if not instances:
            return
        args: list[Any] = [self._prefix, node, max(1, round(ttl * 1000))]
        for instance, info in instances.items():
            args += [instance, info.to_json()]
        await self._store.call("publish_heartbeat", lambda: self._publish(keys=[self._hb_index], args=args))

    async def heartbeats(self) -> dict[InstanceId, list[HeartbeatInfo]]:
        flat = await self._store.call("heartbeats", lambda: self._read(keys=[self._hb_index], args=[self._prefix]))
        result: dict[InstanceId, list[HeartbeatInfo]] = {}
        for i in range(0, len(flat), 2):
            try:
                info = HeartbeatInfo.from_json(flat[i + 1])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring a malformed heartbeat report for %s: %s", flat[i], exc)
                continue
            result.setdefault(InstanceId(flat[i]), []).append(info)
        for reports in result.values():
            reports.sort(key=lambda r: r.node)
        return result

    async def acquire_lock(self, name: str, ttl: float) -> str | None:
        token = new_token()
        key, ttl_ms = self._lock_key(name), max(1, round(ttl * 1000))
        won = await self._store.call("acquire_lock", lambda: self._store.client.set(key, token, nx=True, px=ttl_ms))
        return token if won else None

    async def put_value(self, name: str, value: str, ttl: float) -> None:
        key, ttl_ms = f"{self._prefix}val:{name}", max(1, round(ttl * 1000))
        await self._store.call("put_value", lambda: self._store.client.set(key, value, px=ttl_ms))

    async def get_value(self, name: str) -> str | None:
        key = f"{self._prefix}val:{name}"
        value = await self._store.call("get_value", lambda: self._store.client.get(key))
        return None if value is None else str(value)

    async def release_lock(self, name: str, token: str) -> bool:
        key = self._lock_key(name)
        return bool(await self._store.call("release_lock", lambda: self._release(keys=[key], args=[token])))
