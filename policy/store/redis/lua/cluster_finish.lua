-- cluster_finish: the last step of a release (or of a repair's lock), in the calls' shard, once
-- the client removed each call from its profile keys: each record this owner still locks goes
-- (a pending, ending or repair record), or just loses its lock (a held call a repair locked).
--
-- KEYS[1] the locks T..':l'   KEYS[2 ..] the records T..':c:'..uid, one per ARGV[2 ..]
-- ARGV[1] lock owner   ARGV[2 ..] uids
-- Returns how many records this owner still locked.
local done = 0
for i = 2, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 's', 'lo')
  if h[2] == ARGV[1] then
    if h[1] == 'early' or h[1] == 'active' then
      redis.call('HDEL', KEYS[i], 'l', 'lo')
    else
      redis.call('DEL', KEYS[i])
    end
    redis.call('ZREM', KEYS[1], ARGV[i])
    done = done + 1
  end
end
return done
