-- KEYS[1] the in-flight slots; ARGV [1] slot ttl µs, [2...] the slot ids a live process holds.
-- Their expiry moves a TTL ahead; a slot already gone (settled, expired) is not brought back.
-- (No prelude: this touches nothing but the slots.)
local clock = redis.call('TIME')
local expiry = tonumber(clock[1]) * 1000000 + tonumber(clock[2]) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', string.format('%.17g', expiry), ARGV[i])
end
return #ARGV - 1
