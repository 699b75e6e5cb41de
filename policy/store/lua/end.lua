-- end: release every profile key the call's record lists and delete the record (idempotent).
--
-- KEYS[1] call record {P}:c:<call id>   KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] call id
-- ARGV[4] the stats counter the end reason adds to: "failed", "expired" or "" (none)
-- ARGV[5] "1" to undo a reserve whose caller gave up waiting (also takes back `processed`
--         and does not check the lease: ARGV[1] may be "0"), else ""
-- Returns the removed record (HGETALL form), or false (nil) when the call was not held
-- (never held, already ended, or its lease had ended: then it counted as expired).
local now = ARGV[1]
local id = ARGV[3]
if ARGV[5] == '1' then
  if drop_call(KEYS[1], KEYS[2], KEYS[3], id, nil) then
    redis.call('HINCRBY', KEYS[3], 'processed', -1)
  end
  return false
end
purge(KEYS[2], KEYS[3], ARGV[2], now, PURGE_LIMIT)
if not live_record(KEYS[1], KEYS[2], KEYS[3], id, now) then
  return false
end
local counter = nil
if ARGV[4] ~= '' then
  counter = ARGV[4]
end
return drop_call(KEYS[1], KEYS[2], KEYS[3], id, counter)
