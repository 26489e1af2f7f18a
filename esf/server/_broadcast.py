"""
Broadcast (601): one frame to a group, its own bytes written to every online
device of the group's members but the sender's.

A Broadcast is a request to the server: it costs its sender a unit of its
work budget, the relay policy judges it (when there is one), and the
application's group manager says whether the sender may broadcast to the
group and who its members are.  The frame is never decoded beyond its
information type (for the Ack).

A run of Broadcasts from one read to one group (L{FrameRun}, from
L{esf.wire.FrameDecoder.feed_runs}) is taken whole when it can be
(L{Broadcasts.run}): the group manager is asked once, and each member's
device gets the run's bytes as one slice, as a write-coalescing relay's
fan-out does.  That is what the frames one by one would have done: nothing
else runs between them, so the members and their devices cannot change in
between, and a group manager that answers later has the whole run wait for
its answer as one frame would.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Protocol, Union

from twisted.python.failure import Failure

from esf.wire import _messages as m
from esf.wire._events import call_then
from esf.wire._frames import DEVICE_MARK, EVERYONE_ID, ErrorCode, Frame, FrameRun, MessageType

from ._config import EngineBasics
from ._counters import count_fanout
from ._relay_policy import judged
from ._services import TO_SERVER, Handler, handler_failed

if TYPE_CHECKING:
    from esf.interfaces import IGroupManager, IPresence

    from ._relay_policy import RelayGate
    from ._session import Session

__all__ = ["Broadcasts", "BroadcastEngine"]

_I32 = struct.Struct("<i")
#: A frame header's fields before its ID slots.
_HEAD = struct.Struct("<BBHii")

#: What a Broadcast's members are written: one frame, or a run of them.
_Broadcast = Union[Frame, FrameRun]


def _information_type(body: bytes | memoryview) -> int:
    """
    An Information body's type, the rest unread (a Broadcast's members get
    the frame's own bytes).
    """
    if len(body) < 4:
        m.Information.decode(body)  # raises BadRequest, saying why
    return int(_I32.unpack_from(body)[0])


def _asking(run: FrameRun) -> int:
    """
    How many of C{run}'s frames have a MessageID (each is acknowledged), or
    -1 when a body is too short to hold an information type (the run is
    then taken frame by frame, the short one refused alone).
    """
    raw, hlen = run.raw, run.header_length
    unpack, size = _HEAD.unpack_from, len(raw)
    if run.uniform:
        message_id, body_length = unpack(raw)[3:]
        return -1 if body_length < 4 else run.count if message_id else 0
    offset = asking = 0
    while offset < size:
        message_id, body_length = unpack(raw, offset)[3:]
        if body_length < 4:
            return -1
        if message_id:
            asking += 1
        offset += hlen + body_length
    return asking


class _Relay(Protocol):
    def forward(self, sender: Session, targets: Any, raw: bytes, frames: int) -> int: ...


class _Router(Protocol):
    def resolve(self, dest: str) -> Any: ...


class BroadcastEngine(EngineBasics, Protocol):
    """
    What a Broadcast needs of the engine: the counters, the group manager,
    who is online (and the router, for a member's device ID), the relay
    (its rule for writing), the relay policy, and its dispatch (for the
    frames of a run it cannot take whole).
    """

    @property
    def group_manager(self) -> IGroupManager | None: ...

    @property
    def presence(self) -> IPresence: ...

    @property
    def router(self) -> _Router: ...

    @property
    def relay(self) -> _Relay: ...

    @property
    def relay_gate(self) -> RelayGate | None: ...

    def frame_received(self, session: Session, frame: Frame) -> None: ...


class Broadcasts:
    """
    Broadcasts to groups, a frame at a time (L{broadcast}, a handler the
    engine dispatches to) or a run at a time (L{run}).
    """

    def __init__(self, engine: BroadcastEngine):
        self.engine = engine
        self.handlers: dict[int, Handler] = {MessageType.BROADCAST: self.broadcast}

    def broadcast(self, session: Session, frame: Frame) -> None:
        """
        A Broadcast (601): asks the relay policy, if there is one
        (L{esf.server._relay_policy.RelayGate}), then the group manager
        whether the sender may (L{_allowed}), then who the members are, and
        writes the frame, its own bytes, to each online device of each
        member (L{_deliver}).  A group manager that answers at once costs no
        Deferred (L{call_then}).
        """
        _information_type(frame.body)  # a bad body is refused before anything is asked
        if self._no_group(frame.dest_user_id):
            session.error(frame, ErrorCode.NOT_AUTHORIZED, f"no group {frame.dest_user_id!r} here")
            return
        judged(self.engine.relay_gate, session, frame, self._ask, 1 if frame.message_id else 0)

    def run(self, session: Session, run: FrameRun) -> None:
        """
        A run of Broadcasts from C{session} (logged on, the run's UserID its
        own) to one group, taken whole: charged a unit of work per frame,
        the group manager asked once, the run's bytes written to each
        member's devices as one slice, each frame with a MessageID
        acknowledged.  Where it cannot be taken whole (no such group here,
        a relay policy, which judges each frame, a body too short for an
        information type, or a work budget without a unit for every frame)
        its frames go to the engine's dispatch one by one.
        """
        engine = self.engine
        if not self._no_group(run.dest_user_id) and engine.relay_gate is None:
            asking = _asking(run)
            if asking >= 0 and session.charge_all(run.count):
                self._ask(session, run, asking)
                return
        for frame in run.frames():
            if session.ended:
                break
            engine.frame_received(session, frame)

    def _no_group(self, group_id: str) -> bool:
        return self.engine.group_manager is None or group_id in TO_SERVER

    def _ask(self, session: Session, broadcast: _Broadcast, asking: int) -> None:
        manager = self.engine.group_manager
        assert manager is not None  # checked first
        call_then(
            manager.can_broadcast,
            (session.user_id, broadcast.dest_user_id),
            self._allowed,
            session,
            broadcast,
            asking,
        )

    def _allowed(self, allowed: Any, session: Session, broadcast: _Broadcast, asking: int) -> None:
        if isinstance(allowed, Failure):
            self._failed(allowed, session, broadcast)
            return
        group_id = broadcast.dest_user_id
        if not allowed:
            text = f"{session.user_id} may not broadcast to {group_id}"
            for frame in _frames(broadcast):
                session.error(frame, ErrorCode.NOT_AUTHORIZED, text)
            return
        engine = self.engine
        if group_id == EVERYONE_ID:
            self._deliver(engine.presence.user_ids(), session, broadcast, asking)
            return
        assert engine.group_manager is not None  # checked first
        call_then(
            engine.group_manager.get_members,
            (group_id,),
            self._deliver,
            session,
            broadcast,
            asking,
        )

    def _deliver(
        self, user_ids: Any, session: Session, broadcast: _Broadcast, asking: int
    ) -> None:
        """
        Write the Broadcast (or run) to every online device of the members
        C{user_ids} but the sender's, then acknowledge each frame that has
        a MessageID (C{asking} of them).
        """
        if isinstance(user_ids, Failure):
            self._failed(user_ids, session, broadcast)
            return
        engine = self.engine
        raw = broadcast.raw
        frames = broadcast.count if isinstance(broadcast, FrameRun) else 1
        # The presence first; the router only for a device-marked member.
        devices_of = engine.presence.devices
        resolve = engine.router.resolve
        sender = session.user_id
        devices: list[Any] = []
        failure = None
        try:
            for user_id in dict.fromkeys(user_ids):
                if user_id != sender:
                    targets = devices_of(user_id)
                    if not targets and DEVICE_MARK in user_id:
                        targets = resolve(user_id) or ()
                    devices += targets
        except Exception:
            # What the group manager gave is not user IDs (not hashable,
            # not text): its failure, never the reader's.  The members
            # before the first that is not have it.
            failure = Failure()
        # The relay's rule, for every member device at once (one call, not
        # one per member): one that is backed up holds the sender back
        # briefly, or refuses what it has no room for (counted).
        engine.relay.forward(session, devices, raw, frames)
        if failure is not None:
            self._failed(failure, session, broadcast)
            return
        count_fanout(engine.counters, len(devices), frames)
        if asking:
            for frame in _frames(broadcast):
                if frame.message_id:
                    body = m.Ack(_information_type(frame.body)).encode()
                    session.reply(frame, body, MessageType.ACK)

    def _failed(self, failure: Failure, session: Session, broadcast: _Broadcast) -> None:
        handler_failed(self.engine.counters, failure, session, _frames(broadcast), "group manager")


def _frames(broadcast: _Broadcast) -> list[Frame]:
    return [broadcast] if isinstance(broadcast, Frame) else broadcast.frames()
