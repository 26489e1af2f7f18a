-- KEYS: the node's ledger, its inbox.  ARGV: the node's entries and bytes bounds
-- Returns {entries refused since the last look, bytes held, entries held,
-- entries removed from the inbox by something else than esf's scripts}.
-- Every append counts an entry in the ledger's 'c', every deletion of
-- esf's uncounts it: an inbox holding fewer entries than counted lost the
-- rest to an outside XTRIM or XDEL (esf never trims an inbox), and the
-- count is set right again.
redis.call('HSET', KEYS[1], 'n', ARGV[1], 'm', ARGV[2])
local refused = tonumber(redis.call('HGET', KEYS[1], 'r')) or 0
redis.call('HDEL', KEYS[1], 'r')
local length = redis.call('XLEN', KEYS[2])
local removed = (tonumber(redis.call('HGET', KEYS[1], 'c')) or 0) - length
if removed > 0 then
  redis.call('HSET', KEYS[1], 'c', length)
else
  removed = 0
end
return {refused, tonumber(redis.call('HGET', KEYS[1], 'b')) or 0, length, removed}
