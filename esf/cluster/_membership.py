"""
Membership: this node in the cluster.

L{Membership} joins the cluster when Redis is reached (first, after an
outage, after Redis lost its data: C{lua/epoch.lua}, or when another Redis
server answers: a failover, a restart), keeps this node's
lease (C{lua/tick.lua}, every third of it), notices when this node fell
behind the presence stream, and runs the janitor, which reaps
(C{lua/reap.lua}) the nodes whose lease expired.  While it is not in the
cluster (L{Membership.up} false) the node runs alone.
"""

from __future__ import annotations

import collections
import random
import secrets
import string
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from ._claims import Claims, strays
from ._inbox import InboxLedger
from ._link import IRedisLink, RedisUnavailable, script
from ._mirror import PresenceMirror
from ._records import READS_MANY, Keys, fields

if TYPE_CHECKING:
    from ._reader import StreamReader

__all__ = ["Membership", "Janitor"]

log = Logger(namespace="esf.cluster")

_REAP = script("reap")
_TICK = script("tick")
_EPOCH = script("epoch")

#: Milliseconds a reaped node's unread inbox is kept for its janitor to
#: answer (it deletes them once done; this bounds what one that failed on
#: the way leaves behind).
REAPED_KEPT_MS = 60_000


class NodeIdTaken(RedisUnavailable):
    """
    Another process holds this node's lease: it took the node's ID over.
    """


class LeaseHold:
    """
    This process's hold of its node's lease, C{esf:lease:<node>}, renewed
    every third of it (L{renew}).  The lease's value is the process's own
    random L{token}: a node ID is one process's, and a process that finds
    another's token there waits (L{wait_for_the_id}); one whose lease was
    taken over while it was paused learns it at its next renewal
    (L{NodeIdTaken}).

    @ivar sure_until: until when (the reactor's time) the lease surely
        holds: a sixth of a lease before it runs out, from its last
        renewal's sending (then the node may be reaped).
    """

    def __init__(
        self,
        reactor: Any,
        link: IRedisLink,
        keys: Keys,
        node_id: str,
        lease: float,
        stats: collections.Counter[str],
    ):
        self.reactor = reactor
        self.link = link
        self.keys = keys
        self.node_id = node_id
        self.lease = lease
        self.stats = stats
        # (Its end says what records this process reads, L{READS_MANY}.)
        self.token = secrets.token_hex(8) + READS_MANY
        self.sure_until = 0.0

    async def renew(self) -> tuple[bytes | None, float, float]:
        """
        Renew the lease: the cluster's epoch, and Redis's clock (ms) with
        this node's time (s) when Redis read it (about halfway through the
        round trip).  Raises L{NodeIdTaken} when another process holds it.
        """
        before = self.reactor.seconds()
        reply = await self.link.eval(
            _TICK,
            [self.keys.lease(self.node_id), self.keys.nodes, self.keys.epoch],
            [self.node_id, int(self.lease * 1000), self.token],
        )
        if not isinstance(reply, list):
            raise NodeIdTaken(f"another process holds node {self.node_id}'s lease")
        epoch, (seconds, micros) = reply
        self.renewed(before)
        middle = (before + self.reactor.seconds()) / 2
        return epoch, int(seconds) * 1000 + int(micros) / 1000, middle

    def renewed(self, sent_at: float) -> None:
        """
        A renewal of the lease sent at C{sent_at} (the reactor's time) ran.
        """
        self.sure_until = max(self.sure_until, sent_at + self.lease * 5 / 6)

    def sure(self) -> bool:
        """
        Whether the lease surely holds now, and a little longer: the janitor
        cannot have reaped the node, nor reap it before what it reads now is
        delivered and deleted.
        """
        return bool(self.reactor.seconds() < self.sure_until)

    async def wait_for_the_id(self, running: Callable[[], bool]) -> None:
        """
        Before this process joins, wait while the lease is another
        process's: an earlier one with this node ID that did not leave
        (killed: its lease ends within a lease), or one still running (two
        processes started with one C{--node-id}: it renews the lease, and
        this one never joins while it does).  Meanwhile the node runs
        alone, and says why: a warning at first, an error at every check
        (every third of a lease) that finds the lease renewed.
        """
        key = self.keys.lease(self.node_id)
        mine = self.token.encode()
        ends_before: float | None = None
        while True:
            holder = await self.link.execute("GET", key)
            if holder is None or holder == mine:
                return  # (every join but a duplicate's ends here, at one round trip)
            left_ms = int(await self.link.execute("PTTL", key))
            if left_ms < 0:
                return
            ends = self.reactor.seconds() + left_ms / 1000
            if ends_before is not None and ends > ends_before + self.lease / 10:
                self.taken("another process is in the cluster as {node} and renews its lease")
            elif ends_before is None:
                log.warn(
                    "node {node}'s lease is held by another process (an earlier one that did "
                    "not leave?): joining once it ends, within {left:.1f} s",
                    node=self.node_id,
                    left=left_ms / 1000,
                    esf_event="cluster_node_id_held",
                )
            ends_before = ends
            await deferLater(
                self.reactor, min(self.lease / 3, left_ms / 1000 + 0.01), lambda: None
            )
            if not running():
                raise RedisUnavailable("this node is leaving the cluster")

    def taken(self, what: str) -> None:
        """
        Say that another process holds this node's ID (C{what} happened).
        """
        self.stats["node_id_in_use"] += 1
        log.error(
            what + " (two processes with one --node-id?): this one stays out of the "
            "cluster (it runs alone) until that one's lease ends",
            node=self.node_id,
            esf_event="cluster_node_id_in_use",
        )


class Membership:
    """
    This node's membership of the cluster.

    @param lease: seconds a node's lease lasts; refreshed every third of it.
    @param unread_lost: told a reaped node and its inbox's unread entries (by the L{Janitor}).

    @ivar up: whether the node is in the cluster (Redis reachable, mirror
        loaded); while it is not, it runs alone.
    @ivar claiming: whether a join under way has read the cluster's
        presence: from then on the node's claims and releases go to Redis
        as they come, though it is not up yet (a node that decided them
        alone until it was in, confirming them a round trip at a time,
        never joined while it took one or more per round trip).
    @ivar generation: counts the times the node left or (re)joined: what was
        read from Redis under an older one is stale.
    @ivar streams: the reader of the presence stream and the inbox (set once
        made): its inbox position restarts when the inbox is lost.
    @ivar server: the Redis server (L{IRedisLink.server}) this node last joined on.
    @ivar hold: this process's hold of the node's lease.
    """

    def __init__(
        self,
        reactor: Any,
        link: IRedisLink,
        keys: Keys,
        node_id: str,
        *,
        clock: IReactorTime,
        lease: float,
        ledger: InboxLedger,
        mirror: PresenceMirror,
        claims: Claims,
        unread_lost: Callable[[str, Iterable[Sequence[bytes]]], Deferred[Any]],
        presence_maxlen: int,
        stats: collections.Counter[str],
    ):
        self.reactor = reactor
        self.link = link
        self.keys = keys
        self.node_id = node_id
        self.lease = lease
        self.ledger = ledger
        self.mirror = mirror
        self.claims = claims
        self.stats = stats
        self.janitor = Janitor(
            link, keys, node_id,
            lease=lease, unread_lost=unread_lost, presence_maxlen=presence_maxlen,
        )  # fmt: skip
        self.streams: StreamReader | None = None
        self.up = False
        self.claiming = False
        self.running = False
        self.generation = 0
        self.epoch: bytes | None = None
        self.server: str | None = None
        self.hold = LeaseHold(reactor, link, keys, node_id, lease, stats)
        self._joined_once = False
        self._joining = False
        self._join_again = False
        self._waiters: list[Deferred[None]] = []
        self.clock = clock
        #: When the janitor may run again (L{clock}'s time): a lease after a rejoin.
        self.reap_after = 0.0
        self.ticker = LoopingCall(self._tick)
        self.ticker.clock = clock

    def start(self) -> None:
        self.running = True
        self.ticker.start(self.lease / 3, now=False)

    def stop(self) -> None:
        self.running = False
        if self.ticker.running:
            self.ticker.stop()
        self.changed()

    def changed(self) -> None:
        """
        Wake what waits for a change (L{wait_change}).
        """
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def wait_change(self) -> Deferred[None]:
        """
        Fires at the next change of the links, or of L{up}.
        """
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def alone(self, why: str) -> None:
        """
        Leave the cluster (for now) because of C{why}: run alone.
        """
        if self.up:
            log.warn(
                "{why}: this node goes on alone, other nodes' users read offline",
                why=why,
                esf_event="cluster_disconnected",
            )
        self.up = self.claiming = False
        self.generation += 1
        self.changed()

    # -- joining (first, after an outage, after Redis lost its data) --------------------

    async def join(self) -> None:
        """
        Join the cluster (again), retrying while Redis is reachable.
        """
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
                    self.claiming = False  # alone again until the next join has read
                    if self.running and self.link.connected:
                        log.warn("joining the cluster failed: {error}", error=e)
                        self._join_again = True
                        await deferLater(self.reactor, 0.5, lambda: None)
                if not self._join_again or not self.running or not self.link.connected:
                    break
        finally:
            self._joining = False

    async def _join_once(self) -> None:
        self.up = self.claiming = False
        self.generation += 1
        generation = self.generation
        claims = self.claims
        token = "".join(random.choices(string.ascii_letters + string.digits, k=16))
        server = self.link.server
        # Another server than the one this node joined on: a failover (the
        # replica may have missed the master's last writes, replication
        # being asynchronous) or a restart (which may have lost the last
        # second or all).  Treated as a loss of data, even with the epoch
        # intact.
        moved = self._joined_once and server != self.server
        epoch = await self.link.eval(
            _EPOCH,
            [self.keys.epoch, self.keys.settling],
            [
                token,
                int(self.lease * 1000),
                "1" if self.epoch is not None else "0",
                "1" if moved else "0",
            ],
        )
        lost = self.epoch is not None and epoch != self.epoch
        if lost or moved:
            log.warn(
                "{what}: claiming this node's devices again",
                what=(
                    "Redis lost the cluster's data (a restart without persistence?)"
                    if lost
                    else "another Redis server answers (a failover, or a restart): "
                    "it may have lost the cluster's latest changes"
                ),
                esf_event="cluster_data_lost",
            )
            if self.streams is not None:
                await self.streams.resume_inbox(self.link)
            # Everything this node held must be claimed again.
            claims.unconfirmed.update(claims.local)
        self.epoch = epoch
        # A node ID is one process's: another that holds its lease keeps
        # it until the lease ends.
        await self.hold.wait_for_the_id(lambda: self.running)
        if not self._joined_once:
            # Whatever an earlier process with this ID left is dead.
            if await self.janitor.reap(self.node_id, force=True, holder=self.hold.token) < 0:
                raise NodeIdTaken(f"another process took node {self.node_id}'s lease")
            if self.streams is not None:
                self.streams.restart_inbox()
        else:
            # After an outage, claim again every device this node holds.
            claims.unconfirm_held()
        await self._refresh_lease()
        await self.ledger.look()
        snapshot = None
        while True:
            await claims.release_stale()
            await claims.confirm()
            if snapshot is None:
                # Once: what is claimed or released after it (the logons
                # this node decided alone meanwhile) goes down the presence
                # stream after the snapshot's position, which the mirror
                # reads on from.  (Read again on every pass, one logon per
                # read of every user's hash kept the node out for good.)
                snapshot = await self._snapshot()
                for sid, device in strays(snapshot[1], self.node_id, claims.local).items():
                    claims.stale.setdefault(sid, device)
                self.claiming = True
            if generation != self.generation:
                raise RedisUnavailable("the connection changed while joining")
            if not claims.unconfirmed and not claims.stale:
                break
        self.mirror.load(*snapshot)
        if self._joined_once:
            # Back after an outage (or a failover): the other nodes' leases
            # may have run out meanwhile through no fault of theirs.  Give
            # them a lease to join again before the janitor takes them for
            # dead; reaping a live node would end its users' presence and
            # answer as lost the entries of its inbox it read but whose
            # deletion Redis lost.
            self.reap_after = self.clock.seconds() + self.lease
        self._joined_once = True
        self.server = server
        self.up, self.claiming = True, False
        log.info(
            "in the cluster as {node}: {users} users online, {local} devices here",
            node=self.node_id,
            users=len(self.mirror.users),
            local=len(claims.local),
            esf_event="cluster_joined",
        )
        self.changed()

    async def _refresh_lease(self) -> bytes | None:
        if not self.ticker.running:  # left (a join under way): the lease must not come back
            raise RedisUnavailable("this node is leaving the cluster")
        epoch, redis_ms, local = await self.hold.renew()
        self.ledger.set_redis_time(redis_ms, local)  # for the appends' deadlines
        return epoch

    async def _snapshot(self) -> tuple[bytes, dict[str, dict[bytes, bytes]]]:
        """
        The stream's last ID, then every user's hash.  Changes made between
        the two are in the stream after that ID too; applying them again is
        harmless (a set sets, a release is fenced by session ID).
        """
        last = await self.link.execute("XREVRANGE", self.keys.stream, "+", "-", "COUNT", 1)
        position = last[0][0] if last else b"0-0"
        users = await self.link.execute("SMEMBERS", self.keys.online)
        hashes: dict[str, dict[bytes, bytes]] = {}
        names = [u.decode("utf-8") for u in users or ()]
        for start in range(0, len(names), 1000):
            chunk = names[start : start + 1000]
            replies = await DeferredList(
                [self.link.execute("HGETALL", self.keys.user(u)) for u in chunk],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
            for user_id, (_, flat) in zip(chunk, replies):
                if flat:
                    hashes[user_id] = fields(flat)
        return position, hashes

    # -- leases and the janitor ------------------------------------------------------

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.tick())

    async def tick(self) -> None:
        """
        The upkeep, every third of a lease: renew the lease, release what is
        stale, check the streams, look at the inbox's bounds, the janitor.
        """
        if not (self.up and self.link.connected):
            return
        try:
            try:
                epoch = await self._refresh_lease()
            except NodeIdTaken:
                # Taken over while this node was paused past its lease: what
                # it held was released, its inbox is the other's now.
                self.hold.taken("another process took over node {node}'s ID")
                self.alone("another process holds this node's ID")
                await self.join()
                return
            if epoch != self.epoch:
                # FLUSHALL, or a failover to a replica that lost the epoch.
                self.alone("Redis lost the cluster's data")
                await self.join()
                return
            if self.claims.stale:
                await self.claims.release_stale()
            if self.streams is not None and await self.streams.fell_behind(self.link):
                self.alone("this node fell behind the presence stream")
                await self.join()
                return
            await self.ledger.look()
            if self.clock.seconds() >= self.reap_after:
                await self.janitor.run()
        except Exception as e:
            if self.ticker.running:  # (leaving, the node closes the connections under it)
                log.warn(
                    "cluster upkeep failed: {error}", error=e, esf_event="cluster_tick_failed"
                )


class Janitor:
    """
    Releases the devices of the nodes whose lease expired, and deletes
    their inboxes.

    @param unread_lost: told a reaped node and the unread entries (their
        fields) of its inbox.
    """

    def __init__(
        self,
        link: IRedisLink,
        keys: Keys,
        node_id: str,
        *,
        lease: float,
        unread_lost: Callable[[str, Iterable[Sequence[bytes]]], Deferred[Any]],
        presence_maxlen: int,
    ):
        self.link = link
        self.keys = keys
        self.node_id = node_id
        self.lease = lease
        self.unread_lost = unread_lost
        self.presence_maxlen = presence_maxlen
        #: Entries of a reaped inbox read at a time; the next page is read
        #: once what this one handed to the offline store is done.
        self.page = 100
        self._reaps = 0

    async def run(self) -> None:
        """
        One node at a time (a lock that expires before the next round)
        releases the devices of nodes whose lease has expired.
        """
        lock_ms = max(1, int(self.lease / 3 * 900))
        got = await self.link.execute("SET", self.keys.janitor, self.node_id, "NX", "PX", lock_ms)
        if not got:
            return
        for raw in await self.link.execute("SMEMBERS", self.keys.nodes) or ():
            node = raw.decode("utf-8")
            if node == self.node_id:
                continue
            count = await self.reap(node, force=False)
            if count >= 0:
                log.warn(
                    "node {node}'s lease expired: released its {count} devices",
                    node=node,
                    count=count,
                    esf_event="cluster_node_reaped",
                )

    async def reap(self, node: str, force: bool, holder: str = "") -> int:
        """
        Release C{node}'s devices and delete its inbox (if its lease expired,
        or C{force}): how many devices, or -1 (its lease is alive).  What
        its inbox held unread is handed to C{unread_lost} a page at a time.

        @param holder: the token of the process reaping its own node
            (L{LeaseHold.token}): -1, and nothing done, when another
            process holds the node's lease.
        """
        keys = self.keys
        self._reaps += 1
        moved = keys.reaped(node, self.node_id, self._reaps)
        reply = await self.link.eval(
            _REAP,
            [
                keys.lease(node), keys.index(node), keys.online, keys.stream, keys.nodes,
                keys.inbox(node), keys.ledger(node), moved,
            ],
            [node, self.presence_maxlen, keys.base, "1" if force else "0", REAPED_KEPT_MS, holder],
        )  # fmt: skip
        count = int(reply[0])
        if count >= 0 and int(reply[1]):
            await self._unread(node, moved, int(reply[1]))
        return count

    async def leave(self, holder: str) -> None:
        """
        Reap this node itself as it leaves the cluster (what it still holds
        released, its lease and inbox deleted), unless another process than
        C{holder} holds its ID: then all is left to that one.
        """
        count = await self.reap(self.node_id, force=True, holder=holder)
        log.info(
            "left the cluster; released {count} devices still held"
            if count >= 0
            else "left the cluster; node {node}'s ID is another process's: left to it",
            count=count,
            node=self.node_id,
            esf_event="cluster_left",
        )

    async def _unread(self, node: str, moved: str, unread: int) -> None:
        """
        Hand the C{unread} entries of C{node}'s inbox, moved to the key
        C{moved}, to C{unread_lost}, a page at a time, then delete them.
        """
        start: bytes = b"-"
        done = 0
        try:
            while True:
                page = await self.link.execute("XRANGE", moved, start, "+", "COUNT", self.page)
                if not page:
                    break
                done += len(page)
                await self.unread_lost(node, (entry[1] for entry in page))
                start = b"(" + page[-1][0]
            await self.link.execute("DEL", moved)
        except Exception as e:
            log.warn(
                "{left} of the {unread} entries node {node}'s inbox held unread are lost "
                "unanswered: {error}",
                left=unread - done,
                unread=unread,
                node=node,
                error=e,
                esf_event="cluster_reaped_inbox_lost",
            )
