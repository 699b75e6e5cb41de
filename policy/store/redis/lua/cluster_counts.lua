-- cluster_counts: one shard's counters (its part of the dialog stats or of a whole profile's
-- size). A counter still includes a call whose lease ended until a sweep drops it, so this
-- answers "sweep first" while such a call waits.
--
-- KEYS[1] the counters T..':n'   KEYS[2] the expiry index T..':exp'
-- ARGV[1] now   ARGV[2] '1' to answer although ended leases wait for a sweep   ARGV[3 ..] fields
-- Returns {0, held calls of the shard, value of each field (0 when absent)}, or {-2} when ended
-- leases wait for a sweep.
if ARGV[2] ~= '1' and #redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1) > 0 then
  return {-2}
end
local out = {0, redis.call('ZCARD', KEYS[2])}
if #ARGV > 2 then
  local fields = {}
  for i = 3, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  for _, v in ipairs(redis.call('HMGET', KEYS[1], unpack(fields))) do
    out[#out + 1] = tonumber(v or '0')
  end
end
return out
