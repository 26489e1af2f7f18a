"""
The relay: frames a user addresses to another user, forwarded as they
came (their original bytes) to the devices the DestUserID names.

L{Relay.forward} is the one rule for writing a frame (or a run of them) to
its devices: a device that is backed up holds the sender back, one that
is stalled refuses it (L{Relay.not_queued}).  Both the session's inline
path for runs of Sends (L{esf.server._session.Session.data_received}) and
L{Relay.frame}, which takes every other relayed frame (answers, acknowledged
messages, a user who is offline), use it.  When the application gives a
relay policy, both have it judge each frame first
(L{esf.server._relay_policy.RelayGate}: C{judge} for L{Relay.frame},
C{admit} for a run on the session's inline path).
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger

from esf.wire._frames import ErrorCode, Frame, MessageType

from ._counters import RELAYED_BYTES, RELAYED_MESSAGES, Count
from ._output import PUSH_BACK, REFUSED
from ._router import ANSWERS

if TYPE_CHECKING:
    from esf.interfaces import IPresence
    from esf.wire._events import Event

    from ._config import ServerConfig
    from ._offline import OfflineMessages
    from ._relay_policy import RelayGate
    from ._session import Session

#: A frame header's BodyLength (after StartToken, ClientType, MessageType
#: and MessageID).
_BODY_LENGTH = struct.Struct("<8xi")

__all__ = ["Relay", "NOT_DELIVERED", "DELIVERED", "ALL_QUEUED", "backed_up"]

log = Logger(namespace="esf.server")

#: What L{Relay.forward} answers: no device queued the frames;
NOT_DELIVERED = 0
#: at least one device queued them;
DELIVERED = 1
#: every device queued them and asked nothing of the sender (the
#: session's inline path may then append to their gathered output).
ALL_QUEUED = 2


def backed_up(dest_user_id: str) -> str:
    """
    What the sender of an acknowledged frame is told when every device of
    C{dest_user_id} it went to refused it for being backed up, on this node
    or another.
    """
    return (
        f"not delivered: {dest_user_id} is backed up (it does not read what is relayed to it "
        "fast enough); try later"
    )


class _Router(Protocol):
    def resolve(self, dest: str) -> Any: ...


class _Answers(Protocol):
    def answer(self, session: Session, frame: Frame) -> Any: ...

    def asked(self, session: Session, frame: Frame) -> bool: ...

    def forget(self, session: Session, frame: Frame) -> bool: ...


class RelayEngine(Protocol):
    """
    What the relay needs of the engine (L{esf.server._engine.ServerEngine}).
    """

    @property
    def config(self) -> ServerConfig: ...

    @property
    def counters(self) -> collections.Counter[str]: ...

    @property
    def router(self) -> _Router: ...

    @property
    def answers(self) -> _Answers: ...

    @property
    def presence(self) -> IPresence: ...

    @property
    def offline(self) -> OfflineMessages | None: ...

    @property
    def relay_gate(self) -> RelayGate | None: ...

    @property
    def transmit_failed(self) -> Event: ...


class Relay:
    """
    Forwards frames between users for C{engine}.
    """

    def __init__(self, engine: RelayEngine):
        self.engine = engine
        self.counters = engine.counters

    def forward(self, sender: Session, targets: Sequence[Any], raw: bytes, frames: int) -> int:
        """
        The relay rule: write C{raw}, C{frames} frames of C{sender}, to
        each device of C{targets} (C{send}); a device that answers a
        status holds C{sender} back or refuses them (L{not_queued}).  The
        caller counts what was delivered (L{count}).

        @return: L{ALL_QUEUED}, L{DELIVERED} or L{NOT_DELIVERED}.
        """
        if len(targets) == 1:
            # One device, the common case, without the loop: on PyPy a loop
            # of one turn is a loop of its own to enter and leave, and when
            # every Send of a read goes to another receiver this call comes
            # once per receiver per read (about 6% of a relayed Send's time
            # in process, C{relay_profile.py --interleave 50}).
            target = targets[0]
            status = target.send(raw)
            if not status:
                return ALL_QUEUED
            return (
                DELIVERED if self._queued(sender, target, status, raw, frames) else NOT_DELIVERED
            )
        result = ALL_QUEUED
        delivered = False
        for target in targets:
            status = target.send(raw)
            if status:
                result = DELIVERED
                if not self._queued(sender, target, status, raw, frames):
                    continue
            delivered = True
        return result if delivered else NOT_DELIVERED

    def _queued(self, sender: Session, target: Any, status: int, raw: bytes, frames: int) -> bool:
        """
        C{target.send} answered C{status} (true) for C{raw}, C{frames} frames
        of C{sender}: hold C{sender} back, or refuse what does not fit
        (L{_fit}, L{not_queued}).

        @return: whether any of the frames was queued.
        """
        if status == REFUSED and frames > 1:
            # A run the device has no room for whole: what fits of it.
            return self._fit(sender, target, raw)
        return not self.not_queued(sender, target, status, frames, len(raw))

    def _fit(self, sender: Session, target: Any, raw: bytes) -> bool:
        """
        C{target} (stalled) refused the run of frames C{raw} whole: queue
        its frames one by one while they fit, as they would have been had
        they come one by one, and refuse the rest (L{not_queued}).

        @return: whether any frame was queued.
        """
        hlen = self.engine.config.wire.header_length
        size = len(raw)
        offset = 0
        while offset < size:
            end = offset + hlen + _BODY_LENGTH.unpack_from(raw, offset)[0]
            status = target.send(raw[offset:end])
            if status:
                frames, rest = 1, end
                while rest < size:
                    rest += hlen + _BODY_LENGTH.unpack_from(raw, rest)[0]
                    frames += 1
                self.not_queued(sender, target, status, frames, size - offset)
                break
            offset = end
        return offset > 0

    def not_queued(
        self, sender: Session, target: Any, status: int, frames: int, size: int
    ) -> bool:
        """
        C{target.send} answered C{status} (true) for C{frames} frames of
        C{sender}, C{size} bytes: hold C{sender} back (L{PUSH_BACK}), or
        count what was refused and charge it to C{sender}'s allowance
        (L{esf.server._output.Sender.refused}).

        @return: whether the frames were not queued.
        """
        if status == PUSH_BACK:
            target.push_back(sender)
            return False
        if status == REFUSED:
            self.counters[Count.RECEIVER_BEHIND] += frames
        else:
            # Past the hard bound while the senders are held back (they
            # finish the reads they were in): hold this one back too.
            target.push_back(sender)
        sender.refused(size)
        return True

    def count(self, message_type: int, frames: int, size: int) -> None:
        """
        Count C{frames} relayed frames of C{message_type}, C{size} bytes in
        all, once each however many devices they went to (metrics read it).
        """
        counters = self.counters
        counters[RELAYED_MESSAGES[message_type]] += frames
        counters[RELAYED_BYTES[message_type]] += size

    def frame(self, session: Session, frame: Frame) -> None:
        """
        Forward a frame, its original bytes, to the devices its DestUserID
        names; say why not when there are none.  An answer goes only to the
        device whose request it answers (L{esf.server._router.AnswerRouter}),
        or nowhere.  Any other frame is judged by the application's relay
        policy first, when there is one (L{RelayGate}), before its route is
        resolved.
        """
        engine = self.engine
        message_type = frame.message_type
        if message_type in ANSWERS:
            askers = engine.answers.answer(session, frame)
            if not askers:
                self._unsolicited(session, frame)
                return
            if self.forward(session, askers, frame.raw, 1):
                self.count(message_type, 1, len(frame.raw))
            return
        gate = engine.relay_gate
        if gate is not None:
            gate.judge(session, frame, self.allowed)
            return
        self.allowed(session, frame)

    def allowed(self, session: Session, frame: Frame) -> None:
        """
        Forward C{frame}, which is not an answer, as L{frame} says: the
        relay policy, if any, allowed it.
        """
        engine = self.engine
        message_type = frame.message_type
        targets = engine.router.resolve(frame.dest_user_id)
        offline = engine.offline
        if not targets:
            self._not_online(session, frame, targets)
            return
        if (
            message_type == MessageType.BLOB
            and offline is not None
            and offline.gathering(session, frame)
        ):
            # The rest of a blob begun while its addressee was offline:
            # kept with its first fragments, so that it arrives whole.
            offline.offer(session, frame)
            return
        acknowledged = frame.message_id and message_type != MessageType.SEND
        if acknowledged and not engine.answers.asked(session, frame):
            if not self._paid(session, frame):
                return
            self.counters[Count.TOO_MANY_UNANSWERED] += 1
            session.error(
                frame,
                ErrorCode.RATE_LIMITED,
                f"{engine.config.max_unanswered_requests} requests to users await "
                "answers already; wait for some",
            )
            return
        if self.forward(session, targets, frame.raw, 1):
            self.count(message_type, 1, len(frame.raw))
        elif acknowledged:
            # Refused by every device it is addressed to: say so now,
            # rather than let the sender wait for an answer that cannot
            # come.  (One-way frames were counted by not_queued.)
            engine.answers.forget(session, frame)
            session.error(frame, ErrorCode.RATE_LIMITED, backed_up(frame.dest_user_id))

    def _unsolicited(self, session: Session, frame: Frame) -> None:
        """
        C{frame} answers no request relayed to its sender: dropped, or
        refused if its DestUserID names no user at all.
        """
        if not self._paid(session, frame):
            return
        if self.engine.router.resolve(frame.dest_user_id) is None:
            session.error(
                frame, ErrorCode.BAD_REQUEST, f"{frame.dest_user_id!r} is not a user to relay to"
            )
            return
        self.counters[Count.UNSOLICITED_ANSWERS] += 1
        log.debug(
            "dropped {message_type} #{message_id} from {session!r} to {dest}: "
            "it answers no request relayed to {user_id}",
            message_type=frame.message_type,
            message_id=frame.message_id,
            session=session,
            dest=frame.dest_user_id,
            user_id=session.user_id,
        )

    def _not_online(self, session: Session, frame: Frame, targets: Any) -> None:
        """
        C{frame}'s DestUserID names no user (C{targets} is C{None}) or no
        device online: refuse it, or keep it for the user's next logon.
        """
        if frame.message_type != MessageType.PING_BY_SERVER and not self._paid(session, frame):
            return  # (a PingByServer paid as the request it is, before it came here)
        if targets is None:
            session.error(
                frame, ErrorCode.BAD_REQUEST, f"{frame.dest_user_id!r} is not a user to relay to"
            )
            return
        engine = self.engine
        self.counters[Count.TRANSMIT_FAILED] += 1
        engine.transmit_failed.fire(
            session.user_id, frame.dest_user_id, frame.message_type, frame.raw
        )
        up = engine.presence.up
        if engine.offline is not None and up and engine.offline.offer(session, frame):
            return  # kept: the offline part answers the sender
        if up:
            text = f"{frame.dest_user_id} is not online"
        else:
            # A cluster's presence that lost Redis: users elsewhere are unknown.
            text = f"{frame.dest_user_id} is not reachable: this node lost the cluster's Redis"
        session.error(frame, ErrorCode.USER_OFFLINE, text)

    def _paid(self, session: Session, frame: Frame) -> bool:
        """
        C{frame} goes nowhere (its addressee is offline or no user, it
        answers nothing, it asks past C{max_unanswered_requests}): what the
        server does about it (an Error, the offline store, C{transmit_failed},
        a count) is work it does for C{session} alone, with no receiver to
        hold the sender back.  It costs a unit of the session's work budget,
        as a request to the server does (L{Session.charge}).

        @return: whether the budget had it; if not, the frame is refused
            (C{Error(RateLimited)} to a request, a one-way frame only
            counted as C{work_refused}), and a session that keeps its
            budget spent is ended (L{Session.over_budget}).
        """
        if session.charge(1):
            return True
        if (
            not session.over_budget()
            and frame.message_id
            and frame.message_type not in ANSWERS  # an answer is never answered
        ):
            rate = self.engine.config.work_rate
            session.error(
                frame,
                ErrorCode.RATE_LIMITED,
                f"too many messages that go nowhere (to users who are offline, answers to "
                f"nothing): each costs a unit of work, at most {rate:g} a second; slow down",
            )
        return False
