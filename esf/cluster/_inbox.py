"""
The bounds of the cluster's node inboxes in Redis, and their emptying.

A node's inbox (C{esf:inbox:<node>}, a stream) keeps what other nodes told
its devices only until the node has read it: once an entry is delivered
the node deletes it.  Beside each inbox a hash, its ledger::

    esf:ib:<node>   b: bytes the inbox holds (its entries' payloads)
                    c: entries the inbox holds
                    n, m: the most entries and bytes the node lets it hold
                    r: entries refused since the node last looked

A sender appends through C{lua/append.lua}, which refuses an entry the inbox has no
room for (by the receiving node's own bounds) or whose node has left the
cluster (nobody would ever read it); the receiving node deletes what it read
through C{lua/drop.lua} and, at each upkeep, publishes its bounds and learns how
many entries it was too far behind to take (C{lua/look.lua}).  Every change of the
counts is in the script that changes the stream, so they agree with it: an inbox
holding fewer entries than counted lost them to something else (an operator's
C{XTRIM}), which the look finds.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._link import IRedisLink, RedisUnavailable, script
from ._records import READS_MANY, STORED_RECORD, Keys

__all__ = [
    "InboxLedger",
    "FULL",
    "GONE",
    "STALE",
    "LATE",
    "DEFAULT_INBOX_BYTES",
    "DEFAULT_INBOX_ENTRIES",
]

log = Logger(namespace="esf.cluster")

#: The most bytes (of entries' payloads) a node's inbox holds by default.
DEFAULT_INBOX_BYTES = 64 * 1024 * 1024
#: The most entries a node's inbox holds by default.
DEFAULT_INBOX_ENTRIES = 100_000

#: What L{InboxLedger.append} answers instead of an entry's ID: the inbox is
#: full; its node left the cluster; its node's lease expired (dead or
#: paused, not yet reaped); the append reached Redis after its deadline.
FULL, GONE, STALE, LATE = 1, 0, 2, 3

_APPEND = script("append")
_DROP = script("drop")
_TAKE = script("take")
_LOOK = script("look")
_STORED = script("stored")
_READS_MANY = READS_MANY.encode()


def _untold(failure: Any) -> None:
    log.debug("telling the holders of a device about a stored message failed: {f}", f=failure)


class InboxLedger:
    """
    One node's side of the inbox bounds: appending to other nodes' inboxes
    (refused when full), deleting from its own what it delivered (or is
    about to, L{take}), and
    saying, at most once per upkeep, when inboxes were full.

    @param reactor: the clock of the appends' deadlines.
    @param link: the node's command connection to Redis.
    @param base: the prefix of every Redis key, with its colon.
    @param node_id: this node's ID.
    @param max_entries: the most entries this node's inbox holds.
    @param max_bytes: the most bytes this node's inbox holds (an empty inbox
        takes one entry of any size).
    @param stats: the presence's counts: C{inbox_refused} (records this node
        could not append: the receiving inbox was full), C{inbox_gone}
        (records to a node that left), C{inbox_full} (entries other nodes
        could not append to this node's inbox).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        link: IRedisLink,
        base: str,
        node_id: str,
        *,
        max_entries: int = DEFAULT_INBOX_ENTRIES,
        max_bytes: int = DEFAULT_INBOX_BYTES,
        stats: collections.Counter[str],
    ):
        self.reactor = reactor
        self.link = link
        self.base = base
        self.node_id = node_id
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = stats
        self.keys = keys = Keys(base)
        self._inbox = keys.inbox(node_id)
        self._ledger = keys.ledger(node_id)
        #: Nodes whose full inbox was logged since the last look.
        self._told: set[str] = set()
        #: Entries delivered and not yet deleted: flat (ID, size, ...).
        self._delivered: list[Any] = []
        #: What the last unanswered deletion asked for, until the read sent
        #: after it on its connection ends (L{read_ended}).
        self._unconfirmed: list[Any] = []
        self._dropping: set[Deferred[Any]] = set()
        #: Redis's clock minus this node's, in ms (L{set_redis_time}), if known.
        self._offset_ms: float | None = None
        #: node -> the lease token of its process, when that process reads
        #: records for several sessions at once (C{SendMany} records), as of
        #: the last append to it.
        self.reads_many: dict[str, bytes] = {}

    def set_redis_time(self, redis_ms: float, local: float) -> None:
        """
        Redis's clock read C{redis_ms} (ms) when this node's read C{local}
        (s): appends' deadlines are set on Redis's clock from then on.
        """
        self._offset_ms = redis_ms - local * 1000

    def append(
        self,
        node: str,
        entry: bytes,
        within: float | None = None,
        deliver_within: float | None = None,
        process: bytes = b"",
    ) -> Deferred[Any]:
        """
        Append C{entry} to C{node}'s inbox: its stream ID (L{bytes}), or
        L{FULL}, L{GONE}, L{STALE} or L{LATE} (L{int}) when refused.  Learns
        whether the process that holds C{node}'s lease reads records for
        several sessions at once (L{reads_many}).

        Both bounds hold once Redis's clock is known (L{set_redis_time}).

        @param within: refuse (L{LATE}) the append if Redis runs it more
            than this many seconds from now: an append delayed by a hung
            Redis, whose sender was told it failed, never happens later.
        @param deliver_within: the receiving node delivers the entry's
            requests only within this many seconds from now, and answers
            them otherwise (L{late}): an append that ran just before Redis
            hung, its answer lost, is delivered by then or never, and its
            senders are told so after.
        @param process: the lease token of the process the entry is for
            (its records only that one reads): refused (L{STALE}) if another
            holds C{node}'s lease now.
        """
        deadline = deliver_by = 0
        if self._offset_ms is not None:
            now = self.reactor.seconds() * 1000 + self._offset_ms
            if within is not None:
                deadline = int(now + within * 1000)
            if deliver_within is not None:
                deliver_by = int(now + deliver_within * 1000)
        keys = self.keys
        return self.link.eval(
            _APPEND,
            [keys.inbox(node), keys.ledger(node), keys.nodes, keys.lease(node)],
            [node, entry, self.max_entries, self.max_bytes, deadline, deliver_by, process],
        ).addCallback(self._appended, node)  # fmt: skip

    def tell_holders(self, user_id: str, client_type: int | None) -> Deferred[Any]:
        """
        A message for C{user_id}'s device C{client_type} (C{None}: the
        user's) was just handed to the offline store, this node's view
        listing no such device: post a L{esf.cluster._records.Stored} record
        for each one Redis lists now, on whatever node, so that its node
        looks at the store again (C{lua/stored.lua}).  Sent right after the
        store on the same connection: it runs after the store, and before
        anything this node appends later.  Counts the nodes told
        (C{offline_told}); fires when done, never failing: a failure leaves
        the message in the store for the device's next logon.
        """
        keys = self.keys
        kind = 255 if client_type is None else client_type
        d = self.link.eval(
            _STORED,
            [keys.user(user_id), keys.nodes],
            [keys.base, kind, STORED_RECORD, self.max_entries, self.max_bytes],
        )
        return d.addCallbacks(self._holders_told, _untold)

    def _holders_told(self, told: Any) -> None:
        self.stats["offline_told"] += int(told)

    def _appended(self, result: Any, node: str) -> Any:
        if isinstance(result, list):
            entry_id, holder = result
            if holder.endswith(_READS_MANY):
                self.reads_many[node] = holder
            else:
                self.reads_many.pop(node, None)
            return entry_id
        self.reads_many.pop(node, None)  # (refused: who reads it now is not known)
        return result

    def late(self, deliver_by: bytes | None) -> bool:
        """
        Whether an entry that its sending node wanted delivered by
        C{deliver_by} (its field C{t}, ms on Redis's clock; C{None}: any
        time) comes too late now: its sender may have been told it failed.
        """
        if deliver_by is None or self._offset_ms is None:
            return False
        return bool(self.reactor.seconds() * 1000 + self._offset_ms > int(deliver_by))

    def refused(self, node: str, records: int, why: int) -> None:
        """
        Count C{records} refused by C{node}'s inbox; the first refusal of a
        full inbox since the last look is logged.
        """
        if why != FULL:
            counter = {GONE: "inbox_gone", STALE: "inbox_stale", LATE: "inbox_late"}[why]
            self.stats[counter] += records
            return
        self.stats["inbox_refused"] += records
        if node not in self._told:
            self._told.add(node)
            log.warn(
                "node {node}'s inbox is full (it is behind): messages to its users are "
                "refused, the senders told (logged once per upkeep)",
                node=node,
                esf_event="cluster_inbox_refused",
            )

    def delivered(self, entries: Sequence[tuple[bytes, int]]) -> None:
        """
        This node delivered C{entries} (stream ID, payload size, in order)
        from its inbox: they are deleted by the next L{drop}.
        """
        pending = self._delivered
        for stream_id, size in entries:
            pending += (stream_id, size)

    def drop(self, link: IRedisLink | None = None) -> None:
        """
        Delete from Redis what was L{delivered} since the last drop, through
        C{link} (the node's command connection by default).  The inbox's
        reader drops on its own connection just before each read, unanswered
        (L{IRedisLink.eval_unanswered}), so that what a node delivered
        leaves its inbox before its next read is answered: a janitor that
        reaps the node after that never answers those entries as lost.
        """
        args, self._delivered = self._delivered, []
        if not args:
            return
        keys = [self._inbox, self._ledger]
        if link is not None:
            # The read after it has the reply to wait for: this one has
            # none (a node waiting for one request's answer at a time woke
            # for it: about a tenth of its CPU per request).  One whose
            # read is not answered is asked for again (L{read_ended}); one
            # that Redis refused is made good by the next, which sweeps up
            # older entries too.
            try:
                link.eval_unanswered(_DROP, keys, args)
            except RedisUnavailable:
                self._delivered[:0] = args
            else:
                self._unconfirmed = args
            return
        d = self.link.eval(_DROP, keys, args)
        self._dropping.add(d)

        def done(result: Any) -> None:
            self._dropping.discard(d)
            if not isinstance(result, int):
                # Deleted by the next drop instead (its entries come after).
                self._delivered[:0] = args
                log.debug("deleting read inbox entries failed: {error}", error=result)

        d.addBoth(done)

    def read_ended(self, answered: bool) -> None:
        """
        The read sent after the last unanswered deletion, on the same
        connection, ended: C{answered}, Redis ran the deletion before it;
        else (the connection dropped) the deletion may never have run, and
        is asked for again with the next (deleting twice is harmless).
        """
        if not answered:
            self._delivered[:0] = self._unconfirmed
        self._unconfirmed = []

    def take(
        self, link: IRedisLink, entries: Sequence[tuple[bytes, int]], lease: float, token: str
    ) -> Deferred[Any]:
        """
        Delete C{entries} (stream ID, payload size), read while this node's
        lease may have run out, before they are delivered, and renew the
        lease (for C{lease} seconds, held by this process's C{token}) in the
        same step: fires with C{True} (deliver them) or C{False}: they are
        gone, because the janitor reaped this node meanwhile and answered
        their senders.
        """
        args: list[Any] = [token, int(lease * 1000)]
        for stream_id, size in entries:
            args += (stream_id, size)
        keys = [self._inbox, self._ledger, self.keys.lease(self.node_id)]
        return link.eval(_TAKE, keys, args).addCallback(lambda taken: taken == 1)

    def settled(self) -> Deferred[Any]:
        """
        Delete what was delivered now; fires once the deletions asked for so
        far are done (or failed).
        """
        self.drop()
        return DeferredList(list(self._dropping), consumeErrors=True)

    async def look(self) -> None:
        """
        Publish this node's bounds (senders check them) and learn how many
        entries were refused since the last look: if any, this node fell
        behind; count and log them (once per look).  Learn too whether
        entries left the inbox other than by this node's deletions (esf
        never trims an inbox; an operator may): those it had not read were
        lost; counted and logged.
        """
        self._told.clear()
        refused, held, length, removed = (
            int(x)
            for x in await self.link.eval(
                _LOOK, [self._ledger, self._inbox], [self.max_entries, self.max_bytes]
            )
        )
        if removed:
            self.stats["inbox_overrun"] += 1
            log.warn(
                "{removed} entries were removed from this node's inbox by something else than "
                "esf (an XTRIM?): those it had not read yet were lost",
                removed=removed,
                esf_event="cluster_inbox_overrun",
            )
        if refused:
            self.stats["inbox_full"] += refused
            log.warn(
                "this node fell behind its inbox's bound ({held} bytes in {length} entries; "
                "at most {max_bytes} bytes, {max_entries} entries): other nodes could not "
                "append {refused} entries, their messages were refused",
                held=held,
                length=length,
                max_bytes=self.max_bytes,
                max_entries=self.max_entries,
                refused=refused,
                esf_event="cluster_inbox_full",
            )
