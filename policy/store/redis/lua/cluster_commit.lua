-- cluster_commit: the last step of a reserve, in the call's shard, once every profile key took
-- the call: the pending record becomes a held (early) call, counted in the shard's counters and
-- indexes, and its lock goes (and its list of rate buckets: a held call's tokens stay taken).
--
-- KEYS[1] the call's record T..':c:'..uid   KEYS[2] the expiry index T..':exp'   KEYS[3] the
-- locks T..':l'   KEYS[4] the counters T..':n'   KEYS[5] the node index T..':o'
-- KEYS[6] the values index T..':v'
-- ARGV[1] uid   ARGV[2] lock owner   ARGV[3] lease expiry   ARGV[4] the epoch the client trusts
-- ('' = do not check)   ARGV[5] the call's node-index member   ARGV[6] q (profile counters)
-- ARGV[7] nv (valued kids)   ARGV[8] nvar (variables)
-- ARGV[9 ..] q counter fields ('p:'..eprofile, 'x:'..eprofile as reserve.lua), then nv kids of
-- the call's keys with a value, then nvar pairs (variable name, value)
-- Returns {1} committed; {-3} the pending record is not this reserve's any more (a sweep took
-- its ended lock over: the reserve failed); {-1, epoch now or ''} the epoch is not ARGV[4].
if ARGV[4] ~= '' then
  local e = redis.call('HGET', KEYS[4], 'epoch')
  if e ~= ARGV[4] then
    return {-1, e or ''}
  end
end
local h = redis.call('HMGET', KEYS[1], 's', 'lo')
if h[1] ~= 'pending' or h[2] ~= ARGV[2] then
  return {-3}
end
local q, nv, nvar = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local fields = {'processed'}
for j = 0, q - 1 do
  fields[#fields + 1] = ARGV[9 + j]
end
for j = 0, nv - 1 do
  fields[#fields + 1] = 'k:' .. ARGV[9 + q + j]
end
local cur = redis.call('HMGET', KEYS[4], unpack(fields))
local set = {}
for i, f in ipairs(fields) do
  local v = (tonumber(cur[i]) or 0) + 1
  set[#set + 1] = f
  set[#set + 1] = v
  if i > 1 + q and v == 1 then
    redis.call('ZADD', KEYS[6], 0, ARGV[9 + q + (i - 2 - q)])
  end
end
redis.call('HSET', KEYS[4], unpack(set))
local rec = {'s', 'early'}
local VA = 9 + q + nv
for j = 0, nvar - 1 do
  rec[#rec + 1] = 'v:' .. ARGV[VA + 2 * j]
  rec[#rec + 1] = ARGV[VA + 2 * j + 1]
end
redis.call('HSET', KEYS[1], unpack(rec))
redis.call('HDEL', KEYS[1], 'l', 'lo', 'r')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[5], 0, ARGV[5])
return {1}
