-- stats: the dialog statistics of every instance sharing this Redis and prefix.
--
-- KEYS[1] stats {P}:stats (again, for symmetry)   KEYS[2] expiry index {P}:exp   KEYS[3] stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] how many ended leases to drop first
-- Returns {early, active, processed, expired, failed, still_expired}: still_expired is how many
-- ended leases remain after the drop (the client then sweeps and asks again).
purge(KEYS[2], KEYS[3], ARGV[2], ARGV[1], tonumber(ARGV[3]))
local h = redis.call('HMGET', KEYS[3], 'active', 'processed', 'expired', 'failed')
local out = {0}
for i = 1, 4 do
  out[i + 1] = tonumber(h[i] or '0')
end
out[1] = redis.call('ZCARD', KEYS[2]) - out[2]
out[6] = redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[1])
return out
