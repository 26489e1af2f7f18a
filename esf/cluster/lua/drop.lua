-- The node read these entries: delete them, and any older one a failed
-- deletion left behind.
-- KEYS: the node's inbox, its ledger.  ARGV: entry ID, its size, ... (in order)
-- Most entries left behind by a failed deletion that one later deletion
-- sweeps up (the rest go with the ones after).
local SWEEP = 100
local freed, deleted = 0, 0
for i = 1, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    freed = freed + tonumber(ARGV[i + 1])
    deleted = deleted + 1
  end
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', ARGV[#ARGV - 1], 'COUNT', SWEEP)) do
  redis.call('XDEL', KEYS[1], entry[1])
  freed = freed + string.len(entry[2][2])
  deleted = deleted + 1
end
if redis.call('XLEN', KEYS[1]) == 0 then
  -- Nothing held, nothing counted (this also mends counts that an
  -- outside trim of the stream left too high).
  redis.call('HDEL', KEYS[2], 'b', 'c')
elseif deleted > 0 then
  redis.call('HINCRBY', KEYS[2], 'b', -freed)
  redis.call('HINCRBY', KEYS[2], 'c', -deleted)
end
return freed
