-- Shared helpers, prepended to every script when the store loads it (store.py `script_source`).
--
-- The key layout is in policy/store/redis/keys.py, the record's fields in codec.py. In short,
-- with P = '{prefix}:':  P..'c:'..uid (a call's record, hash), P..'exp' (uid -> lease expiry),
-- P..'n' (the counters hash), P..'k:'..kid (a key's calls, uid -> admission seq),
-- P..'v:'..eprofile (a profile's non-empty values), P..'o:'..node (a node's calls),
-- P..'x' (expired records awaiting a sweep's report). Scripts derive P from the counters key
-- they are given (KEYS: P..'n').
-- Times are Redis-base seconds as decimal text (the client adds its measured offset to its clock).

-- (items, pack and hash: _codec.lua, prepended before this file)

-- The key prefix P from the counters key P..'n'.
local function prefix_of(counts_key)
  return string.sub(counts_key, 1, -2)
end

-- Whether a lease ended by `now` that no sweep has dropped yet: the counters still include
-- such a call, so a script that reads counters answers -2 ("sweep first") instead.
local function stale(exp_key, now)
  return #redis.call('ZRANGEBYSCORE', exp_key, '-inf', now, 'LIMIT', 0, 1) > 0
end

-- Remove a call everywhere its record `rec` (a table) lists it and delete the record; count
-- it under `reason` (a counters field, or nil); `undo` also takes back its `processed`.
-- Touches keys named by the record, not in KEYS: its profile keys P..'k:'..kid, the value
-- indexes P..'v:'..eprofile of those that empty, its node index P..'o:'..node (same hash tag).
-- A key with a value has its size in counter 'k:'..kid (0: the field goes and the value leaves
-- the profile's index); a profile's 'p:'/'x:' counters go down once per call.
local function release(P, exp_key, counts_key, uid, rec, reason, undo)
  local list = items(rec.k or '')
  redis.call('ZREM', exp_key, uid)
  redis.call('ZREM', P .. 'o:' .. (list[1] or ''), uid)
  local fields, deltas, emptied = {}, {}, {}
  local valued, none, order = {}, {}, {}  -- eprofiles with a valued key / with their key without value
  for i = 2, #list do
    local kid = list[i]
    redis.call('ZREM', P .. 'k:' .. kid, uid)
    local eq = string.find(kid, '=', 1, true)
    if eq then
      local ep = string.sub(kid, 1, eq - 1)
      if not valued[ep] then
        valued[ep] = true
        order[#order + 1] = ep
      end
      fields[#fields + 1] = 'k:' .. kid  -- the key's counter; at 0 its value leaves the index
      deltas[#fields] = -1
      emptied[#fields] = {P .. 'v:' .. ep, string.sub(kid, eq + 1)}
    else
      none[kid] = true
    end
  end
  for _, ep in ipairs(order) do
    fields[#fields + 1] = 'p:' .. ep
    deltas[#fields] = -1
    if none[ep] then
      fields[#fields + 1] = 'x:' .. ep
      deltas[#fields] = -1
    end
  end
  if rec.s == 'active' then
    fields[#fields + 1] = 'active'
    deltas[#fields] = -1
  end
  if reason then
    fields[#fields + 1] = reason
    deltas[#fields] = 1
  end
  if undo then
    fields[#fields + 1] = 'processed'
    deltas[#fields] = -1
  end
  if #fields > 0 then
    local cur = redis.call('HMGET', counts_key, unpack(fields))
    local set, del = {}, {}
    for i, f in ipairs(fields) do
      local v = (tonumber(cur[i]) or 0) + deltas[i]
      if string.sub(f, 2, 2) == ':' and v <= 0 then  -- a key's or profile's counter: gone at 0
        del[#del + 1] = f
        local e = emptied[i]
        if e then
          redis.call('ZREM', e[1], e[2])
        end
      else
        set[#set + 1] = f
        set[#set + 1] = v
      end
    end
    if #set > 0 then
      redis.call('HSET', counts_key, unpack(set))
    end
    if #del > 0 then
      redis.call('HDEL', counts_key, unpack(del))
    end
  end
  redis.call('DEL', P .. 'c:' .. uid)
end
