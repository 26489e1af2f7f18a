-- Release every device a node holds, forget the node.
-- KEYS: the node's lease, the node's index, online set, presence stream,
--       nodes set, the node's inbox, its ledger
-- ARGV: node, maxlen, prefix, force ('1': even if its lease is alive),
--       most unread inbox entries to return
-- Returns {devices released, the first unread entries of its inbox}, or
-- {-1} when its lease is alive.
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1}
end
local unread = redis.call('XRANGE', KEYS[6], '-', '+', 'COUNT', ARGV[5])
local n = 0
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
        redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*',
                   'u', user, 'c', kind, 'd', sid)
        n = n + 1
      end
    end
  end
end
redis.call('DEL', KEYS[2], KEYS[6], KEYS[7])
redis.call('SREM', KEYS[5], ARGV[1])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
end
return {n, unread}
