-- Shared helpers of the cluster scripts, prepended to each (cluster.py `cluster_script_source`).
--
-- The layout is in policy/store/redis/cluster_layout.py. Two kinds of script: a shard script
-- touches one shard's keys (T = the shard's hash tag): call records T..':c:'..uid, the expiry
-- index T..':exp', the locks T..':l', the counters T..':n', the node index T..':o', the values
-- index T..':v', the reports T..':x'; a step script touches one profile key P..':k:'..kid. Every
-- key a script touches is in its KEYS (all in one slot). Times are cluster-time seconds as
-- decimal text (the client adds the offset it measured to its clock).

-- (items, pack and hash: _codec.lua, prepended before this file)

-- Whether a record is a held call (not a reservation or a release in progress).
local function is_held(rec)
  return rec.s == 'early' or rec.s == 'active'
end

-- The call leaves its shard: the expiry index, the node index, the counters (its valued keys'
-- 'k:'..kid, at 0 the kid leaves the values index; its profiles' 'p:'/'x:' once each;
-- 'active'), counted under `reason` (a counters field, or nil); `undo` also takes back its
-- `processed`. Its profile keys are released by the client (they are in other slots).
local function release_shard(exp_key, counts_key, nodes_key, values_key, uid, rec, reason, undo)
  local list = items(rec.k or '')
  local node = list[1] or ''
  redis.call('ZREM', exp_key, uid)
  redis.call('ZREM', nodes_key, #node .. ':' .. node .. uid)
  local fields, deltas, emptied = {}, {}, {}
  local valued, none, order = {}, {}, {}
  for i = 2, #list do
    local kid = list[i]
    local eq = string.find(kid, '=', 1, true)
    if eq then
      local ep = string.sub(kid, 1, eq - 1)
      if not valued[ep] then
        valued[ep] = true
        order[#order + 1] = ep
      end
      fields[#fields + 1] = 'k:' .. kid
      deltas[#fields] = -1
      emptied[#fields] = kid
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
      if string.sub(f, 2, 2) == ':' and v <= 0 then
        del[#del + 1] = f
        if emptied[i] then
          redis.call('ZREM', values_key, emptied[i])
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
end
