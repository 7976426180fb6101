-- Read only. Returns {limit r, limit t, learned r, learned t, available r, available t,
-- used r, used t (over the last period, in tenths), in flight, cool-down µs left, adaptive
-- window ('' when none)}.
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
        fmt(T.lim - T.c), fmt(used_r), fmt(used_t), fmt(inflight), fmt(math.max(0, cool - now)),
        s.cw or ''}
