-- Release every device a node holds, forget the node.
-- KEYS: the node's lease, the node's index, online set, presence stream,
--       nodes set, the node's inbox, its ledger, the key its inbox moves to
-- ARGV: node, maxlen, prefix, force ('1': even if its lease is alive),
--       milliseconds the moved inbox is kept, the token of the process
--       reaping its own node ('' for another's): not if another holds it
-- Returns {devices released, entries its inbox held unread}, or {-1} when
-- its lease is alive (or another process's).  The unread entries move to
-- the last key (kept for a while), for the janitor to read page by page:
-- one script over all of them could run for as long as the inbox is large.
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1}
end
if ARGV[6] ~= '' then
  local holder = redis.call('GET', KEYS[1])
  if holder and holder ~= ARGV[6] then
    return {-1}
  end
end
local unread = redis.call('XLEN', KEYS[6])
if unread > 0 then
  redis.call('RENAME', KEYS[6], KEYS[8])
  redis.call('PEXPIRE', KEYS[8], ARGV[5])
end
local n = 0
-- The releases go down the presence stream a hundred to an entry.
local entry = {}
local function flush()
  if #entry > 0 then
    -- (The stream keeps about maxlen changes: fewer entries of many.)
    local keep = math.max(1, math.floor(tonumber(ARGV[2]) * 6 / #entry))
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', keep, '*', unpack(entry))
    entry = {}
  end
end
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local user, kind = string.match(member, '^(.*)\t(%d+)$')
  if user then
    local hash = ARGV[3] .. 'u:' .. user
    local v = redis.call('HGET', hash, kind)
    if v then
      local sid, node = string.match(v, '^([^\t]*)\t([^\t]*)\t')
      if node == ARGV[1] then
        redis.call('HDEL', hash, kind)
        if redis.call('HLEN', hash) == 0 then
          redis.call('SREM', KEYS[3], user)
        end
        local k = #entry
        entry[k + 1], entry[k + 2], entry[k + 3] = 'u', user, 'c'
        entry[k + 4], entry[k + 5], entry[k + 6] = kind, 'd', sid
        n = n + 1
        if #entry >= 600 then
          flush()
        end
      end
    end
  end
end
flush()
redis.call('DEL', KEYS[2], KEYS[6], KEYS[7])
redis.call('SREM', KEYS[5], ARGV[1])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
end
return {n, unread}
