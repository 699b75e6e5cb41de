-- size: how many calls are in one profile key, or in any key of a profile. O(1).
--
-- KEYS[1] the counters P..'n'   KEYS[2] the expiry index P..'exp'
-- KEYS[3] the key's zset P..'k:'..kid (for a whole profile: its key without value)
-- ARGV[1] now   ARGV[2] 'value' (a key with a value: its counter 'k:'..kid), 'key' (a key without
-- value: ZCARD KEYS[3]) or 'profile' (ZCARD KEYS[3], the calls in its key without value, plus
-- counter 'p:'..eprofile, the calls in any of its valued keys, minus counter 'x:'..eprofile,
-- the calls in both)   ARGV[3] the counter 'k:'..kid (value) or eprofile (profile)
-- ARGV[4] '1' to answer although ended leases wait for a sweep (then it may count them)
-- Returns the count, or -2 when ended leases wait for a sweep (nothing read).
if ARGV[4] ~= '1' and stale(KEYS[2], ARGV[1]) then
  return -2
end
if ARGV[2] == 'value' then
  return tonumber(redis.call('HGET', KEYS[1], ARGV[3]) or '0')
end
local n = redis.call('ZCARD', KEYS[3])
if ARGV[2] == 'profile' then
  local c = redis.call('HMGET', KEYS[1], 'p:' .. ARGV[3], 'x:' .. ARGV[3])
  n = n + (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0)
end
return n
