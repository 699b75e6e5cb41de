-- cluster_lock: the repair's lock on calls of one shard, so that it can compare them with their
-- profile keys (other slots) while no reserve, end or sweep of the same uids runs: each held call
-- that no operation holds is locked by this owner; with ARGV[4] = '1' a uid without any record
-- gets a placeholder record ('repair') that locks its identity the same way. cluster_finish
-- unlocks the held calls and deletes the placeholders.
--
-- KEYS[1] the locks T..':l'   KEYS[2 ..] the records T..':c:'..uid of the calls ARGV[5 ..]
-- ARGV[1] now   ARGV[2] lock expiry   ARGV[3] lock owner   ARGV[4] '1' to lock absent uids too
-- ARGV[5 ..] uids
-- Returns, per uid in order, a pair: ('held', its lease expiry .. ' ' .. its `k`) locked held
-- call; ('absent', '') no record, a placeholder locks it; ('busy', '') another operation holds it
-- (or its lease ended: a sweep's), left alone.
local out = {}
local now = tonumber(ARGV[1])
for i = 2, #KEYS do
  local uid = ARGV[i + 3]
  local h = redis.call('HMGET', KEYS[i], 's', 'e', 'k', 'l')
  if not h[1] then
    if ARGV[4] == '1' then
      redis.call('HSET', KEYS[i], 's', 'repair', 'l', ARGV[2], 'lo', ARGV[3])
      redis.call('ZADD', KEYS[1], ARGV[2], uid)
      out[#out + 1] = 'absent'
    else
      out[#out + 1] = 'busy'
    end
    out[#out + 1] = ''
  elseif (h[1] == 'early' or h[1] == 'active') and not h[4] and tonumber(h[2]) > now then
    redis.call('HSET', KEYS[i], 'l', ARGV[2], 'lo', ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[2], uid)
    out[#out + 1] = 'held'
    out[#out + 1] = h[2] .. ' ' .. (h[3] or '')
  else
    out[#out + 1] = 'busy'
    out[#out + 1] = ''
  end
end
return out
