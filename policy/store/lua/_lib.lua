-- Shared helpers, prepended to every operation script when it is registered.
--
-- Conventions of every script:
--   KEYS[2] = the expiry index   ({P}:exp, zset: call id -> lease expiry)
--   KEYS[3] = the stats hash     ({P}:stats: processed, expired, failed, active; early calls
--             are the held calls, ZCARD of the expiry index, minus the active ones)
--   ARGV[1] = now (seconds, float as decimal text; the store never reads a clock)
--   ARGV[2] = the call record key prefix ({P}:c:), so expired calls can be dropped by id
-- A profile key is a zset {P}:k:<profile>[=<value>] of call ids scored by lease expiry; the
-- set {P}:i:<profile> indexes the profile's non-empty keys that have a value (for sizes of a
-- whole profile; the key without a value, {P}:k:<profile>, is looked at directly).
-- A call record is a hash {P}:c:<call id> with seven fields:
--   d  (JSON from the client, never parsed here: id, f(rom), t(o), a(ccount), i(nit ts),
--       p(rofiles) [[profile, value|null], ...] for listings)
--   s  (state: early|active)  st (start ts or "")  to (lease length)  e (lease expiry)
--   n  (the token of the reserve that admitted it)
--   k  (every key the call joined: for each, "<bytes>:<zset><bytes>:<index>" with the index ""
--       for a key without value; length-prefixed because values may hold any character)
-- (Few fields and no JSON in Lua: cjson cost ~8 us per 10-key list and a 17-field HSET ~15 us,
-- a third of a reserve.)

-- Call fn(zset, index) for every key of a record's `k` field.
local function each_key(k, fn)
  local pos, len = 1, #k
  while pos <= len do
    local c = string.find(k, ':', pos, true)
    local zend = c + tonumber(string.sub(k, pos, c - 1))
    local z = string.sub(k, c + 1, zend)
    c = string.find(k, ':', zend + 1, true)
    pos = c + tonumber(string.sub(k, zend + 1, c - 1)) + 1
    fn(z, string.sub(k, c + 1, pos - 1))
  end
end

-- Remove a call everywhere it is listed; count it under `counter` (may be nil).
-- Returns the record's fields (HGETALL form) when `want` (true, or the record already read),
-- else true; false when there was no record.
local function drop_call(rec_key, exp_key, stats_key, id, counter, want)
  redis.call('ZREM', exp_key, id)
  local rec = nil
  local k, s
  if want then
    if type(want) == 'table' then
      rec = want
    else
      rec = redis.call('HGETALL', rec_key)
    end
    if #rec == 0 then
      return false
    end
    for j = 1, #rec, 2 do
      if rec[j] == 'k' then
        k = rec[j + 1]
      elseif rec[j] == 's' then
        s = rec[j + 1]
      end
    end
  else
    local ks = redis.call('HMGET', rec_key, 'k', 's')
    k, s = ks[1], ks[2]
    if not s then
      return false
    end
  end
  if k then
    each_key(k, function(z, y)
      redis.call('ZREM', z, id)
      if y ~= '' and redis.call('EXISTS', z) == 0 then
        redis.call('SREM', y, z)
      end
    end)
  end
  if s == 'active' then
    redis.call('HINCRBY', stats_key, 'active', -1)
  end
  if counter then
    redis.call('HINCRBY', stats_key, counter, 1)
  end
  redis.call('DEL', rec_key)
  return rec or true
end

-- Drop up to `limit` calls whose lease ended by now (score <= now); count them as expired.
-- Exactly once: the script is atomic, and a dropped call is gone from the index.
local function purge(exp_key, stats_key, rec_prefix, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', exp_key, '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, id in ipairs(ids) do
    if drop_call(rec_prefix .. id, exp_key, stats_key, id, 'expired', false) then
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
    drop_call(rec_key, exp_key, stats_key, id, 'expired', false)
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
  each_key(redis.call('HGET', rec_key, 'k') or '', function(z, _)
    redis.call('ZADD', z, 'XX', expires, id)
  end)
end

-- The live call ids of a profile key (a zset), or of every key of a profile (the key without
-- value, then every key its index set lists), as a table id -> true; and how many.
local function members(key, index, now)
  local seen, n = {}, 0
  local zsets = {key}
  if index then
    for _, z in ipairs(redis.call('SMEMBERS', index)) do
      zsets[#zsets + 1] = z
    end
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
