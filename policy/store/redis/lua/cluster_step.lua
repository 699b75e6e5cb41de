-- cluster_step: one profile key of a reserve: drop the entries whose lease ended, then add the
-- call if the key's limit has room (or it has none, or the reserve is forced). The caller holds
-- the call's pending record (cluster_begin), so an entry of this uid already here is a leftover
-- of an admission that is gone (a crash, a lost write): it is counted once and now belongs to
-- this reserve.
--
-- KEYS[1] the profile key P..':k:'..kid (uid -> lease expiry)
-- ARGV[1] now   ARGV[2] uid   ARGV[3] lease expiry   ARGV[4] limit ('' = none: a counting-only
-- key, or a shadow limit)   ARGV[5] '1' to add even over the limit (force)
-- Returns {1, size} added (size includes the call) or {0, size} refused (the key is full; size
-- without the call).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'GT', ARGV[3], ARGV[2])
  return {1, n}
end
if ARGV[4] ~= '' and ARGV[5] ~= '1' and n >= tonumber(ARGV[4]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return {1, n + 1}
