-- epoch: the data-loss marker. Written once (the first instance to start on an empty Redis,
-- or the first to notice a loss); every instance adopts the one in force. A marker that is
-- missing or not the one an instance trusts means Redis lost its data.
--
-- KEYS[1] the counters P..'n' (field 'epoch')
-- ARGV[1] a new marker, written only if there is none
-- Returns {created (1/0), the marker in force}.
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  return {1, ARGV[1]}
end
return {0, redis.call('HGET', KEYS[1], 'epoch')}
