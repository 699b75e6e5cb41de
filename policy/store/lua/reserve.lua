-- reserve: admit a call into every profile key of its plan if every enforced limit has room,
-- else into none (all or nothing), after dropping calls whose lease ended.
--
-- KEYS[1]            call record       {P}:c:<call id>
-- KEYS[2]            expiry index      {P}:exp
-- KEYS[3]            stats hash        {P}:stats
-- KEYS[4 .. 3+n]     the n distinct profile keys of the plan   {P}:k:<profile>[=<value>]
-- KEYS[4+n .. 3+2n]  the index of each key's profile {P}:i:<profile>, or the key itself
--                    when it has no value (no index entry then)
-- ARGV[1] now          ARGV[2] record key prefix {P}:c:
-- ARGV[3] lease expiry (now + timeout)            ARGV[4] lease length (timeout)
-- ARGV[5] call id
-- ARGV[6] the record's `d` field (JSON: id, from, to, account, init ts, profiles)
-- ARGV[7] the record's `k` field (the keys below, length-prefixed; see _lib.lua)
-- ARGV[8] n            ARGV[9] c, the number of enforced limits
-- ARGV[10] a token naming this very reserve (kept in the record as `n`, so that a reserve
--   whose answer never reached its caller can be undone without touching any other admission)
-- ARGV[11 ..] c triples (plan index, key index 1..n, limit), in plan order
-- Returns {status, blocked, size_1, ..., size_n [, record fields (HGETALL form)]}
--   status 1 = admitted (sizes include the call), 0 = refused (blocked = the plan index of
--   the first full limit), 2 = duplicate: the call is already held, nothing changed, and the
--   held record follows the sizes. blocked is -1 unless refused.
local now = ARGV[1]
local id = ARGV[5]
local n = tonumber(ARGV[8])
local c = tonumber(ARGV[9])
purge(KEYS[2], KEYS[3], ARGV[2], now, PURGE_LIMIT)

local out = {0, -1}
for i = 1, n do
  out[2 + i] = alive(KEYS[3 + i], now)
end

if is_live(KEYS[1], KEYS[2], KEYS[3], id, now) then
  out[1] = 2
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
    out[#out + 1] = v
  end
  return out
end

for j = 0, c - 1 do
  local idx = tonumber(ARGV[11 + 3 * j])
  local ki = tonumber(ARGV[12 + 3 * j])
  local limit = tonumber(ARGV[13 + 3 * j])
  if out[2 + ki] >= limit then
    out[2] = idx
    return out
  end
end

local expires = ARGV[3]
for i = 1, n do
  local key, index = KEYS[3 + i], KEYS[3 + n + i]
  redis.call('ZADD', key, expires, id)
  if index ~= key and out[2 + i] == 0 then
    redis.call('SADD', index, key)
  end
  out[2 + i] = out[2 + i] + 1
end
redis.call('ZADD', KEYS[2], expires, id)
redis.call('HSET', KEYS[1], 'd', ARGV[6], 's', 'early', 'st', '', 'to', ARGV[4], 'e', expires,
  'n', ARGV[10], 'k', ARGV[7])
redis.call('HINCRBY', KEYS[3], 'processed', 1)
out[1] = 1
return out
