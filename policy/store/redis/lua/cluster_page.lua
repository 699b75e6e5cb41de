-- cluster_page: a page of the live calls of one profile key, in lease order (then uid order),
-- continuing after (score, uid) of the previous page. A lease only ever grows (entries are
-- raised, never lowered), so a call that stays is never skipped (it may show again later).
--
-- KEYS[1] the profile key P..':k:'..kid
-- ARGV[1] now   ARGV[2] the score the previous page ended at ('' = from the start)   ARGV[3] the
-- uid it ended at   ARGV[4] limit (bounded by the client)
-- Returns {uid_1, score_1, uid_2, score_2, ...}: up to limit + 1 calls (one more than the page
-- says there is more).
-- a <= b in byte order (how Redis orders members of equal score; Lua's own comparison follows
-- the server's locale)
local function le(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a <= #b
end

local live = redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1])
local lo = live
if ARGV[2] ~= '' then
  local s = ARGV[2]
  local at = redis.call('ZSCORE', KEYS[1], ARGV[3])
  if at and tonumber(at) == tonumber(s) then  -- the uid is still where the page ended
    lo = redis.call('ZRANK', KEYS[1], ARGV[3]) + 1
  else
    lo = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. s)
    local hi = lo + redis.call('ZCOUNT', KEYS[1], s, s)
    while lo < hi do  -- the first uid after ARGV[3] among the calls scored s
      local mid = math.floor((lo + hi) / 2)
      if le(redis.call('ZRANGE', KEYS[1], mid, mid)[1], ARGV[3]) then
        lo = mid + 1
      else
        hi = mid
      end
    end
  end
  if lo < live then
    lo = live
  end
end
return redis.call('ZRANGE', KEYS[1], lo, lo + tonumber(ARGV[4]), 'WITHSCORES')
