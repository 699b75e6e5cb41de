-- Helpers of every script but epoch.lua (which runs alone), prepended before _lib.lua or
-- _cluster_lib.lua (store.py `script_source`, cluster.py `cluster_script_source`).

-- The strings of a '<bytes>:<text>' sequence (codec.py `pack_items`).
local function items(s)
  local out, pos, len = {}, 1, #s
  while pos <= len do
    local c = string.find(s, ':', pos, true)
    local n = tonumber(string.sub(s, pos, c - 1))
    out[#out + 1] = string.sub(s, c + 1, c + n)
    pos = c + n + 1
  end
  return out
end

-- The same, the other way (records of expired calls in the reports list).
local function pack(list)
  local parts = {}
  for i, s in ipairs(list) do
    parts[i] = #s .. ':' .. s
  end
  return table.concat(parts)
end

-- An HGETALL reply as a table field -> value.
local function hash(flat)
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  return h
end
