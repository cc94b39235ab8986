"""The Lua scripts of REDIS_STREAM (:mod:`funboost_like.brokers.redis_stream` says what each key holds)."""

from __future__ import annotations

from funboost_like.brokers.redis_base import LUA_BURY, LUA_COUNTS, LUA_NEXT_DUE, LUA_NOW
from funboost_like.brokers.redis_common import LuaScript
from funboost_like.brokers.redis_consumers import consumer_scripts

GROUP = "funboost_like"  # the consumer group of every stream

# Lua: re-add the message of entry ``id`` at the end of ``stream`` (or, given ``due``, into the
# ``delayed`` ZSET) with ``more`` deliveries and ``crash`` crashes counted; then ack and delete the entry.
LUA_READD = LUA_COUNTS + f"local G = '{GROUP}'\n" + """
local function xadd(stream, body, d, c)
  local args = {'data', body}
  if d > 0 then args[3] = 'delivered' args[4] = d end
  if c > 0 then args[#args + 1] = 'crashes' args[#args + 1] = c end
  redis.call('XADD', stream, '*', unpack(args))
end
local function readd(stream, id, more, crash, delayed, due, uid)
  local entry = redis.call('XRANGE', stream, id, id)[1]
  if entry then
    local fields, body, d, c = entry[2], nil, 0, 0
    for i = 1, #fields, 2 do
      local k, v = fields[i], fields[i + 1]
      if k == 'data' then body = v elseif k == 'delivered' then d = tonumber(v) or 0
      elseif k == 'crashes' then c = tonumber(v) or 0 end
    end
    if body == nil then
      redis.call('XADD', stream, '*', unpack(fields))
    elseif due then
      redis.call('ZADD', delayed, due, uid .. ':0:' .. fmt(d + more, c + crash) .. ':' .. body)
    else
      xadd(stream, body, d + more, c + crash)
    end
  end
  redis.call('XACK', stream, G, id)
  redis.call('XDEL', stream, id)
end
"""

# KEYS: stream, delayed. Appends the due delayed messages to the stream (with their counts in the
# fields 'delivered' and 'crashes') and returns the milliseconds until the next one is due (-1: none).
MOVE_DUE = LuaScript(LUA_NOW + LUA_READD + LUA_NEXT_DUE + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for i = 1, #due do
  local _, stop, seen = string.find(due[i], '^[^:]*:%d:([%d.]+):')
  local d, c = counts(seen)
  xadd(KEYS[1], string.sub(due[i], (stop or 0) + 1), d, c)
end
if #due > 0 then redis.call('ZREM', KEYS[2], unpack(due)) end
return next_due_ms(KEYS[2], now)
""")

# The give-back script (see RedisConsumers._give_back; KEYS[1] is the stream): the items are entry ids.
# Only entries still pending under this consumer are settled; a released one ('head') is added again
# at the end, with no attempt counted (a stream has no front).
SETTLE = LuaScript(LUA_NOW + LUA_READD + LUA_BURY + """
local mode = ARGV[1]
local done = 0
for i = 7, #ARGV do
  local id = ARGV[i]
  local entry = redis.call('XPENDING', KEYS[1], G, id, id, 1)[1]
  if entry and entry[2] == ARGV[3] then
    if mode == 'tail' or mode == 'head' then
      readd(KEYS[1], id, mode == 'tail' and 1 or 0, 0)
    elseif mode == 'delay' then
      readd(KEYS[1], id, 1, 0, KEYS[3], now + tonumber(ARGV[5]), ARGV[4] .. i)
    else
      if mode == 'dead' then bury(KEYS[5], ARGV[6]) end
      redis.call('XACK', KEYS[1], G, id)
      redis.call('XDEL', KEYS[1], id)
    end
    done = done + 1
  end
end
return done
""")

# The registry's functions (see redis_consumers.consumer_scripts). Dead are also the group's consumers in
# no heartbeat record and idle for dead_after (killed before their first heartbeat, or records of
# consumers of older versions); their pending entries go back to the stream.
SCRIPTS = consumer_scripts(LUA_READD + """
local function dead_consumers(before)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before, 'LIMIT', 0, 100)
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[2], G)
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['idle'] > (now - before) * 1000 and not redis.call('ZSCORE', KEYS[1], info['name']) then
        dead[#dead + 1] = info['name']
      end
    end
  end
  return dead
end
local function pending(cid, n)
  local ok, entries = pcall(redis.call, 'XPENDING', KEYS[2], G, '-', '+', n, cid)
  if ok then return entries end
  return {}
end
local function held(cid) return #pending(cid, 1) end
local function recover(cid)
  local moved = 0
  while true do
    local entries = pending(cid, 100)
    if #entries == 0 then return moved end
    for _, entry in ipairs(entries) do readd(KEYS[2], entry[1], 1, 1) end
    moved = moved + #entries
  end
end
local function forget(cid) pcall(redis.call, 'XGROUP', 'DELCONSUMER', KEYS[2], G, cid) end
""")

# KEYS: stream, delayed; ARGV: group. Waiting = delayed + stream entries not pending in the group.
COUNT = LuaScript("""
local n = redis.call('ZCARD', KEYS[2])
n = n + redis.call('XLEN', KEYS[1])  -- 0 when there is no stream (then XPENDING fails: nothing pending)
local ok, summary = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
if ok then n = n - summary[1] end
return n
""")

# KEYS: stream; ARGV: group. Entries delivered and not acked yet.
IN_FLIGHT = LuaScript("local ok, s = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1]) return ok and s[1] or 0")

# Lua function: the XRANGE start of the entries ``group`` has not read yet (after its last-delivered id).
LUA_UNREAD_START = """
local function unread_start(stream, group)
  local start = '-'
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  for _, g in ipairs(ok and groups or {}) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then start = '(' .. info['last-delivered-id'] end
  end
  return start
end
"""

# KEYS: stream, delayed; ARGV: group. Deletes the delayed messages and the entries the group has
# not read yet (those after its last-delivered id); pending entries stay with their consumers.
PURGE = LuaScript(LUA_UNREAD_START + """
local n = redis.call('ZCARD', KEYS[2])
redis.call('DEL', KEYS[2])
local start = unread_start(KEYS[1], ARGV[1])
while true do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  if #batch == 0 then return n end
  for _, entry in ipairs(batch) do redis.call('XDEL', KEYS[1], entry[1]) end
  n = n + #batch
  start = '(' .. batch[#batch][1]
end
""")


# KEYS: stream; ARGV: group. The data of the first entry the group has not read yet (none: {}).
HEAD = LuaScript(LUA_UNREAD_START + """
local entry = redis.call('XRANGE', KEYS[1], unread_start(KEYS[1], ARGV[1]), '+', 'COUNT', 1)[1]
if not entry then return {} end
for i = 1, #entry[2], 2 do
  if entry[2][i] == 'data' then return {entry[2][i + 1]} end
end
return {}
""")
