-- lease: answer (early -> active, start time now) or refresh a held call: a new lease of
-- ARGV[3] seconds. Answering an active call again only renews the lease.
--
-- KEYS[1] the call's record P..'c:'..uid   KEYS[2] the expiry index P..'exp'
-- KEYS[3] the counters P..'n'
-- ARGV[1] now   ARGV[2] lease expiry (now + timeout)   ARGV[3] lease length   ARGV[4] uid
-- ARGV[5] token ('' = whatever admission holds the call)   ARGV[6] '1' answer, '' refresh
-- Returns the record (HGETALL form), or false (nil) when the call is not held or its lease
-- ended (a sweep drops and reports it). With a token that is not the record's, nothing
-- changes and the held record is returned.
local h = redis.call('HMGET', KEYS[1], 'e', 'n', 's')
if not h[1] or tonumber(h[1]) <= tonumber(ARGV[1]) then
  return false
end
if ARGV[5] ~= '' and h[2] ~= ARGV[5] then
  return redis.call('HGETALL', KEYS[1])
end
if ARGV[6] == '1' and h[3] ~= 'active' then
  redis.call('HSET', KEYS[1], 's', 'active', 'st', ARGV[1], 'to', ARGV[3], 'e', ARGV[2])
  redis.call('HINCRBY', KEYS[3], 'active', 1)
else
  redis.call('HSET', KEYS[1], 'to', ARGV[3], 'e', ARGV[2])
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return redis.call('HGETALL', KEYS[1])
