-- end: release every profile key the call's record lists and delete the record.
--
-- KEYS[1] the call's record P..'c:'..uid   KEYS[2] the expiry index P..'exp'
-- KEYS[3] the counters P..'n'
-- Also touches, by name from the record (a client cannot know them in advance: the call may
-- have been admitted by another instance under other rules): the call's profile keys
-- P..'k:'..kid, the value indexes P..'v:'..eprofile of keys that empty, its node index
-- P..'o:'..node. All carry the same hash tag (one Cluster slot).
-- ARGV[1] now   ARGV[2] uid   ARGV[3] the counter the end reason adds to: 'failed',
-- 'expired' or '' (none)   ARGV[4] token ('' = whatever admission holds the call)
-- Returns the removed record (HGETALL form); false (nil) when the call is not held or its
-- lease had ended (a sweep drops and reports it, counted as expired); with a token that is
-- not the record's, the held record, unchanged.
local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then
  return false
end
local rec = hash(flat)
if tonumber(rec.e) <= tonumber(ARGV[1]) then
  return false
end
if ARGV[4] ~= '' and rec.n ~= ARGV[4] then
  return flat
end
local reason = nil
if ARGV[3] ~= '' then
  reason = ARGV[3]
end
release(prefix_of(KEYS[3]), KEYS[2], KEYS[3], ARGV[2], rec, reason, false)
return flat
