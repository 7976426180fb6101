-- Settle, release, observe and record an output size, in any combination, in one call.
-- ARGV [4] slot id ('' = no call to finish), [5] tokens reserved, [6] tokens charged,
-- [7] '1' = give the request back too, [8] k_r mark, [9] k_t mark,
-- [10] output key ('' = none), [11] output tokens, [12] moving-average weight,
-- [13] header limit r, [14] header limit t (0 = absent), [15] remaining r, [16] remaining t
-- (-1 = absent), [17] admission µs of the call the headers answer (-1 = unknown), [18] a_r,
-- [19] a_t at that admission.
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
