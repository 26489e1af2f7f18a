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

How durable it is is Redis's business: with C{appendonly yes} and
C{appendfsync always} a stored message survives Redis's own crash.
"""

from __future__ import annotations

from typing import Any, Sequence, cast

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ._offline import MAX_ID, OfflineStoreError, OfflineStoreFull, StoredMessage
from .interfaces import IOfflineStore

__all__ = ["RedisOfflineStore"]

_ANY = 255
_PREFIX = 14  # "%010d%03d:"

_STORE = b"""
local count = redis.call('ZCARD', KEYS[1])
local size = tonumber(redis.call('GET', KEYS[3]) or '0')
local k = #ARGV - 3
local added = 0
for i = 4, #ARGV do added = added + string.len(ARGV[i]) end
if count + k > tonumber(ARGV[1]) or size + added > tonumber(ARGV[2]) then
  return {-1, count, size}
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last + k > 2147483647 then
  return {-2, count, size}
end
last = redis.call('INCRBY', KEYS[2], k)
local first = last - k + 1
for i = 1, k do
  local id = first + i - 1
  redis.call('ZADD', KEYS[1], id, string.format('%010d%03d:', id, tonumber(ARGV[3])) .. ARGV[3 + i])
end
redis.call('INCRBY', KEYS[3], added)
return {first, k}
"""

_DELETE = b"""
local gone = 0
local size = 0
for i = 1, #ARGV do
  local found = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[i], ARGV[i])
  for _, member in ipairs(found) do
    size = size + string.len(member) - 14
    gone = gone + 1
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[i], ARGV[i])
end
if gone > 0 then redis.call('DECRBY', KEYS[2], size) end
return gone
"""


@implementer(IOfflineStore)
class RedisOfflineStore:
    """
    The offline store in Redis.

    @param link: an L{esf.cluster.IRedisLink} (the cluster's C{link}); the
        store neither starts nor stops it.
    @param prefix: the prefix of its keys (the cluster's).
    """

    def __init__(
        self,
        link: Any,
        max_messages: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        prefix: str = "esf",
    ):
        self.link = link
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"<RedisOfflineStore {self.link!r}>"

    def _keys(self, user_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:off:{user_id}:"
        return base + "m", base + "n", base + "b"

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def store(
        self, user_id: str, client_type: int | None, frames: Sequence[bytes]
    ) -> Deferred[list[int]]:
        kind = _ANY if client_type is None else client_type
        d = self.link.eval(
            _STORE,
            self._keys(user_id),
            [self.max_messages, self.max_bytes, kind, *[bytes(f) for f in frames]],
        )

        def answered(reply: list[Any]) -> list[int]:
            first, a, b = (int(reply[0]), int(reply[1]), int(reply[2]) if len(reply) > 2 else 0)
            if first == -1:
                raise OfflineStoreFull(user_id, a, b, self.max_messages, self.max_bytes)
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
        return Deferred.fromCoroutine(
            self._fetch(user_id, client_types, after, max_count, max_bytes)
        )

    async def _fetch(
        self,
        user_id: str,
        client_types: Sequence[int | None],
        after: int,
        max_count: int,
        max_bytes: int,
    ) -> list[StoredMessage]:
        kinds = {_ANY if k is None else k for k in client_types}
        key = self._keys(user_id)[0]
        out: list[StoredMessage] = []
        size = 0
        while True:
            members = await self.link.execute(
                "ZRANGEBYSCORE", key, f"({after}", "+inf", "LIMIT", 0, max_count
            )
            for member in members:
                message_id, kind = int(member[:10]), int(member[10:13])
                after = message_id
                if kind not in kinds:
                    continue
                raw = bytes(member[_PREFIX:])
                if out and (len(out) >= max_count or size + len(raw) > max_bytes):
                    return out
                out.append(StoredMessage(message_id, None if kind == _ANY else kind, raw))
                size += len(raw)
            if len(out) >= max_count or len(members) < max_count or after >= MAX_ID:
                return out

    def delete(self, user_id: str, ids: Sequence[int]) -> Deferred[int]:
        if not ids:
            return succeed(0)
        m, _, b = self._keys(user_id)
        d = self.link.eval(_DELETE, [m, b], [int(i) for i in ids])
        return cast("Deferred[int]", d.addCallback(int))

    def counts(self, user_id: str) -> Deferred[tuple[int, int]]:
        m, _, b = self._keys(user_id)

        async def read() -> tuple[int, int]:
            count = await self.link.execute("ZCARD", m)
            size = await self.link.execute("GET", b)
            return int(count), int(size or 0)

        return Deferred.fromCoroutine(read())
