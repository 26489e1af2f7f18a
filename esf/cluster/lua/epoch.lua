-- KEYS: epoch, the settling mark.  ARGV: a new random epoch, used if none is
-- set; the lease in ms; '1' if this node knew an epoch before; '1' if it
-- finds another Redis server than it joined on (a failover, a restart).
-- A new epoch set by a node that knew another (Redis lost its data), or
-- another server (which may have lost the latest writes): for a lease,
-- until every live node has claimed its devices again, who is online is not
-- known and the offline store keeps nothing (esf.offline._redis).
if (redis.call('SET', KEYS[1], ARGV[1], 'NX') and ARGV[3] == '1') or ARGV[4] == '1' then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
return redis.call('GET', KEYS[1])
