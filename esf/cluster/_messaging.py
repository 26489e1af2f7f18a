"""
Messaging between nodes: what one node tells the devices another holds::

    RemoteHandle   an IDeviceHandle for a device held by another node: what
                   it is told becomes a record for that node's inbox
    Outbox         gathers the records for each node during a reactor turn
                   and appends them as one inbox entry; tells the senders of
                   what was refused; holds senders back while Redis is
                   behind, and refuses at once what is relayed to a session
                   its node said is backed up

What this node's inbox brings is delivered by L{esf.cluster._delivery}.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable
from weakref import WeakSet

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.interfaces import IDeviceHandle
from esf.server._config import UserData
from esf.server._output import PUSH_BACK, REFUSED
from esf.server._router import ANSWERS
from esf.wire import _messages as m
from esf.wire._decoder import FrameDecoder
from esf.wire._frames import (
    DisconnectedType,
    ErrorCode,
    MessageType,
    as_client_type,
)

from ._inbox import FULL, GONE, LATE, STALE, InboxLedger
from ._link import NotSent
from ._records import (
    MAX_QUERY_SECONDS,
    Holder,
    Kick,
    KickOut,
    Notify,
    PushOut,
    Query,
    Record,
    Send,
    SendMany,
    decode_records,
)

if TYPE_CHECKING:
    from esf.wire._frames import WireConfig


__all__ = [
    "RemoteHandle",
    "Outbox",
    "Post",
    "Lookup",
    "Devices",
    "BEHIND_SECONDS",
    "MAX_BEHIND",
    "Deadlines",
]

log = Logger(namespace="esf.cluster")

#: How a handle posts a record: C{(node, record)}; a relayed frame's
#: status, as L{IDeviceHandle.send} answers it.
Post = Callable[[str, Record], "int | None"]
#: Who holds a device now (the presence's C{get}).
Lookup = Callable[[str, int], "IDeviceHandle | None"]
#: The devices of a user online now (the presence's C{devices}).
Devices = Callable[[str], Sequence["IDeviceHandle"]]

#: The MessageType field of a Broadcast's frame, as on the wire (bytes 2
#: and 3 of its header, little-endian).
_BROADCAST_TYPE = int(MessageType.BROADCAST).to_bytes(2, "little")
#: Flush an outbox early past this many bytes.
_OUTBOX_FLUSH_BYTES = 256 * 1024
#: Bytes of records this node posted that Redis has not taken yet past
#: which the sessions relaying to other nodes are held back (push back, as
#: for a receiver of this node that is backed up), until Redis has taken
#: all but L{_IN_FLIGHT_LOW}: what one sender relays across the cluster does
#: not queue up in Redis ahead of everyone else's.
_IN_FLIGHT_HIGH = 2 * 1024 * 1024
_IN_FLIGHT_LOW = 1024 * 1024
#: Seconds a node refuses at source what its sessions relay to a session of
#: another node that said it is backed up (L{Behind}); that node says it
#: again, while the session refuses, at most every half of it.
BEHIND_SECONDS = 0.5
#: Most marks of backed-up sessions (and of such sessions' senders' nodes
#: told) a node keeps: past it, the ended ones are forgotten.
MAX_BEHIND = 10_000


class Deadlines(dict[Any, float]):
    """
    Keys, each with the time until which it holds, at most C{most} of them:
    to make room, those whose time has passed are forgotten, by one sweep
    at most each time one passes (not one per key added while all hold: a
    sweep walks them all).
    """

    def __init__(self, most: int) -> None:
        super().__init__()
        self.most = most
        #: Before this time no key's time passes: no sweep can make room.
        self._sweep_at = 0.0

    def put(self, key: Any, until: float, now: float) -> bool:
        """
        Hold C{key} until C{until}; C{False} when there is no room for it.
        """
        if len(self) >= self.most and key not in self:
            if now < self._sweep_at:
                return False
            for old in [old for old, at in self.items() if at <= now]:
                del self[old]
            if len(self) >= self.most:
                self._sweep_at = min(self.values())
                return False
        self[key] = until
        return True


#: Why an inbox entry failed (L{esf.cluster._inbox}'s answers, and Redis
#: not answering the append in time) -> what its senders are told.
UNANSWERED, BEHIND, NOT_SENT = -1, -2, -3
_NO_ANSWER = "is not reachable now: the cluster's Redis did not answer in time"
_REFUSALS = {
    BEHIND: (
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
    NOT_SENT: (ErrorCode.USER_OFFLINE, "is not reachable: this node lost the cluster's Redis"),
    # Redis may have taken the append before its answer was lost: the
    # outcome is not known, only that it is settled (Outbox._flushed).
    UNANSWERED: (
        ErrorCode.TIMEOUT,
        "did not confirm in time: the cluster's Redis did not answer; the message was "
        "delivered by now or never will be",
    ),
}


@implementer(IDeviceHandle)
class RemoteHandle:
    """
    A device held by another node.  What it is told is appended to that
    node's inbox, fenced by the device's session ID: the holder's node
    acts on it only if that session still holds the device.
    """

    __slots__ = (
        "user_id",
        "client_type",
        "session_id",
        "node",
        "logon_order",
        "_address",
        "_logon_time",
        "_user_data",
        "_post",
        "_hold",
    )

    def __init__(
        self,
        user_id: str,
        client_type: int,
        holder: Holder,
        post: Post,
        hold: Callable[[Any], None] | None = None,
    ):
        self.user_id = user_id
        self.client_type = client_type
        self.session_id = holder.session_id
        self.node = holder.node
        #: Logon orders are counted per node and mean nothing here; a logon
        #: on this node always comes after a remote one (REPLACE_OLD).
        self.logon_order = 0
        self._address = holder.address
        self._logon_time = holder.logon_time
        self._user_data: UserData | None = None
        self._post = post
        self._hold = hold

    @property
    def user_data(self) -> UserData:
        """
        The device's L{UserData}, made when first asked for (every node
        mirrors every device of the cluster, and most are never asked
        about), then kept: an application's C{tag} on it stays.
        """
        data = self._user_data
        if data is None:
            data = self._user_data = UserData(
                self.user_id, as_client_type(self.client_type), self._address, self._logon_time
            )
        return data

    def __repr__(self) -> str:
        return f"<RemoteHandle {self.user_id}/{self.client_type} {self.session_id}>"

    def send(self, data: bytes) -> int | None:
        # Refused at once (REFUSED) while the holder's node says the session
        # is backed up; PUSH_BACK while Redis is behind (Outbox.post).
        return self._post(self.node, Send(self.session_id, data))

    def push_back(self, sender: Any) -> None:
        """
        C{send} answered L{PUSH_BACK}: hold C{sender} back until Redis has
        taken most of what this node sent it (L{Outbox.hold}).
        """
        if self._hold is not None:
            self._hold(sender)

    def notify(self, message_type: int, body: bytes = b"", client_type: int = 0) -> None:
        self._post(self.node, Notify(self.session_id, int(message_type), body, int(client_type)))

    def kick(self, reason: DisconnectedType, text: str) -> None:
        self._post(self.node, Kick(self.session_id, int(reason), text))

    # Not IDeviceHandle: what the engine does differently for a device of
    # another node, so that the user manager's events fire on the holder's
    # node.

    def push_out(self, new_address: str, cause: str) -> None:
        """
        The device logged on again from C{new_address}: the holder's node
        fires C{device_being_pushed_out}, sends C{BeingPushedOutNotify}
        and ends the session with C{BeingPushedOut}.
        """
        self._post(self.node, PushOut(self.session_id, new_address, cause))

    def kick_out(self, operator: str, reason: str, text: str) -> None:
        """
        C{operator} kicks the device: the holder's node fires
        C{device_kicked_out}, sends C{BeingKickedOutNotify} and ends the
        session with C{BeingKickedOut} (C{text} in its DisconnectNotice).
        """
        self._post(self.node, KickOut(self.session_id, operator, reason, text))

    def ask(self, message_id: int, body: bytes, timeout: float) -> None:
        """
        The engine's query C{message_id} (an Information C{body}): the
        holder's node sends the session a Request and forwards its answer
        back to this node, for at most C{timeout} seconds.
        """
        seconds = min(MAX_QUERY_SECONDS, math.ceil(timeout))
        # The asking node is filled in by the outbox (L{Outbox.post}).
        self._post(self.node, Query(self.session_id, message_id, seconds, "", body))


class _Turn:
    """
    The records posted for other nodes during one reactor turn, to go as
    one inbox entry per node.  The copies of a Broadcast for several
    sessions of a node that reads such records, one after another, are one
    L{SendMany}: the frame once, through Redis and in the inbox, not once
    per member.  Only a Broadcast's: should the node die with the record
    unread, a janitor running an older esf skips it, and a Broadcast's
    copies are never answered nor kept offline anyway; the copies of a Send
    or a request for a user's devices go one each, so that any janitor
    keeps or answers them.

    @param reads_many: node -> its process's token, when it reads
        L{SendMany} records (read when the turn ends).
    """

    def __init__(self, reads_many: dict[str, bytes]):
        self.reads_many = reads_many
        #: About how many bytes the records hold.
        self.size = 0
        #: node -> its records, how many were posted, and their bytes.
        self._records: dict[str, list[bytes]] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._sizes: collections.Counter[str] = collections.Counter()
        #: node -> runs of one frame for several of its sessions: [the
        #: frame, the session IDs, where its record is in _records]; and the
        #: last Broadcast copy for it, with where it is.
        self._fans: dict[str, list[list[Any]]] = {}
        self._last: dict[str, tuple[Send, int]] = {}

    def __bool__(self) -> bool:
        return bool(self._records)

    def add(self, node: str, record: Record, packed: bytes) -> int:
        """
        Add C{record} (C{packed}) to what goes to C{node}; return about how
        many bytes it adds.
        """
        records = self._records.get(node)
        if records is None:
            records = self._records[node] = []
        if (
            type(record) is Send
            and record.frame.startswith(_BROADCAST_TYPE, 2)  # (no slice made)
            and self.reads_many.get(node)
            and self._joined(node, records, record)
        ):
            size = len(record.session_id) + 4
        else:
            records.append(packed)
            size = len(packed)
        self.size += size
        self._counts[node] += 1
        self._sizes[node] += size
        return size

    def _joined(self, node: str, records: list[bytes], record: Send) -> bool:
        """
        Whether the Broadcast copy C{record} joined a run of the same frame
        for C{node}, the record just before it; if not, it may start one.
        """
        last = self._last.get(node)
        if last is None or last[0].frame is not record.frame or last[1] != len(records) - 1:
            self._last[node] = (record, len(records))
            return False
        fans = self._fans.setdefault(node, [])
        if fans and fans[-1][2] == last[1]:
            fans[-1][1].append(record.session_id)
        else:
            fans.append([record.frame, [last[0].session_id, record.session_id], last[1]])
        return True

    def entries(self) -> Iterator[tuple[str, bytes, bytes, int, int]]:
        """
        Each node's entry: C{(node, entry, process, count, size)}, where
        C{process} is the token of the process it is for (an entry holding
        L{SendMany} records), or empty; C{count} and C{size} are what
        L{add} counted for it.
        """
        fans = self._fans
        for node, records in self._records.items():
            # For the process that said it reads them, and only for it (its
            # token checked by the append): a Send each for any other.
            process = self.reads_many.get(node, b"") if node in fans else b""
            for frame, session_ids, at in fans.get(node, ()):
                if process:
                    records[at] = SendMany(tuple(session_ids), frame).encode()
                else:
                    records[at] = b"".join(Send(s, frame).encode() for s in session_ids)
            yield node, b"".join(records), process, self._counts[node], self._sizes[node]


class Outbox:
    """
    This node's posts to other nodes' inboxes.  Records for one node
    gathered during a reactor turn go as one entry; one connection,
    commands written in call order: what one node sends one device arrives
    in order.  Past L{_IN_FLIGHT_HIGH} bytes Redis has not taken yet, the
    sessions that relay to other nodes are held back (L{hold}); past a
    bound of records (Redis slow or gone), it drops rather than queue
    without end.

    @param answered: called C{(session_id, message_id, error, body)} to fail
        a query of this node's engine whose record was refused (the
        queries' L{Queries.answered}).
    @param lookup: who holds a device now, to tell a refused request's
        sender.
    @param timeout: seconds a Redis call may take; an append is refused by
        Redis if it runs later than half of it, its requests are answered
        by the receiving node if read later than three quarters of it, and
        the senders of an append that failed are told no earlier than all
        of it after it was sent.
    @param clock: the clock of the marks of sessions of other nodes that
        are backed up (L{mark_behind}); the reactor by default.
    """

    def __init__(
        self,
        reactor: Any,
        node_id: str,
        ledger: InboxLedger,
        *,
        answered: Callable[[str, int, bool, bytes], None],
        lookup: Lookup,
        stats: collections.Counter[str],
        timeout: float,
        max_in_flight: int,
        clock: Any = None,
    ):
        self.reactor = reactor
        #: The clock of the marks of backed-up sessions (L{mark_behind}).
        self.clock = clock or reactor
        self.node_id = node_id
        self.ledger = ledger
        self.answered = answered
        self.lookup = lookup
        self.stats = stats
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        #: The engine's wire settings (set by the presence's C{attach}).
        self.wire: WireConfig | None = None
        self.in_flight = 0
        #: Bytes of the records in flight.
        self.in_flight_bytes = 0
        #: Sessions held back until Redis catches up (L{hold}).
        self._held: WeakSet[Any] | None = None
        #: node -> its process's token, when it reads records for several
        #: sessions (its ledger's L{InboxLedger.reads_many}).
        self._reads_many: dict[str, bytes] = getattr(ledger, "reads_many", {})
        #: What to send at the end of this reactor turn.
        self._turn = _Turn(self._reads_many)
        self._flush_call: IDelayedCall | None = None
        #: Appends that failed, whose senders are told at their time: a
        #: token -> the timer and the entry.
        self._unanswered: dict[int, tuple[IDelayedCall, bytes]] = {}
        self._tokens = itertools.count()
        #: Sessions of other nodes backed up: session ID -> until when what
        #: is relayed to them is refused here.
        self._behind = Deadlines(MAX_BEHIND)

    def __bool__(self) -> bool:
        return bool(self._turn)

    def post(self, node: str, record: Record) -> int | None:
        """
        Send C{record} to C{node}'s inbox, at the end of this reactor turn;
        or refuse a relayed frame (L{REFUSED}) for a session that its node
        said is backed up (L{mark_behind}), as that node would: what one
        receiver does not read is not carried across the cluster to be
        refused there, and its senders are held back here as on one node
        (L{esf.server._relay.Relay.not_queued}).  A relayed frame sent
        while Redis has more than L{_IN_FLIGHT_HIGH} bytes of this node's
        to take answers L{PUSH_BACK}: its sender is held back (L{hold}).
        """
        if self._behind and type(record) is Send:
            until = self._behind.get(record.session_id)
            if until is not None:
                if until > self.clock.seconds():
                    return REFUSED
                del self._behind[record.session_id]
        if isinstance(record, Query) and not record.asker:
            record = record._replace(asker=self.node_id)  # where the answer goes
        packed = record.encode()
        if self.in_flight >= self.max_in_flight:
            self.stats["remote_send_dropped"] += 1
            log.debug("dropped a message to node {node}: Redis is behind", node=node)
            self._refused(packed, BEHIND)
            return None
        turn = self._turn
        self.in_flight += 1
        self.in_flight_bytes += turn.add(node, record, packed)
        if turn.size > _OUTBOX_FLUSH_BYTES:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)
        if self.in_flight_bytes > _IN_FLIGHT_HIGH and type(record) is Send:
            return PUSH_BACK
        return None

    def hold(self, sender: Any) -> None:
        """
        Hold C{sender} back (it relayed while Redis was behind) until Redis
        has taken all but L{_IN_FLIGHT_LOW} bytes of what this node sent it
        (answered or failed: an append that Redis does not answer fails
        within the call's timeout).
        """
        held = self._held
        if held is None:
            held = self._held = WeakSet()
        if sender in held:
            return
        held.add(sender)
        sender.hold_back()

    def _let_go(self) -> None:
        held, self._held = self._held, None
        for sender in list(held or ()):
            sender.let_go()

    def mark_behind(self, session_id: str, seconds: float) -> None:
        """
        The session C{session_id} of another node is backed up: refuse
        what is relayed to it for C{seconds}.
        """
        now = self.clock.seconds()
        self._behind.put(session_id, now + seconds, now)

    def flush(self) -> None:
        """
        Append what was posted, now: one entry per node.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        turn, self._turn = self._turn, _Turn(self._reads_many)
        sent_at = self.reactor.seconds()
        timeout = self.timeout
        for node, entry, process, count, size in turn.entries():
            self.in_flight_bytes += len(entry) - size  # (what _flushed takes off)
            # An append whose answer never came (Redis hung, or the
            # connection dropped) may have run, or may still run: Redis
            # refuses it past half the call's timeout, and the receiving
            # node answers (rather than delivers) what it reads past three
            # quarters of it.  Its senders are told only once the whole
            # timeout has passed (_flushed): the outcome is settled then,
            # delivered or never.  (The last quarter covers the error in
            # the two nodes' readings of Redis's clock.)
            d = self.ledger.append(
                node, entry, within=timeout / 2, deliver_within=timeout * 3 / 4, process=process
            )
            d.addBoth(self._flushed, node, entry, count, sent_at + timeout)

    def _flushed(
        self, result: Any, node: str, entry: bytes, count: int, settled_at: float
    ) -> None:
        self.in_flight -= count
        self.in_flight_bytes -= len(entry)
        if self._held is not None and self.in_flight_bytes <= _IN_FLIGHT_LOW:
            self._let_go()
        if isinstance(result, Failure):
            self.stats["remote_send_failed"] += count
            log.debug(
                "{count} messages to node {node} failed: {error}",
                count=count,
                node=node,
                error=result.getErrorMessage(),
            )
            if result.check(NotSent):
                self._refused(entry, NOT_SENT)  # it never runs
                return
            wait = settled_at - self.reactor.seconds()
            if wait <= 0:
                self._refused(entry, UNANSWERED)
                return
            # Failed early: the connection dropped (another call timed
            # out).  Told once the outcome is settled.
            token = next(self._tokens)
            call = self.reactor.callLater(wait, self._tell_unanswered, token)
            self._unanswered[token] = (call, entry)
        elif isinstance(result, int):
            self.ledger.refused(node, count, result)
            self._refused(entry, result)

    def _tell_unanswered(self, token: int) -> None:
        _, entry = self._unanswered.pop(token)
        self._refused(entry, UNANSWERED)

    def stop(self) -> None:
        """
        Tell now the senders of appends that failed and wait to be told
        (the node is leaving: its sessions end).
        """
        self._let_go()
        waiting, self._unanswered = self._unanswered, {}
        for call, entry in waiting.values():
            if call.active():
                call.cancel()
            self._refused(entry, UNANSWERED)

    def _refused(self, entry: bytes, why: int) -> None:
        """
        Tell the senders of an inbox entry that was refused or failed: a
        relayed request's sender gets the error L{_REFUSALS} gives for
        C{why} (C{RateLimited}: the inbox was full, or this node is behind
        Redis; C{UserOffline}: its node left or stopped renewing its lease,
        Redis ran the append past its deadline, or the append was never
        sent; C{Timeout}: Redis did not answer, so the request was delivered
        by now or never will be), once per request; a one-way message is
        counted as dropped; a query of this node's engine fails at once.
        Answers, notices and a member's copy of a Broadcast are only
        counted (by the caller): the copy was acknowledged at once, and
        never answered (a MessageID of a Broadcast may be the same as a
        request's of the same sender to a user named like the group).
        """
        code, because = _REFUSALS[why]
        told: set[tuple[str, int, int]] = set()
        for record in decode_records(entry):
            if isinstance(record, Query):
                body = m.Error(MessageType.REQUEST, code, f"the device {because}").encode()
                self.answered(record.session_id, record.message_id, True, body)
            elif isinstance(record, (Send, SendMany)) and self.wire is not None:
                # One frame, or a run of one-way Sends (the relay's inline path).
                for frame in FrameDecoder(self.wire).feed(record.frame):
                    sender = self.lookup(frame.user_id, frame.client_type)
                    ident = (frame.user_id, frame.client_type, frame.message_id)
                    tell = getattr(sender, "not_delivered", None)
                    if (
                        tell is None
                        or frame.message_type in ANSWERS
                        or frame.message_type == MessageType.BROADCAST
                        or ident in told
                    ):
                        continue
                    if frame.message_id:
                        told.add(ident)
                    tell(frame, code, f"{frame.dest_user_id} {because}")
