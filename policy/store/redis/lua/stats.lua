-- stats: the dialog statistics of every instance sharing this prefix. O(1): counters.
--
-- KEYS[1] the counters P..'n'   KEYS[2] the expiry index P..'exp'
-- ARGV[1] now   ARGV[2] '1' to answer although ended leases wait for a sweep
-- Returns {0, held, active, processed, expired, failed} (early = held - active), or {-2}
-- when ended leases wait for a sweep.
if ARGV[2] ~= '1' and stale(KEYS[2], ARGV[1]) then
  return {-2}
end
local h = redis.call('HMGET', KEYS[1], 'active', 'processed', 'expired', 'failed')
return {0, redis.call('ZCARD', KEYS[2]), tonumber(h[1] or '0'), tonumber(h[2] or '0'),
        tonumber(h[3] or '0'), tonumber(h[4] or '0')}
