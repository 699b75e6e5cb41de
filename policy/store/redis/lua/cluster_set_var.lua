-- cluster_set_var: set (or delete) one variable of a held call, in its shard.
--
-- KEYS[1] the call's record T..':c:'..uid
-- ARGV[1] now   ARGV[2] the variable's name   ARGV[3] its value   ARGV[4] '1' to delete it
-- Returns the record (HGETALL form), or false (nil) when the call is not held or its lease ended.
local h = redis.call('HMGET', KEYS[1], 'e', 's')
if not h[1] or not (h[2] == 'early' or h[2] == 'active') or tonumber(h[1]) <= tonumber(ARGV[1]) then
  return false
end
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[1], 'v:' .. ARGV[2])
else
  redis.call('HSET', KEYS[1], 'v:' .. ARGV[2], ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
