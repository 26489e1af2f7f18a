-- KEYS: the node's ledger, its inbox.  ARGV: the node's entries and bytes bounds
-- Returns {entries refused since the last look, bytes held, entries held}.
redis.call('HSET', KEYS[1], 'n', ARGV[1], 'm', ARGV[2])
local refused = tonumber(redis.call('HGET', KEYS[1], 'r')) or 0
redis.call('HDEL', KEYS[1], 'r')
return {refused, tonumber(redis.call('HGET', KEYS[1], 'b')) or 0, redis.call('XLEN', KEYS[2])}
