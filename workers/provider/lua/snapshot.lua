-- Read only. Returns {limit r, limit t, learned r, learned t, available r, available t,
-- used r, used t (over the last period, in tenths), in flight, cool-down µs left, adaptive
-- window ('' when none)}.
local used_r, used_t = used_last_period()
local inflight = redis.call('ZCOUNT', slots, '(' .. fmt(now), '+inf')
return {fmt(R.lim), fmt(T.lim), fmt(learned_r), fmt(learned_t), fmt(R.lim - R.c),
        fmt(T.lim - T.c), fmt(used_r), fmt(used_t), fmt(inflight), fmt(math.max(0, cool - now)),
        s.cw or ''}
