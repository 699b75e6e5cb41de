-- list: the records of the calls holding a live lease in a profile key, or in every key of
-- a profile.
--
-- KEYS[1] the profile key {P}:k:<profile>[=<value>] (ARGV[3] = "key"), or the profile's
--         key without value {P}:k:<profile> (ARGV[3] = "profile"; then KEYS[4] is the
--         profile's index {P}:i:<profile> of its keys with a value) (ARGV[3] = "profile")
-- KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] "key" or "profile"
-- Returns an array of records, each in HGETALL form (unordered; the client sorts by call id).
purge(KEYS[2], KEYS[3], ARGV[2], ARGV[1], PURGE_LIMIT)
local index = nil
if ARGV[3] == 'profile' then
  index = KEYS[4]
end
local seen = members(KEYS[1], index, ARGV[1])
local out = {}
for id, _ in pairs(seen) do
  local rec = redis.call('HGETALL', ARGV[2] .. id)
  if #rec > 0 then
    out[#out + 1] = rec
  end
end
return out
