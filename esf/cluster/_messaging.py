"""
Messaging between nodes: what one node tells the devices another holds::

    RemoteHandle   an IDeviceHandle for a device held by another node: what
                   it is told becomes a record for that node's inbox
    Outbox         gathers the records for each node during a reactor turn
                   and appends them as one inbox entry; tells the senders of
                   what was refused
    Delivery       hands the records read from this node's inbox to its
                   sessions, fenced by session ID; answers the requests a
                   reaped node never read
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.interfaces import IDeviceHandle
from esf.server._config import UserData
from esf.server._offline import split_dest
from esf.server._output import REFUSED
from esf.server._relay import backed_up
from esf.server._router import ANSWERS, is_request
from esf.wire import _messages as m
from esf.wire._decoder import FrameDecoder
from esf.wire._frames import (
    DEVICE_MARK,
    DisconnectedType,
    ErrorCode,
    Frame,
    MessageType,
    as_client_type,
)

from ._inbox import FULL, GONE, LATE, STALE, InboxLedger
from ._link import NotSent
from ._records import (
    BACKED_UP,
    ENDED,
    MAX_QUERY_SECONDS,
    READ_LATE,
    REAPED_UNREAD,
    Answer,
    Behind,
    Failed,
    Holder,
    Kick,
    KickOut,
    Notify,
    Probe,
    Probed,
    PushOut,
    Query,
    Record,
    Send,
    decode_records,
    fields,
)

if TYPE_CHECKING:
    from esf.server._offline import OfflineMessages
    from esf.wire._frames import WireConfig

    from ._queries import Queries

__all__ = ["RemoteHandle", "Outbox", "Delivery", "LocalSessions", "Post", "Lookup"]

log = Logger(namespace="esf.cluster")

#: How a handle posts a record: C{(node, record)}; a relayed frame's
#: status, as L{IDeviceHandle.send} answers it.
Post = Callable[[str, Record], "int | None"]
#: Who holds a device now (the presence's C{get}).
Lookup = Callable[[str, int], "IDeviceHandle | None"]
#: The devices of a user online now (the presence's C{devices}).
Devices = Callable[[str], Sequence["IDeviceHandle"]]

#: Flush an outbox early past this many bytes.
_OUTBOX_FLUSH_BYTES = 256 * 1024
#: Seconds a node refuses at source what its sessions relay to a session of
#: another node that said it is backed up (L{Behind}); that node says it
#: again, while the session refuses, at most every half of it.
BEHIND_SECONDS = 0.5
#: Most marks of backed-up sessions (and of such sessions' senders' nodes
#: told) a node keeps: past it, the ended ones are forgotten.
_MAX_BEHIND = 10_000
READ_TOO_LATE = (
    "was not reached in time: the node that holds it read the message too late "
    "(it is behind, or the cluster's Redis stalled); try later"
)
REAPED = "is not online: its node stopped answering and left the cluster before delivering this"
ENDED_TEXT = "is not online: the session this went to ended before its node delivered it"


def _failure(why: int, dest_user_id: str) -> tuple[ErrorCode, str]:
    """
    The Error a L{Failed} request's sender gets for C{why}.
    """
    if why == BACKED_UP:
        return ErrorCode.RATE_LIMITED, backed_up(dest_user_id)
    if why == READ_LATE:
        return ErrorCode.RATE_LIMITED, f"{dest_user_id} {READ_TOO_LATE}"
    if why == ENDED:
        return ErrorCode.USER_OFFLINE, f"{dest_user_id} {ENDED_TEXT}"
    return ErrorCode.USER_OFFLINE, f"{dest_user_id} {REAPED}"


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
    )

    def __init__(self, user_id: str, client_type: int, holder: Holder, post: Post):
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
        # is backed up (Outbox.post).
        return self._post(self.node, Send(self.session_id, data))

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


class _Batch(Protocol):
    """
    What delivery needs of the engine's output batch
    (L{esf.server._output.OutputBatch}).
    """

    def begin(self) -> bool: ...

    def flush(self) -> None: ...


class Outbox:
    """
    This node's posts to other nodes' inboxes.  Records for one node
    gathered during a reactor turn go as one entry; one connection,
    commands written in call order: what one node sends one device arrives
    in order.  Past a bound of records Redis has not taken yet (Redis slow
    or gone), it drops rather than queue without end.

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
        #: node -> inbox records to send it at the end of this reactor turn.
        self._pending: dict[str, list[bytes]] = {}
        self._pending_bytes = 0
        self._flush_call: IDelayedCall | None = None
        #: Appends that failed, whose senders are told at their time: a
        #: token -> the timer and the entry.
        self._unanswered: dict[int, tuple[IDelayedCall, bytes]] = {}
        self._tokens = itertools.count()
        #: Sessions of other nodes backed up: session ID -> until when what
        #: is relayed to them is refused here.
        self._behind: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def post(self, node: str, record: Record) -> int | None:
        """
        Send C{record} to C{node}'s inbox, at the end of this reactor turn;
        or refuse a relayed frame (L{REFUSED}) for a session that its node
        said is backed up (L{mark_behind}), as that node would: what one
        receiver does not read is not carried across the cluster to be
        refused there, and its senders are held back here as on one node
        (L{esf.server._relay.Relay.not_queued}).
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
        pending = self._pending.get(node)
        if pending is None:
            pending = self._pending[node] = []
        pending.append(packed)
        self.in_flight += 1
        self._pending_bytes += len(packed)
        if self._pending_bytes > _OUTBOX_FLUSH_BYTES:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)
        return None

    def mark_behind(self, session_id: str, seconds: float) -> None:
        """
        The session C{session_id} of another node is backed up: refuse
        what is relayed to it for C{seconds}.
        """
        marks = self._behind
        now = self.clock.seconds()
        if len(marks) >= _MAX_BEHIND:
            for key in [key for key, until in marks.items() if until <= now]:
                del marks[key]
        if len(marks) < _MAX_BEHIND:
            marks[session_id] = now + seconds

    def flush(self) -> None:
        """
        Append what was posted, now: one entry per node.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        sent_at = self.reactor.seconds()
        timeout = self.timeout
        for node, records in pending.items():
            entry = b"".join(records)
            # An append whose answer never came (Redis hung, or the
            # connection dropped) may have run, or may still run: Redis
            # refuses it past half the call's timeout, and the receiving
            # node answers (rather than delivers) what it reads past three
            # quarters of it.  Its senders are told only once the whole
            # timeout has passed (_flushed): the outcome is settled then,
            # delivered or never.  (The last quarter covers the error in
            # the two nodes' readings of Redis's clock.)
            d = self.ledger.append(node, entry, within=timeout / 2, deliver_within=timeout * 3 / 4)
            d.addBoth(self._flushed, node, entry, len(records), sent_at + timeout)

    def _flushed(
        self, result: Any, node: str, entry: bytes, count: int, settled_at: float
    ) -> None:
        self.in_flight -= count
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
            elif isinstance(record, Send) and self.wire is not None:
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


#: How many of this node's sessions that ended L{LocalSessions} remembers.
_ENDED_KEPT = 4096


class LocalSessions(dict[str, IDeviceHandle]):
    """
    This node's sessions, by session ID.  Of those that ended (popped), the
    device kind of the last L{_ENDED_KEPT} is remembered (C{ended}): a
    request that comes for one after it ended was never delivered to that
    device, nor to a later session of it (a logon again), whatever that
    session now holds (L{Delivery}).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ended: dict[str, int] = {}

    def pop(self, sid: str, *default: Any) -> Any:
        # (As dict.pop: a KeyError for a missing sid unless given a default.)
        handle = super().pop(sid, *default)
        if handle is not None:
            ended = self.ended
            ended[sid] = int(handle.client_type)
            if len(ended) > _ENDED_KEPT:
                del ended[next(iter(ended))]
        return handle


class Delivery:
    """
    Hands what this node's inbox brings to its sessions (C{local}, by
    session ID): a record for a session that is gone is dropped (fenced).

    @param queries: this node's side of queries between nodes.
    @param post: posts a record to another node (L{Outbox.post}).
    @param lookup: who holds a device now (the presence's C{get}).
    @param devices: the devices of a user online now (the presence's
        C{devices}).
    @param probed: called C{(token, held)} with the answer to a probe of
        this node's (L{esf.cluster._probes.Probes.answered}).
    @param behind: called C{(session_id, seconds)} when another node says
        its session is backed up (L{Outbox.mark_behind}).
    @param clock: when this node last told another that a session of its
        is backed up.
    """

    def __init__(
        self,
        local: LocalSessions,
        queries: Queries,
        *,
        post: Post,
        lookup: Lookup,
        devices: Devices,
        probed: Callable[[int, bool], None],
        behind: Callable[[str, float], None],
        clock: Any,
        stats: collections.Counter[str],
    ):
        self.local = local
        self.queries = queries
        self.post = post
        self.lookup = lookup
        self.devices = devices
        self.probed = probed
        self.behind = behind
        self.clock = clock
        self.stats = stats
        #: (this node's session, the sending node) -> when that node was
        #: last told the session is backed up.
        self._told_behind: dict[tuple[str, str], float] = {}
        #: The engine's wire settings (set by the presence's C{attach}).
        self.wire: WireConfig | None = None
        #: Optional: the engine's output batch, so that what one read of
        #: the inbox delivers is written once per session.
        self.batch: _Batch | None = None
        #: The engine's offline part, if it keeps messages for offline
        #: users (set by the presence's C{attach}).
        self.offline: OfflineMessages | None = None

    def deliver(self, packed: bytes, late: bool = False) -> None:
        """
        Act on the records of one inbox entry; when it came C{late} (past
        the time its sending node wanted it delivered by), the requests
        among them are answered at their senders' node instead (their
        senders may have been told they failed).
        """
        local = self.local
        for record in decode_records(packed):
            if isinstance(record, Answer):
                session_id, message_id, error, body = record
                self.queries.answered(session_id, message_id, error, body)
                continue
            if isinstance(record, Probe):
                held = record.session_id in local
                self.post(record.asker, Probed(record.session_id, record.token, held))
                continue
            if isinstance(record, Probed):
                self.probed(record.token, record.held)
                continue
            if isinstance(record, Behind):
                # (A bound on what another node's word can make this one do.)
                self.behind(record.session_id, min(record.ms / 1000, 2 * BEHIND_SECONDS))
                continue
            handle: Any = local.get(record.session_id)
            if handle is None:
                self.stats["inbox_fenced"] += 1
                if isinstance(record, Send):
                    kind = local.ended.get(record.session_id)
                    self._not_delivered(record.frame, ENDED, ended_kind=kind)
                continue
            if isinstance(record, Send):
                if late and self._answered_late(record.frame):
                    continue
                # A local session checks answers from other nodes itself,
                # and says whether it refused the frame for being behind.
                send = getattr(handle, "send_from_node", None)
                if send is None:
                    handle.send(record.frame)
                elif send(record.frame):
                    self._backed_up(handle, record.frame)
            elif isinstance(record, Notify):
                handle.notify(record.message_type, record.body, record.client_type)
            elif isinstance(record, Kick):
                handle.kick(DisconnectedType(record.reason), record.text)
            elif isinstance(record, PushOut):
                handle.push_out(record.new_address, record.cause)
            elif isinstance(record, Query):
                self.queries.ask(handle, record)
            elif isinstance(record, Failed):
                (frame,) = FrameDecoder(self.wire).feed(record.frame) if self.wire else (None,)
                tell = getattr(handle, "not_delivered", None)
                if frame is not None and tell is not None:
                    tell(frame, *_failure(record.why, frame.dest_user_id))
            elif isinstance(record, KickOut):
                handle.kick_out(record.operator, record.reason, record.text)
            self.stats["inbox_delivered"] += 1

    def unread_lost(self, node: str, entries: Iterable[Sequence[bytes]]) -> Deferred[Any]:
        """
        The inbox of C{node}, reaped, held C{entries} (their fields) unread:
        see L{_not_delivered}.  Fires once the offline store is done with
        what was handed to it (so that the janitor hands it no more than a
        page of the inbox at a time).
        """
        kept: list[Deferred[Any]] = []
        for flat in entries:
            for record in decode_records(fields(flat)[b"m"]):
                if isinstance(record, Send):
                    self._not_delivered(record.frame, REAPED_UNREAD, node, kept)
        return DeferredList(kept, consumeErrors=True)

    def _not_delivered(
        self,
        data: bytes,
        why: int,
        reaped: str | None = None,
        kept: list[Deferred[Any]] | None = None,
        ended_kind: int | None = None,
    ) -> None:
        """
        C{data}, a frame relayed to a session of another node, was never
        delivered: its node was reaped before it read it (L{REAPED_UNREAD}),
        or the session had ended (L{ENDED}).  A request is answered
        C{Error(UserOffline)} at its sender's node, unless another device
        of a user it named may have it too (and answer): not one of the
        ended session's kind (C{ended_kind}, when known), which is that
        device logged on again, without it.  A one-way message
        is kept in the offline store, when the engine has one, if its
        addressee has no device online now; else it is counted as dropped,
        as a member's copy of a Broadcast is.  An answer is dropped: its
        asker is answered by its own timeout.
        The devices of the node C{reaped} count as offline already (this
        node's mirror may not have applied their release yet).  What the
        store is asked to keep is added to C{kept} (its Deferreds).
        """
        if self.wire is None:
            return
        # One frame, or a run of Sends or Broadcasts (the relay's inline
        # path, a Broadcast run).
        for frame in FrameDecoder(self.wire).feed(data):
            if frame.message_type in ANSWERS:
                continue
            if frame.message_type == MessageType.BROADCAST:
                # A member's copy: answered already (the Ack means every
                # device that was online and keeping up), never kept.
                self.stats["inbox_dropped"] += 1
                continue
            dest = frame.dest_user_id
            if is_request(frame):
                elsewhere = why == ENDED and self._elsewhere(dest, kind=ended_kind)
                if not elsewhere and self._tell_sender(frame, frame.raw, why):
                    self.stats["inbox_reaped" if why == REAPED_UNREAD else "inbox_ended_told"] += 1
                continue
            offline = self.offline
            user_id, kind = split_dest(dest)
            held = self.devices(user_id) if kind is None else [self.lookup(user_id, kind)]
            online = [d for d in held if d is not None and getattr(d, "node", None) != reaped]
            keeping = offline.keep_unsent(frame) if not online and offline is not None else None
            if keeping is None:
                self.stats["inbox_dropped"] += 1
                continue
            self.stats["inbox_kept"] += 1
            if kept is not None:
                kept.append(keeping)

    def _answered_late(self, data: bytes) -> bool:
        """
        Answer C{data}, a frame that came late, at its sender's node if it
        is a request: whether it was one (and is not to be delivered).
        """
        frame = self._request(data)
        if frame is None:
            return False
        self.stats["inbox_read_late"] += 1
        self._tell_sender(frame, data, READ_LATE)
        return True

    def _backed_up(self, handle: IDeviceHandle, data: bytes) -> None:
        """
        C{handle}, a session of this node, refused C{data} from another node
        for being backed up.  The sender's node is told (L{Behind}): it
        refuses what its sessions relay to C{handle} from then on, rather
        than carry it here.  The sender of an acknowledged frame is told
        (C{RateLimited}, as on one node) when C{handle} was the one device
        the frame could reach: it named the device, or the user has no
        other online.  Else another device may have it and answer; the
        sender's request then waits for that answer, or its timeout.
        """
        if self.wire is None:
            return
        frames = FrameDecoder(self.wire).feed(data)
        if not frames:
            return
        self._tell_behind(handle.session_id, frames[0])
        if len(frames) != 1 or not is_request(frames[0]):
            return  # one-way: counted by the session
        if not self._elsewhere(frames[0].dest_user_id, handle.session_id):
            self._tell_sender(frames[0], data, BACKED_UP)

    def _tell_behind(self, session_id: str, frame: Frame) -> None:
        """
        Tell the node of C{frame}'s sender that this node's session
        C{session_id} is backed up, unless it was told less than half of
        L{BEHIND_SECONDS} ago.
        """
        sender = self.lookup(frame.user_id, frame.client_type)
        if not isinstance(sender, RemoteHandle):
            return  # gone, or of this node (its relay holds it back itself)
        told, key, now = self._told_behind, (session_id, sender.node), self.clock.seconds()
        if told.get(key, -BEHIND_SECONDS) > now - BEHIND_SECONDS / 2:
            return
        if len(told) >= _MAX_BEHIND:
            for old in [old for old, at in told.items() if at <= now - BEHIND_SECONDS]:
                del told[old]
            if len(told) >= _MAX_BEHIND:
                return
        told[key] = now
        self.post(sender.node, Behind(session_id, int(BEHIND_SECONDS * 1000)))

    def _request(self, data: bytes) -> Frame | None:
        """
        The request C{data} (a L{Send} record's bytes) is, if it is one.  A
        record holds one frame, or a run of one-way Sends or of Broadcasts
        (neither asks the receiving device's user for an answer).
        """
        if self.wire is None:
            return None
        frames = FrameDecoder(self.wire).feed(data)
        if len(frames) != 1 or not is_request(frames[0]):
            return None
        return frames[0]

    def _elsewhere(self, dest: str, but: str | None = None, kind: int | None = None) -> bool:
        """
        Whether a frame to C{dest} went to another device online now than
        the session C{but} (or than a device of kind C{kind}): C{dest}
        names a user (not one device of theirs) with such a device.
        """
        if DEVICE_MARK in dest:
            return False
        return any(
            d.session_id != but and (kind is None or d.client_type != kind)
            for d in self.devices(dest)
        )

    def _tell_sender(self, frame: Frame, data: bytes, why: int) -> bool:
        """
        Answer C{frame} (its bytes C{data}), a request that was not
        delivered for C{why}, at its sender's node: this one's session at
        once, another's through a L{Failed} record.

        @return: whether its sender is still online to be told.
        """
        sender = self.lookup(frame.user_id, frame.client_type)
        if sender is None:
            return False
        if isinstance(sender, RemoteHandle):
            self.post(sender.node, Failed(sender.session_id, data, why))
        else:
            tell = getattr(sender, "not_delivered", None)
            if tell is not None:
                tell(frame, *_failure(why, frame.dest_user_id))
        return True
