"""Lua scripts of the Redis pin store: every multi-key mutation runs as one atomic script.

Why Lua: a pin and its per-instance counter must change together, and ``claim``/``repin``/
``drop(expected)``/``drop_instance`` must be compare-and-set in Redis itself, without WATCH retries.
Scripts read the server clock (``TIME``), so counter fields (expiry, unix ms) agree with the pins'
own expiry whatever the clocks of the proxy nodes say.

Layout (schema in ``pins.redis``): a pin is a plain string key whose expiry is rounded down to a
grid of ``window`` ms (``expiry_at``), and each bucket keeps, per instance, a small hash
``expiry ms -> number of pins expiring then``. Because every pin of a counter field expires exactly at
that field's time, ``counts()`` is exact: it sums the fields not yet past. No per-pin index entry:
``list`` and ``drop_instance`` find pins by an incremental SCAN (``LIST_KEYS``/``DROP_KEYS`` then
check the keys one SCAN batch brought).

Previous layout (``pins.redis_legacy``: a sorted-set index entry per pin): pins it wrote are read as
they are (same pin keys), counted from its index until they are next written, touched or dropped
here, which moves them to the counters (``uncount`` removes the index entry). Old nodes in a rolling
deploy keep writing it; both are read, so nothing is lost.

Calling convention (Redis Cluster safe): every script touches the keys of one *bucket* only, all
hash-tagged ``{pN}`` so they share one slot. Per-user scripts: ``KEYS`` = pin key, the bucket's
counted-instances set; ``ARGV[1]`` = counter base (``P cnt:{pN}``), ``ARGV[2]`` = legacy index base
(``P idx:{pN}``), ``ARGV[3]`` = user key. Bucket scripts: ``KEYS`` = counted-instances set, legacy
instances set; ``ARGV[1..3]`` = counter base, legacy index base, pin base (``P pin:{pN}``). Key names
that depend on values read inside the script are built from those bases and stay in the bucket's
slot. Replies: PTTL conventions (-1 no expiry, -2 gone). Needs Redis >= 7.0 (``PEXPIRETIME``).

Pure data: no imports, no I/O.
"""

from __future__ import annotations

_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function expiry_at(now, ttl, window)
  return math.floor((now + ttl) / window) * window
end
local function ms(n) return string.format('%d', n) end
-- Forget how the pin at pinkey (naming cur) is counted: its legacy index entry, else one from its
-- counter field. A pin counted nowhere (written outside these scripts) changes nothing.
local function uncount(pinkey, user, cur, cntbase, idxbase)
  if redis.call('ZREM', idxbase .. cur, user) == 1 then return end
  local at = redis.call('PEXPIRETIME', pinkey)
  if at <= 0 then return end
  local key, field = cntbase .. cur, ms(at)
  local n = tonumber(redis.call('HGET', key, field) or '0')
  if n > 1 then redis.call('HINCRBY', key, field, -1) elseif n == 1 then redis.call('HDEL', key, field) end
end
local function count(livekey, cntbase, instance, at)
  redis.call('HINCRBY', cntbase .. instance, ms(at), 1)
  redis.call('SADD', livekey, instance)
end
-- Write the pin (cur: what it names now, or false) and count it; returns its PTTL.
local function write(pinkey, livekey, cntbase, idxbase, user, cur, instance, ttl, window)
  if cur then uncount(pinkey, user, cur, cntbase, idxbase) end
  local now = now_ms()
  local at = expiry_at(now, ttl, window)
  redis.call('SET', pinkey, instance, 'PXAT', at)
  count(livekey, cntbase, instance, at)
  return at - now
end
"""

# KEYS: pin. Reply: {instance or false, pttl}.
GET = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

# KEYS: pin, live. ARGV: cnt base, idx base, user, instance, ttl_ms, window_ms. Reply: {won, instance, pttl}.
# Claim-or-get: an existing pin is the answer (won 0), so a lost claim costs no second look-up.
CLAIM = (
    _PRELUDE
    + """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur, redis.call('PTTL', KEYS[1])} end
local pttl = write(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], false, ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
return {1, ARGV[4], pttl}
"""
)

# KEYS: pin, live. ARGV: cnt base, idx base, user, expected ('' = absent), instance, ttl_ms, window_ms.
# A missing pin matches any expected value (see RedisPinStore.repin). Reply: {won, instance, pttl}.
REPIN = (
    _PRELUDE
    + """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[4] then return {0, cur, redis.call('PTTL', KEYS[1])} end
local pttl = write(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], cur, ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]))
return {1, ARGV[5], pttl}
"""
)

# KEYS: pin, live. ARGV: cnt base, idx base, user, instance, ttl_ms, window_ms. Reply: {1, instance, pttl}.
SET = (
    _PRELUDE
    + """
local cur = redis.call('GET', KEYS[1])
local pttl = write(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], cur, ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
return {1, ARGV[4], pttl}
"""
)

# KEYS: pin, live. ARGV: cnt base, idx base, user, expected ('' = any). Reply: 1 when deleted.
DROP = (
    _PRELUDE
    + """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if ARGV[4] ~= '' and cur ~= ARGV[4] then return 0 end
uncount(KEYS[1], ARGV[3], cur, ARGV[1], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
"""
)

# KEYS: live, legacy instances (of the bucket). ARGV: cnt base, idx base, pin base, ttl_ms, window_ms,
# then user, instance pairs, all of that bucket. Slides only pins that still name that instance (a
# pin re-pinned since the touch is left alone), and writes only when the expiry moves to a later grid
# line or the pin still sits in the legacy index: most touches within one window write nothing.
# Reply: number of pins whose expiry moved.
TOUCH = (
    _PRELUDE
    + """
local now = now_ms()
local at = expiry_at(now, tonumber(ARGV[4]), tonumber(ARGV[5]))
local n = 0
for i = 6, #ARGV, 2 do
  local user, instance = ARGV[i], ARGV[i + 1]
  local key = ARGV[3] .. user
  if redis.call('GET', key) == instance then
    local legacy = redis.call('ZSCORE', ARGV[2] .. instance, user)
    if legacy or redis.call('PEXPIRETIME', key) < at then
      uncount(key, user, instance, ARGV[1], ARGV[2])
      redis.call('PEXPIREAT', key, at)
      count(KEYS[1], ARGV[1], instance, at)
      n = n + 1
    end
  end
end
return n
"""
)

# KEYS: live, legacy instances (of the bucket). ARGV: cnt base, idx base. Sums the counter fields not
# yet past (and the legacy index entries not yet expired), deleting the past ones and forgetting
# empty counters and indexes. Reply: flat {instance, count, ...}. Cost: O(instances x windows).
COUNTS = (
    _PRELUDE
    + """
local now = now_ms()
local totals, order = {}, {}
local function add(instance, n)
  if totals[instance] == nil then totals[instance] = 0; order[#order + 1] = instance end
  totals[instance] = totals[instance] + n
end
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. instance
  local flat = redis.call('HGETALL', key)
  local n = 0
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) < now then redis.call('HDEL', key, flat[i]) else n = n + tonumber(flat[i + 1]) end
  end
  if redis.call('EXISTS', key) == 0 then redis.call('SREM', KEYS[1], instance) end
  if n > 0 then add(instance, n) end
end
local past = ms(now)
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local key = ARGV[2] .. instance
  redis.call('ZREMRANGEBYSCORE', key, '-inf', past)
  local n = redis.call('ZCARD', key)
  if n == 0 then redis.call('SREM', KEYS[2], instance) else add(instance, n) end
end
local out = {}
for _, instance in ipairs(order) do
  out[#out + 1] = instance
  out[#out + 1] = totals[instance]
end
return out
"""
)

# KEYS: live, legacy instances (of the bucket). ARGV: cnt base, idx base, pin base, instance ('' = any),
# then user keys of that bucket (from one SCAN batch). Read-only.
# Reply: flat {user, instance, pttl, ...} of those pins that are live (and name instance).
LIST_KEYS = """
local out = {}
for i = 5, #ARGV do
  local key = ARGV[3] .. ARGV[i]
  local cur = redis.call('GET', key)
  if cur and (ARGV[4] == '' or cur == ARGV[4]) then
    out[#out + 1] = ARGV[i]
    out[#out + 1] = cur
    out[#out + 1] = redis.call('PTTL', key)
  end
end
return out
"""

# KEYS: live, legacy instances (of the bucket). ARGV: cnt base, idx base, pin base, instance, then
# user keys of that bucket (from one SCAN batch). Deletes those pins that still name instance, with
# their counts. Atomic per batch, so concurrent reapers delete (and report) each pin once.
# Reply: {users deleted...}.
DROP_KEYS = (
    _PRELUDE
    + """
local dropped = {}
for i = 5, #ARGV do
  local key = ARGV[3] .. ARGV[i]
  if redis.call('GET', key) == ARGV[4] then
    uncount(key, ARGV[i], ARGV[4], ARGV[1], ARGV[2])
    redis.call('DEL', key)
    dropped[#dropped + 1] = ARGV[i]
  end
end
return dropped
"""
)

SCRIPTS: dict[str, str] = {
    "GET": GET,
    "CLAIM": CLAIM,
    "REPIN": REPIN,
    "SET": SET,
    "DROP": DROP,
    "TOUCH": TOUCH,
    "COUNTS": COUNTS,
    "LIST_KEYS": LIST_KEYS,
    "DROP_KEYS": DROP_KEYS,
}
