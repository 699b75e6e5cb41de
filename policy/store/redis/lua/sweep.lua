-- sweep: drop up to ARGV[2] calls whose lease ended by now, count each in `expired`, and keep
-- its record in the reports list; then hand out up to ARGV[3] records from that list. Every
-- expiry is reported exactly once across all instances: dropping and popping are atomic.
--
-- KEYS[1] the expiry index P..'exp'   KEYS[2] the counters P..'n'   KEYS[3] the reports P..'x'
-- Also touches, by name, each dropped call's record P..'c:'..uid and the keys it lists (see
-- end.lua): not known before the script runs (never on the check path; same hash tag).
-- ARGV[1] now   ARGV[2] at most this many calls dropped   ARGV[3] at most this many reports
-- popped (0: only drop)   ARGV[4] the epoch the client trusts ('' = do not check)
-- ARGV[5] the reports list's bound (the oldest reports beyond it are discarded)
-- ARGV[6] a time budget in microseconds: the script stops dropping once it has run this long
--         (Redis TIME, looked at every 8 calls), so it never blocks Redis for long
-- Returns {0, more, report_1, report_2, ...}: more = 1 when ended leases remain; each report
-- is a record's HGETALL fields, length-prefixed. {-1, epoch now or ''} when the epoch is not
-- ARGV[4] (Redis lost its data; nothing done).
if ARGV[4] ~= '' then
  local e = redis.call('HGET', KEYS[2], 'epoch')
  if e ~= ARGV[4] then
    return {-1, e or ''}
  end
end
local limit = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit + 1)
local more = 0
if #ids > limit then
  more = 1
end
local P = prefix_of(KEYS[2])
local len = nil
local t = redis.call('TIME')
local stop_at = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[6])
for i = 1, math.min(#ids, limit) do
  if i % 8 == 0 then
    t = redis.call('TIME')
    if tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop_at then
      more = 1
      break
    end
  end
  local uid = ids[i]
  local flat = redis.call('HGETALL', P .. 'c:' .. uid)
  if #flat == 0 then
    redis.call('ZREM', KEYS[1], uid)  -- no record (cannot happen): only unlist it
  else
    release(P, KEYS[1], KEYS[2], uid, hash(flat), 'expired', false)
    len = redis.call('RPUSH', KEYS[3], pack(flat))
  end
end
if len and len > tonumber(ARGV[5]) then
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[5]), -1)
end
local out = {0, more}
local pop = tonumber(ARGV[3])
if pop > 0 then
  local got = redis.call('LPOP', KEYS[3], pop)
  if got then
    for _, r in ipairs(got) do
      out[#out + 1] = r
    end
  end
end
return out
