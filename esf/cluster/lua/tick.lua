-- KEYS: the node's lease, nodes set, epoch.  ARGV: node, lease in ms
-- Returns {the epoch, Redis's TIME}.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return {redis.call('GET', KEYS[3]), redis.call('TIME')}
