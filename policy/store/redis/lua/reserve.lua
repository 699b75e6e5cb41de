-- reserve: admit a call into every profile key of its plan if every enforced limit has room,
-- else into none (all or nothing). The check path: touches only the keys in KEYS.
--
-- KEYS[1]             the call's record           P..'c:'..uid
-- KEYS[2]             the expiry index            P..'exp'
-- KEYS[3]             the counters                P..'n' (also holds the epoch marker)
-- KEYS[4]             the node's index            P..'o:'..node
-- KEYS[5 .. 4+n]      the n distinct profile keys of the plan, P..'k:'..kid
-- KEYS[5+n .. 4+n+m]  the value indexes P..'v:'..eprofile of the m profiles with a value
-- KEYS[5+n+m .. ]     the r rate buckets P..'r:'..rid (hashes: t tokens, ts their time)
-- ARGV[1] now   ARGV[2] lease expiry (now + timeout)   ARGV[3] lease length   ARGV[4] uid
-- ARGV[5] the record's `d` (JSON)   ARGV[6] its identity prefix (the start of `d`)
-- ARGV[7] token   ARGV[8] the record's `k` (node and kids, length-prefixed)
-- ARGV[9] the epoch the client trusts ('' = do not check: a forced reserve while rebuilding)
-- ARGV[10] flags: 'f' force (admit over limits), 's' go ahead although ended leases wait for
--          a sweep (counts may then include them: only ever too high, never too low)
-- ARGV[11] n   ARGV[12] m   ARGV[13] q (profile counters)   ARGV[14] c (enforced limits)
-- ARGV[15] nv (variables)
-- ARGV[16 ..] n pairs (value-index slot 1..m or 0, value or ''), one per key, then q counter
--   fields ('p:'..eprofile for each profile the call joins with a value, 'x:'..eprofile if it
--   also joins that profile's key without value), then c triples (plan index, key slot 1..n,
--   limit), then nv pairs (variable name, value), then r triples (tokens a second, burst,
--   's' for a shadow rate or ''), one per rate bucket: r is what is left of ARGV, divided by 3
-- A key's size: for a key with a value its counter 'k:'..kid in KEYS[3], for a key without value
-- the ZCARD of its zset (exact: no sweep pending, see -2 below).
-- Returns {status, blocked, size_1 .. size_n [, the held record (HGETALL form)]
--          [, rate_blocked, tokens_1 .. tokens_r]}:
--   1 admitted (sizes include the call); 0 refused (blocked = plan index of the first full
--   enforced limit, or -1 when only a rate refused); 2 duplicate: the call is held, nothing
--   counted again, the admission now carries this token (the record follows); 3 conflict: held
--   with another account/From/To, nothing changed (the record follows); -1 the epoch is not
--   ARGV[9] (Redis lost its data; {-1, epoch now or ''}); -2 ended leases wait for a sweep
--   ({-2}; nothing changed). blocked is -1 unless a limit refused.
--   With rates (statuses 0 and 1 only; none are read for 2 and 3, nor with 'f'):
--   rate_blocked = index (0-based) of the first enforced rate without a whole token, or -1;
--   tokens_j = the bucket's tokens at `now` before this call took one, as exact text.
-- A rate bucket: tokens refill at its rate with the time from the bucket's ts to `now` (a `now`
-- before ts refills nothing and keeps ts), up to burst; a missing bucket is full. Only an
-- admission takes tokens (one from each bucket that has one); a bucket then expires when it
-- would be full again, plus RATE_SLACK_MS (Redis's clock vs the clients' offsets), so an idle
-- bucket goes away and is recreated full.
local now = ARGV[1]
local uid = ARGV[4]
local n, q, c, nv = tonumber(ARGV[11]), tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local flags = ARGV[10]

local A = 16                -- first per-key pair
local PA = A + 2 * n        -- profile counter fields
local CA = PA + q           -- limit triples
local fields = {'epoch', 'seq', 'processed'}
for j = 1, q do
  fields[3 + j] = ARGV[PA + j - 1]
end
local plen = #KEYS[3]  -- P..'n': a key's counter is its name from 'k:' on, string.sub(key, plen)
local kf = {}  -- key index -> position of its counter in `fields` (keys with a value)
for i = 1, n do
  if ARGV[A + 2 * (i - 1)] ~= '0' then
    fields[#fields + 1] = string.sub(KEYS[4 + i], plen)
    kf[i] = #fields
  end
end
local cur = redis.call('HMGET', KEYS[3], unpack(fields))
if ARGV[9] ~= '' and cur[1] ~= ARGV[9] then
  return {-1, cur[1] or ''}
end
if not string.find(flags, 's', 1, true) and stale(KEYS[2], now) then
  return {-2}
end
local out = {0, -1}
for i = 1, n do
  if kf[i] then
    out[2 + i] = tonumber(cur[kf[i]]) or 0
  else
    out[2 + i] = redis.call('ZCARD', KEYS[4 + i])
  end
end

local held = redis.call('HMGET', KEYS[1], 'd', 'n', 'e', 'c')
if held[1] then
  if tonumber(held[3]) <= tonumber(now) then
    return {-2}  -- its own lease ended: a sweep drops (and reports) it first
  end
  local w = ARGV[6]
  if string.sub(held[1], 1, #w) ~= w then
    out[1] = 3
  else
    out[1] = 2
    if held[2] ~= ARGV[7] then  -- the later attempt takes the admission over
      redis.call('HSET', KEYS[1], 'n', ARGV[7], 'b', held[2], 'c', held[4] or held[2])
    end
  end
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
    out[#out + 1] = v
  end
  return out
end

local force = string.find(flags, 'f', 1, true)
if not force then
  for j = 0, c - 1 do
    local at = CA + 3 * j
    if out[2 + tonumber(ARGV[at + 1])] >= tonumber(ARGV[at + 2]) then
      out[2] = tonumber(ARGV[at])
      break
    end
  end
end

local RA = CA + 3 * c + 2 * nv  -- the rate triples
local nr = force and 0 or (#ARGV - RA + 1) / 3
local RK = 4 + n + tonumber(ARGV[12])  -- KEYS[RK + j]: rate j's bucket
local tokens, stamps = {}, {}
if nr > 0 then
  local t_now = tonumber(now)
  local rblocked = -1
  for j = 1, nr do
    local at = RA + 3 * (j - 1)
    local burst = tonumber(ARGV[at + 1])
    local b = redis.call('HMGET', KEYS[RK + j], 't', 'ts')
    local t, ts = burst, t_now
    if b[1] then
      t, ts = tonumber(b[1]), tonumber(b[2])
      if t_now > ts then
        t = math.min(burst, t + (t_now - ts) * tonumber(ARGV[at]))
        ts = t_now
      else
        t = math.min(burst, t)
      end
    end
    tokens[j], stamps[j] = t, ts
    if t < 1 and rblocked < 0 and ARGV[at + 2] ~= 's' then
      rblocked = j - 1
    end
  end
  out[3 + n] = rblocked
  for j = 1, nr do
    out[3 + n + j] = string.format('%.17g', tokens[j])
  end
  if out[2] >= 0 or rblocked >= 0 then
    return out
  end
elseif out[2] >= 0 then
  return out
end

local seq = (tonumber(cur[2]) or 0) + 1
local set = {'seq', seq, 'processed', (tonumber(cur[3]) or 0) + 1}
for j = 1, q do
  set[#set + 1] = fields[3 + j]
  set[#set + 1] = (tonumber(cur[3 + j]) or 0) + 1
end
for i = 1, n do
  redis.call('ZADD', KEYS[4 + i], seq, uid)
  if kf[i] then
    if out[2 + i] == 0 then  -- the key goes 0 -> 1: its value joins the profile's index
      local at = A + 2 * (i - 1)
      redis.call('ZADD', KEYS[4 + n + tonumber(ARGV[at])], 0, ARGV[at + 1])
    end
    set[#set + 1] = fields[kf[i]]
    set[#set + 1] = out[2 + i] + 1
  end
  out[2 + i] = out[2 + i] + 1
end
redis.call('HSET', KEYS[3], unpack(set))
redis.call('ZADD', KEYS[2], ARGV[2], uid)
redis.call('ZADD', KEYS[4], seq, uid)
local rec = {'d', ARGV[5], 's', 'early', 'to', ARGV[3], 'e', ARGV[2], 'n', ARGV[7], 'k', ARGV[8]}
local VA = CA + 3 * c
for j = 0, nv - 1 do
  rec[#rec + 1] = 'v:' .. ARGV[VA + 2 * j]
  rec[#rec + 1] = ARGV[VA + 2 * j + 1]
end
redis.call('HSET', KEYS[1], unpack(rec))
local RATE_SLACK_MS = 1000
for j = 1, nr do
  local t = tokens[j]
  if t >= 1 then  -- (a shadow rate without a token takes none)
    local at = RA + 3 * (j - 1)
    t = t - 1
    local full_ms = math.ceil((tonumber(ARGV[at + 1]) - t) / tonumber(ARGV[at]) * 1000)
    redis.call('HSET', KEYS[RK + j], 't', string.format('%.17g', t), 'ts', string.format('%.17g', stamps[j]))
    redis.call('PEXPIRE', KEYS[RK + j], string.format('%d', full_ms + RATE_SLACK_MS))
  end
end
out[1] = 1
return out
