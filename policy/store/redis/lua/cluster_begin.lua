-- cluster_begin: the first step of a reserve, in the call's shard. A held call is a duplicate
-- (the admission is handed to this token) or a conflict, and nothing else happens; otherwise
-- the call gets a *pending* record that locks its identity (no other reserve, end or repair
-- of this uid runs until it is committed or released) and lists the keys the reserve may
-- touch, so that a sweep can release them if the reserving instance dies.
--
-- KEYS[1] the call's record T..':c:'..uid   KEYS[2] the locks T..':l'   KEYS[3] the counters T..':n'
-- ARGV[1] now   ARGV[2] uid   ARGV[3] token   ARGV[4] the record's `d` (JSON)   ARGV[5] its
-- identity prefix (the start of `d`)   ARGV[6] the record's `k` (node and kids, length-prefixed)
-- ARGV[7] lease expiry   ARGV[8] lease length   ARGV[9] lock expiry   ARGV[10] lock owner
-- ARGV[11] the epoch the client trusts ('' = do not check: a forced reserve while rebuilding)
-- ARGV[12] the call-rate buckets the reserve may take a token of: '' or the hold id (its lock
-- owner) then the rids, length-prefixed (kept as `r` until the commit: a sweep that takes the
-- pending record over refunds them, cluster_rate.lua)
-- Returns {1} pending record written (go on with the profile keys); {2, record...} duplicate:
-- held, the admission now carries this token; {3, record...} conflict: held with another
-- account/From/To, nothing changed; {4} another operation holds this call now (try again
-- shortly); {-2} its lease or lock ended and waits for a sweep; {-1, epoch now or ''} the
-- shard's epoch is not ARGV[11] (its primary lost its data).
if ARGV[11] ~= '' then
  local e = redis.call('HGET', KEYS[3], 'epoch')
  if e ~= ARGV[11] then
    return {-1, e or ''}
  end
end
local now = tonumber(ARGV[1])
local held = redis.call('HMGET', KEYS[1], 'd', 'n', 'e', 'c', 's', 'l')
if held[1] or held[5] then
  if held[6] or not (held[5] == 'early' or held[5] == 'active') then
    if tonumber(held[6] or '0') <= now then
      return {-2}
    end
    return {4}
  end
  if tonumber(held[3]) <= now then
    return {-2}
  end
  local out
  local w = ARGV[5]
  if string.sub(held[1], 1, #w) ~= w then
    out = {3}
  else
    out = {2}
    if held[2] ~= ARGV[3] then
      redis.call('HSET', KEYS[1], 'n', ARGV[3], 'b', held[2], 'c', held[4] or held[2])
    end
  end
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
    out[#out + 1] = v
  end
  return out
end
redis.call('HSET', KEYS[1], 'd', ARGV[4], 's', 'pending', 'to', ARGV[8], 'e', ARGV[7], 'n', ARGV[3],
           'k', ARGV[6], 'l', ARGV[9], 'lo', ARGV[10])
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[1], 'r', ARGV[12])
end
redis.call('ZADD', KEYS[2], ARGV[9], ARGV[2])
return {1}
