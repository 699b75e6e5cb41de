-- end: release every profile key the call's record lists and delete the record (idempotent).
--
-- KEYS[1] call record {P}:c:<call id>   KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] call id
-- ARGV[4] the stats counter the end reason adds to: "failed", "expired" or "" (none)
-- ARGV[5] "1" to undo a reserve whose answer never reached its caller, else ""
-- ARGV[6] (undo only) that reserve's token: the call is dropped only if this very reserve
--         admitted it (its record's `n`); `processed` is taken back, the lease not checked
-- Returns the removed record (HGETALL form), or false (nil) when the call was not held
-- (never held, already ended, or its lease had ended: then it counted as expired).
-- An undo returns 1 when it released the call, else 0.
local now = ARGV[1]
local id = ARGV[3]
if ARGV[5] == '1' then
  if redis.call('HGET', KEYS[1], 'n') == ARGV[6] then
    drop_call(KEYS[1], KEYS[2], KEYS[3], id, nil, false)
    redis.call('HINCRBY', KEYS[3], 'processed', -1)
    return 1
  end
  return 0
end
purge(KEYS[2], KEYS[3], ARGV[2], now, PURGE_LIMIT)
local rec = redis.call('HGETALL', KEYS[1])  -- read once: lease check, keys, and the reply
if #rec == 0 then
  return false
end
for j = 1, #rec, 2 do
  if rec[j] == 'e' and tonumber(rec[j + 1]) <= tonumber(now) then
    drop_call(KEYS[1], KEYS[2], KEYS[3], id, 'expired', rec)  -- its lease had ended
    return false
  end
end
local counter = nil
if ARGV[4] ~= '' then
  counter = ARGV[4]
end
return drop_call(KEYS[1], KEYS[2], KEYS[3], id, counter, rec)
