-- size: how many calls are in one profile key, or in any key of a profile. O(1): a counter.
--
-- KEYS[1] the counters P..'n'   KEYS[2] the expiry index P..'exp'
-- ARGV[1] now   ARGV[2] the counter: 'k:'..kid (a key) or 'p:'..eprofile (a whole profile)
-- ARGV[3] '1' to answer although ended leases wait for a sweep (then it may count them)
-- Returns the count, or -2 when ended leases wait for a sweep (nothing read).
if ARGV[3] ~= '1' and stale(KEYS[2], ARGV[1]) then
  return -2
end
return tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
