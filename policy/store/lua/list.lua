-- list: the records of the calls holding a live lease in a profile key (or aggregate).
--
-- KEYS[1] profile zset {P}:k:<profile>[=<value>] or {P}:a:<profile>
-- KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:
-- Returns an array of records, each in HGETALL form (unordered; the client sorts by call id).
purge(KEYS[2], KEYS[3], ARGV[2], ARGV[1], PURGE_LIMIT)
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  local rec = redis.call('HGETALL', ARGV[2] .. id)
  if #rec > 0 then
    out[#out + 1] = rec
  end
end
return out
