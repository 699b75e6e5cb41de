-- cluster_expire: the first step of a sweep, in one shard, for calls the client found due (their
-- lease or their lock ended): each held call whose lease ended is counted in `expired`, leaves
-- the shard's counters and indexes, and its record goes to the reports list (exactly once, also
-- across instances) and stays as *ending*, locked by this sweep, until the client has removed
-- it from its profile keys (cluster_finish). A record whose lock ended (its operation died) is
-- taken over: a reservation or release is finished by this sweep; a held call a repair locked is
-- only unlocked. Then up to ARGV[6] reports are handed out.
--
-- KEYS[1] the expiry index T..':exp'   KEYS[2] the locks T..':l'   KEYS[3] the counters T..':n'
-- KEYS[4] the node index T..':o'   KEYS[5] the values index T..':v'   KEYS[6] the reports T..':x'
-- KEYS[7 ..] the records T..':c:'..uid of the calls ARGV[7 ..]
-- ARGV[1] now   ARGV[2] lock expiry   ARGV[3] lock owner (this sweep)   ARGV[4] the epoch the
-- client trusts ('' = do not check)   ARGV[5] the reports list's bound (the oldest beyond are
-- discarded)   ARGV[6] at most this many reports handed out (0: none)   ARGV[7 ..] uids
-- Returns {0, n, uid_1, k_1, r_1, ..., uid_n, k_n, r_n, report_1, ...}: the n calls this sweep
-- now locks (remove each from the keys its `k` lists, refund the holds its `r` lists - a reserve
-- that never committed: '' for the others -, then cluster_finish), then the reports (a record's
-- HGETALL fields, length-prefixed); {-1, epoch now or ''} when the epoch is not ARGV[4].
if ARGV[4] ~= '' then
  local e = redis.call('HGET', KEYS[3], 'epoch')
  if e ~= ARGV[4] then
    return {-1, e or ''}
  end
end
local now = tonumber(ARGV[1])
local locked = {}
local len = nil
for i = 7, #KEYS do
  local uid = ARGV[i]
  local flat = redis.call('HGETALL', KEYS[i])
  if #flat == 0 then
    redis.call('ZREM', KEYS[1], uid)
    redis.call('ZREM', KEYS[2], uid)
  else
    local rec = hash(flat)
    if rec.l then
      if tonumber(rec.l) <= now then
        if is_held(rec) then
          redis.call('HDEL', KEYS[i], 'l', 'lo')
          redis.call('ZREM', KEYS[2], uid)
        else
          redis.call('HSET', KEYS[i], 's', 'ending', 'l', ARGV[2], 'lo', ARGV[3])
          redis.call('ZADD', KEYS[2], ARGV[2], uid)
          locked[#locked + 1] = uid
          locked[#locked + 1] = rec.k or ''
          locked[#locked + 1] = rec.r or ''
        end
      end
    elseif is_held(rec) and tonumber(rec.e) <= now then
      release_shard(KEYS[1], KEYS[3], KEYS[4], KEYS[5], uid, rec, 'expired', false)
      len = redis.call('RPUSH', KEYS[6], pack(flat))
      redis.call('HSET', KEYS[i], 's', 'ending', 'l', ARGV[2], 'lo', ARGV[3])
      redis.call('ZADD', KEYS[2], ARGV[2], uid)
      locked[#locked + 1] = uid
      locked[#locked + 1] = rec.k or ''
      locked[#locked + 1] = ''
    elseif not is_held(rec) then
      redis.call('ZREM', KEYS[1], uid)  -- (cannot happen: only held calls are in the expiry index)
    end
  end
end
if len and len > tonumber(ARGV[5]) then
  redis.call('LTRIM', KEYS[6], -tonumber(ARGV[5]), -1)
end
local out = {0, #locked / 3}
for _, v in ipairs(locked) do
  out[#out + 1] = v
end
local pop = tonumber(ARGV[6])
if pop > 0 then
  local got = redis.call('LPOP', KEYS[6], pop)
  if got then
    for _, r in ipairs(got) do
      out[#out + 1] = r
    end
  end
end
return out
