"""
A cluster: several esf nodes act as one server, sharing presence and
routing through one Redis.  L{ClusterPresence} is the IPresence the nodes
share; it wires the parts, each with one job::

    _link        the Redis link: its URL, one connection kept up with every
                 call bounded (RedisLink), the Lua scripts (lua/*.lua)
    _sentinel    finding the master through Sentinel at each connection
    _records     Redis's key names, presence values, inbox records
    _mirror      the presence mirror: who is online, from the presence
                 stream (pure: no Redis, no reactor)
    _claims      this node's claims, and deciding them alone while Redis is
                 away; claiming again after an outage
    _membership  joining, the epoch, the lease, the janitor and reaping
    _reader      reading the presence stream and this node's inbox
    _messaging   RemoteHandle and the outbox: records for other nodes
    _delivery    delivering the records of this node's inbox
    _queries     the engine's queries to another node's sessions
    _inbox       the inboxes' bounds, and their emptying

Every change of presence is one Lua script (claim, release, reap) that
changes the hash and the indexes and appends the change to the presence
stream atomically; each node applies the stream to its mirror, so reads
(and the relay's lookups) never wait for Redis.  docs/cluster.md explains
the design and its guarantees.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from esf.interfaces import IDeviceHandle, IPresence
from esf.server._config import default_node_id
from esf.server._policy import HolderUnconfirmed
from esf.server._presence import Claim

from ._claims import Claims
from ._delivery import Delivery, LocalSessions, _Batch
from ._inbox import DEFAULT_INBOX_BYTES, DEFAULT_INBOX_ENTRIES, InboxLedger
from ._link import IRedisLink, RedisLink, RedisUnavailable, RedisURL
from ._membership import Membership
from ._messaging import Outbox, RemoteHandle
from ._mirror import PresenceMirror, Released, Replaced, Report
from ._probes import Probes
from ._queries import Queries
from ._reader import StreamReader
from ._records import Holder, Keys, Record, check_node_id

if TYPE_CHECKING:
    from esf.server._engine import ServerEngine
    from esf.server._presence import UserManager

__all__ = [
    "RedisURL",
    "RedisUnavailable",
    "IRedisLink",
    "RedisLink",
    "RemoteHandle",
    "ClusterPresence",
    "ClusterService",
    "check_node_id",
    "default_node_id",
    "DEFAULT_LEASE",
]

log = Logger(namespace="esf.cluster")

#: Seconds a node's lease lasts; it is refreshed every third of it, and the
#: janitor runs as often, so a dead node's devices are released within
#: about 4/3 of it (20 s).
DEFAULT_LEASE = 15.0


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
    @param presence_maxlen: about how many changes the presence stream keeps.
    @param read_count: most stream entries read at once.
    @param push_out_grace: seconds after which a session of this node that
        another node's logon replaced is ended, if that node's push-out has
        not arrived.
    @param max_posts_in_flight: most inbox records Redis has not yet taken;
        more are dropped (and counted).
    @param link_factory: makes the two L{IRedisLink}s.

    @ivar up: whether the node is in the cluster (Redis reachable, mirror
        loaded); while it is not, it runs alone.
    @ivar stats: counts of what happened to cross-node traffic, by name
        (each exported as C{esf_cluster_<name>_total}, described in
        C{esf.operations._series.CLUSTER_METRICS}).
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
        self.stats: collections.Counter[str] = collections.Counter()
        keys = Keys(f"{prefix}:")
        self.link: IRedisLink = link_factory(reactor, url, timeout=timeout, name="commands")
        self.reader: IRedisLink = link_factory(reactor, url, timeout=timeout, name="inbox")
        #: The inboxes' bounds, and the deletion of what this node read.
        self.inbox = InboxLedger(
            reactor, self.link, keys.base, node_id,
            max_entries=inbox_maxlen, max_bytes=inbox_bytes, stats=self.stats,
        )  # fmt: skip
        self.push_out_grace = push_out_grace
        #: The engine's user manager (set by L{attach}).
        self.user_manager: UserManager | None = None
        #: This node's sessions given to claim and not yet released.
        local = LocalSessions()
        self.mirror = PresenceMirror(self.node_id, local, self._remote, self._report)
        self.claims = Claims(
            self.link, keys, self.mirror, local,
            alone=lambda: not (self.membership.up or self.membership.claiming),
            reactor=reactor, clock=self.clock,
            remote=self._remote, presence_maxlen=presence_maxlen, stats=self.stats,
        )  # fmt: skip
        self.queries = Queries(self.clock, post=self._post, stats=self.stats)
        self.outbox = Outbox(
            reactor, self.node_id, self.inbox,
            answered=self.queries.answered, lookup=self.get, stats=self.stats,
            timeout=timeout, max_in_flight=max_posts_in_flight, clock=self.clock,
        )  # fmt: skip
        self.probes = Probes(self.clock, self.node_id, post=self._post, stats=self.stats)
        self.delivery = Delivery(
            local,
            self.queries,
            post=self._post,
            lookup=self.get,
            devices=self.devices,
            probed=self.probes.answered,
            behind=self.outbox.mark_behind,
            clock=self.clock,
            stats=self.stats,
        )
        self.membership = Membership(
            reactor, self.link, keys, self.node_id,
            clock=self.clock, lease=lease, ledger=self.inbox, mirror=self.mirror,
            claims=self.claims, unread_lost=self.delivery.unread_lost,
            presence_maxlen=presence_maxlen, stats=self.stats,
        )  # fmt: skip
        self.streams = StreamReader(
            reactor, self.reader, keys, self.node_id,
            membership=self.membership, mirror=self.mirror, delivery=self.delivery,
            ledger=self.inbox, block=block, count=read_count, timeout=timeout,
            stats=self.stats,
        )  # fmt: skip
        self.membership.streams = self.streams
        self._reading: Deferred[None] | None = None

    @property
    def up(self) -> bool:
        """
        Whether the node is in the cluster (Redis reachable, mirror loaded);
        while it is not, it runs alone.
        """
        return self.membership.up

    @property
    def delivery_batch(self) -> _Batch | None:
        """
        Optional: an object with C{begin() -> bool} and C{flush()} (the
        engine's C{batch}), so that what one read of the inbox delivers is
        written once per session.
        """
        return self.delivery.batch

    @delivery_batch.setter
    def delivery_batch(self, batch: _Batch | None) -> None:
        self.delivery.batch = batch

    @property
    def max_forwarded(self) -> int:
        """
        The most queries from other nodes this node remembers at once.
        """
        return self.queries.max_forwarded

    @max_forwarded.setter
    def max_forwarded(self, value: int) -> None:
        self.queries.max_forwarded = value

    def attach(self, engine: ServerEngine) -> None:
        """
        Work for C{engine} (its constructor calls this): take its
        takeover-guard settings, its user manager (whose push-out and kick
        events this node fires for its own devices), its output batch, its
        wire settings and its outstanding queries (for queries between
        nodes).
        """
        config = engine.config
        claims, queries = self.claims, self.queries
        scripts = claims.scripts
        scripts.takeover_limit = config.takeover_limit
        scripts.takeover_window = config.takeover_window
        scripts.takeover_cooldown = config.takeover_cooldown
        claims.offline = self.delivery.offline = engine.offline
        queries.timeout = config.query_timeout
        queries.wire = self.outbox.wire = self.delivery.wire = config.wire
        queries.pending = engine.pending
        self.user_manager = engine.user_manager
        self.delivery_batch = engine.batch

    # -- the wiring ---------------------------------------------------------------

    def _remote(self, user_id: str, client_type: int, holder: Holder) -> IDeviceHandle:
        return RemoteHandle(user_id, client_type, holder, self._post, self.outbox.hold)

    def _post(self, node: str, record: Record) -> int | None:
        return self.outbox.post(node, record)

    def _report(self, report: Report) -> None:
        """
        What the presence stream did to one of this node's sessions.
        """
        if isinstance(report, Replaced):
            # Replaced elsewhere; the claimant tells it so through the
            # inbox.  Should that word be lost, end it anyway after a grace
            # period.
            self.clock.callLater(self.push_out_grace, self.claims.end_replaced, report.handle)
        elif isinstance(report, Released):
            # Released behind this node's back: claim it again.
            self.claims.reclaim(report.handle)
            Deferred.fromCoroutine(self.membership.join())

    def _link_up(self) -> None:
        log.info("connected to Redis at {url}", url=str(self.url), esf_event="cluster_connected")
        Deferred.fromCoroutine(self.membership.join())

    def _link_down(self) -> None:
        self.membership.alone(f"lost Redis at {self.url}")

    # -- life -------------------------------------------------------------------------

    def start(self) -> None:
        """
        Connect to Redis and join the cluster (in the background: until then
        the node runs alone).
        """
        self.membership.start()
        self.link.start(self._link_up, self._link_down)
        self.reader.start(self.membership.changed, self.membership.changed)
        self._reading = Deferred.fromCoroutine(self.streams.run())

    async def stop(self) -> None:
        """
        Leave the cluster: release what this node still holds, drop its
        lease and inbox, close the connections.
        """
        self.membership.stop()
        self.probes.stop()
        if self.outbox:
            self.outbox.flush()
        if self.claims.inflight:
            await DeferredList(list(self.claims.inflight), consumeErrors=True)
        await self.inbox.settled()
        if self.link.connected:
            try:
                await self.membership.janitor.leave(self.membership.hold.token)
            except Exception as e:
                log.warn("leaving the cluster: {error}", error=e)
        self.membership.up = False
        await DeferredList([self.link.stop(), self.reader.stop()], consumeErrors=True)
        self.outbox.stop()  # what failed with the connections is told now
        if self._reading is not None:
            await DeferredList([self._reading], consumeErrors=True)

    # -- IPresence ----------------------------------------------------------------------

    def claim(self, handle: IDeviceHandle, replace: bool) -> Deferred[Claim]:
        d = self.claims.claim(handle, replace)
        if not replace:
            d.addCallback(self._held_elsewhere)
        return d

    def _held_elsewhere(self, claim: Claim) -> Claim | Deferred[Claim]:
        """
        An C{ignore-new} logon that lost to a holder on another node: that
        node must say it still holds the device (L{Probes}), or the logon is
        refused C{Busy} (L{HolderUnconfirmed}) rather than C{HadLoggedOn}.
        """
        holder = claim.previous
        if claim.won or not isinstance(holder, RemoteHandle):
            return claim

        def told(held: bool | None) -> Claim:
            if held:
                return claim
            raise HolderUnconfirmed(
                f"{holder.user_id} is held by node {holder.node}, which "
                + ("does not answer" if held is None else "is ending that session")
                + "; try again shortly"
            )

        return self.probes.ask(holder).addCallback(told)

    def release(self, handle: IDeviceHandle) -> Deferred[bool]:
        return self.claims.release(handle)

    def get(self, user_id: str, client_type: int) -> IDeviceHandle | None:
        return self.mirror.get(user_id, client_type, alone=not self.membership.up)

    def devices(self, user_id: str) -> Sequence[IDeviceHandle]:
        return self.mirror.devices(user_id, alone=not self.membership.up)

    def user_count(self) -> int:
        return self.mirror.user_count(alone=not self.membership.up)

    def user_ids(self, offset: int = 0, limit: int | None = None) -> list[str]:
        return self.mirror.user_ids(offset, limit, alone=not self.membership.up)

    def kept_offline(self, user_id: str, client_type: int | None) -> None:
        """
        See L{IPresence.kept_offline} and L{InboxLedger.tell_holders}.
        """
        if self.membership.up:
            self.inbox.tell_holders(user_id, client_type)

    def forward_answer(self, session: Any, frame: Any) -> bool:
        """
        C{session} (this node's) answered the server's MessageID
        C{frame.message_id} with a Response or an Error that this node's
        engine does not wait for: if another node asked it, send the answer
        there and say C{True}.
        """
        return self.queries.forward_answer(session, frame)


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
