"""The limiter's Lua scripts: each runs atomically in Redis against Redis's own clock.

State of one scope lives in three keys sharing a hash tag (so Redis Cluster keeps them together):
  {scope}:state  hash   ts (µs of the last update), per dimension (r = requests, t = tokens):
                        c? consumed, i.e. not yet refilled (limit - c = available, may go < 0),
                        k? everything ever charged (FIFO position of a call's charge),
                        a? everything ever admitted (for reading x-ratelimit-remaining-*),
                        l? limit learned from headers; cool (µs when the cool-down ends);
                        cid/cnr/cnt/cexp a waiting process's claim; e<i>/ur<i>/ut<i> a ring of ten
                        usage counters, one per tenth of the period
  {scope}:slots  zset   in-flight slots scored by their expiry (µs)
  {scope}:out    hash   <key>|m, <key>|v, <key>|n: moving mean and variance of output sizes

Common ARGV: [1] configured rpm (0 = none), [2] configured tpm, [3] period (µs).
"""

from __future__ import annotations

PRELUDE = """
local state, slots = KEYS[1], KEYS[2]
local period = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local width = math.max(1, math.floor(period / 10))
local epoch = math.floor(now / width)
local ring = tostring(epoch % 10)

local function fmt(x) return string.format('%.17g', x) end
local function num(v, default) return tonumber(v) or default end

local names = {'ts', 'lr', 'lt', 'cr', 'ct', 'kr', 'kt', 'ar', 'at', 'cool',
               'cid', 'cnr', 'cnt', 'cexp', 'e' .. ring}
local raw = redis.call('HMGET', state, unpack(names))
local s = {}
for i, name in ipairs(names) do s[name] = raw[i] end

-- A configured limit and a learned one: the tighter wins; 0 means unlimited.
local function limit(configured, learned)
  if configured > 0 and learned > 0 then return math.min(configured, learned) end
  return math.max(configured, learned)
end

local learned_r, learned_t = num(s.lr, 0), num(s.lt, 0)
local elapsed = math.max(0, now - num(s.ts, now))
local function dimension(configured, learned, c, k, a)
  local d = {lim = limit(configured, learned), c = num(c, 0), k = num(k, 0), a = num(a, 0)}
  if d.lim > 0 then d.c = math.max(0, d.c - elapsed * d.lim / period) else d.c = 0 end
  return d
end
local R = dimension(tonumber(ARGV[1]), learned_r, s.cr, s.kr, s.ar)
local T = dimension(tonumber(ARGV[2]), learned_t, s.ct, s.kt, s.at)
local cool = num(s.cool, 0)

local function save()
  redis.call('HSET', state, 'ts', fmt(now), 'cr', fmt(R.c), 'ct', fmt(T.c), 'kr', fmt(R.k),
             'kt', fmt(T.k), 'ar', fmt(R.a), 'at', fmt(T.a))
  redis.call('PEXPIRE', state, 86400000)
end

-- The bucket takes `amount` more: an admission, an overrun, a correction from the provider.
local function charge(d, amount)
  if d.lim > 0 then d.c = d.c + amount end
  d.k = d.k + amount
end

-- Give back up to `amount` of one call's charge, which sits at FIFO position `mark` (k just
-- after its admission). Refill pays charges oldest first, so the part of it that has already
-- refilled cannot be given back twice: a refund never exceeds what is left of the charge.
local function refund(d, amount, mark)
  if d.lim <= 0 then return end
  local left = math.min(amount, mark - (d.k - d.c))
  if left > 0 then d.c = d.c - left end
end

local function tally(requests, tokens)
  local e, ur, ut = 'e' .. ring, 'ur' .. ring, 'ut' .. ring
  if num(s[e], -1) ~= epoch then
    redis.call('HSET', state, e, fmt(epoch), ur, fmt(requests), ut, fmt(tokens))
    s[e] = epoch
  else
    if requests ~= 0 then redis.call('HINCRBY', state, ur, fmt(requests)) end
    if tokens ~= 0 then redis.call('HINCRBY', state, ut, fmt(tokens)) end
  end
end
"""

# ARGV [4] tokens, [5] max in flight, [6] slot ttl µs, [7] slot id, [8] longest acceptable wait µs,
# [9] how long the caller sleeps at most between looks µs, [10] claim grace µs, [11] claimant (one
# per process: its waiters take turns anyway, so a claim never holds back its own process).
# Returns {'ok', now, k_r, k_t, a_r, a_t, µs the next such call would wait}
#       | {'wait', µs, why} | {'busy', µs, why}
#       | {'full', µs until the oldest slot expires} | {'big', token limit}
ACQUIRE = (
    PRELUDE
    + """
local tokens, max_inflight = tonumber(ARGV[4]), tonumber(ARGV[5])
local id, max_wait, claimant = ARGV[7], tonumber(ARGV[8]), ARGV[11]
if T.lim > 0 and tokens > T.lim then return {'big', fmt(T.lim)} end

-- The first process to be refused holds a claim for its waiter: the others may only use what is
-- left beyond it, so a large request is not starved by a stream of small ones.
local live = s.cid and num(s.cexp, 0) > now
local mine = live and s.cid == claimant
local hold_r, hold_t = 0, 0
if live and not mine then hold_r, hold_t = num(s.cnr, 0), num(s.cnt, 0) end

local wait, why = 0, 'rate'
if cool > now then wait, why = cool - now, 'cool-down' end
local function shortfall(d, amount, hold)
  if d.lim <= 0 then return 0 end
  return math.max(0, d.c + hold + amount - d.lim) * period / d.lim
end
local refill = math.max(shortfall(R, 1, hold_r), shortfall(T, tokens, hold_t))
if refill > wait then wait, why = refill, 'rate' end

if wait > 0 then
  if wait > max_wait then
    if mine then redis.call('HDEL', state, 'cid', 'cnr', 'cnt', 'cexp') end
    return {'busy', fmt(wait), why}
  end
  if not live or mine then
    local expiry = now + math.min(wait, tonumber(ARGV[9])) + tonumber(ARGV[10])
    redis.call('HSET', state, 'cid', claimant, 'cnr', '1', 'cnt', fmt(tokens), 'cexp', fmt(expiry))
  end
  return {'wait', fmt(wait), why}
end

redis.call('ZREMRANGEBYSCORE', slots, '-inf', fmt(now))
if redis.call('ZCARD', slots) >= max_inflight then
  local oldest = redis.call('ZRANGE', slots, 0, 0, 'WITHSCORES')
  return {'full', fmt(tonumber(oldest[2]) - now)}
end

charge(R, 1)
charge(T, tokens)
R.a, T.a = R.a + 1, T.a + tokens
local ttl = tonumber(ARGV[6])
redis.call('ZADD', slots, fmt(now + ttl), id)
redis.call('PEXPIRE', slots, fmt(math.floor(ttl / 1000) + 86400000))
if mine then redis.call('HDEL', state, 'cid', 'cnr', 'cnt', 'cexp') end
save()
tally(1, 0)
-- How long the next call of this size would wait: the queued waiters of this process sleep that.
local next_wait = math.max(shortfall(R, 1, hold_r), shortfall(T, tokens, hold_t))
return {'ok', fmt(now), fmt(R.k), fmt(T.k), fmt(R.a), fmt(T.a), fmt(next_wait)}
"""
)

# Settle, release, observe and record an output size, in any combination, in one call.
# ARGV [4] slot id ('' = no call to finish), [5] tokens reserved, [6] tokens charged,
# [7] '1' = give the request back too, [8] k_r mark, [9] k_t mark,
# [10] output key ('' = none), [11] output tokens, [12] moving-average weight,
# [13] header limit r, [14] header limit t (0 = absent), [15] remaining r, [16] remaining t
# (-1 = absent), [17] admission µs of the call the headers answer (-1 = unknown), [18] a_r,
# [19] a_t at that admission.
# Returns {mean, variance ('' when no output given), limit r, limit t}.
FINISH = (
    PRELUDE
    + """
local id = ARGV[4]
if id ~= '' then
  local reserved, charged = tonumber(ARGV[5]), tonumber(ARGV[6])
  local removed = redis.call('ZREM', slots, id)
  -- An overrun is charged even when the slot is gone: charging twice is the safe mistake.
  if charged > reserved then charge(T, charged - reserved) end
  if removed == 1 then
    if charged < reserved then refund(T, reserved - charged, tonumber(ARGV[9])) end
    local requests = 0
    if ARGV[7] == '1' then
      refund(R, 1, tonumber(ARGV[8]))
      requests = -1
    end
    tally(requests, charged)
  end
end

local header_r, header_t = tonumber(ARGV[13]), tonumber(ARGV[14])
if (header_r > 0 and header_r ~= learned_r) or (header_t > 0 and header_t ~= learned_t) then
  if header_r > 0 then learned_r = header_r end
  if header_t > 0 then learned_t = header_t end
  redis.call('HSET', state, 'lr', fmt(learned_r), 'lt', fmt(learned_t))
  R.lim = limit(tonumber(ARGV[1]), learned_r)
  T.lim = limit(tonumber(ARGV[2]), learned_t)
  -- A bucket emptied (a cool-down) or overdrawn on the old, larger scale is empty on the new
  -- one, not in debt for the difference: the provider never admitted what we could not send.
  if R.lim > 0 and R.c > R.lim then R.c = R.lim end
  if T.lim > 0 and T.c > T.lim then T.c = T.lim end
end

-- The provider had `remaining` when it admitted the call (at about `since`). It has refilled
-- since, and everything we admitted after that call is not in its figure yet. If that leaves
-- less than our bucket thinks, our bucket was optimistic: lower it (never raise it).
local since = tonumber(ARGV[17])
local function tighten(d, remaining, admitted)
  if d.lim <= 0 or remaining < 0 then return end
  local target = remaining
  if since >= 0 then
    target = remaining + d.lim / period * math.max(0, now - since) - (d.a - admitted)
  end
  local level = d.lim - d.c
  if target < level then charge(d, level - target) end
end
tighten(R, tonumber(ARGV[15]), tonumber(ARGV[18]))
tighten(T, tonumber(ARGV[16]), tonumber(ARGV[19]))

local mean, variance = '', ''
local field = ARGV[10]
if field ~= '' then
  local out, x = KEYS[3], tonumber(ARGV[11])
  local v = redis.call('HMGET', out, field .. '|m', field .. '|v', field .. '|n')
  local count = num(v[3], 0) + 1
  local weight = math.max(tonumber(ARGV[12]), 1 / count)
  local m, var = num(v[1], x), num(v[2], 0)
  local delta = x - m
  m = m + weight * delta
  var = (1 - weight) * (var + weight * delta * delta)
  redis.call('HSET', out, field .. '|m', fmt(m), field .. '|v', fmt(var), field .. '|n', fmt(count))
  redis.call('PEXPIRE', out, 604800000)
  mean, variance = fmt(m), fmt(var)
end
save()
return {mean, variance, fmt(R.lim), fmt(T.lim)}
"""
)

# ARGV [4] cool-down µs. A 429 says the provider's bucket is empty: make ours empty too (debt is
# kept) and stop every admission until the cool-down ends. Returns the µs left of it.
COOL_DOWN = (
    PRELUDE
    + """
local ends = now + tonumber(ARGV[4])
if ends > cool then
  cool = ends
  redis.call('HSET', state, 'cool', fmt(cool))
end
if R.lim > 0 and R.c < R.lim then charge(R, R.lim - R.c) end
if T.lim > 0 and T.c < T.lim then charge(T, T.lim - T.c) end
save()
return fmt(cool - now)
"""
)

# Read only. Returns {limit r, limit t, learned r, learned t, available r, available t,
# used r, used t (over the last period, in tenths), in flight, cool-down µs left}.
SNAPSHOT = (
    PRELUDE
    + """
local fields = {}
for i = 0, 9 do
  fields[#fields + 1] = 'e' .. i
  fields[#fields + 1] = 'ur' .. i
  fields[#fields + 1] = 'ut' .. i
end
local v = redis.call('HMGET', state, unpack(fields))
local used_r, used_t = 0, 0
for i = 0, 9 do
  if num(v[3 * i + 1], -1) > epoch - 10 then
    used_r = used_r + num(v[3 * i + 2], 0)
    used_t = used_t + num(v[3 * i + 3], 0)
  end
end
local inflight = redis.call('ZCOUNT', slots, '(' .. fmt(now), '+inf')
return {fmt(R.lim), fmt(T.lim), fmt(learned_r), fmt(learned_t), fmt(R.lim - R.c),
        fmt(T.lim - T.c), fmt(used_r), fmt(used_t), fmt(inflight), fmt(math.max(0, cool - now))}
"""
)
