"""
A cluster: several esf nodes act as one server, sharing presence and
routing through one Redis::

    ClusterPresence   an IPresence shared by the nodes (claim, release, a
                      full in-memory mirror of the cluster's presence)
    RemoteHandle      an IDeviceHandle for a device held by another node:
                      what it is told goes to that node's inbox
    RedisLink         one connection to Redis (txredisapi), kept up by
                      ClientService, every call bounded by a timeout

Redis holds, under a prefix (C{esf} by default)::

    esf:u:<user>       hash: device kind -> "session_id TAB node TAB logon_time TAB address"
    esf:online         set of the users with at least one device
    esf:n:<node>       set of "user TAB kind" a node holds (the janitor's index)
    esf:nodes          set of the nodes that joined
    esf:lease:<node>   the node's lease (SET PX, refreshed every lease/3 s)
    esf:presence       stream of presence changes (bounded, MAXLEN ~)
    esf:inbox:<node>   stream of what other nodes tell this node's devices,
                       bounded in entries and bytes, emptied as it is read
    esf:ib:<node>      hash: the inbox's bytes and bounds (esf.cluster._inbox)
    esf:epoch          a random token: missing or changed = Redis lost its data
    esf:janitor        the janitor's lock (SET NX PX)
    esf:settling       set for a lease after a new epoch: who is online is not
                       known yet, the offline store keeps nothing

Every change of presence is one Lua script (claim, release, reap) that
changes the hash and the indexes and appends the change to the presence
stream atomically; each node applies the stream to its mirror, so reads
(and the relay's lookups) never wait for Redis.  docs/cluster.md explains
the design and its guarantees.
"""

from __future__ import annotations

import collections
import math
import random
import string
import struct
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from sortedcontainers import SortedList  # type: ignore[import-untyped]
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from esf.wire import _messages as m
from ._inbox import (
    DEFAULT_INBOX_BYTES,
    DEFAULT_INBOX_ENTRIES,
    FULL,
    GONE,
    LATE,
    STALE,
    InboxLedger,
    ledger_key,
)
from esf.server._config import RelogonMode, UserData, default_node_id
from esf.server._policy import TakeoverRefused
from esf.server._presence import Claim
from esf.server._router import ANSWERS
from esf.wire._frames import (
    SERVER_ID,
    DisconnectedType,
    ErrorCode,
    FrameDecoder,
    MessageType,
    as_client_type,
    encode_frame,
)
from esf.interfaces import IDeviceHandle, IPresence

if TYPE_CHECKING:
    from esf.server._engine import ServerEngine
    from esf.server._offline import OfflineMessages
    from esf.wire._pending import PendingRequests
    from esf.server._presence import UserManager
    from esf.wire._frames import WireConfig

    class _Batch(Protocol):
        """
        What the cluster needs of the engine's output batch
        (L{esf.server._output.OutputBatch}).
        """

        def begin(self) -> bool: ...

        def flush(self) -> None: ...

    #: How a L{RemoteHandle} posts a record: C{(handle, kind, a, b, data)}.
    _Post = Callable[["RemoteHandle", int, int, int, bytes], None]

__all__ = [
    "RedisURL",
    "RedisUnavailable",
    "IRedisLink",
    "RedisLink",
    "RemoteHandle",
    "ClusterPresence",
    "ClusterService",
    "default_node_id",
    "DEFAULT_LEASE",
]

log = Logger(namespace="esf.cluster")

#: Seconds a node's lease lasts; it is refreshed every third of it, and the
#: janitor runs as often, so a dead node's devices are released within
#: about 4/3 of it (20 s).
DEFAULT_LEASE = 15.0


def check_node_id(node_id: str) -> str:
    """
    C{node_id} if it is usable: printable ASCII, no spaces, at most 100
    characters (it goes into Redis keys and session IDs).
    """
    if not node_id or len(node_id) > 100 or not all(33 <= ord(c) < 127 for c in node_id):
        raise ValueError(
            f"a node ID is 1..100 printable ASCII characters without spaces, not {node_id!r}"
        )
    return node_id


class RedisUnavailable(Exception):
    """
    Redis cannot be reached now: not connected, or it did not answer in
    time.
    """


@attrs.frozen
class RedisURL:
    """
    Where Redis is: C{redis://[[user]:password@]host[:port][/db]}, or
    C{rediss://...} for TLS, where C{?ssl_ca_certs=PATH} names the PEM file
    of the authorities that Redis's certificate is checked against (the
    system's by default).
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    tls: bool = False
    ca_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """
        @raise ValueError: C{url} is not a Redis URL.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis URL starts with redis:// or rediss://, not {url!r}")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} must be a number, not {path!r}")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"ssl_ca_certs"}
        if unknown:
            raise ValueError(f"unknown parameters in a Redis URL: {', '.join(sorted(unknown))}")
        ca_file = query.get("ssl_ca_certs", [None])[-1]
        if ca_file is not None and parts.scheme != "rediss":
            raise ValueError("ssl_ca_certs goes with rediss:// (TLS) only")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=int(path or 0),
            password=unquote(parts.password) if parts.password is not None else None,
            username=unquote(parts.username) if parts.username else None,
            tls=parts.scheme == "rediss",
            ca_file=ca_file,
        )

    def __str__(self) -> str:
        # Never the password: this goes to logs.
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
            reactor, self.host, self.port, timeout=timeout
        )
        if self.tls:
            from twisted.internet.ssl import Certificate, optionsForClientTLS

            trust = None
            if self.ca_file is not None:
                with open(self.ca_file, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            endpoint = endpoints.wrapClientTLS(
                optionsForClientTLS(self.host, trustRoot=trust), endpoint
            )
        return endpoint


class IRedisLink(Interface):
    """
    What the cluster needs of a Redis client: one connection, kept up, that
    runs commands and scripts with a bound on each call.  Replies are
    L{bytes} (nested lists for arrays, C{None} for nil), never decoded.
    """

    connected = Attribute("""Whether commands can be sent now.""")

    def start(on_connected: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """
        Connect, and reconnect whenever the connection is lost; call
        C{on_connected()} each time it is ready, C{on_lost()} each time it
        is lost.
        """

    def stop() -> Deferred[None]:
        """
        Close the connection and stop reconnecting; a Deferred.
        """

    def execute(*args: Any, timeout: float | None = None) -> Deferred[Any]:
        """
        Run one command; a Deferred of its reply.  Fails with
        L{RedisUnavailable} at once when not connected, and after
        C{timeout} seconds (the link's own by default) without an answer,
        dropping the connection then, so that no later reply is taken for
        another command's.
        """

    def eval(script: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        """
        Run a Lua script (EVALSHA, loading it when Redis does not know it),
        bounded like L{execute}.
        """


class _LinkFactory(Factory):
    """
    Builds txredisapi protocols for a L{RedisLink}.  The protocol calls
    back C{stopTrying}, C{connectionError} and reads C{isLazy} on its
    factory when authentication or SELECT fails.
    """

    isLazy = True

    def __init__(self, link: RedisLink):
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        # txredisapi has no annotations (nor a py.typed marker): its
        # protocol and what it returns are Any here.
        import txredisapi  # type: ignore[import-untyped]

        url = self.link.url
        protocol = txredisapi.RedisProtocol(
            charset=None,  # payloads are bytes, never decoded
            replyTimeout=None,  # the link bounds every call itself
            password=url.password,
            dbid=url.db,
            convertNumbers=False,
            username=url.username,
        )
        protocol.factory = self
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            try:
                lost(reason)
            finally:
                self.link._lost(protocol)

        protocol.connectionLost = connection_lost
        return protocol

    def stopTrying(self) -> None:
        # Authentication or SELECT failed: keep retrying with backoff (the
        # operator may fix Redis), loudly.
        pass

    def connectionError(self, why: str) -> None:
        log.error("{link}: {why}", link=self.link, why=why, esf_event="cluster_redis_error")


@implementer(IRedisLink)
class RedisLink:
    """
    One connection to Redis through txredisapi's protocol, kept up by
    Twisted's L{ClientService} (txredisapi's own pool would queue commands
    while disconnected; here a command fails at once instead).
    """

    def __init__(self, reactor: Any, url: RedisURL, *, timeout: float = 2.0, name: str = "redis"):
        self.reactor = reactor
        self.url = url
        self.timeout = timeout
        self.name = name
        self._protocol: Any = None
        self._service: ClientService | None = None
        self._on_connected: Callable[[], None] = lambda: None
        self._on_lost: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return f"<RedisLink {self.name} {self.url}>"

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def start(self, on_connected: Callable[[], None], on_lost: Callable[[], None]) -> None:
        self._on_connected, self._on_lost = on_connected, on_lost
        self._service = ClientService(
            self.url.endpoint(self.reactor, self.timeout),
            _LinkFactory(self),
            retryPolicy=backoffPolicy(initialDelay=0.05, maxDelay=2.0),
            clock=self.reactor,
            prepareConnection=self._prepare,
        )
        self._service.startService()

    def stop(self) -> Deferred[None]:
        service, self._service = self._service, None
        self._on_connected = self._on_lost = lambda: None
        if service is None:
            return succeed(None)
        stopped: Deferred[None] = service.stopService()
        return stopped

    def _prepare(self, protocol: Any) -> Deferred[None]:
        # Ready once AUTH and SELECT are done; a connection that fails them
        # is closed by the protocol and counts as a failed attempt.
        ready: Deferred[None] = Deferred()

        def connected(p: Any) -> None:
            if not ready.called:
                self._protocol = p
                ready.callback(None)
                self._on_connected()

        def gone(_: Any) -> None:
            if not ready.called:
                ready.errback(RedisUnavailable(f"{self}: closed while connecting"))

        protocol.whenConnected().addCallback(connected)
        protocol.whenDisconnected().addCallback(gone)
        return ready

    def _lost(self, protocol: Any) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._on_lost()

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        protocol = self._protocol
        if protocol is None:
            return fail(RedisUnavailable(f"not connected to Redis at {self.url}"))
        try:
            d = protocol.execute_command(*args, apply_timeout=False)
        except Exception as e:
            return fail(RedisUnavailable(f"Redis at {self.url}: {e}"))
        return self._bounded(d, protocol, args[0], timeout)

    def eval(self, script: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        protocol = self._protocol
        if protocol is None:
            return fail(RedisUnavailable(f"not connected to Redis at {self.url}"))
        try:
            d = protocol.eval(script, list(keys), list(args))
        except Exception as e:
            return fail(RedisUnavailable(f"Redis at {self.url}: {e}"))
        return self._bounded(d, protocol, "EVAL", None)

    def _bounded(
        self, d: Deferred[Any], protocol: Any, command: Any, timeout: float | None
    ) -> Deferred[Any]:
        import txredisapi

        timeout = self.timeout if timeout is None else timeout

        def timed_out(result: Any, seconds: float) -> Any:
            # The answer may still come: drop the connection so that it is
            # never taken for the answer to a later command.
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
            raise RedisUnavailable(f"Redis at {self.url} did not answer {command!r} within {seconds:g} s")

        def translate(failure: Failure) -> Failure:
            if failure.check(txredisapi.ConnectionError):
                return Failure(RedisUnavailable(f"Redis at {self.url}: {failure.getErrorMessage()}"))
            return failure

        d.addErrback(translate)
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
        return d


# -- the scripts --------------------------------------------------------------------
#
# A presence value is "session_id TAB node TAB logon_time TAB address"; node
# IDs and session IDs hold no TAB (check_node_id), addresses neither.  The
# scripts compute some keys from the prefix (a node's index, a user's hash):
# fine on one Redis (or a replicated one); Redis Cluster is not supported.

_CLAIM = b"""
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
local member = ARGV[1] .. '\\t' .. ARGV[2]
if old then
  local osid, onode, ot = string.match(old, '^([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)\\t')
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
"""

#: The claim script's mode for claiming a device again after an outage, by
#: the relogon mode its logon was claimed with: which of two logons made at
#: two nodes meanwhile wins.
_RECLAIM = {RelogonMode.REPLACE_OLD: "newer", RelogonMode.IGNORE_NEW: "older"}

_RELEASE = b"""
-- KEYS: user hash, online set, presence stream
-- ARGV: user, kind, session_id, maxlen, prefix
local v = redis.call('HGET', KEYS[1], ARGV[2])
if not v then
  return {0, 0, false}
end
local sid, node = string.match(v, '^([^\\t]*)\\t([^\\t]*)\\t')
if sid ~= ARGV[3] then
  return {0, 0, false}
end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('SREM', ARGV[5] .. 'n:' .. node, ARGV[1] .. '\\t' .. ARGV[2])
local last = 0
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  last = 1
end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
                      'u', ARGV[1], 'c', ARGV[2], 'd', ARGV[3])
return {1, last, id}
"""

_REAP = b"""
-- Release every device a node holds, forget the node.
-- KEYS: the node's lease, the node's index, online set, presence stream,
--       nodes set, the node's inbox, its ledger
-- ARGV: node, maxlen, prefix, force ('1': even if its lease is alive),
--       most unread inbox entries to return
-- Returns {devices released, the first unread entries of its inbox}, or
-- {-1} when its lease is alive.
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1}
end
local unread = redis.call('XRANGE', KEYS[6], '-', '+', 'COUNT', ARGV[5])
local n = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local user, kind = string.match(member, '^(.*)\\t(%d+)$')
  if user then
    local hash = ARGV[3] .. 'u:' .. user
    local v = redis.call('HGET', hash, kind)
    if v then
      local sid, node = string.match(v, '^([^\\t]*)\\t([^\\t]*)\\t')
      if node == ARGV[1] then
        redis.call('HDEL', hash, kind)
        if redis.call('HLEN', hash) == 0 then
          redis.call('SREM', KEYS[3], user)
        end
        redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*',
                   'u', user, 'c', kind, 'd', sid)
        n = n + 1
      end
    end
  end
end
redis.call('DEL', KEYS[2], KEYS[6], KEYS[7])
redis.call('SREM', KEYS[5], ARGV[1])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
end
return {n, unread}
"""

_TICK = b"""
-- KEYS: the node's lease, nodes set, epoch.  ARGV: node, lease in ms
-- Returns {the epoch, Redis's TIME}.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return {redis.call('GET', KEYS[3]), redis.call('TIME')}
"""

_EPOCH = b"""
-- KEYS: epoch, the settling mark.  ARGV: a new random epoch, used if none is
-- set; the lease in ms; '1' if this node knew an epoch before.
-- A new epoch set by a node that knew another (Redis lost its data): for a
-- lease, until every live node has claimed its devices again, who is online
-- is not known and the offline store keeps nothing (esf.offline._redis).
if redis.call('SET', KEYS[1], ARGV[1], 'NX') and ARGV[3] == '1' then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
return redis.call('GET', KEYS[1])
"""


def _stream_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


def _fields(flat: Sequence[Any]) -> dict[bytes, Any]:
    # (A hash's values are bytes; XINFO's are also numbers and nested replies.)
    return dict(zip(flat[::2], flat[1::2]))


@attrs.frozen
class _Holder:
    """
    A presence value, parsed.
    """

    session_id: str
    node: str
    logon_time: float
    address: str

    @classmethod
    def parse(cls, value: bytes) -> _Holder:
        sid, node, when, address = value.decode("utf-8").split("\t", 3)
        return cls(sid, node, float(when), address)

    @classmethod
    def of(cls, handle: IDeviceHandle, logon_time: float | None = None) -> _Holder:
        """
        C{handle} as a holder, logged on at C{logon_time} (by default its
        L{UserData}'s, which a session gets only once its claim is won).
        """
        data = handle.user_data
        if logon_time is None:
            logon_time = data.logon_time if data is not None else 0.0
        address = data.address if data is not None else getattr(handle, "address", "?")
        return cls(handle.session_id, handle.node, logon_time, address)

    def encode(self) -> bytes:
        return f"{self.session_id}\t{self.node}\t{self.logon_time!r}\t{self.address}".encode()


#: An inbox record: kind, session ID length, two numbers, data length; then
#: the session ID and the data.  What one node tells another in one
#: reactor turn goes as one stream entry of such records (one XADD, one
#: entry to read): far cheaper than an entry per frame.
_RECORD = struct.Struct("<BHIII")
_SEND, _NOTIFY, _KICK = 1, 2, 3
#: A push-out or a kick-out: the holder's node fires the user manager's
#: event, then notifies and ends the session.  Their data is
#: length-prefixed UTF-8 strings (L{_pack}).
_PUSH_OUT, _KICK_OUT = 4, 5
#: A server query from another node (a: its MessageID there, data: the
#: asking node, then the Information body), and the answer going back
#: (a: that MessageID, b: 1 for an Error, data: the answer's body).
_QUERY, _ANSWER = 6, 7
#: A request relayed to a node that was reaped before it read it (data: the
#: request's frame): the sender's node answers it C{Error(UserOffline)}.
_FAILED = 8
_REAPED = "is not online: its node stopped answering and left the cluster before delivering this"
#: The most unread entries of a reaped node's inbox whose senders are told.
_REAP_UNREAD = 1000
_LENGTH = struct.Struct("<I")
#: Why an inbox entry failed (L{esf.cluster._inbox}'s answers, and Redis
#: not answering the append in time) -> what its senders are told.
_UNANSWERED, _BEHIND = -1, -2
_NO_ANSWER = "is not reachable now: the cluster's Redis did not answer in time"
_REFUSALS = {
    _BEHIND: (
        ErrorCode.RATE_LIMITED,
        "is not reachable now: this node's traffic to the cluster's Redis is behind; try later",
    ),
    GONE: (ErrorCode.USER_OFFLINE, "is not online: its node left the cluster"),
    STALE: (
        ErrorCode.USER_OFFLINE,
        "is not reachable: its node stopped answering (its cluster lease expired)",
    ),
    FULL: (
        ErrorCode.RATE_LIMITED,
        "is not reachable now: the node that holds it is behind (its cluster inbox is full); "
        "try later",
    ),
    LATE: (ErrorCode.USER_OFFLINE, _NO_ANSWER),
    _UNANSWERED: (ErrorCode.USER_OFFLINE, _NO_ANSWER),
}
#: The longest a node remembers a query another node asked (a bound).
_MAX_QUERY_SECONDS = 3600


def _pack(*texts: str | bytes) -> bytes:
    parts = []
    for text in texts:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        parts.append(_LENGTH.pack(len(raw)) + raw)
    return b"".join(parts)


def _unpack(data: bytes, count: int) -> list[bytes]:
    out, offset = [], 0
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        out.append(data[offset : offset + length])
        offset += length
    return out
#: Flush an outbox early past this many bytes.
_OUTBOX_FLUSH_BYTES = 256 * 1024


def _records(packed: bytes) -> Iterator[tuple[int, str, int, int, bytes]]:
    """
    The records of one inbox entry: C{(kind, session_id, a, b, data)}.
    """
    view = memoryview(packed)
    offset, end, size = 0, len(packed), _RECORD.size
    while offset < end:
        kind, sid_length, a, b, length = _RECORD.unpack_from(view, offset)
        offset += size
        sid = bytes(view[offset : offset + sid_length]).decode("utf-8")
        offset += sid_length
        yield kind, sid, a, b, bytes(view[offset : offset + length])
        offset += length


@implementer(IDeviceHandle)
class RemoteHandle:
    """
    A device held by another node.  What it is told is appended to that
    node's inbox, fenced by the device's session ID: the holder's node
    acts on it only if that session still holds the device.
    """

    __slots__ = ("user_id", "client_type", "session_id", "node", "logon_order", "user_data", "_post")

    def __init__(self, user_id: str, client_type: int, holder: _Holder, post: _Post):
        self.user_id = user_id
        self.client_type = client_type
        self.session_id = holder.session_id
        self.node = holder.node
        #: Logon orders are counted per node and mean nothing here; a logon
        #: on this node always comes after a remote one (REPLACE_OLD).
        self.logon_order = 0
        self.user_data = UserData(
            user_id, as_client_type(client_type), holder.address, holder.logon_time
        )
        self._post = post

    def __repr__(self) -> str:
        return f"<RemoteHandle {self.user_id}/{self.client_type} {self.session_id}>"

    def send(self, data: bytes) -> None:
        self._post(self, _SEND, 0, 0, data)

    def notify(self, message_type: int, body: bytes = b"", client_type: int = 0) -> None:
        self._post(self, _NOTIFY, int(message_type), int(client_type), body)

    def kick(self, reason: DisconnectedType, text: str) -> None:
        self._post(self, _KICK, int(reason), 0, text.encode("utf-8"))

    # Not IDeviceHandle: what the engine does differently for a device of
    # another node, so that the user manager's events fire on the holder's
    # node.

    def push_out(self, new_address: str, cause: str) -> None:
        """
        The device logged on again from C{new_address}: the holder's node
        fires C{device_being_pushed_out}, sends C{BeingPushedOutNotify}
        and ends the session with C{BeingPushedOut}.
        """
        self._post(self, _PUSH_OUT, 0, 0, _pack(new_address, cause))

    def kick_out(self, operator: str, reason: str, text: str) -> None:
        """
        C{operator} kicks the device: the holder's node fires
        C{device_kicked_out}, sends C{BeingKickedOutNotify} and ends the
        session with C{BeingKickedOut} (C{text} in its DisconnectNotice).
        """
        self._post(self, _KICK_OUT, 0, 0, _pack(operator, reason, text))

    def ask(self, message_id: int, body: bytes, timeout: float) -> None:
        """
        The engine's query C{message_id} (an Information C{body}): the
        holder's node sends the session a Request and forwards its answer
        back to this node, for at most C{timeout} seconds.
        """
        self._post(self, _QUERY, message_id, min(_MAX_QUERY_SECONDS, math.ceil(timeout)), body)


@implementer(IPresence)
class ClusterPresence:
    """
    The presence of a cluster of nodes, kept in Redis, read from a local
    mirror.

    While Redis cannot be reached the node goes on alone: its reads show
    only its own devices (a user on another node reads as offline, so a
    message to them fails at once), claims are decided locally, and when
    Redis is back the node claims its devices again (a conflict is settled
    by the relogon mode each was claimed with: the later logon wins with
    C{REPLACE_OLD}, the earlier with C{IGNORE_NEW}) and reloads the mirror.

    @param reactor: the reactor Redis's connections run on.
    @param url: where Redis is (a L{RedisURL} or its text).
    @param node_id: this node's ID; the engine's C{node_id} must be the same.
    @param clock: what leases and the janitor run on (C{reactor} by default).
    @param lease: seconds a node's lease lasts; refreshed every third of it.
    @param prefix: the prefix of every Redis key.
    @param timeout: seconds any Redis call may take.
    @param block: seconds one blocking read of the streams waits.
    @param inbox_maxlen: the most entries this node's inbox holds; an
        entry past it is refused (its senders told).
    @param inbox_bytes: the most bytes this node's inbox holds (entries'
        payloads; an empty inbox takes one entry of any size); an entry
        past it is refused.  Both bounds are this node's: it publishes them
        in Redis, where the senders' appends check them.
    @param presence_maxlen: about how many entries the presence stream keeps.
    @param read_count: most stream entries read at once.
    @param push_out_grace: seconds after which a session of this node that
        another node's logon replaced is ended, if that node's push-out has
        not arrived.
    @param max_posts_in_flight: most inbox records Redis has not yet taken;
        more are dropped (and counted).
    @param link_factory: makes the two L{IRedisLink}s.

    @ivar up: whether the node is in the cluster (Redis reachable, mirror
        loaded); while it is not, it runs alone.
    @ivar stats: counts of what happened to cross-node traffic
        (C{inbox_delivered}, C{inbox_fenced}, C{remote_send_failed},
        C{remote_send_dropped}, C{pushed_out_without_notice}, C{reclaimed},
        C{inbox_reaped} (requests a reaped node never read, their senders
        told), and L{InboxLedger}'s C{inbox_refused}, C{inbox_gone},
        C{inbox_stale}, C{inbox_late}, C{inbox_full}).
    """

    def __init__(
        self,
        reactor: Any,
        url: RedisURL | str,
        node_id: str,
        *,
        clock: IReactorTime | None = None,
        lease: float = DEFAULT_LEASE,
        prefix: str = "esf",
        timeout: float = 2.0,
        block: float = 2.0,
        inbox_maxlen: int = DEFAULT_INBOX_ENTRIES,
        inbox_bytes: int = DEFAULT_INBOX_BYTES,
        presence_maxlen: int = 100_000,
        read_count: int = 1000,
        push_out_grace: float = 2.0,
        max_posts_in_flight: int = 10_000,
        link_factory: Callable[..., IRedisLink] = RedisLink,
    ):
        if isinstance(url, str):
            url = RedisURL.parse(url)
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.url = url
        self.node_id = check_node_id(node_id)
        self.lease = lease
        self.timeout = timeout
        self.block = block
        self.presence_maxlen = presence_maxlen
        self.read_count = read_count
        self.push_out_grace = push_out_grace
        self.max_posts_in_flight = max_posts_in_flight
        self._posts_in_flight = 0
        #: node -> inbox records to send it at the end of this reactor turn.
        self._outbox: dict[str, list[bytes]] = {}
        self._outbox_bytes = 0
        self._flush_call: IDelayedCall | None = None
        #: Optional: an object with C{begin() -> bool} and C{flush()} (the
        #: engine's C{batch}), so that what one read of the inbox delivers
        #: is written once per session.
        self.delivery_batch: _Batch | None = None
        #: The takeover-flapping guard, cluster-wide (the engine's
        #: C{ServerConfig} sets these in L{attach}): more than
        #: C{takeover_limit} takeovers of one device within
        #: C{takeover_window} s refuse it for C{takeover_cooldown} s.
        self.takeover_limit = 5
        self.takeover_window = 60.0
        self.takeover_cooldown = 60.0
        #: The engine's user manager (set by L{attach}): this node fires
        #: C{device_being_pushed_out} and C{device_kicked_out} for its own
        #: devices when another node pushes or kicks them.
        self.user_manager: UserManager | None = None
        #: The engine's wire settings and outstanding queries (set by
        #: L{attach}): for queries between nodes.
        self.wire: WireConfig | None = None
        self.pending: PendingRequests | None = None
        #: The engine's offline part (set by L{attach}), if it has a store:
        #: a session claimed again gets what was stored for it meanwhile.
        self._offline: OfflineMessages | None = None
        self.query_timeout = 30.0
        #: Queries other nodes' engines asked this node's sessions:
        #: (session ID, MessageID sent to the session) -> (asking node, its
        #: MessageID, deadline), oldest first; bounded by count and time.
        self._forwarded: collections.OrderedDict[tuple[str, int], tuple[str, int, float]] = (
            collections.OrderedDict()
        )
        self.max_forwarded = 10_000
        self.stats: collections.Counter[str] = collections.Counter()
        self._base = f"{prefix}:"
        self._k_online = f"{prefix}:online"
        self._k_stream = f"{prefix}:presence"
        self._k_nodes = f"{prefix}:nodes"
        self._k_epoch = f"{prefix}:epoch"
        self._k_janitor = f"{prefix}:janitor"
        self._k_inbox = self._inbox_key(node_id)
        self._b_stream = self._k_stream.encode()
        self._b_inbox = self._k_inbox.encode()
        self.link: IRedisLink = link_factory(reactor, url, timeout=timeout, name="commands")
        self.reader: IRedisLink = link_factory(reactor, url, timeout=timeout, name="inbox")
        #: The inboxes' bounds, and the deletion of what this node read.
        self.inbox = InboxLedger(
            reactor, self.link, self._base, node_id,
            max_entries=inbox_maxlen, max_bytes=inbox_bytes, stats=self.stats,
        )  # fmt: skip

        # The mirror: user ID -> handles in logon order (local sessions and
        # RemoteHandles), and the same user IDs sorted.
        self._users: dict[str, tuple[IDeviceHandle, ...]] = {}
        self._sorted: SortedList = SortedList()
        #: This node's sessions given to claim and not yet released.
        self._local: dict[str, IDeviceHandle] = {}
        #: Those of them claimed with C{IGNORE_NEW} (the others with
        #: C{REPLACE_OLD}): claimed again after an outage, each settles a
        #: conflict by the mode its logon was claimed with.
        self._ignore_new: set[str] = set()
        #: When each of them logged on (this node's clock, taken at its
        #: claim): stored with the claim, it settles a device logged on at
        #: two nodes during a split (L{_RECLAIM}).
        self._logon_at: dict[str, float] = {}
        #: Local sessions claimed while Redis was away (to claim there).
        self._unconfirmed: set[str] = set()
        #: Sessions released while Redis was away or whose claim has an
        #: unknown outcome: session ID -> (user, kind), released later.
        self._stale: dict[str, tuple[str, int]] = {}
        #: Devices the mirror took from a script's answer ahead of the
        #: stream: (user, kind) -> the stream ID of that change.
        self._ahead: dict[tuple[str, int], tuple[int, int]] = {}
        self._presence_pos = b"0-0"
        self._presence_at = (0, 0)
        self._inbox_pos = b"0-0"
        self._inbox_at = (0, 0)
        # Whether the node is in the cluster (Redis reachable, mirror loaded).
        self.up = False
        self._running = False
        self._joined_once = False
        self._joining = False
        self._join_again = False
        self._generation = 0
        self._epoch: bytes | None = None
        self._waiters: list[Deferred[None]] = []
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.clock
        self._reading: Deferred[None] | None = None
        self._inflight: set[Deferred[Any]] = set()

    def attach(self, engine: ServerEngine) -> None:
        """
        Work for C{engine} (its constructor calls this): take its
        takeover-guard settings, its user manager (whose push-out and kick
        events this node fires for its own devices), its output batch, its
        wire settings and its outstanding queries (for queries between
        nodes).
        """
        config = engine.config
        self.takeover_limit = config.takeover_limit
        self.takeover_window = config.takeover_window
        self.takeover_cooldown = config.takeover_cooldown
        self.query_timeout = config.query_timeout
        self.wire = config.wire
        self.user_manager = engine.user_manager
        self.pending = engine.pending
        self.delivery_batch = engine.batch
        self._offline = engine.offline

    def _inbox_key(self, node: str) -> str:
        return f"{self._base}inbox:{node}"

    def _user_key(self, user_id: str) -> str:
        return f"{self._base}u:{user_id}"

    # -- life -------------------------------------------------------------------------

    def start(self) -> None:
        """
        Connect to Redis and join the cluster (in the background: until then
        the node runs alone).
        """
        self._running = True
        self.link.start(self._link_up, self._link_down)
        self.reader.start(self._changed, self._changed)
        self._ticker.start(self.lease / 3, now=False)
        self._reading = Deferred.fromCoroutine(self._read_loop())

    async def stop(self) -> None:
        """
        Leave the cluster: release what this node still holds, drop its
        lease and inbox, close the connections.
        """
        self._running = False
        if self._ticker.running:
            self._ticker.stop()
        self._changed()
        if self._outbox:
            self._flush()
        if self._inflight:
            await DeferredList(list(self._inflight), consumeErrors=True)
        await self.inbox.settled()
        if self.link.connected:
            try:
                count = await self._reap(self.node_id, force=True)
                log.info(
                    "left the cluster; released {count} devices still held",
                    count=count,
                    esf_event="cluster_left",
                )
            except Exception as e:
                log.warn("leaving the cluster: {error}", error=e)
        self.up = False
        await DeferredList([self.link.stop(), self.reader.stop()], consumeErrors=True)
        if self._reading is not None:
            await DeferredList([self._reading], consumeErrors=True)

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _wait_change(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def _link_up(self) -> None:
        log.info("connected to Redis at {url}", url=str(self.url), esf_event="cluster_connected")
        Deferred.fromCoroutine(self._join())

    def _link_down(self) -> None:
        self._alone(f"lost Redis at {self.url}")

    def _alone(self, why: str) -> None:
        if self.up:
            log.warn(
                "{why}: this node goes on alone, other nodes' users read offline",
                why=why,
                esf_event="cluster_disconnected",
            )
        self.up = False
        self._generation += 1
        self._changed()

    # -- joining (first, after an outage, after Redis lost its data) --------------------

    async def _join(self) -> None:
        if self._joining:
            self._join_again = True
            return
        self._joining = True
        try:
            while True:
                self._join_again = False
                try:
                    await self._join_once()
                except Exception as e:
                    if self._running and self.link.connected:
                        log.warn("joining the cluster failed: {error}", error=e)
                        self._join_again = True
                        await deferLater(self.reactor, 0.5, lambda: None)
                if not self._join_again or not self._running or not self.link.connected:
                    break
        finally:
            self._joining = False

    async def _join_once(self) -> None:
        self.up = False
        self._generation += 1
        generation = self._generation
        token = "".join(random.choices(string.ascii_letters + string.digits, k=16))
        epoch = await self.link.eval(
            _EPOCH,
            [self._k_epoch, f"{self._base}settling"],
            [token, int(self.lease * 1000), "1" if self._epoch is not None else "0"],
        )
        if self._epoch is not None and epoch != self._epoch:
            log.warn(
                "Redis lost the cluster's data (a restart without persistence?): "
                "claiming this node's devices again",
                esf_event="cluster_data_lost",
            )
            self._inbox_pos, self._inbox_at = b"0-0", (0, 0)
            # Everything this node held must be claimed again.
            self._unconfirmed.update(self._local)
        self._epoch = epoch
        if not self._joined_once:
            # A node ID is one process's: whatever an earlier process with
            # this ID left is dead.
            await self._reap(self.node_id, force=True)
            self._inbox_pos, self._inbox_at = b"0-0", (0, 0)
        else:
            # After an outage, claim again every device this node holds.
            self._unconfirmed.update(
                sid for sid, handle in self._local.items() if self._holds(handle)
            )
        await self._refresh_lease()
        await self.inbox.look()
        while True:
            await self._release_stale()
            await self._confirm_claims()
            snapshot = await self._snapshot()
            if generation != self._generation:
                raise RedisUnavailable("the connection changed while joining")
            if not self._unconfirmed and not self._stale:
                break
        self._load(*snapshot)
        self._joined_once = True
        self.up = True
        log.info(
            "in the cluster as {node}: {users} users online, {local} devices here",
            node=self.node_id,
            users=len(self._users),
            local=len(self._local),
            esf_event="cluster_joined",
        )
        self._changed()

    def _holds(self, handle: IDeviceHandle) -> bool:
        for h in self._users.get(handle.user_id, ()):
            if h is handle:
                return True
        return False

    async def _refresh_lease(self) -> bytes | None:
        before = self.reactor.seconds()
        epoch, (seconds, micros) = await self.link.eval(
            _TICK,
            [f"{self._base}lease:{self.node_id}", self._k_nodes, self._k_epoch],
            [self.node_id, int(self.lease * 1000)],
        )
        # Redis's clock, for the appends' deadlines: read about halfway
        # through the round trip.
        middle = (before + self.reactor.seconds()) / 2
        self.inbox.set_redis_time(int(seconds) * 1000 + int(micros) / 1000, middle)
        return epoch  # type: ignore[no-any-return]

    async def _release_stale(self) -> None:
        stale, self._stale = self._stale, {}
        try:
            for sid, (user_id, kind) in list(stale.items()):
                await self._release_script(user_id, kind, sid)
                del stale[sid]
        finally:
            stale.update(self._stale)
            self._stale = stale

    def _mode_of(self, sid: str) -> RelogonMode:
        """
        The relogon mode this node's session C{sid} was claimed with.
        """
        return RelogonMode.IGNORE_NEW if sid in self._ignore_new else RelogonMode.REPLACE_OLD

    async def _confirm_claims(self) -> None:
        while self._unconfirmed:
            # Many at once (one connection, pipelined), a bounded number.
            chunk = [self._unconfirmed.pop() for _ in range(min(500, len(self._unconfirmed)))]
            handles = [self._local[sid] for sid in chunk if sid in self._local]
            modes = [_RECLAIM[self._mode_of(h.session_id)] for h in handles]
            try:
                replies = await DeferredList(
                    [self._claim_script(h, mode) for h, mode in zip(handles, modes)],
                    fireOnOneErrback=True,
                    consumeErrors=True,
                )
            except Exception:
                self._unconfirmed.update(h.session_id for h in handles)
                raise
            for handle, (_, (won, old, _id)) in zip(handles, replies):
                sid = handle.session_id
                if sid not in self._local:
                    continue  # released meanwhile: _stale has it
                mode = self._mode_of(sid)
                if won:
                    if self._offline is not None and getattr(handle, "logged_on", False):
                        # Others may have stored messages for it while the
                        # cluster did not list it.
                        self._offline.reclaimed(handle)  # type: ignore[arg-type]
                    if old is not None:
                        previous = _Holder.parse(old)
                        if previous.session_id != sid:
                            self._settle_remote(handle, previous, mode)
                else:
                    assert old is not None  # lost to the holder it names
                    self._settle_local(handle, _Holder.parse(old), mode)

    def _settle_remote(self, winner: IDeviceHandle, loser: _Holder, mode: RelogonMode) -> None:
        """
        C{winner} (here) took the device back from C{loser} (a logon made
        elsewhere while this node could not reach Redis), by C{winner}'s
        relogon C{mode}: end C{loser}.
        """
        if loser.node == self.node_id:
            handle = self._local.get(loser.session_id)
        else:
            handle = RemoteHandle(winner.user_id, winner.client_type, loser, self._post)
        if handle is None:
            return
        self._end_conflict(handle, winner.user_data.address if winner.user_data else "?", mode)

    def _settle_local(self, loser: IDeviceHandle, winner: _Holder, mode: RelogonMode) -> None:
        self._end_conflict(loser, winner.address, mode)

    def _end_conflict(self, handle: IDeviceHandle, other_address: str, mode: RelogonMode) -> None:
        if mode is RelogonMode.REPLACE_OLD:
            cause = (
                f"{handle.user_id} logged on with this device from {other_address} too, "
                f"later, while the cluster was split"
            )
            handle.push_out(other_address, cause)  # the holder's node fires the event
        else:
            handle.kick(
                DisconnectedType.NEW_CONNECTION_IGNORED,
                f"{handle.user_id} was already logged on with this device from {other_address} "
                f"while the cluster was split",
            )
        log.info(
            "settled a split logon of {user_id}/{client_type}: ended {session_id}",
            user_id=handle.user_id,
            client_type=handle.client_type,
            session_id=handle.session_id,
            esf_event="cluster_split_settled",
        )

    async def _snapshot(self) -> tuple[bytes, dict[str, dict[bytes, bytes]]]:
        """
        The stream's last ID, then every user's hash.  Changes made between
        the two are in the stream after that ID too; applying them again is
        harmless (a set sets, a release is fenced by session ID).
        """
        last = await self.link.execute("XREVRANGE", self._k_stream, "+", "-", "COUNT", 1)
        position = last[0][0] if last else b"0-0"
        users = await self.link.execute("SMEMBERS", self._k_online)
        hashes: dict[str, dict[bytes, bytes]] = {}
        names = [u.decode("utf-8") for u in users or ()]
        for start in range(0, len(names), 1000):
            chunk = names[start : start + 1000]
            replies = await DeferredList(
                [self.link.execute("HGETALL", self._user_key(u)) for u in chunk],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
            for user_id, (_, flat) in zip(chunk, replies):
                if flat:
                    hashes[user_id] = _fields(flat)
        return position, hashes

    def _load(self, position: bytes, hashes: dict[str, dict[bytes, bytes]]) -> None:
        users: dict[str, tuple[IDeviceHandle, ...]] = {}
        for user_id, kinds in hashes.items():
            handles = []
            for kind, value in kinds.items():
                holder = _Holder.parse(value)
                handle = self._handle_for(user_id, int(kind), holder)
                if handle is not None:
                    handles.append((holder.logon_time, handle))
            if handles:
                handles.sort(key=lambda pair: pair[0])
                users[user_id] = tuple(h for _, h in handles)
        self._users = users
        self._sorted = SortedList(users)
        self._ahead.clear()
        self._presence_pos, self._presence_at = position, _stream_id(position)

    def _handle_for(self, user_id: str, kind: int, holder: _Holder) -> IDeviceHandle | None:
        """
        The handle the mirror shows for C{holder}: the session itself when
        it is this node's (C{None} for one of this node's that is gone), a
        L{RemoteHandle} otherwise (the mirror's own, when it has one).
        """
        if holder.node == self.node_id:
            return self._local.get(holder.session_id)
        for handle in self._users.get(user_id, ()):
            if handle.session_id == holder.session_id:
                return handle
        return RemoteHandle(user_id, kind, holder, self._post)

    # -- leases and the janitor ------------------------------------------------------

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._tick_async())

    async def _tick_async(self) -> None:
        if not (self.up and self.link.connected):
            return
        try:
            epoch = await self._refresh_lease()
            if epoch != self._epoch:
                # FLUSHALL, or a failover to a replica that lost the epoch.
                self._alone("Redis lost the cluster's data")
                await self._join()
                return
            if self._stale:
                await self._release_stale()
            if await self._fell_behind():
                self._alone("this node fell behind the presence stream")
                await self._join()
                return
            await self.inbox.look()
            await self._janitor()
        except Exception as e:
            log.warn("cluster upkeep failed: {error}", error=e, esf_event="cluster_tick_failed")

    async def _fell_behind(self) -> bool:
        """
        Whether the presence stream was trimmed past what this node has read
        (it fell more than the stream's bound behind): then its mirror
        missed changes and must be reloaded.  Entries trimmed from this
        node's inbox unread are lost messages: counted and logged, and the
        reading goes on from the oldest entry kept.  (Redis 7 counts the
        entries ever added; older ones do not, and this answers no.)
        """
        behind = False
        for key, what in ((self._k_stream, "presence"), (self._k_inbox, "inbox")):
            try:
                info = _fields(await self.link.execute("XINFO", "STREAM", key))
            except RedisUnavailable:
                raise
            except Exception:
                continue  # no such stream yet
            added, length, first = (
                info.get(b"entries-added"), info.get(b"length"), info.get(b"first-entry")
            )
            if added is None or length is None or not first or int(added) <= int(length):
                continue  # nothing was ever trimmed
            first_at = _stream_id(first[0])
            at = self._presence_at if what == "presence" else self._inbox_at
            if first_at <= at:
                continue
            if what == "presence":
                log.warn(
                    "this node fell behind the presence stream: reloading its mirror",
                    esf_event="cluster_presence_overrun",
                )
                behind = True
            else:
                self.stats["inbox_overrun"] += 1
                log.warn(
                    "this node's inbox was trimmed before it was read: messages were lost",
                    esf_event="cluster_inbox_overrun",
                )
                ms, seq = first_at
                before = (ms, seq - 1) if seq else (ms - 1, 2**64 - 1)
                self._inbox_pos, self._inbox_at = b"%d-%d" % before, before
        return behind

    async def _janitor(self) -> None:
        """
        One node at a time (a lock that expires before the next round)
        releases the devices of nodes whose lease has expired.
        """
        lock_ms = max(1, int(self.lease / 3 * 900))
        got = await self.link.execute("SET", self._k_janitor, self.node_id, "NX", "PX", lock_ms)
        if not got:
            return
        for raw in await self.link.execute("SMEMBERS", self._k_nodes) or ():
            node = raw.decode("utf-8")
            if node == self.node_id:
                continue
            count = await self._reap(node, force=False)
            if count >= 0:
                log.warn(
                    "node {node}'s lease expired: released its {count} devices",
                    node=node,
                    count=count,
                    esf_event="cluster_node_reaped",
                )

    def _reap(self, node: str, force: bool) -> Deferred[int]:
        """
        Release C{node}'s devices and delete its inbox (if its lease expired,
        or C{force}): how many devices, or -1 (its lease is alive).  The
        senders of the requests its inbox held unread are told
        (L{_unread_lost}).
        """

        def reaped(reply: list[Any]) -> int:
            count = int(reply[0])
            if count >= 0:
                self._unread_lost(entry[1] for entry in reply[1])
            return count

        return self.link.eval(
            _REAP,
            [
                f"{self._base}lease:{node}",
                f"{self._base}n:{node}",
                self._k_online,
                self._k_stream,
                self._k_nodes,
                self._inbox_key(node),
                ledger_key(self._base, node),
            ],
            [node, self.presence_maxlen, self._base, "1" if force else "0", _REAP_UNREAD],
        ).addCallback(reaped)

    def _unread_lost(self, entries: Iterable[Sequence[bytes]]) -> None:
        """
        A reaped node's inbox held C{entries} (their fields) unread: answer
        each request among them C{Error(UserOffline)}, at its sender's node
        (this one's sessions at once, others' through a L{_FAILED} record).
        """
        if self.wire is None:
            return
        decoder = FrameDecoder(self.wire)
        for flat in entries:
            for kind, _, _, _, data in _records(_fields(flat)[b"m"]):
                if kind != _SEND:
                    continue
                (frame,) = decoder.feed(data)
                if not frame.message_id or frame.message_type in ANSWERS:
                    continue
                sender = self.get(frame.user_id, frame.client_type)
                if sender is None:
                    continue
                self.stats["inbox_reaped"] += 1
                if isinstance(sender, RemoteHandle):
                    self._post_record(sender.node, _FAILED, sender.session_id, 0, 0, data)
                elif hasattr(sender, "error"):
                    sender.error(frame, ErrorCode.USER_OFFLINE, f"{frame.dest_user_id} {_REAPED}")

    # -- IPresence: changes -------------------------------------------------------------

    def _claim_script(
        self, handle: IDeviceHandle, mode: str
    ) -> Deferred[tuple[bool, bytes | None, bytes | None]]:
        holder = _Holder.of(handle, self._logon_at.get(handle.session_id))
        d = self.link.eval(
            _CLAIM,
            [self._user_key(handle.user_id), self._k_online, self._k_stream],
            [
                handle.user_id,
                int(handle.client_type),
                holder.encode(),
                mode,
                self.presence_maxlen,
                self._base,
                holder.session_id,
                holder.node,
                repr(holder.logon_time),
                self.takeover_limit if mode == "replace" else 0,
                max(1, int(self.takeover_window * 1000)),
                max(1, int(self.takeover_cooldown * 1000)),
            ],
        )

        def answered(reply: list[Any]) -> tuple[bool, bytes | None, bytes | None]:
            won, old, stream_id = reply
            if int(won) == 2:
                raise TakeoverRefused(
                    f"{handle.user_id} took this device over more than {self.takeover_limit} "
                    f"times within {self.takeover_window:g} s across the cluster; try again in "
                    f"{int(stream_id) / 1000:.0f} s"
                )
            won = bool(int(won))
            if won and stream_id is not None:
                if self._apply_ahead(handle.user_id, int(handle.client_type), stream_id):
                    self._set(handle.user_id, int(handle.client_type), handle, from_stream=False)
            return won, old, stream_id

        return d.addCallback(answered)

    def _release_script(self, user_id: str, kind: int, sid: str) -> Deferred[bool]:
        d = self.link.eval(
            _RELEASE,
            [self._user_key(user_id), self._k_online, self._k_stream],
            [user_id, kind, sid, self.presence_maxlen, self._base],
        )

        def answered(reply: list[Any]) -> bool:
            removed, last, stream_id = reply
            if int(removed) and stream_id is not None:
                self._apply_ahead(user_id, kind, stream_id)
            return bool(int(removed)) and bool(int(last))

        return d.addCallback(answered)

    def _apply_ahead(self, user_id: str, kind: int, stream_id: bytes) -> bool:
        """
        A script's answer carries a change the stream will bring later: note
        it, so that the stream does not undo a later one; C{False} when the
        stream has brought it (and maybe later ones) already.
        """
        at = _stream_id(stream_id)
        if at <= self._presence_at:
            return False
        self._ahead[(user_id, kind)] = at
        return True

    def claim(self, handle: IDeviceHandle, replace: bool) -> Deferred[Claim]:
        sid = handle.session_id
        if not self.up:
            return succeed(self._claim_alone(handle, replace))
        self._hold(handle, replace)
        d = self._claim_script(handle, "replace" if replace else "keep")
        self._track(d)

        def answered(result: tuple[bool, bytes | None, bytes | None]) -> Claim:
            won, old, _ = result
            previous = None
            if old is not None:
                holder = _Holder.parse(old)
                if holder.session_id != sid:
                    # (None for a session of this node's that is released.)
                    previous = self._handle_for(handle.user_id, int(handle.client_type), holder)
                    if previous is None and not won:
                        previous = RemoteHandle(
                            handle.user_id, int(handle.client_type), holder, self._post
                        )
            if not won:
                self._let_go(sid)
            return Claim(won, previous)

        def failed(failure: Failure) -> Failure:
            if failure.check(TakeoverRefused):
                self._let_go(sid)  # refused: nothing was claimed
                return failure
            # The outcome is unknown: release it (fenced) once Redis answers.
            if self._let_go(sid) is not None:
                self._stale[sid] = (handle.user_id, int(handle.client_type))
            return failure

        return d.addCallbacks(answered, failed)

    def _claim_alone(self, handle: IDeviceHandle, replace: bool) -> Claim:
        previous = None
        for h in self._users.get(handle.user_id, ()):
            if h.client_type == handle.client_type and h.node == self.node_id:
                previous = h
        if previous is not None and not replace:
            return Claim(False, previous)
        self._hold(handle, replace)
        self._unconfirmed.add(handle.session_id)
        self._set(handle.user_id, int(handle.client_type), handle, from_stream=False)
        return Claim(True, previous)

    def release(self, handle: IDeviceHandle) -> Deferred[bool]:
        sid = handle.session_id
        user_id, kind = handle.user_id, int(handle.client_type)
        self._let_go(sid)
        if not self.up:
            if sid in self._unconfirmed:
                self._unconfirmed.discard(sid)
            else:
                self._stale[sid] = (user_id, kind)
            self._unset(user_id, kind, sid, from_stream=False)
            return succeed(not self.devices(user_id))
        d = self._release_script(user_id, kind, sid)
        self._track(d)

        def answered(last: bool) -> bool:
            self._unset(user_id, kind, sid, from_stream=False)
            return last

        def failed(failure: Failure) -> bool:
            self._stale[sid] = (user_id, kind)
            self._unset(user_id, kind, sid, from_stream=False)
            return not self.devices(user_id)

        return d.addCallbacks(answered, failed)

    def _hold(self, handle: IDeviceHandle, replace: bool) -> None:
        """
        Count C{handle} among this node's sessions, with the relogon mode
        it is claimed with.
        """
        sid = handle.session_id
        self._local[sid] = handle
        # A session gets its UserData only once its claim is won: its logon
        # time is the claim's.
        data = handle.user_data
        self._logon_at[sid] = data.logon_time if data is not None else self.clock.seconds()
        if not replace:
            self._ignore_new.add(sid)

    def _let_go(self, sid: str) -> IDeviceHandle | None:
        """
        Count session C{sid} no more among this node's; the handle, or
        C{None} when it was not.
        """
        self._ignore_new.discard(sid)
        self._logon_at.pop(sid, None)
        return self._local.pop(sid, None)

    def _track(self, d: Deferred[Any]) -> None:
        self._inflight.add(d)

        def done(result: Any) -> Any:
            self._inflight.discard(d)
            return result

        d.addBoth(done)

    # -- the mirror ---------------------------------------------------------------------

    def _set(self, user_id: str, kind: int, handle: IDeviceHandle, from_stream: bool) -> None:
        devices = self._users.get(user_id, ())
        replaced = None
        for h in devices:
            if h.client_type == kind:
                if h.session_id == handle.session_id:
                    return
                replaced = h
                break
        if replaced is not None:
            devices = tuple(h for h in devices if h is not replaced)
            if from_stream and replaced.session_id in self._local:
                # One of this node's sessions was replaced elsewhere; the
                # claimant tells it so through the inbox.  Should that word
                # be lost, end it anyway after a grace period.
                self.clock.callLater(self.push_out_grace, self._end_replaced, replaced)
        elif not devices:
            self._sorted.add(user_id)
        self._users[user_id] = devices + (handle,)

    def _end_replaced(self, handle: IDeviceHandle) -> None:
        if handle.session_id in self._local and not self._holds(handle):
            self.stats["pushed_out_without_notice"] += 1
            handle.kick(
                DisconnectedType.BEING_PUSHED_OUT,
                f"{handle.user_id} logged on with this device on another node",
            )

    def _unset(self, user_id: str, kind: int, sid: str, from_stream: bool) -> None:
        devices = self._users.get(user_id, ())
        rest = tuple(h for h in devices if not (h.client_type == kind and h.session_id == sid))
        if len(rest) == len(devices):
            return
        if rest:
            self._users[user_id] = rest
        else:
            del self._users[user_id]
            self._sorted.remove(user_id)
        if from_stream and sid in self._local:
            # Released behind this node's back: its lease expired while it
            # was alive (a long pause, say).  Claim it again.
            log.warn(
                "{user_id}/{client_type} was released by the janitor while held here: claiming it again",
                user_id=user_id,
                client_type=kind,
                esf_event="cluster_reclaim",
            )
            self.stats["reclaimed"] += 1
            self._unconfirmed.add(sid)
            handle = self._local[sid]
            self._set(user_id, kind, handle, from_stream=False)
            Deferred.fromCoroutine(self._join())

    def _apply(self, stream_id: bytes, fields: dict[bytes, bytes]) -> None:
        at = _stream_id(stream_id)
        user_id = fields[b"u"].decode("utf-8")
        kind = int(fields[b"c"])
        key = (user_id, kind)
        ahead = self._ahead.get(key)
        if ahead is not None:
            if at < ahead:
                return  # the mirror shows a later change already
            del self._ahead[key]
            if at == ahead:
                return
        value = fields.get(b"v")
        if value is not None:
            holder = _Holder.parse(value)
            handle = self._handle_for(user_id, kind, holder)
            if handle is not None:
                self._set(user_id, kind, handle, from_stream=True)
        else:
            self._unset(user_id, kind, fields[b"d"].decode("utf-8"), from_stream=True)

    # -- the inbox ------------------------------------------------------------------

    def _post(self, handle: RemoteHandle, kind: int, a: int, b: int, data: bytes) -> None:
        # Records for one node gathered during a reactor turn go as one
        # entry; one connection, commands written in call order: what one
        # node sends one device arrives in order.  Past a bound of records
        # Redis has not taken yet (Redis slow or gone), drop rather than
        # queue without end.
        if kind == _QUERY:
            data = _pack(self.node_id, data)  # where the answer goes
        self._post_record(handle.node, kind, handle.session_id, a, b, data)

    def _post_record(self, node: str, kind: int, session_id: str, a: int, b: int, data: bytes) -> None:
        sid = session_id.encode("utf-8")
        record = _RECORD.pack(kind, len(sid), a, b, len(data)) + sid + data
        if self._posts_in_flight >= self.max_posts_in_flight:
            self.stats["remote_send_dropped"] += 1
            log.debug("dropped a message to node {node}: Redis is behind", node=node)
            self._refused(record, _BEHIND)
            return
        outbox = self._outbox.get(node)
        if outbox is None:
            outbox = self._outbox[node] = []
        outbox.append(record)
        self._posts_in_flight += 1
        self._outbox_bytes += len(record)
        if self._outbox_bytes > _OUTBOX_FLUSH_BYTES:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        outboxes, self._outbox, self._outbox_bytes = self._outbox, {}, 0
        for node, records in outboxes.items():
            entry = b"".join(records)
            # Refused by Redis if it runs later than halfway to the call's
            # timeout: a sender told its message failed (below) is right.
            d = self.inbox.append(node, entry, within=self.timeout / 2)
            d.addBoth(self._flushed, node, entry, len(records))

    def _flushed(self, result: Any, node: str, entry: bytes, count: int) -> None:
        self._posts_in_flight -= count
        if isinstance(result, Failure):
            self.stats["remote_send_failed"] += count
            log.debug(
                "{count} messages to node {node} failed: {error}",
                count=count,
                node=node,
                error=result.getErrorMessage(),
            )
            self._refused(entry, _UNANSWERED)
        elif isinstance(result, int):
            self.inbox.refused(node, count, result)
            self._refused(entry, result)

    def _refused(self, entry: bytes, why: int) -> None:
        """
        Tell the senders of an inbox entry that was refused or failed: a
        relayed request's sender gets the error L{_REFUSALS} gives for
        C{why} (C{RateLimited}: the inbox was full, or this node is behind
        Redis; C{UserOffline}: its node left or stopped renewing its lease,
        or Redis did not answer in time), once per request; a one-way
        message is counted as dropped; a query of this node's engine fails
        at once.  Answers and notices are only counted (by the caller).
        """
        code, because = _REFUSALS[why]
        told: set[tuple[str, int, int]] = set()
        for kind, sid, a, _, data in _records(entry):
            if kind == _QUERY:
                body = m.Error(MessageType.REQUEST, code, f"the device {because}").encode()
                self._answered(sid, a, 1, body)
            elif kind == _SEND and self.wire is not None:
                (frame,) = FrameDecoder(self.wire).feed(data)
                sender = self.get(frame.user_id, frame.client_type)
                ident = (frame.user_id, frame.client_type, frame.message_id)
                error = getattr(sender, "error", None)
                if error is None or frame.message_type in ANSWERS or ident in told:
                    continue
                if frame.message_id:
                    told.add(ident)
                error(frame, code, f"{frame.dest_user_id} {because}")

    def _deliver(self, packed: bytes) -> None:
        local = self._local
        for kind, sid, a, b, data in _records(packed):
            if kind == _ANSWER:
                self._answered(sid, a, b, data)
                continue
            handle = local.get(sid)
            if handle is None:
                self.stats["inbox_fenced"] += 1
                continue
            if kind == _SEND:
                # A local session checks answers from other nodes itself.
                getattr(handle, "send_from_node", handle.send)(data)
            elif kind == _NOTIFY:
                handle.notify(a, data, b)
            elif kind == _KICK:
                handle.kick(DisconnectedType(a), data.decode("utf-8"))
            elif kind == _PUSH_OUT:
                new_address, cause = (t.decode("utf-8") for t in _unpack(data, 2))
                handle.push_out(new_address, cause)
            elif kind == _QUERY:
                self._ask(handle, a, b, *_unpack(data, 2))
            elif kind == _FAILED:
                (frame,) = FrameDecoder(self.wire).feed(data) if self.wire else (None,)
                error = getattr(handle, "error", None)
                if frame is not None and error is not None:
                    error(frame, ErrorCode.USER_OFFLINE, f"{frame.dest_user_id} {_REAPED}")
            elif kind == _KICK_OUT:
                operator, reason, text = (t.decode("utf-8") for t in _unpack(data, 3))
                handle.kick_out(operator, reason, text)
            self.stats["inbox_delivered"] += 1

    # -- queries between nodes -----------------------------------------------------
    #
    # An engine's query to a device of another node goes to that node's
    # inbox (RemoteHandle.ask).  The holder's node sends its session the
    # Request under a MessageID of its own engine's (so that it never
    # collides with that engine's own queries), remembers for the query's
    # timeout who asked, and when the session answers that MessageID
    # (forward_answer, which the engine's services call for an answer its
    # own table does not expect) sends the answer back to the asking node,
    # whose table takes it as the answer of the RemoteHandle it asked.

    def _ask(
        self, handle: IDeviceHandle, their_id: int, seconds: float, asker: bytes, body: bytes
    ) -> None:
        if self.pending is None or self.wire is None:
            self.stats["queries_dropped"] += 1  # not attached to an engine
            return
        now = self.clock.seconds()
        forwarded = self._forwarded
        while forwarded:
            key, (_, _, deadline) = next(iter(forwarded.items()))
            if deadline > now and len(forwarded) < self.max_forwarded:
                break
            del forwarded[key]
            if deadline > now:
                self.stats["queries_forgotten"] += 1
        local_id = self.pending.next_id()
        seconds = min(seconds or self.query_timeout, _MAX_QUERY_SECONDS)
        forwarded[(handle.session_id, local_id)] = (asker.decode("utf-8"), their_id, now + seconds)
        handle.send(
            encode_frame(
                self.wire,
                MessageType.REQUEST,
                body,
                message_id=local_id,
                user_id=SERVER_ID,
                dest_user_id=handle.user_id,
            )
        )

    def forward_answer(self, session: Any, frame: Any) -> bool:
        """
        C{session} (this node's) answered the server's MessageID
        C{frame.message_id} with a Response or an Error that this node's
        engine does not wait for: if another node asked it, send the answer
        there and say C{True}.
        """
        entry = self._forwarded.pop((session.session_id, frame.message_id), None)
        if entry is None:
            return False
        asker, their_id, deadline = entry
        if deadline <= self.clock.seconds():
            return False  # timed out at the asker already
        error = int(frame.message_type == MessageType.ERROR)
        self._post_record(asker, _ANSWER, session.session_id, their_id, error, bytes(frame.body))
        return True

    def _answered(self, sid: str, message_id: int, error: int, body: bytes) -> None:
        pending = self.pending
        asked = pending.asked(message_id) if pending is not None else None
        if asked is None or getattr(asked, "session_id", None) != sid:
            self.stats["answers_dropped"] += 1  # timed out, or not ours
            return
        assert pending is not None  # it knew whom it asked
        result: Any
        try:
            if error:
                decoded = m.Error.decode(body)
                result = m.RequestError(decoded.code, decoded.text)
            else:
                result = m.Information.decode(body).payload
        except m.BadRequest as e:
            result = m.RequestError(ErrorCode.BAD_REQUEST, f"malformed answer: {e}")
        pending.answer(message_id, asked, result)

    async def _read_loop(self) -> None:
        while self._running:
            if not (self.up and self.reader.connected):
                await self._wait_change()
                continue
            generation = self._generation
            try:
                reply = await self.reader.execute(
                    "XREAD",
                    "COUNT",
                    self.read_count,
                    "BLOCK",
                    int(self.block * 1000),
                    "STREAMS",
                    self._k_stream,
                    self._k_inbox,
                    self._presence_pos,
                    self._inbox_pos,
                    timeout=self.block + self.timeout,
                )
            except RedisUnavailable:
                if self._running and self.reader.connected:
                    await deferLater(self.reactor, 0.05, lambda: None)
                continue
            except CancelledError:
                continue
            except Exception:
                log.failure("reading the cluster's streams failed")
                await deferLater(self.reactor, 1.0, lambda: None)
                continue
            if reply:
                self._process(reply, generation)

    def _process(self, reply: list[Any], generation: int) -> None:
        streams = {key: entries for key, entries in reply}
        entries = streams.get(self._b_stream)
        if entries and generation == self._generation and self.up:
            for stream_id, flat in entries:
                at = _stream_id(stream_id)
                if at <= self._presence_at:
                    continue
                self._presence_pos, self._presence_at = stream_id, at
                try:
                    self._apply(stream_id, _fields(flat))
                except Exception:
                    log.failure("a bad presence record {id}", id=stream_id)
        inbox = streams.get(self._b_inbox)
        if not inbox:
            return
        batch = self.delivery_batch
        outermost = batch is not None and batch.begin()
        read: list[tuple[bytes, int]] = []
        try:
            for stream_id, flat in inbox:
                at = _stream_id(stream_id)
                if at <= self._inbox_at:
                    continue  # delivered already: never twice
                self._inbox_pos, self._inbox_at = stream_id, at
                packed = _fields(flat)[b"m"]
                read.append((stream_id, len(packed)))
                try:
                    self._deliver(packed)
                except Exception:
                    log.failure("delivering inbox record {id} failed", id=stream_id)
        finally:
            if outermost:
                assert batch is not None  # it began the batch
                batch.flush()
            self.inbox.delivered(read)  # what was delivered leaves Redis

    # -- IPresence: reads -------------------------------------------------------------

    def get(self, user_id: str, client_type: int) -> IDeviceHandle | None:
        up = self.up
        for handle in self._users.get(user_id, ()):
            if handle.client_type == client_type and (up or handle.node == self.node_id):
                return handle
        return None

    def devices(self, user_id: str) -> Sequence[IDeviceHandle]:
        if self.up:
            return self._users.get(user_id, ())
        node = self.node_id
        return tuple(h for h in self._users.get(user_id, ()) if h.node == node)

    def user_count(self) -> int:
        if self.up:
            return len(self._users)
        return len({h.user_id for h in self._local.values() if self._holds(h)})

    def user_ids(self, offset: int = 0, limit: int | None = None) -> list[str]:
        stop = None if limit is None else offset + limit
        if self.up:
            return list(self._sorted.islice(offset, stop))
        # Alone: only this node's users, sorted here (outages only).
        local = sorted({h.user_id for h in self._local.values() if self._holds(h)})
        return local[offset:stop]


class ClusterService(Service):
    """
    Runs a L{ClusterPresence}: joins the cluster when started, leaves it
    when stopped.  Put it before the engine's service in their parent, so
    that it stops after the engine has ended its sessions.
    """

    def __init__(self, presence: ClusterPresence):
        self.presence = presence

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service has no annotations
        self.presence.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self.presence.stop())
