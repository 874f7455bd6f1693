"""The previous Redis layout's write scripts (before the counter layout of ``pins.redis``), verbatim.

Why kept: during a rolling deploy old nodes still run these on the same Redis, so the current store
must read and migrate what they write (``tests/pins/test_layout_migration.py`` plays an old node
with them) and ``benchmarks/scaling_pins.py`` measures this layout beside the current one. The store
itself never runs them. Previous key schema (``P`` = key prefix, ``N`` = bucket):

- ``P pin:{pN}<user_key>``  string, the instance id, PX = TTL (unchanged: both layouts share it)
- ``P idx:{pN}<instance>``  sorted set, member = user key, score = expiry (server unix ms)
- ``P instances{pN}``       set of instance ids with a (possibly) non-empty index in bucket N

Pure data: no imports, no I/O.
"""

from __future__ import annotations

_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function idx(base, instance) return base .. instance end
local function write(pinkey, setkey, base, user, cur, instance, ttl)
  local now = now_ms()
  redis.call('SET', pinkey, instance, 'PX', ttl)
  if cur and cur ~= instance then redis.call('ZREM', idx(base, cur), user) end
  redis.call('ZADD', idx(base, instance), now + ttl, user)
  redis.call('SADD', setkey, instance)
end
"""

# KEYS: pin. Reply: {instance or false, pttl}.
GET = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

# KEYS: pin, instances. ARGV: idx base, user, instance, ttl_ms. Reply: {won, instance, pttl}.
# Claim-or-get: an existing pin is the answer (won 0), so a lost claim costs no second look-up.
CLAIM = (
    _PRELUDE
    + """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur, redis.call('PTTL', KEYS[1])} end
local ttl = tonumber(ARGV[4])
write(KEYS[1], KEYS[2], ARGV[1], ARGV[2], false, ARGV[3], ttl)
return {1, ARGV[3], ttl}
"""
)

# KEYS: pin, instances. ARGV: idx base, user, expected ('' = absent), instance, ttl_ms.
# A missing pin matches any expected value (see RedisPinStore.repin). Reply: {won, instance, pttl}.
REPIN = (
    _PRELUDE
    + """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[3] then return {0, cur, redis.call('PTTL', KEYS[1])} end
local ttl = tonumber(ARGV[5])
write(KEYS[1], KEYS[2], ARGV[1], ARGV[2], cur, ARGV[4], ttl)
return {1, ARGV[4], ttl}
"""
)

# KEYS: pin, instances. ARGV: idx base, user, instance, ttl_ms. Reply: {1, instance, pttl}.
SET = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[4])
write(KEYS[1], KEYS[2], ARGV[1], ARGV[2], redis.call('GET', KEYS[1]), ARGV[3], ttl)
return {1, ARGV[3], ttl}
"""
)

# KEYS: pin, instances. ARGV: idx base, user, expected ('' = any). Reply: 1 when deleted.
DROP = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if ARGV[3] ~= '' and cur ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. cur, ARGV[2])
return 1
"""

# KEYS: instances (of the bucket). ARGV: idx base, pin base, ttl_ms, then user, instance pairs, all
# of that bucket. Refreshes only pins that still name that instance (a pin re-pinned since the
# touch is left alone). Reply: number refreshed.
TOUCH = (
    _PRELUDE
    + """
local now = now_ms()
local ttl = tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV, 2 do
  local user, instance = ARGV[i], ARGV[i + 1]
  local key = ARGV[2] .. user
  if redis.call('GET', key) == instance then
    redis.call('PEXPIRE', key, ttl)
    redis.call('ZADD', idx(ARGV[1], instance), now + ttl, user)
    n = n + 1
  end
end
return n
"""
)

# KEYS: instances (of the bucket). ARGV: idx base, pin base, instance, limit. Read-only.
# Reply: flat {user, pttl, ...} of the bucket's live pins naming instance.
LIST = (
    _PRELUDE
    + """
local members = redis.call('ZRANGEBYSCORE', idx(ARGV[1], ARGV[3]), '(' .. string.format('%d', now_ms()),
  '+inf', 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, user in ipairs(members) do
  local key = ARGV[2] .. user
  if redis.call('GET', key) == ARGV[3] then
    out[#out + 1] = user
    out[#out + 1] = redis.call('PTTL', key)
  end
end
return out
"""
)

# KEYS: instances (of the bucket). ARGV: idx base. Trims expired index entries, forgets empty indexes.
# Reply: flat {instance, count, ...}. Cost: O(instances + expired entries).
COUNTS = (
    _PRELUDE
    + """
local now = string.format('%d', now_ms())
local out = {}
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = idx(ARGV[1], instance)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local n = redis.call('ZCARD', key)
  if n == 0 then
    redis.call('SREM', KEYS[1], instance)
  else
    out[#out + 1] = instance
    out[#out + 1] = n
  end
end
return out
"""
)

# KEYS: instances (of the bucket). ARGV: idx base, pin base, instance, batch. Deletes up to `batch`
# pins of the bucket's index that still name instance, and removes every visited member from the
# index whatever it names now. Atomic per batch, so concurrent reapers see disjoint members.
# Reply: {entries left in the index, {users...}}.
DROP_INSTANCE = """
local index = ARGV[1] .. ARGV[3]
local dropped = {}
for _, user in ipairs(redis.call('ZRANGE', index, 0, tonumber(ARGV[4]) - 1)) do
  local key = ARGV[2] .. user
  if redis.call('GET', key) == ARGV[3] then
    redis.call('DEL', key)
    dropped[#dropped + 1] = user
  end
  redis.call('ZREM', index, user)
end
local left = redis.call('ZCARD', index)
if left == 0 then redis.call('SREM', KEYS[1], ARGV[3]) end
return {left, dropped}
"""

SCRIPTS: dict[str, str] = {
    "GET": GET,
    "CLAIM": CLAIM,
    "REPIN": REPIN,
    "SET": SET,
    "DROP": DROP,
    "TOUCH": TOUCH,
    "LIST": LIST,
    "COUNTS": COUNTS,
    "DROP_INSTANCE": DROP_INSTANCE,
}
