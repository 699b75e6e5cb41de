-- sweep: drop up to ARGV[3] calls whose lease ended by now, cluster-wide; each is counted in
-- `expired` exactly once even when several instances sweep at the same time (atomic script).
--
-- KEYS[1] expiry index {P}:exp (again, for symmetry)   KEYS[2] expiry index {P}:exp
-- KEYS[3] stats {P}:stats
-- ARGV[1] now   ARGV[2] record key prefix {P}:c:   ARGV[3] at most this many calls
-- Returns {dropped, remaining}: how many calls were dropped, and how many ended leases remain.
local n = purge(KEYS[2], KEYS[3], ARGV[2], ARGV[1], tonumber(ARGV[3]))
return {n, redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[1])}
