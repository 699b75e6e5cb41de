-- Shared helpers, prepended to every operation script when it is registered.
--
-- Conventions of every script:
--   KEYS[2] = the expiry index   ({P}:exp, zset: call id -> lease expiry)
--   KEYS[3] = the stats hash     ({P}:stats: processed, expired, failed, early, active)
--   ARGV[1] = now (seconds, float as decimal text; the store never reads a clock)
--   ARGV[2] = the call record key prefix ({P}:c:), so expired calls can be dropped by id
-- A profile key is a zset {P}:k:<profile>[=<value>] of call ids scored by lease expiry; the
-- set {P}:i:<profile> indexes the profile's non-empty keys (for sizes without a value).
-- A call record is a hash {P}:c:<call id> with fields
--   id, f (from), t (to), a (account), s (state: early|active), i (init ts), st (start ts or ""),
--   to (lease length), e (lease expiry), p (JSON [[profile, value|null], ...] for listings),
--   k (JSON [zset 1, its index, zset 2, its index, ...]: every key the call joined).

-- Remove a call everywhere it is listed; count it under `counter` (may be nil).
-- Returns the record's fields (HGETALL form) or false when there was no record.
local function drop_call(rec_key, exp_key, stats_key, id, counter)
  local rec = redis.call('HGETALL', rec_key)
  redis.call('ZREM', exp_key, id)
  if #rec == 0 then
    return false
  end
  local k, s
  for j = 1, #rec, 2 do
    if rec[j] == 'k' then
      k = rec[j + 1]
    elseif rec[j] == 's' then
      s = rec[j + 1]
    end
  end
  if k then
    local keys = cjson.decode(k)
    for j = 1, #keys, 2 do
      redis.call('ZREM', keys[j], id)
      if redis.call('EXISTS', keys[j]) == 0 then
        redis.call('SREM', keys[j + 1], keys[j])
      end
    end
  end
  if s then
    redis.call('HINCRBY', stats_key, s, -1)
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

-- Whether the call is held with a lease that has not ended (dropping it if it ended).
local function is_live(rec_key, exp_key, stats_key, id, now)
  local e = redis.call('HGET', rec_key, 'e')
  if not e then
    return false
  end
  if tonumber(e) <= tonumber(now) then
    drop_call(rec_key, exp_key, stats_key, id, 'expired')
    return false
  end
  return true
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
    local keys = cjson.decode(k)
    for j = 1, #keys, 2 do
      redis.call('ZADD', keys[j], 'XX', expires, id)
    end
  end
end

-- The live call ids of a profile key (a zset), or of every key of a profile (an index set),
-- as a table id -> true; and how many.
local function members(key, is_index, now)
  local seen, n = {}, 0
  local zsets = {key}
  if is_index then
    zsets = redis.call('SMEMBERS', key)
  end
  for _, z in ipairs(zsets) do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', z, '(' .. now, '+inf')) do
      if not seen[id] then
        seen[id] = true
        n = n + 1
      end
    end
  end
  return seen, n
end

local PURGE_LIMIT = 100
