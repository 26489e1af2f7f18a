"""
The reader of the cluster's two streams: the presence stream (into the
mirror) and this node's inbox (to its sessions), with one blocking XREAD
on a connection of its own.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ._delivery import Delivery
from ._inbox import InboxLedger
from ._link import IRedisLink, RedisUnavailable
from ._membership import Membership
from ._mirror import PresenceMirror
from ._records import Keys, fields, stream_id

__all__ = ["StreamReader"]

log = Logger(namespace="esf.cluster")


class StreamReader:
    """
    Reads the presence stream and this node's inbox while the node is in
    the cluster.

    @param block: seconds one blocking read waits.
    @param count: most stream entries read at once.
    @param timeout: seconds any Redis call may take (besides C{block}).
    @param stats: counts C{inbox_overrun}.
    """

    def __init__(
        self,
        reactor: Any,
        link: IRedisLink,
        keys: Keys,
        node_id: str,
        *,
        membership: Membership,
        mirror: PresenceMirror,
        delivery: Delivery,
        ledger: InboxLedger,
        block: float,
        count: int,
        timeout: float,
        stats: collections.Counter[str],
    ):
        self.reactor = reactor
        self.link = link
        self.membership = membership
        self.mirror = mirror
        self.delivery = delivery
        self.ledger = ledger
        self.block = block
        self.count = count
        self.timeout = timeout
        self.stats = stats
        self._k_stream = keys.stream
        self._k_inbox = keys.inbox(node_id)
        self._b_stream = self._k_stream.encode()
        self._b_inbox = self._k_inbox.encode()
        self.inbox_pos = b"0-0"
        self.inbox_at = (0, 0)

    def restart_inbox(self, before: tuple[int, int] = (0, 0)) -> None:
        """
        Read the inbox from the first entry after C{before} on.
        """
        self.inbox_pos, self.inbox_at = b"%d-%d" % before, before

    async def resume_inbox(self, link: IRedisLink) -> None:
        """
        After Redis lost data, read the inbox on from this node's position,
        or from the last ID Redis (asked through C{link}) has given an entry
        of it, if that is older: the entries past it were lost.  What Redis
        kept up to there was read already (a promoted replica's stream is a
        prefix of what the old master's was; a restarted Redis's, of what it
        had), and what is appended from now on comes after it.
        """
        last = (0, 0)
        try:
            info = fields(await link.execute("XINFO", "STREAM", self._k_inbox))
        except RedisUnavailable:
            raise
        except Exception:
            pass  # no such stream: lost with the rest
        else:
            last = stream_id(info[b"last-generated-id"])
        self.restart_inbox(min(last, self.inbox_at))

    async def fell_behind(self, link: IRedisLink) -> bool:
        """
        Whether the presence stream was trimmed past what this node has read
        (it fell more than the stream's bound behind): then its mirror
        missed changes and must be reloaded.  (Redis 7 counts the entries
        ever added; older ones do not, and this answers no.)  Asks through
        C{link}, not the blocking read's.  (The inbox is never trimmed: what
        else removes its entries, the ledger's look finds,
        L{InboxLedger.look}.)
        """
        try:
            info = fields(await link.execute("XINFO", "STREAM", self._k_stream))
        except RedisUnavailable:
            raise
        except Exception:
            return False  # no such stream yet
        added, length, first = (
            info.get(b"entries-added"),
            info.get(b"length"),
            info.get(b"first-entry"),
        )
        if added is None or length is None or not first or int(added) <= int(length):
            return False  # nothing was ever trimmed
        if stream_id(first[0]) <= self.mirror.at:
            return False
        log.warn(
            "this node fell behind the presence stream: reloading its mirror",
            esf_event="cluster_presence_overrun",
        )
        return True

    async def run(self) -> None:
        """
        Read while the membership runs.
        """
        membership = self.membership
        while membership.running:
            if not (membership.up and self.link.connected):
                await membership.wait_change()
                continue
            if self.link.server != membership.server:
                # This connection reached another Redis server than the one
                # the node joined on (one of them stayed on a demoted
                # master, or they reconnected at two moments of a
                # failover): drop both, to read and write on the master
                # the Sentinels name now.
                log.warn(
                    "the inbox's connection is on another Redis server than the node's: "
                    "connecting both again",
                    esf_event="cluster_links_apart",
                )
                self.link.drop()
                membership.link.drop()
                await membership.wait_change()
                continue
            generation = membership.generation
            # What the last read delivered leaves the inbox before this
            # read is answered (one round trip for both).
            self.ledger.drop(self.link)
            answered = False
            try:
                reply = await self.link.execute(
                    "XREAD",
                    "COUNT",
                    self.count,
                    "BLOCK",
                    int(self.block * 1000),
                    "STREAMS",
                    self._k_stream,
                    self._k_inbox,
                    self.mirror.position,
                    self.inbox_pos,
                    timeout=self.block + self.timeout,
                )
                answered = True
            except RedisUnavailable:
                if membership.running and self.link.connected:
                    await deferLater(self.reactor, 0.05, lambda: None)
                continue
            except CancelledError:
                continue
            except Exception:
                log.failure("reading the cluster's streams failed")
                await deferLater(self.reactor, 1.0, lambda: None)
                continue
            finally:
                self.ledger.read_ended(answered)
            if not reply:
                continue
            deliver, taken = True, False
            unread = () if membership.hold.sure() else self._unread(reply)
            if unread:
                # Read while this node's lease may have run out (it was
                # paused, or stalled): the janitor may have reaped it and
                # answered these entries' senders.  Deliver them only if
                # they are still there, taking them at once.
                sent_at = self.reactor.seconds()
                try:
                    taken = deliver = await self.ledger.take(
                        self.link, unread, membership.lease, membership.hold.token
                    )
                except RedisUnavailable:
                    continue  # read them again, if they are still there
                except Exception:
                    log.failure("taking inbox entries failed")
                    await deferLater(self.reactor, 1.0, lambda: None)
                    continue
                if taken:
                    membership.hold.renewed(sent_at)
                else:
                    self.stats["inbox_reaped_unread"] += len(unread)
            self.process(reply, generation, deliver=deliver, taken=taken)

    def _unread(self, reply: list[Any]) -> list[tuple[bytes, int]]:
        """
        The inbox entries of C{reply} this node has not handled yet (stream
        ID, payload size).
        """
        inbox = dict(reply).get(self._b_inbox) or ()
        return [
            (raw_id, len(fields(flat)[b"m"]))
            for raw_id, flat in inbox
            if stream_id(raw_id) > self.inbox_at
        ]

    def process(
        self, reply: list[Any], generation: int, *, deliver: bool = True, taken: bool = False
    ) -> None:
        """
        Apply one XREAD C{reply}, read under the membership's C{generation}
        (the presence entries of an older one are stale: the mirror was
        reloaded since).  Its inbox entries are delivered, or skipped when
        not C{deliver} (the janitor took them); when C{taken} they have left
        Redis already, else they are deleted by the next drop.
        """
        streams = dict(reply)
        entries = streams.get(self._b_stream)
        membership = self.membership
        if entries and generation == membership.generation and membership.up:
            self.mirror.apply(entries)
        inbox = streams.get(self._b_inbox)
        if not inbox:
            return
        if not deliver:
            for raw_id, _ in inbox:
                at = stream_id(raw_id)
                if at > self.inbox_at:
                    self.inbox_pos, self.inbox_at = raw_id, at
            return
        batch = self.delivery.batch
        outermost = batch is not None and batch.begin()
        read: list[tuple[bytes, int]] = []
        try:
            for raw_id, flat in inbox:
                at = stream_id(raw_id)
                if at <= self.inbox_at:
                    continue  # delivered already: never twice
                self.inbox_pos, self.inbox_at = raw_id, at
                entry = fields(flat)
                packed = entry[b"m"]
                read.append((raw_id, len(packed)))
                try:
                    self.delivery.deliver(packed, self.ledger.late(entry.get(b"t")))
                except Exception:
                    log.failure("delivering inbox record {id} failed", id=raw_id)
        finally:
            if outermost:
                assert batch is not None  # it began the batch
                batch.flush()
            if not taken:
                self.ledger.delivered(read)  # deleted by the next drop
