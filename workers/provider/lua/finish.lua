-- Settle, release, observe and record an output size, in any combination, in one call.
-- ARGV [4] slot id ('' = no call to finish), [5] tokens reserved, [6] tokens charged,
-- [7] '1' = give the request back too, [8] k_r mark, [9] k_t mark,
-- [10] output key ('' = none), [11] output tokens, [12] moving-average weight,
-- [13] header limit r, [14] header limit t (0 = absent), [15] remaining r, [16] remaining t
-- (-1 = absent), [17] admission µs of the call the headers answer (-1 = unknown), [18] a_r,
-- [19] a_t at that admission.
-- [20] how the call ended: 0 = no call, 1 = answered, 2 = overloaded (429, 5xx, timeout);
-- [21] its latency µs; [22] adaptive concurrency ('0' off, '1' on, '2' while no rate limit is
-- known), with [23] floor, [24] start, [25] cap; [26] its output tokens (-1 = unknown: the
-- latency alone is compared).
-- Returns {mean, variance ('' when no output given), limit r, limit t}.
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
  local unknown_r, unknown_t = R.lim <= 0, T.lim <= 0
  R.lim = limit(tonumber(ARGV[1]), learned_r)
  T.lim = limit(tonumber(ARGV[2]), learned_t)
  -- A limit known for the first time: what was sent while none was known is in the provider's
  -- bucket already (the last period's admissions; for tokens, what settled plus the calls still
  -- in flight at this call's size), so the bucket does not start full.
  if (unknown_r and R.lim > 0) or (unknown_t and T.lim > 0) then
    local used_r, used_t = used_last_period()
    local flying = redis.call('ZCOUNT', slots, '(' .. fmt(now), '+inf')
    if unknown_r and R.lim > 0 then R.c = math.max(R.c, math.min(R.lim, used_r)) end
    if unknown_t and T.lim > 0 then
      T.c = math.max(T.c, math.min(T.lim, used_t + flying * tonumber(ARGV[5])))
    end
  end
  -- A bucket emptied (a cool-down) or overdrawn on the old, larger scale is empty on the new
  -- one, not in debt for the difference: the provider never admitted what we could not send.
  if R.lim > 0 and R.c > R.lim then R.c = R.lim end
  if T.lim > 0 and T.c > T.lim then T.c = T.lim end
end

-- The provider had `remaining` when it admitted the call, some time after we did (`since`): the
-- request still had to be sent, and calls admitted here just after it may have reached the
-- provider first and be in its figure already. So the calls admitted within TRANSIT of ours
-- (or of its whole flight, if shorter) count as seen; only those admitted later as not yet seen.
-- Counting them as unseen (the mistake of a naive reading) makes a burst of concurrent calls,
-- answered out of order, look like a deficit of the whole burst. The refill is counted from our
-- admission. Both errors are optimistic by at most TRANSIT's worth of admissions and refill:
-- a drift smaller than that is left to the 429 cool-down; a larger one is corrected here.
local since = tonumber(ARGV[17])
local TRANSIT = 500000
local seen_r, seen_t = tonumber(ARGV[18]), tonumber(ARGV[19])
if since >= 0 then
  local edge = since + math.min(TRANSIT, math.max(0, now - since))
  local last = redis.call('ZREVRANGEBYSCORE', KEYS[4], fmt(edge), '-inf', 'LIMIT', 0, 1)[1]
  if last then
    local sep = string.find(last, ':', 1, true)
    seen_r = math.max(seen_r, tonumber(string.sub(last, 1, sep - 1)))
    seen_t = math.max(seen_t, tonumber(string.sub(last, sep + 1)))
  end
end
local function tighten(d, remaining, admitted)
  if d.lim <= 0 or remaining < 0 then return end
  local target = remaining
  if since >= 0 then
    target = remaining + d.lim / period * math.max(0, now - since) - (d.a - admitted)
  end
  local level = d.lim - d.c
  if target < level then charge(d, level - target) end
end
tighten(R, tonumber(ARGV[15]), seen_r)
tighten(T, tonumber(ARGV[16]), seen_t)

-- Adaptive concurrency, for endpoints that publish no limits: the window of calls in flight
-- doubles per round trip until the first sign of overload (slow start), then grows by one per
-- round trip; an overload (429, 5xx, timeout) halves it, and a moving latency rising to 1.5
-- times its least value lately together with a moving pace (latency per output token) rising to
-- 1.3 times its own (a server queueing or saturated) take a fifth off; one decrease per round
-- trip. Either alone misleads: where latency grows with the answer's length, a run of long
-- answers looks like a queue; where it does not, a run of short ones does. The latency's wider
-- margin keeps a stall of the client's own (its CPU, a pause) from passing for a queue.
local ended = tonumber(ARGV[20])
if adaptive(ARGV[22]) and ended > 0 then
  local floor, cap = tonumber(ARGV[23]), tonumber(ARGV[25])
  local a = redis.call('HMGET', state, 'ss', 'lb', 'ls', 'dec', 'pb', 'bt', 'lk', 'ma', 'mb')
  local window = num(s.cw, tonumber(ARGV[24]))
  local slow_start = a[1] ~= '0'
  local low, short, dec = num(a[2], -1), num(a[3], -1), num(a[4], 0)
  local low_before, low_since, size = num(a[5], -1), num(a[6], now), num(a[7], -1)
  local fast, fast_before = num(a[8], -1), num(a[9], -1)
  local rtt = math.max(short, 0)
  local decrease = 1
  if ended == 2 then
    decrease = 0.5
  else
    local latency, tokens = tonumber(ARGV[21]), math.max(tonumber(ARGV[26]), 0) + 1
    if short < 0 then short, size = latency, tokens end
    -- short: the moving latency of about the last ten answers (the round trip); size: their
    -- moving output tokens; short / size: the pace. low and fast: the least pace and latency
    -- of this minute, low_before and fast_before of the one before (then they are forgotten,
    -- so a workload whose answers slow down is learned again). A least value that crept up
    -- with what it is compared with would let a queue on the server grow.
    short = short + 0.1 * (latency - short)
    size = size + 0.1 * (tokens - size)
    local pace = short / size
    if low < 0 then low, fast = pace, short end
    if now - low_since > 60e6 then
      low_before, fast_before, low, fast, low_since = low, fast, pace, short, now
    end
    low, fast = math.min(low, pace), math.min(fast, short)
    local least_pace = low_before > 0 and math.min(low, low_before) or low
    local least_latency = fast_before > 0 and math.min(fast, fast_before) or fast
    if pace > 1.3 * least_pace and short > 1.5 * least_latency then decrease = 0.8 end
  end
  if decrease < 1 then
    if now - dec > rtt then
      window = math.max(floor, window * decrease)
      slow_start, dec = false, now
    end
  elseif slow_start then
    window = math.min(cap, window + 1)
  else
    window = math.min(cap, window + 1 / window)
  end
  redis.call('HSET', state, 'cw', fmt(window), 'ss', slow_start and '1' or '0', 'lb', fmt(low),
             'ls', fmt(short), 'dec', fmt(dec), 'pb', fmt(low_before), 'bt', fmt(low_since),
             'lk', fmt(size), 'ma', fmt(fast), 'mb', fmt(fast_before))
end

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
