-- A message for a user was just handed to the offline store by a node whose
-- view listed no device of theirs: tell each node that holds one now (a
-- logon its view had not caught up with) to look at the store again, with
-- a record in its inbox for each such device.  Run on the storing node's
-- command connection right after the store, so that whatever that node
-- relays to the device afterwards comes after it in the inbox.
-- KEYS: the user's presence hash, the nodes set
-- ARGV: the key prefix (with its colon), the device kind stored for (255:
--       any), the record's kind, the inboxes' bounds (entries, bytes) used
--       while a node has published none
-- Returns how many nodes were told.
local kind = ARGV[2]
local by_node = {}
local order = {}
local held = redis.call('HGETALL', KEYS[1])
for i = 1, #held, 2 do
  if kind == '255' or held[i] == kind then
    local sid, node = string.match(held[i + 1], '^([^\t]*)\t([^\t]*)\t')
    if sid then
      local record = struct.pack('<BHIII', tonumber(ARGV[3]), string.len(sid),
                                 tonumber(held[i]), 0, 0) .. sid
      if not by_node[node] then
        by_node[node] = {}
        order[#order + 1] = node
      end
      table.insert(by_node[node], record)
    end
  end
end
local told = 0
for _, node in ipairs(order) do
  local inbox = ARGV[1] .. 'inbox:' .. node
  local ledger = ARGV[1] .. 'ib:' .. node
  -- As an append (append.lua): only to a node in the cluster whose lease
  -- is held, within its inbox's bounds (a full inbox means a node far
  -- behind: the message then waits for the device's next logon).
  if redis.call('SISMEMBER', KEYS[2], node) == 1
     and redis.call('EXISTS', ARGV[1] .. 'lease:' .. node) == 1 then
    local entry = table.concat(by_node[node])
    local size = string.len(entry)
    local bounds = redis.call('HMGET', ledger, 'b', 'n', 'm')
    local bytes = tonumber(bounds[1]) or 0
    if (bytes > 0 and bytes + size > (tonumber(bounds[3]) or tonumber(ARGV[5])))
       or redis.call('XLEN', inbox) >= (tonumber(bounds[2]) or tonumber(ARGV[4])) then
      redis.call('HINCRBY', ledger, 'r', 1)
    else
      redis.call('HINCRBY', ledger, 'b', size)
      redis.call('HINCRBY', ledger, 'c', 1)
      redis.call('XADD', inbox, '*', 'm', entry)
      told = told + 1
    end
  end
end
return told
