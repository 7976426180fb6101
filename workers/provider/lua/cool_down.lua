-- ARGV [4] cool-down µs. A 429 says the provider's bucket is empty: make ours empty too (debt is
-- kept) and stop every admission until the cool-down ends. Returns the µs left of it.
local ends = now + tonumber(ARGV[4])
if ends > cool then
  cool = ends
  redis.call('HSET', state, 'cool', fmt(cool))
end
if R.lim > 0 and R.c < R.lim then charge(R, R.lim - R.c) end
if T.lim > 0 and T.c < T.lim then charge(T, T.lim - T.c) end
save()
return fmt(cool - now)
