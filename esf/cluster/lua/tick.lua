-- KEYS: the node's lease, nodes set, epoch.  ARGV: node, lease in ms, this
-- process's token (the lease's value: which process holds the node's ID)
-- Returns {the epoch, Redis's TIME}; or, when another process holds the
-- lease (it took the node's ID over while this one was paused), its token,
-- the lease left alone.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[3] then
  return holder
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return {redis.call('GET', KEYS[3]), redis.call('TIME')}
