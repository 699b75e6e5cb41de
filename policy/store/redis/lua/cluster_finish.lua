-- cluster_finish: the last step of releases (or of a repair's lock) in one shard, for the calls
-- of one event-loop tick (cluster_batch.py), once the client removed each call from its profile
-- keys: each record its owner still locks goes (a pending, ending or repair record), or just
-- loses its lock (a held call a repair or a lease change locked).
--
-- KEYS[1] the locks T..':l'   KEYS[2 ..] the records T..':c:'..uid, one per pair of ARGV
-- ARGV[1] uid, ARGV[2] the lock owner that finishes it, and so on in pairs
-- Returns how many records their owner still locked.
local done = 0
for i = 2, #KEYS do
  local uid, owner = ARGV[2 * i - 3], ARGV[2 * i - 2]
  local h = redis.call('HMGET', KEYS[i], 's', 'lo')
  if h[2] == owner then
    if h[1] == 'early' or h[1] == 'active' then
      redis.call('HDEL', KEYS[i], 'l', 'lo')
    else
      redis.call('DEL', KEYS[i])
    end
    redis.call('ZREM', KEYS[1], uid)
    done = done + 1
  end
end
return done
