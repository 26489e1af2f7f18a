-- KEYS: the receiving node's inbox, its ledger, the nodes set, its lease
-- ARGV: the receiving node, the entry, entries and bytes bounds (used while
--       the receiving node has published none), a deadline in ms on
--       Redis's clock (0: none), when the entry's requests must be
--       delivered by, in ms on Redis's clock (0: any time; kept with the
--       entry as its field 't'), the lease's token of the process the
--       entry is for ('': any; given when the entry holds records only
--       that process is known to read)
-- Returns {the new entry's ID, the receiving process's lease token}; or 0
-- when the node is not in the cluster (left, or reaped: nobody reads its
-- inbox); 1 when the inbox is full; 2 when the node's lease expired (dead or
-- paused: nobody reads its inbox now, and the janitor will delete it), or
-- is another process's than the one the entry is for (all its sessions
-- are gone with the one that held it); 3 when the deadline is past (the
-- sender was told the append failed: it must not happen later).
local deadline = tonumber(ARGV[5])
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline then
    return 3
  end
end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then
  return 0
end
local holder = redis.call('GET', KEYS[4])
if not holder or (ARGV[7] ~= '' and holder ~= ARGV[7]) then
  return 2
end
local ledger = redis.call('HMGET', KEYS[2], 'b', 'n', 'm')
local held = tonumber(ledger[1]) or 0
local size = string.len(ARGV[2])
-- An empty inbox takes one entry of any size (an entry is at most one
-- turn's outbox, 256 KiB and one frame).
if (held > 0 and held + size > (tonumber(ledger[3]) or tonumber(ARGV[4])))
   or redis.call('XLEN', KEYS[1]) >= (tonumber(ledger[2]) or tonumber(ARGV[3])) then
  redis.call('HINCRBY', KEYS[2], 'r', 1)
  return 1
end
redis.call('HINCRBY', KEYS[2], 'b', size)
redis.call('HINCRBY', KEYS[2], 'c', 1)
local id
if ARGV[6] ~= '0' then
  id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2], 't', ARGV[6])
else
  id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
end
return {id, holder}
