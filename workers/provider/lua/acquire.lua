-- ARGV [4] tokens, [5] max in flight, [6] slot ttl µs, [7] slot id, [8] longest acceptable wait µs,
-- [9] how long the caller sleeps at most between looks µs, [10] claim grace µs, [11] claimant (one
-- per process: its waiters take turns anyway, so a claim never holds back its own process).
-- [12] adaptive concurrency: '1' on, '2' on while no rate limit is configured or learned, '0'
-- off; when on, the window `cw` (at least [13] floor, [14] to start with) caps the calls in
-- flight below [5].
-- Returns {'ok', now, k_r, k_t, a_r, a_t, µs the next such call would wait}
--       | {'wait', µs, why} | {'busy', µs, why}
--       | {'full', µs until the oldest slot expires} | {'big', token limit}
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

-- Slow start doubles the adaptive window per round trip (finish.lua), and a round trip counts
-- at most RAMP: while no answer has come back yet, or answers take longer than RAMP, a window
-- that has been full for RAMP (calls waiting, no overload seen) doubles here. At 10 s calls the
-- window of 32 reached a cap of 256 after three round trips, 30 s; now after 3 s. Time spent
-- idle is not counted: `sg` is when the window was last full or grown, and a look that finds
-- it older than twice RAMP starts counting again.
local RAMP = 1000000
redis.call('ZREMRANGEBYSCORE', slots, '-inf', fmt(now))
local flying = redis.call('ZCARD', slots)
local cap = max_inflight
if adaptive(ARGV[12]) then
  local floor = tonumber(ARGV[13])
  local window = math.max(floor, num(s.cw, tonumber(ARGV[14])))
  if flying >= math.floor(window) and flying < max_inflight then
    local a = redis.call('HMGET', state, 'ss', 'ls', 'sg')
    local short = num(a[2], -1)
    if a[1] ~= '0' and (short < 0 or short >= RAMP) then
      local since = num(a[3], -1)
      if since < 0 or now - since > 2 * RAMP then
        redis.call('HSET', state, 'sg', fmt(now))
      elseif now - since >= RAMP then
        window = math.min(max_inflight, 2 * window)
        redis.call('HSET', state, 'cw', fmt(window), 'sg', fmt(now))
      end
    end
  end
  cap = math.min(max_inflight, math.floor(window))
end
if flying >= cap then
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
local admissions = KEYS[4]
redis.call('ZADD', admissions, fmt(now), fmt(R.a) .. ':' .. fmt(T.a))
redis.call('ZREMRANGEBYSCORE', admissions, '-inf', '(' .. fmt(now - 2 * period))
redis.call('PEXPIRE', admissions, math.floor(2 * period / 1000) + 1000)
-- How long the next call of this size would wait: the queued waiters of this process sleep that.
local next_wait = math.max(shortfall(R, 1, hold_r), shortfall(T, tokens, hold_t))
return {'ok', fmt(now), fmt(R.k), fmt(T.k), fmt(R.a), fmt(T.a), fmt(next_wait)}
