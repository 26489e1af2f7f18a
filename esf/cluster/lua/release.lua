-- KEYS: user hash, online set, presence stream
-- ARGV: user, kind, session_id, maxlen, prefix
local v = redis.call('HGET', KEYS[1], ARGV[2])
if not v then
  return {0, 0, false}
end
local sid, node = string.match(v, '^([^\t]*)\t([^\t]*)\t')
if sid ~= ARGV[3] then
  return {0, 0, false}
end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('SREM', ARGV[5] .. 'n:' .. node, ARGV[1] .. '\t' .. ARGV[2])
local last = 0
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  last = 1
end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
                      'u', ARGV[1], 'c', ARGV[2], 'd', ARGV[3])
return {1, last, id}
