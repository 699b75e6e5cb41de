-- walk: a page of the calls in any key of a profile: its key without value first, then the
-- keys of its values in value order, each in admission order. At most ARGV[5] calls and
-- ARGV[5] + 1 values per call (bounded). A call in several keys of the profile is listed
-- under each; the client keeps it only under the first of them its record names.
--
-- KEYS[1] the profile's key without value P..'k:'..eprofile   KEYS[2] its value index
-- P..'v:'..eprofile. Also reads, by name, the keys of the values the index lists,
-- ARGV[1] .. value (not known before the walk; same hash tag; never on the check path).
-- ARGV[1] P..'k:'..eprofile..'='   ARGV[2] stage of the cursor: 'n' (the key without value),
-- 'v' (inside ARGV[4]'s key) or 'w' (the values after ARGV[4])   ARGV[3] the admission seq
-- the cursor stopped at ('' = from the start of that key)   ARGV[4] value   ARGV[5] limit
-- Returns {stage, seq, value, uid_1, under_1, uid_2, under_2, ...}: the cursor of the next
-- page (stage '' when this is the last page) and the calls with the key they were found
-- under ('-' for the key without value, '=' .. value otherwise).
local limit = tonumber(ARGV[5])
local out = {'', '', ''}
local got = 0

-- Take up to the rest of the page from one key; false when the page filled up first.
local function take(zset, after, stage, value, under)
  local want = limit - got
  local lo = '-inf'
  if after ~= '' then
    lo = '(' .. after
  end
  local r = redis.call('ZRANGEBYSCORE', zset, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, want + 1)
  local have = #r / 2
  local n = math.min(have, want)
  for i = 1, n do
    out[#out + 1] = r[2 * i - 1]
    out[#out + 1] = under
  end
  got = got + n
  if have > want then
    out[1], out[2], out[3] = stage, r[2 * n], value
    if n == 0 then
      out[2] = after
    end
    return false
  end
  return true
end

local stage, after, value = ARGV[2], ARGV[3], ARGV[4]
if stage == 'n' then
  if not take(KEYS[1], after, 'n', '', '-') then
    return out
  end
  stage, after, value = 'w', '', nil
end
local range = '-'
if value then
  if stage == 'v' then
    range = '[' .. value
  else
    range = '(' .. value
  end
end
local vals = redis.call('ZRANGEBYLEX', KEYS[2], range, '+', 'LIMIT', 0, limit + 1)
for i, v in ipairs(vals) do
  if got >= limit then
    out[1], out[2], out[3] = 'v', '', v
    return out
  end
  local a = ''
  if i == 1 and stage == 'v' and v == value then
    a = after
  end
  if not take(ARGV[1] .. v, a, 'v', v, '=' .. v) then
    return out
  end
end
if #vals > limit then
  out[1], out[2], out[3] = 'w', '', vals[#vals]
end
return out
