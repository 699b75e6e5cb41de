-- cluster_step: the calls of one event-loop tick that join one profile key (cluster_batch.py),
-- each as if alone, in the order given: drop the entries whose lease ended, then add each call
-- if the key's limit has room for it (or it has none, or the reserve is forced). Each caller
-- holds its call's pending record (cluster_begin), so an entry of that uid already here is a
-- leftover of an admission that is gone (a crash, a lost write): it is counted once and now
-- belongs to this reserve.
--
-- KEYS[1] the profile key P..':k:'..kid (uid -> lease expiry)
-- ARGV[1] now   then per call 4 arguments: uid, lease expiry, limit ('' = none: a counting-only
-- key, or a shadow limit), '1' to add even over the limit (force)
-- Returns per call, in order, a pair: 1 and the size with the call (added), or 0 and the size
-- without it (refused: the key is full).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
local out = {}
for i = 2, #ARGV, 4 do
  local uid, lease, limit, force = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('ZSCORE', KEYS[1], uid) then
    redis.call('ZADD', KEYS[1], 'GT', lease, uid)
    out[#out + 1] = 1
  elseif limit ~= '' and force ~= '1' and n >= tonumber(limit) then
    out[#out + 1] = 0
  else
    redis.call('ZADD', KEYS[1], lease, uid)
    n = n + 1
    out[#out + 1] = 1
  end
  out[#out + 1] = n
end
return out
