-- values: a page of a profile's non-empty values with their sizes, in value order.
--
-- KEYS[1] the profile's value index P..'v:'..eprofile   KEYS[2] the expiry index P..'exp'
-- KEYS[3] the counters P..'n' (each value's size: counter ARGV[4] .. value)
-- ARGV[1] now   ARGV[2] where the page starts, a ZRANGEBYLEX bound: '-' (the first value) or
-- '(' .. the last value of the previous page   ARGV[3] at most this many values (bounded by
-- the client)   ARGV[4] 'k:'..eprofile..'='   ARGV[5] '1' to answer
-- although ended leases wait for a sweep
-- Returns {0, more (1/0), value_1, size_1, value_2, size_2, ...}, or {-2} when ended leases
-- wait for a sweep.
if ARGV[5] ~= '1' and stale(KEYS[2], ARGV[1]) then
  return {-2}
end
local limit = tonumber(ARGV[3])
local vals = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+', 'LIMIT', 0, limit + 1)
local more = 0
if #vals > limit then
  more = 1
  vals[limit + 1] = nil
end
local out = {0, more}
if #vals > 0 then
  local fields = {}
  for i, v in ipairs(vals) do
    fields[i] = ARGV[4] .. v
  end
  local sizes = redis.call('HMGET', KEYS[3], unpack(fields))
  for i, v in ipairs(vals) do
    out[#out + 1] = v
    out[#out + 1] = tonumber(sizes[i] or '0')
  end
end
return out
