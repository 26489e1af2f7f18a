-- Release every device a node holds, forget the node.
-- KEYS: the node's lease, the node's index, online set, presence stream,
--       nodes set, the node's inbox, its ledger, the key its inbox moves to
-- ARGV: node, maxlen, prefix, force ('1': even if its lease is alive),
--       milliseconds the moved inbox is kept
-- Returns {devices released, entries its inbox held unread}, or {-1} when
-- its lease is alive.  The unread entries move to the last key (kept for a
-- while), for the janitor to read page by page: one script over all of
-- them could run for as long as the inbox is large.
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1}
end
local unread = redis.call('XLEN', KEYS[6])
if unread > 0 then
  redis.call('RENAME', KEYS[6], KEYS[8])
  redis.call('PEXPIRE', KEYS[8], ARGV[5])
end
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
