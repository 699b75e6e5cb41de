-- size: how many calls hold a live lease in a profile key, or in every key of a profile.
--
-- KEYS[1] the profile key {P}:k:<profile>[=<value>] (ARGV[3] = "key"), or the profile's
--         key without value {P}:k:<profile> (ARGV[3] = "profile"; then KEYS[4] is the
--         profile's index {P}:i:<profile> of its keys with a value; a call in two keys counts once)
-- KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] "key" or "profile"
-- Returns the count (integer).
purge(KEYS[2], KEYS[3], ARGV[2], ARGV[1], PURGE_LIMIT)
if ARGV[3] == 'key' then
  return alive(KEYS[1], ARGV[1])
end
local _, n = members(KEYS[1], KEYS[4], ARGV[1])
return n
