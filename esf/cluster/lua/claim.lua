-- KEYS: user hash, online set, presence stream
-- ARGV: user, kind, value, mode, maxlen, prefix, session_id, node, logon_time,
--       takeover limit (0: no guard), takeover window ms, takeover cooldown ms
-- mode, by the claimant's relogon mode: replace (REPLACE_OLD) | keep
--       (IGNORE_NEW; a holder whose node's lease expired is replaced) |
--       newer (a re-claim of a REPLACE_OLD logon: the later logon wins) |
--       older (a re-claim of an IGNORE_NEW logon: the earlier wins)
-- Returns {1, old or false, stream id} when claimed, {0, old, false} when
-- not, {2, old, ms of cooldown left} when a takeover is refused as flapping.
local old = redis.call('HGET', KEYS[1], ARGV[2])
local member = ARGV[1] .. '\t' .. ARGV[2]
if old then
  local osid, onode, ot = string.match(old, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t')
  if osid == ARGV[7] then
    redis.call('SADD', KEYS[2], ARGV[1])
    redis.call('SADD', ARGV[6] .. 'n:' .. ARGV[8], member)
    return {1, false, false}
  end
  local mode = ARGV[4]
  local won = true
  if mode == 'keep' then
    -- A holder whose node stopped renewing its lease (dead or paused, not
    -- yet reaped) does not lock its user out.
    won = redis.call('EXISTS', ARGV[6] .. 'lease:' .. onode) == 0
  elseif mode == 'newer' or mode == 'older' then
    local mine, theirs = tonumber(ARGV[9]), tonumber(ot) or 0
    if mine == theirs then
      won = ARGV[7] > osid
    elseif mode == 'newer' then
      won = mine > theirs
    else
      won = mine < theirs
    end
  end
  if not won then
    return {0, old, false}
  end
  local limit = tonumber(ARGV[10])
  if mode == 'replace' and limit > 0 then
    -- The takeover-flapping guard, cluster-wide: the takeovers of this
    -- device in the last window (a sorted set by Redis's time), and a
    -- cooldown once there are more than the limit.
    local tkey = ARGV[6] .. 't:' .. member
    local bkey = ARGV[6] .. 'tb:' .. member
    local left = redis.call('PTTL', bkey)
    if left > 0 then
      return {2, old, left}
    end
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('ZREMRANGEBYSCORE', tkey, '-inf', now - tonumber(ARGV[11]))
    redis.call('ZADD', tkey, now, ARGV[7])
    redis.call('PEXPIRE', tkey, ARGV[11])
    if redis.call('ZCARD', tkey) > limit then
      redis.call('DEL', tkey)
      redis.call('SET', bkey, '1', 'PX', ARGV[12])
      return {2, old, tonumber(ARGV[12])}
    end
  end
  redis.call('SREM', ARGV[6] .. 'n:' .. onode, member)
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', ARGV[6] .. 'n:' .. ARGV[8], member)
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
                      'u', ARGV[1], 'c', ARGV[2], 'v', ARGV[3])
return {1, old or false, id}
