-- size: how many calls hold a live lease in a profile key (or a per-profile aggregate).
--
-- KEYS[1] profile zset {P}:k:<profile>[=<value>] or {P}:a:<profile>
-- KEYS[2] expiry index {P}:exp   KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:
-- Returns the count (integer).
purge(KEYS[2], KEYS[3], ARGV[2], ARGV[1], PURGE_LIMIT)
return alive(KEYS[1], ARGV[1])
