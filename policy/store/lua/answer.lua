-- answer: mark a held call answered (state active, start ts = now) and give it a new lease.
-- Answering an active call again only renews the lease (idempotent).
--
-- KEYS[1] call record {P}:c:<call id>   KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] lease expiry (now + timeout)
-- ARGV[4] lease length (timeout)   ARGV[5] call id
-- Returns the updated record (HGETALL form), or false (nil) when the call is not held.
local now = ARGV[1]
local id = ARGV[5]
purge(KEYS[2], KEYS[3], ARGV[2], now, PURGE_LIMIT)
if not is_live(KEYS[1], KEYS[2], KEYS[3], id, now) then
  return false
end
if redis.call('HGET', KEYS[1], 's') ~= 'active' then
  redis.call('HSET', KEYS[1], 's', 'active', 'st', now)
  redis.call('HINCRBY', KEYS[3], 'active', 1)
end
set_lease(KEYS[1], KEYS[2], id, ARGV[3], ARGV[4])
return redis.call('HGETALL', KEYS[1])
