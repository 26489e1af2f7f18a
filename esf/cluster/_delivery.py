"""
Delivery of what other nodes sent this one::

    LocalSessions  this node's sessions by session ID, and the kinds of
                   those that ended lately
    Delivery       hands the records read from this node's inbox to its
                   sessions, fenced by session ID; answers the requests a
                   reaped node never read; tells a sender's node that a
                   session of this one is backed up
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from esf.interfaces import IDeviceHandle
from esf.server._offline import split_dest
from esf.server._relay import backed_up
from esf.server._router import ANSWERS, is_request
from esf.wire._decoder import FrameDecoder
from esf.wire._frames import DEVICE_MARK, DisconnectedType, ErrorCode, Frame, MessageType

from ._messaging import BEHIND_SECONDS, MAX_BEHIND, Deadlines, Devices, Lookup, Post, RemoteHandle
from ._records import (
    BACKED_UP,
    ENDED,
    READ_LATE,
    REAPED_UNREAD,
    Answer,
    Behind,
    Failed,
    Kick,
    KickOut,
    Notify,
    OneRecord,
    Probe,
    Probed,
    PushOut,
    Query,
    Record,
    Send,
    SendMany,
    Stored,
    decode_records,
    fields,
)

if TYPE_CHECKING:
    from esf.server._offline import OfflineMessages
    from esf.wire._frames import WireConfig

    from ._queries import Queries

__all__ = ["Delivery", "LocalSessions"]

log = Logger(namespace="esf.cluster")

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


class _Batch(Protocol):
    """
    What delivery needs of the engine's output batch
    (L{esf.server._output.OutputBatch}).
    """

    def begin(self) -> bool: ...

    def flush(self) -> None: ...


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
        # (An OrderedDict forgets the oldest in constant time; a dict finds
        # its first key by skipping the slots of those deleted before it.)
        self.ended: collections.OrderedDict[str, int] = collections.OrderedDict()

    def pop(self, sid: str, *default: Any) -> Any:
        # (As dict.pop: a KeyError for a missing sid unless given a default.)
        handle = super().pop(sid, *default)
        if handle is not None:
            ended = self.ended
            ended[sid] = int(handle.client_type)
            if len(ended) > _ENDED_KEPT:
                ended.popitem(last=False)
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
        self._told_behind = Deadlines(MAX_BEHIND)
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
        for record in _one_each(decode_records(packed)):
            try:
                self._act(record, late)
            except Exception:
                # One record's failure is its own: the entry's others (other
                # sessions' messages among them) are still acted on.
                log.failure(
                    "acting on an inbox record for {session} failed",
                    session=getattr(record, "session_id", "?"),
                )

    def _act(self, record: OneRecord, late: bool) -> None:
        """
        Act on one record of an inbox entry (L{deliver}).
        """
        local = self.local
        if isinstance(record, Answer):
            session_id, message_id, error, body = record
            self.queries.answered(session_id, message_id, error, body)
            return
        if isinstance(record, Probe):
            held = record.session_id in local
            self.post(record.asker, Probed(record.session_id, record.token, held))
            return
        if isinstance(record, Probed):
            self.probed(record.token, record.held)
            return
        if isinstance(record, Behind):
            # (A bound on what another node's word can make this one do.)
            self.behind(record.session_id, min(record.ms / 1000, 2 * BEHIND_SECONDS))
            return
        handle: Any = local.get(record.session_id)
        if handle is None:
            self.stats["inbox_fenced"] += 1
            if isinstance(record, Send):
                kind = local.ended.get(record.session_id)
                self._not_delivered(record.frame, ENDED, ended_kind=kind)
            return
        if isinstance(record, Send):
            if late and self._answered_late(record.frame):
                return
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
        elif isinstance(record, Stored) and self.offline is not None:
            self.offline.look_again(handle)
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
            for record in _one_each(decode_records(fields(flat)[b"m"])):
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
        if told.get(key, now) > now:
            return  # told within the last half of BEHIND_SECONDS
        if told.put(key, now + BEHIND_SECONDS / 2, now):
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


def _one_each(records: Iterable[Record]) -> Iterator[OneRecord]:
    """
    C{records}, with a L{SendMany} as the L{Send} to each of its sessions it
    stands for: each is delivered, fenced and answered for as its own.
    """
    for record in records:
        if isinstance(record, SendMany):
            frame = record.frame
            for session_id in record.session_ids:
                yield Send(session_id, frame)
        else:
            yield record
