"""
The offline store in Redis, for a cluster: a user may log on at another
node than the one that kept their messages.  It uses an L{IRedisLink} (by
default the cluster's own command connection); each change is one Lua
script, so a store is all or nothing and the bounds hold across nodes.

Keys, under the prefix (C{esf} by default)::

    esf:off:<user>:m   sorted set: score = ID, member = "%010d%03d:" % (ID,
                       device kind, 255 for any) + the frame
    esf:off:<user>:n   the user's last ID (INCRBY)
    esf:off:<user>:b   bytes kept for the user
    esf:off:<user>:s   hash: ID -> the message's sender
    esf:offsnd:<user>  hash: n, b = messages and bytes <user> has waiting,
                       for all receivers together (gone at 0)
    esf:offtotal       hash: n, b = messages and bytes in the whole store

While the cluster's C{esf:settling} mark is set (for a lease after Redis
lost its data) nothing is stored: who is online is not known yet.

How durable it is is Redis's business: with C{appendonly yes} and
C{appendfsync always} a stored message survives Redis's own crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from esf.interfaces import IOfflineStore

from ._store import (
    MAX_ID,
    OfflineBounds,
    OfflineSenderFull,
    OfflineServerFull,
    OfflineStoreError,
    OfflineStoreFull,
    StoredMessage,
)

__all__ = ["RedisOfflineStore"]

_ANY = 255
_PREFIX = 14  # "%010d%03d:"

# KEYS: user's m, n, b, s; the total; the sender's; the cluster's settling
# mark.  ARGV: the bounds (user messages, user bytes, kind, sender messages,
# sender bytes, total messages, total bytes), the sender, then the frames.
_STORE = b"""
if redis.call('EXISTS', KEYS[7]) == 1 then
  -- Redis lost its data and the nodes have not all claimed their devices
  -- again: the receiver may well be online.
  return {-5, 0, 0}
end
local count = redis.call('ZCARD', KEYS[1])
local size = tonumber(redis.call('GET', KEYS[3]) or '0')
local k = #ARGV - 8
local added = 0
for i = 9, #ARGV do added = added + string.len(ARGV[i]) end
if count + k > tonumber(ARGV[1]) or size + added > tonumber(ARGV[2]) then
  return {-1, count, size}
end
local sn = tonumber(redis.call('HGET', KEYS[6], 'n') or '0')
local sb = tonumber(redis.call('HGET', KEYS[6], 'b') or '0')
if sn + k > tonumber(ARGV[4]) or sb + added > tonumber(ARGV[5]) then
  return {-3, sn, sb}
end
local tn = tonumber(redis.call('HGET', KEYS[5], 'n') or '0')
local tb = tonumber(redis.call('HGET', KEYS[5], 'b') or '0')
if tn + k > tonumber(ARGV[6]) or tb + added > tonumber(ARGV[7]) then
  return {-4, tn, tb}
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last + k > 2147483647 then
  return {-2, count, size}
end
last = redis.call('INCRBY', KEYS[2], k)
local first = last - k + 1
for i = 1, k do
  local id = first + i - 1
  redis.call('ZADD', KEYS[1], id, string.format('%010d%03d:', id, tonumber(ARGV[3])) .. ARGV[8 + i])
  redis.call('HSET', KEYS[4], id, ARGV[8])
end
redis.call('INCRBY', KEYS[3], added)
redis.call('HINCRBY', KEYS[6], 'n', k)
redis.call('HINCRBY', KEYS[6], 'b', added)
redis.call('HINCRBY', KEYS[5], 'n', k)
redis.call('HINCRBY', KEYS[5], 'b', added)
return {first, k}
"""

# KEYS: user's m, b, s; the total.  ARGV: the senders' key prefix, then IDs.
_DELETE = b"""
local gone = 0
local size = 0
local senders = {}
for i = 2, #ARGV do
  local found = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[i], ARGV[i])
  for _, member in ipairs(found) do
    local length = string.len(member) - 14
    size = size + length
    gone = gone + 1
    local sender = redis.call('HGET', KEYS[3], ARGV[i])
    if sender then
      local t = senders[sender]
      if not t then
        t = {0, 0}
        senders[sender] = t
      end
      t[1] = t[1] + 1
      t[2] = t[2] + length
    end
  end
  if #found > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[i], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
  end
end
if gone > 0 then
  redis.call('DECRBY', KEYS[2], size)
  redis.call('HINCRBY', KEYS[4], 'n', -gone)
  redis.call('HINCRBY', KEYS[4], 'b', -size)
  for sender, t in pairs(senders) do
    local key = ARGV[1] .. sender
    if redis.call('HINCRBY', key, 'n', -t[1]) <= 0 then
      redis.call('DEL', key)
    else
      redis.call('HINCRBY', key, 'b', -t[2])
    end
  end
end
return gone
"""

# KEYS: user's m.  ARGV: after (the last ID seen), most messages, most
# bytes, messages and bytes the window holds already, most members to
# look at, then the device kinds wanted.  One member read at a time, so
# that Redis copies only the frames the window takes (and the first that
# does not fit), never the next hundred nor those of other devices in
# whole.  Answers: the last ID looked at, 1 when the window is full or
# nothing is left (else 0: look again from that ID), then the members.
_FETCH = b"""
local kinds = {}
for i = 7, #ARGV do kinds[tonumber(ARGV[i])] = true end
local seen = ARGV[1]
local max_count = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
local have = tonumber(ARGV[4])
local size = tonumber(ARGV[5])
local out = {seen, 0}
for _ = 1, tonumber(ARGV[6]) do
  local found = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. seen, '+inf', 'LIMIT', 0, 1)
  local member = found[1]
  if not member then
    out[2] = 1
    return out
  end
  if kinds[tonumber(string.sub(member, 11, 13))] then
    local length = string.len(member) - 14
    if have > 0 and (have >= max_count or size + length > max_bytes) then
      out[2] = 1
      return out
    end
    have = have + 1
    size = size + length
    out[#out + 1] = member
  end
  seen = string.sub(member, 1, 10)
  out[1] = seen
end
return out
"""

#: Most members one fetch script looks at (a window's worth and those of
#: other devices it skips): a script is short, however many a user has.
_SCAN = 200


@implementer(IOfflineStore)
class RedisOfflineStore:
    """
    The offline store in Redis.

    @param link: an C{IRedisLink} (the cluster's C{link}); the
        store neither starts nor stops it.
    @param bounds: what it keeps at most (L{esf.offline.OfflineBounds}),
        over all nodes: they are checked in Redis, in the script that
        stores.
    @param prefix: the prefix of its keys (the cluster's).
    """

    def __init__(
        self,
        link: Any,
        *,
        bounds: OfflineBounds = OfflineBounds(),
        prefix: str = "esf",
    ):
        self.link = link
        self.bounds = bounds
        self.prefix = prefix
        self._total_key = f"{prefix}:offtotal"
        self._senders = f"{prefix}:offsnd:"
        self._settling = f"{prefix}:settling"

    def __repr__(self) -> str:
        return f"<RedisOfflineStore {self.link!r}>"

    def _keys(self, user_id: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}:off:{user_id}:"
        return base + "m", base + "n", base + "b", base + "s"

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def store(
        self, user_id: str, client_type: int | None, frames: Sequence[bytes], sender_id: str
    ) -> Deferred[list[int]]:
        kind = _ANY if client_type is None else client_type
        bounds = self.bounds
        d = self.link.eval(
            _STORE,
            [*self._keys(user_id), self._total_key, self._senders + sender_id, self._settling],
            [
                bounds.max_messages,
                bounds.max_bytes,
                kind,
                bounds.max_sender_messages,
                bounds.max_sender_bytes,
                bounds.max_total_messages,
                bounds.max_total_bytes,
                sender_id,
                *[bytes(f) for f in frames],
            ],
        )

        def answered(reply: list[Any]) -> list[int]:
            first, a, b = (int(reply[0]), int(reply[1]), int(reply[2]) if len(reply) > 2 else 0)
            if first == -1:
                raise OfflineStoreFull(user_id, a, b, bounds.max_messages, bounds.max_bytes)
            if first == -3:
                raise OfflineSenderFull(
                    sender_id, a, b, bounds.max_sender_messages, bounds.max_sender_bytes
                )
            if first == -4:
                raise OfflineServerFull(a, b, bounds.max_total_messages, bounds.max_total_bytes)
            if first == -5:
                raise OfflineStoreError(
                    "the cluster is settling who is online (its Redis lost its data); try later"
                )
            if first == -2:
                raise OfflineStoreError(f"{user_id} has used up its message IDs")
            return list(range(first, first + a))

        return cast("Deferred[list[int]]", d.addCallback(answered))

    def fetch(
        self,
        user_id: str,
        client_types: Sequence[int | None],
        after: int,
        max_count: int,
        max_bytes: int,
    ) -> Deferred[list[StoredMessage]]:
        kinds = sorted({_ANY if k is None else k for k in client_types})
        key = self._keys(user_id)[0]

        async def read() -> list[StoredMessage]:
            seen = after
            out: list[StoredMessage] = []
            size = 0
            while True:
                reply = await self.link.eval(
                    _FETCH, [key], [seen, max_count, max_bytes, len(out), size, _SCAN, *kinds]
                )
                seen, done = int(reply[0]), int(reply[1])
                for member in reply[2:]:
                    message_id, kind = int(member[:10]), int(member[10:13])
                    raw = bytes(member[_PREFIX:])
                    out.append(StoredMessage(message_id, None if kind == _ANY else kind, raw))
                    size += len(raw)
                if done or seen >= MAX_ID:
                    return out

        return Deferred.fromCoroutine(read())

    def delete(self, user_id: str, ids: Sequence[int]) -> Deferred[int]:
        if not ids:
            return succeed(0)
        m, _, b, senders = self._keys(user_id)
        d = self.link.eval(
            _DELETE, [m, b, senders, self._total_key], [self._senders, *[int(i) for i in ids]]
        )
        return cast("Deferred[int]", d.addCallback(int))

    def counts(self, user_id: str) -> Deferred[tuple[int, int]]:
        m, _, b, _ = self._keys(user_id)

        async def read() -> tuple[int, int]:
            count = await self.link.execute("ZCARD", m)
            size = await self.link.execute("GET", b)
            return int(count), int(size or 0)

        return Deferred.fromCoroutine(read())

    def _pair(self, key: str) -> Deferred[tuple[int, int]]:
        async def read() -> tuple[int, int]:
            n, b = await self.link.execute("HMGET", key, "n", "b")
            return int(n or 0), int(b or 0)

        return Deferred.fromCoroutine(read())

    def sender_counts(self, sender_id: str) -> Deferred[tuple[int, int]]:
        return self._pair(self._senders + sender_id)

    def total_counts(self) -> Deferred[tuple[int, int]]:
        return self._pair(self._total_key)
