-- Shared helpers, prepended to every operation script when it is registered.
--
-- Conventions of every script:
--   KEYS[2] = the expiry index   ({P}:exp, zset: call id -> lease expiry)
--   KEYS[3] = the stats hash     ({P}:stats: processed, expired, failed, early, active)
--   ARGV[1] = now (seconds, float as decimal text; the store never reads a clock)
--   ARGV[2] = the call record key prefix ({P}:c:), so expired calls can be dropped by id
-- A call record is a hash {P}:c:<call id> with fields
--   id, f (from), t (to), a (account), s (state: early|active), i (init ts), st (start ts or ""),
--   to (lease length), e (lease expiry), p (JSON [[profile, value|null], ...] for listings),
--   k (JSON array of the profile zsets it joined, per-value keys and per-profile aggregates).

-- Remove a call everywhere it is listed; count it under `counter` (may be nil).
-- Returns the record's fields (HGETALL form) or false when there was no record.
local function drop_call(rec_key, exp_key, stats_key, id, counter)
  local rec = redis.call('HGETALL', rec_key)
  redis.call('ZREM', exp_key, id)
  if #rec == 0 then
    return false
  end
  local h = {}
  for j = 1, #rec, 2 do
    h[rec[j]] = rec[j + 1]
  end
  if h['k'] then
    for _, key in ipairs(cjson.decode(h['k'])) do
      redis.call('ZREM', key, id)
    end
  end
  if h['s'] then
    redis.call('HINCRBY', stats_key, h['s'], -1)
  end
  if counter then
    redis.call('HINCRBY', stats_key, counter, 1)
  end
  redis.call('DEL', rec_key)
  return rec
end

-- Drop up to `limit` calls whose lease ended by now (score <= now); count them as expired.
-- Exactly once: the script is atomic, and a dropped call is gone from the index.
local function purge(exp_key, stats_key, rec_prefix, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', exp_key, '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, id in ipairs(ids) do
    if drop_call(rec_prefix .. id, exp_key, stats_key, id, 'expired') then
      n = n + 1
    end
  end
  return n
end

-- The record of a held call whose lease has not ended, or false (dropping it if it ended).
local function live_record(rec_key, exp_key, stats_key, id, now)
  local e = redis.call('HGET', rec_key, 'e')
  if not e then
    return false
  end
  if tonumber(e) <= tonumber(now) then
    drop_call(rec_key, exp_key, stats_key, id, 'expired')
    return false
  end
  return redis.call('HGETALL', rec_key)
end

-- How many calls in a profile zset hold a lease that has not ended.
local function alive(key, now)
  return redis.call('ZCOUNT', key, '(' .. now, '+inf')
end

-- Give a held call a new lease: the record, the expiry index and every zset it joined.
local function set_lease(rec_key, exp_key, id, expires, timeout)
  redis.call('HSET', rec_key, 'e', expires, 'to', timeout)
  redis.call('ZADD', exp_key, expires, id)
  local k = redis.call('HGET', rec_key, 'k')
  if k then
    for _, key in ipairs(cjson.decode(k)) do
      redis.call('ZADD', key, 'XX', expires, id)
    end
  end
end

local PURGE_LIMIT = 100
