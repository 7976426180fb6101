-- The limiter's Lua scripts: each runs atomically in Redis against Redis's own clock.
--
-- State of one scope lives in three keys sharing a hash tag (so Redis Cluster keeps them together):
--   {scope}:state  hash   ts (µs of the last update), per dimension (r = requests, t = tokens):
--                         c? consumed, i.e. not yet refilled (limit - c = available, may go < 0),
--                         k? everything ever charged (FIFO position of a call's charge),
--                         a? everything ever admitted (for reading x-ratelimit-remaining-*),
--                         l? limit learned from headers; cool (µs when the cool-down ends);
--                         cid/cnr/cnt/cexp a waiting process's claim; e<i>/ur<i>/ut<i> a ring of ten
--                         usage counters, one per tenth of the period; with adaptive concurrency,
--                         cw the window (calls in flight allowed), ss '0' once slow start ended,
--                         ls the short moving latency, lk the moving output tokens + 1 (their
--                         ratio is the pace), lb and ma the least pace and latency in the minute
--                         begun at bt, pb and mb in the minute before, dec (µs of the last
--                         decrease), sg (µs since the window has been full in slow start, or of
--                         its last doubling there: acquire.lua)
--   {scope}:slots  zset   in-flight slots scored by their expiry (µs)
--   {scope}:out    hash   <key>|m, <key>|v, <key>|n: moving mean and variance of output sizes
--   {scope}:admissions zset  the last two periods' admissions scored by their time (µs), each
--                         named by the running totals a_r:a_t just after it (for reading headers)
--
-- Common ARGV: [1] configured rpm (0 = none), [2] configured tpm, [3] period (µs).
--
-- Every script below starts with this prelude (workers/provider/scripts.py joins them).
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
               'cid', 'cnr', 'cnt', 'cexp', 'e' .. ring, 'cw'}
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

-- Adaptive concurrency in force: '1' always, '2' only while no rate limit is configured or learned.
local function adaptive(mode)
  return mode == '1' or (mode == '2' and R.lim <= 0 and T.lim <= 0)
end

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

-- Requests admitted and tokens settled over the last period, from the ring of usage counters.
local function used_last_period()
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
  return used_r, used_t
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
