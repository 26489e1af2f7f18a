-- Claims and releases of devices, asked for by one node during one reactor
-- turn, made in order: each changes one user's hash and the indexes, and all
-- the changes made go down the presence stream as one entry.
-- KEYS: online set, presence stream
-- ARGV: maxlen (about how many changes the stream keeps), prefix, takeover
--       limit (0: no guard), takeover window ms, takeover cooldown ms, then
--       the changes asked for, each one of
--         'c', user, kind, value, mode, session_id, node, logon_time  (claim)
--         'r', user, kind, session_id                                 (release)
-- mode, by the claimant's relogon mode: replace (REPLACE_OLD) | keep
--       (IGNORE_NEW; a holder whose node's lease expired is replaced) |
--       newer (a re-claim of a REPLACE_OLD logon: the later logon wins) |
--       older (a re-claim of an IGNORE_NEW logon: the earlier wins)
-- Returns {stream id or false, answer, ...}: the entry's ID (false when
-- nothing changed) and an answer per change asked for, in order.  Each
-- change made is the entry's fields u (user), c (kind) and v (the new
-- value: claimed) or d (the session released), in order; n below is its
-- place among them (from 1).  A claim answers {1, old or false, n} when
-- claimed ({1, false, 0}: the claimant held it already, nothing changed),
-- {0, old, false} when not, {2, old, ms of cooldown left} when the takeover
-- is refused as flapping; a release {1, last, n} when released (last: 1
-- when the user has no device left), {0, 0, false} when another session
-- holds the device, or none.
local prefix = ARGV[2]
local limit = tonumber(ARGV[3])
local entry = {}
local made = 0

local function change(user, kind, field, value)
  made = made + 1
  local n = #entry
  entry[n + 1] = 'u'
  entry[n + 2] = user
  entry[n + 3] = 'c'
  entry[n + 4] = kind
  entry[n + 5] = field
  entry[n + 6] = value
  return made
end

local function claim(user, kind, value, mode, sid, node, logon_time)
  local hash = prefix .. 'u:' .. user
  local member = user .. '\t' .. kind
  local old = redis.call('HGET', hash, kind)
  if old then
    local osid, onode, ot = string.match(old, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t')
    if osid == sid then
      redis.call('SADD', KEYS[1], user)
      redis.call('SADD', prefix .. 'n:' .. node, member)
      return {1, false, 0}
    end
    local won = true
    if mode == 'keep' then
      -- A holder whose node stopped renewing its lease (dead or paused, not
      -- yet reaped) does not lock its user out.
      won = redis.call('EXISTS', prefix .. 'lease:' .. onode) == 0
    elseif mode == 'newer' or mode == 'older' then
      local mine, theirs = tonumber(logon_time), tonumber(ot) or 0
      if mine == theirs then
        won = sid > osid
      elseif mode == 'newer' then
        won = mine > theirs
      else
        won = mine < theirs
      end
    end
    if not won then
      return {0, old, false}
    end
    if mode == 'replace' and limit > 0 then
      -- The takeover-flapping guard, cluster-wide: the takeovers of this
      -- device in the last window (a sorted set by Redis's time), and a
      -- cooldown once there are more than the limit.
      local tkey = prefix .. 't:' .. member
      local bkey = prefix .. 'tb:' .. member
      local left = redis.call('PTTL', bkey)
      if left > 0 then
        return {2, old, left}
      end
      local t = redis.call('TIME')
      local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      redis.call('ZREMRANGEBYSCORE', tkey, '-inf', now - tonumber(ARGV[4]))
      redis.call('ZADD', tkey, now, sid)
      redis.call('PEXPIRE', tkey, ARGV[4])
      if redis.call('ZCARD', tkey) > limit then
        redis.call('DEL', tkey)
        redis.call('SET', bkey, '1', 'PX', ARGV[5])
        return {2, old, tonumber(ARGV[5])}
      end
    end
    redis.call('SREM', prefix .. 'n:' .. onode, member)
  end
  redis.call('HSET', hash, kind, value)
  redis.call('SADD', KEYS[1], user)
  redis.call('SADD', prefix .. 'n:' .. node, member)
  return {1, old or false, change(user, kind, 'v', value)}
end

local function release(user, kind, sid)
  local hash = prefix .. 'u:' .. user
  local v = redis.call('HGET', hash, kind)
  if not v then
    return {0, 0, false}
  end
  local held, node = string.match(v, '^([^\t]*)\t([^\t]*)\t')
  if held ~= sid then
    return {0, 0, false}
  end
  redis.call('HDEL', hash, kind)
  redis.call('SREM', prefix .. 'n:' .. node, user .. '\t' .. kind)
  local last = 0
  if redis.call('HLEN', hash) == 0 then
    redis.call('SREM', KEYS[1], user)
    last = 1
  end
  return {1, last, change(user, kind, 'd', sid)}
end

local answers = {false}
local i = 6
while i <= #ARGV do
  if ARGV[i] == 'c' then
    answers[#answers + 1] = claim(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
                                  ARGV[i + 5], ARGV[i + 6], ARGV[i + 7])
    i = i + 8
  else
    answers[#answers + 1] = release(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  end
end
if made > 0 then
  -- The stream keeps about maxlen changes, not entries: an entry of many
  -- changes trims it to fewer entries.
  local keep = math.max(1, math.floor(tonumber(ARGV[1]) / made))
  answers[1] = redis.call('XADD', KEYS[2], 'MAXLEN', '~', keep, '*', unpack(entry))
end
return answers
