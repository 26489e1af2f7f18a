-- The node is about to deliver these entries, read while its lease may have
-- run out (it was paused, or stalled): delete them and renew its lease,
-- unless the janitor reaped the node meanwhile (its inbox went with them,
-- and their senders were answered).
-- KEYS: the node's inbox, its ledger, its lease
-- ARGV: this process's token (the lease's value), lease in ms, entry ID, its
--       size, ... (in order)
-- Returns 1 when the entries were there (taken: deliver them), 0 when they
-- were gone (do not), or when another process holds the node's lease: it
-- took the node's ID over, and these entries are its own.
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then
  return 0
end
local freed, deleted = 0, 0
for i = 3, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    freed = freed + tonumber(ARGV[i + 1])
    deleted = deleted + 1
  end
end
if deleted == 0 then
  return 0
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('HDEL', KEYS[2], 'b', 'c')
else
  redis.call('HINCRBY', KEYS[2], 'b', -freed)
  redis.call('HINCRBY', KEYS[2], 'c', -deleted)
end
return 1
