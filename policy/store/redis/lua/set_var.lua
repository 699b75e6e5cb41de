-- set_var: set (or delete) one variable of a held call.
--
-- KEYS[1] the call's record P..'c:'..uid
-- ARGV[1] now   ARGV[2] the variable's name   ARGV[3] its value   ARGV[4] '1' to delete it
-- Returns the record (HGETALL form), or false (nil) when the call is not held or its lease ended.
local e = redis.call('HGET', KEYS[1], 'e')
if not e or tonumber(e) <= tonumber(ARGV[1]) then
  return false
end
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[1], 'v:' .. ARGV[2])
else
  redis.call('HSET', KEYS[1], 'v:' .. ARGV[2], ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
