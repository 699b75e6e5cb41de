-- get: the record of a held call.
--
-- KEYS[1] call record {P}:c:<call id>   KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] call id
-- Returns the record (HGETALL form), or false (nil) when the call is not held.
purge(KEYS[2], KEYS[3], ARGV[2], ARGV[1], PURGE_LIMIT)
if not is_live(KEYS[1], KEYS[2], KEYS[3], ARGV[3], ARGV[1]) then
  return false
end
return redis.call('HGETALL', KEYS[1])
