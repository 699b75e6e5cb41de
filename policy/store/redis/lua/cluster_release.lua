-- cluster_release: the first step of releasing a call, in its shard: the call leaves the shard's
-- counters and indexes at once and its record stays as *ending*, locked by this operation, while
-- the client removes it from its profile keys (other slots); cluster_finish then deletes it.
-- If the client dies in between, a sweep takes the ended lock over and finishes the release.
--
-- KEYS[1] the call's record T..':c:'..uid   KEYS[2] the expiry index T..':exp'   KEYS[3] the
-- locks T..':l'   KEYS[4] the counters T..':n'   KEYS[5] the node index T..':o'
-- KEYS[6] the values index T..':v'
-- ARGV[1] now   ARGV[2] uid   ARGV[3] mode: 'end' (an end: ARGV[4] is the token, '' = whatever
-- admission holds the call) or 'undo' (take back what one reserve did when its caller never saw
-- the answer, or a refused reserve's pending record: ARGV[4] is that reserve's token and
-- ARGV[8] its lock owner)   ARGV[5] the counter the end adds to ('failed', 'expired' or '')
-- ARGV[6] lock expiry   ARGV[7] lock owner (of this release)   ARGV[8] see ARGV[3]
-- Returns {1, record...} the call is ending (remove it from the keys its `k` lists, then
-- cluster_finish); {0} nothing to do (not held, lease ended, or - undo - not this reserve's);
-- {2, record...} (end) held by another admission, unchanged; {3} (undo) the call was handed
-- back to the admission before the undone takeover; {4} another operation holds the call now.
local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then
  return {0}
end
local rec = hash(flat)
local now = tonumber(ARGV[1])
local mode = ARGV[3]
local token = ARGV[4]

local function ending()
  redis.call('HSET', KEYS[1], 's', 'ending', 'l', ARGV[6], 'lo', ARGV[7])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[2])
  local out = {1}
  for _, v in ipairs(flat) do
    out[#out + 1] = v
  end
  return out
end

if mode == 'undo' and rec.s == 'pending' then
  if rec.n ~= token or rec.lo ~= ARGV[8] then
    return {0}
  end
  return ending()
end
if not is_held(rec) then
  return {0}
end
if mode == 'end' then
  if tonumber(rec.e) <= now then
    return {0}
  end
  if token ~= '' and rec.n ~= token then
    local out = {2}
    for _, v in ipairs(flat) do
      out[#out + 1] = v
    end
    return out
  end
  if rec.l then
    return {4}
  end
  local reason = nil
  if ARGV[5] ~= '' then
    reason = ARGV[5]
  end
  release_shard(KEYS[2], KEYS[4], KEYS[5], KEYS[6], ARGV[2], rec, reason, false)
  return ending()
end
-- undo of a committed reserve (undo.lua's rules)
if rec.n ~= token then
  return {0}
end
if not rec.c or rec.c == token then
  if rec.l then
    return {4}
  end
  release_shard(KEYS[2], KEYS[4], KEYS[5], KEYS[6], ARGV[2], rec, nil, true)
  return ending()
end
if rec.b then
  redis.call('HSET', KEYS[1], 'n', rec.b)
  redis.call('HDEL', KEYS[1], 'b')
else
  redis.call('HSET', KEYS[1], 'n', rec.c)
end
return {3}
