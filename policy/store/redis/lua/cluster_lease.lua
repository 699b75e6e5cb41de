-- cluster_lease: answer (early -> active, start time now) or refresh a held call: a new lease of
-- ARGV[3] seconds, in two steps around the client's update of the call's entries in its profile
-- keys (other slots), which carry the same lease. Mode 'lock' locks the call (no end, sweep or
-- other lease change runs meanwhile) and, when the lease gets shorter, shortens the record first;
-- mode 'set' writes the new lease and state and unlocks. So a record never outlives its entries:
-- a longer lease reaches the entries first, a shorter one the record first, and a client that
-- dies between the steps leaves entries at least as long as the record (its lock ends after the
-- lock lease and a sweep unlocks it).
--
-- KEYS[1] the call's record T..':c:'..uid   KEYS[2] the expiry index T..':exp'   KEYS[3] the
-- counters T..':n'   KEYS[4] the locks T..':l'
-- ARGV[1] now   ARGV[2] lease expiry (now + timeout)   ARGV[3] lease length   ARGV[4] uid
-- ARGV[5] token ('' = whatever admission holds the call)   ARGV[6] '1' answer, '' refresh
-- ARGV[7] mode 'lock' or 'set'   ARGV[8] lock expiry   ARGV[9] lock owner
-- Returns (lock) {1, the lease expiry before, the record's `k`} locked; {0} not held (also while
-- it is being reserved or released) or its lease ended; {2, record...} held by another admission
-- (token), unchanged; {4} another operation holds the call now. (set) the record (HGETALL form),
-- or false (nil) when this owner's lock is gone (a sweep took it over: nothing written).
local now = tonumber(ARGV[1])
if ARGV[7] == 'lock' then
  local h = redis.call('HMGET', KEYS[1], 'e', 'n', 's', 'l', 'k')
  if not h[1] or not (h[3] == 'early' or h[3] == 'active') or tonumber(h[1]) <= now then
    return {0}
  end
  if ARGV[5] ~= '' and h[2] ~= ARGV[5] then
    local out = {2}
    for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
      out[#out + 1] = v
    end
    return out
  end
  if h[4] then
    return {4}
  end
  redis.call('HSET', KEYS[1], 'l', ARGV[8], 'lo', ARGV[9])
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[4])
  if tonumber(ARGV[2]) < tonumber(h[1]) then
    redis.call('HSET', KEYS[1], 'e', ARGV[2])
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
  end
  return {1, h[1], h[5] or ''}
end
local h = redis.call('HMGET', KEYS[1], 's', 'lo')
if h[2] ~= ARGV[9] then
  return false
end
if ARGV[6] == '1' and h[1] ~= 'active' then
  redis.call('HSET', KEYS[1], 's', 'active', 'st', ARGV[1], 'to', ARGV[3], 'e', ARGV[2])
  redis.call('HINCRBY', KEYS[3], 'active', 1)
else
  redis.call('HSET', KEYS[1], 'to', ARGV[3], 'e', ARGV[2])
end
redis.call('HDEL', KEYS[1], 'l', 'lo')
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return redis.call('HGETALL', KEYS[1])
