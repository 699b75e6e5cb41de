-- cluster_rate: the operations of one event-loop tick on one call-rate bucket (cluster_batch.py),
-- in the order given: takes (a reserve's step), settles (its call was admitted: the token stays
-- taken) and refunds (its call was not admitted: the token goes back).
--
-- A bucket holds two token counts at its time ts, both refilled at the rate up to the burst:
-- t, the tokens if every take not yet settled or refunded (a *hold*) ends admitted, and u (only
-- while there are holds), the tokens if every hold ends refunded. A check takes a token only
-- when t >= 1. The true count (the bucket that saw only the takes whose call was admitted) lies
-- between them, so t is what a check may trust, and a refund can lift t to what it knows the
-- true count is at least: removing one take raises a bucket by 1 at most, so with h holds and
-- this one refunded the true count is >= u - (h - 1) (and >= t). A refund never mints a token,
-- however late it comes: a bucket that refilled to its burst meanwhile gets nothing back. With a
-- single hold the refund is exact (t becomes u); the last hold to go makes t = u.
-- Holds are fields 'h:'..id (the reserve's lock owner) valued with their expiry; a hold that
-- expires counts as settled (the token stays taken: the safe side).
--
-- KEYS[1] the bucket P..':r:'..rid (hash: t, ts, and while holds exist h (their number),
--         u, hm (the earliest hold expiry), 'h:'..id)
-- ARGV[1] now (holds that expired by then are settled first)   ARGV[2] a hold's lease (seconds)
-- ARGV[3] slack (ms) added to the bucket's time to full in its PEXPIRE
-- then per operation 6 arguments: 't' take, 's' settle or 'r' refund; the hold's id; now; the
-- rate (tokens a second); the burst; 's' for a shadow rate or '' (rate, burst, shadow: takes only)
-- Returns per operation, in order, a pair: a take: the tokens at its now before it took one
-- (exact text) and 1 if it took one, 0 if not (none left: an enforced rate refuses; a shadow
-- rate does not, and takes none); a settle or refund: '' and 1 if the hold was there, else 0.
-- A missing bucket is full. Only a take writes a missing bucket; a bucket expires once it would
-- be full again (plus ARGV[3]): every count is then the burst, holds included.
local b = redis.call('HMGET', KEYS[1], 't', 'ts', 'u', 'h', 'hm')
local t, ts, u, h, hm = tonumber(b[1]), tonumber(b[2]), tonumber(b[3]), tonumber(b[4]) or 0, tonumber(b[5])
if t and h > 0 and not u then
  u = t
end
local now0 = tonumber(ARGV[1])
local dirty, took = false, false
local rate, burst

-- one hold ends: settled (its token stays taken) or refunded (given back as far as it is known to be)
local function close(refund)
  if refund then
    t = math.max(t, u - (h - 1))
  else
    u = math.max(t, u - 1)
  end
  h = h - 1
  if h == 0 then
    t = math.max(t, u)
    u = nil
  end
  dirty = true
end

if t and h > 0 and hm and hm <= now0 then  -- expired holds: settled
  local flat = redis.call('HGETALL', KEYS[1])
  local ended, left = {}, nil
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'h:' then
      local e = tonumber(flat[i + 1])
      if e <= now0 then
        ended[#ended + 1] = flat[i]
      elseif not left or e < left then
        left = e
      end
    end
  end
  if #ended > 0 then
    redis.call('HDEL', KEYS[1], unpack(ended))
    for _ = 1, #ended do
      close(false)
    end
  end
  while h > 0 and not left do  -- (a count without holds: settled, the safe side)
    close(false)
  end
  hm = left
  dirty = true
end

local out = {}
for i = 4, #ARGV, 6 do
  local op, id = ARGV[i], ARGV[i + 1]
  if op == 't' then
    local now = tonumber(ARGV[i + 2])
    rate, burst = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    if not t then
      t, ts = burst, now
    elseif now > ts then
      local add = (now - ts) * rate
      t = math.min(burst, t + add)
      if u then
        u = math.min(burst, u + add)
      end
      ts = now
    else
      t = math.min(burst, t)
      if u then
        u = math.min(burst, u)
      end
    end
    out[#out + 1] = string.format('%.17g', t)
    if t >= 1 then
      if h == 0 then
        u = t
      end
      t = t - 1
      h = h + 1
      local e = now + tonumber(ARGV[2])
      redis.call('HSET', KEYS[1], 'h:' .. id, string.format('%.17g', e))
      if not hm or e < hm then
        hm = e
      end
      dirty, took = true, true
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  else
    out[#out + 1] = ''
    if t and redis.call('HDEL', KEYS[1], 'h:' .. id) == 1 then
      close(op == 'r')
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
end

if dirty then
  local fmt = '%.17g'
  if h > 0 then
    redis.call('HSET', KEYS[1], 't', string.format(fmt, t), 'ts', string.format(fmt, ts), 'h', h,
               'u', string.format(fmt, u), 'hm', string.format(fmt, hm))
  else
    redis.call('HSET', KEYS[1], 't', string.format(fmt, t), 'ts', string.format(fmt, ts))
    redis.call('HDEL', KEYS[1], 'h', 'u', 'hm')
  end
  if took then
    local full_ms = math.ceil((burst - t) / rate * 1000)
    redis.call('PEXPIRE', KEYS[1], string.format('%d', full_ms + tonumber(ARGV[3])))
  end
end
return out
