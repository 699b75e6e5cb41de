-- undo: take back what one reserve did when its caller never saw the answer (it came too
-- late, or its connection died after it was sent): the service decided that check without
-- the store, so the slot must not stay held. Keyed by that reserve's token:
--   the record's token is not it -> nothing (a later check took the call over and was
--     answered: never release an admission someone confirmed);
--   it created the record (no takeover since, or taken back to it) -> release the call and
--     take back its `processed`;
--   it took the call over from an earlier admission -> give the call back to that one.
--
-- KEYS[1] the call's record P..'c:'..uid   KEYS[2] the expiry index P..'exp'
-- KEYS[3] the counters P..'n'
-- Also touches, by name from the record, when it releases the call: its profile keys, value
-- indexes and node index, as end.lua (same hash tag).
-- ARGV[1] uid   ARGV[2] the token of the reserve to undo
-- Returns 0 (nothing), 1 (released) or 2 (handed back to the earlier token).
local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then
  return 0
end
local rec = hash(flat)
if rec.n ~= ARGV[2] then
  return 0
end
if not rec.c or rec.c == ARGV[2] then
  release(prefix_of(KEYS[3]), KEYS[2], KEYS[3], ARGV[1], rec, nil, true)
  return 1
end
if rec.b then
  redis.call('HSET', KEYS[1], 'n', rec.b)
  redis.call('HDEL', KEYS[1], 'b')
else
  redis.call('HSET', KEYS[1], 'n', rec.c)
end
return 2
