"""
The relay policy: the application's say on which frames one user may
relay to another (L{esf.interfaces.IRelayPolicy}).

L{RelayGate} asks it for every frame a user addresses to another user
that is not an answer (the relay's and the Broadcast's), before the route
is resolved, and carries out what it answers: an allowed frame goes on to
whoever asked the gate (the relay, the application services), a refused
one is answered C{Error(NotAuthorized, reason)} or, one-way, counted.  A
policy that answers later holds the session's later frames behind the
one that waits, in order, within bounds: frames per session
(C{relay_policy_pending}: past it the session is read no further), time
(C{relay_policy_timeout}: then the frame is refused and the answer
cancelled) and the server's memory budget.  Without a policy the engine
has no gate and nothing is asked.
"""

from __future__ import annotations

import collections
import struct
from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.wire._events import outcome
from esf.wire._frames import ErrorCode, Frame, MessageType, SendRun

from ._config import EngineBasics, SessionPhase
from ._counters import Count
from ._descriptors import IntervalCount
from ._router import user_part

if TYPE_CHECKING:
    from esf.interfaces import IRelayPolicy

    from ._budget import MemoryBudget
    from ._output import OutputBatch
    from ._session import Session

__all__ = ["RelayRefused", "RelayGate", "GateEngine", "WAITING_COST", "judged"]

log = Logger(namespace="esf.server")

_I32 = struct.Struct("<i")
#: Plain ints: compared on every frame, an enum member costs a look-up.
_BROADCAST = int(MessageType.BROADCAST)
_PING_BY_SERVER = int(MessageType.PING_BY_SERVER)
_SEND = int(MessageType.SEND)

#: What one frame waiting for a decision holds besides its bytes (its
#: decoded L{Frame}, its entry, the policy's Deferred with its callback),
#: charged to the server's memory budget with them: measured with
#: tracemalloc, about 860 bytes on CPython 3.11, rounded up.
WAITING_COST = 1024

#: An entry whose decision has not come yet.
_UNDECIDED = object()
#: The answer of a policy that did not decide in time.
_TIMED_OUT = object()


class RelayRefused(Exception):
    """
    Raised by L{esf.interfaces.IRelayPolicy.may_relay} (or the Deferred it
    answers fails with it) to refuse a frame with a reason the sender sees.
    """

    def __init__(self, reason: str = "not authorised to relay this"):
        super().__init__(reason)
        self.reason = reason


class _Relay(Protocol):
    def forward(self, sender: Session, targets: Any, raw: bytes, frames: int) -> int: ...

    def count(self, message_type: int, frames: int, size: int) -> None: ...

    def allowed(self, session: Session, frame: Frame) -> None: ...


class GateEngine(EngineBasics, Protocol):
    """
    What the gate needs of the engine: the settings, the clock, the
    counters, the memory budget (frames waiting for a decision count in
    it), the output batch (what a late decision lets through is written
    as a read's output is) and the relay (a run of Sends judged on the
    session's inline path goes on through it).
    """

    @property
    def budget(self) -> MemoryBudget: ...

    @property
    def batch(self) -> OutputBatch: ...

    @property
    def relay(self) -> _Relay: ...


class _Refusal:
    """
    Why a frame is not relayed: the Error's code and text, and whether
    the policy's own answer refused it (logged as C{relay_refused}) rather
    than its failure or silence (logged apart, once per interval).
    """

    __slots__ = ("code", "text", "answered")

    def __init__(self, code: ErrorCode, text: str, answered: bool):
        self.code = code
        self.text = text
        self.answered = answered


class _Entry:
    """
    One frame of a session waiting to be let through or refused, in turn.
    """

    __slots__ = ("frame", "then", "args", "decision", "answer", "cost", "deadline")

    def __init__(
        self,
        frame: Frame,
        then: Callable[..., None],
        args: tuple[Any, ...],
        cost: int,
        deadline: float,
    ):
        self.frame = frame
        self.then = then
        self.args = args
        #: L{_UNDECIDED}, C{None} (allowed) or a L{_Refusal}.
        self.decision: Any = _UNDECIDED
        #: The policy's Deferred while it has not fired.
        self.answer: Deferred[Any] | None = None
        self.cost = cost
        #: When it is refused if still undecided.
        self.deadline = deadline


class _Waiting:
    """
    One session's frames waiting in order, whether they hold its reading
    (past C{relay_policy_pending}), and the one timer that refuses those
    whose decisions are late.  (One timer per session rather than
    C{Deferred.addTimeout} per frame: that costs a delayed call and four
    closures a frame, about 1 KB, while the entries' deadlines come in the
    order of the queue.)
    """

    __slots__ = ("entries", "holding", "timer")

    def __init__(self) -> None:
        self.entries: collections.deque[_Entry] = collections.deque()
        self.holding = False
        self.timer: IDelayedCall | None = None


class RelayGate:
    """
    Asks C{policy} (an L{esf.interfaces.IRelayPolicy}) about the frames of
    C{engine}'s sessions and acts on its answers (see the module's
    docstring).
    """

    def __init__(self, engine: GateEngine, policy: IRelayPolicy):
        self.engine = engine
        self.policy = policy
        self._may_relay = policy.may_relay
        self.counters = engine.counters
        #: The sessions with frames waiting (made on demand, dropped when
        #: the last one is through).
        self._waiting: dict[Session, _Waiting] = {}
        #: Failures and silences of the policy, logged once per interval
        #: (a broken policy fails for every frame of every session).
        self._last_failure: Failure | None = None
        self._failures = IntervalCount(engine.clock, self._log_failures)
        self._timeouts = IntervalCount(engine.clock, self._log_timeouts)

    def judge(self, session: Session, frame: Frame, then: Callable[..., None], *args: Any) -> None:
        """
        Ask the policy about C{frame} from C{session}; once it is allowed,
        and every frame of the session judged before it is through, call
        C{then(session, frame, *args)}; if it is refused, answer it.
        """
        message_type = frame.message_type
        if message_type == _PING_BY_SERVER:
            information_type = 0
        else:
            raw, start = frame.raw, frame.header_length
            if len(raw) < start + 4:
                session.error(
                    frame, ErrorCode.BAD_REQUEST, "the body holds no information type (i32)"
                )
                return
            information_type = _I32.unpack_from(raw, start)[0]
        dest = frame.dest_user_id
        # A Broadcast names a group; anything else a user, or one of its
        # devices ("bob#5"): the user is the receiver.
        receiver = dest if message_type == _BROADCAST else user_part(dest)
        asked = (session.user_id, receiver, message_type, information_type)
        waiting = self._waiting.get(session)
        if waiting is None:
            answer = outcome(self._may_relay, asked)
            if answer is True:  # the common case: allowed at once, nothing waits
                then(session, frame, *args)
            else:
                self._answered(session, frame, answer, then, args)
        elif self.engine.budget.fits(len(frame.raw) + WAITING_COST):
            # Behind frames that wait: asked now, let through in turn.
            self._wait(session, waiting, frame, outcome(self._may_relay, asked), then, args)
        else:
            self._refuse(session, frame, _BUDGET_SPENT)

    def admit(self, session: Session, run: SendRun, targets: Any) -> bool:
        """
        Judge the Sends of C{run}, from C{session} to C{targets} (the
        devices of an online user), on the session's inline path for runs:
        C{True} when every one was allowed at once, and the session forwards
        the run as it is.  Otherwise they are handled here, in order: those
        allowed before the first that is not are forwarded, that one is
        answered as its answer says, and the rest are judged one by one.
        """
        relay = self.engine.relay
        if session in self._waiting:
            for frame in run.frames():
                if session.state is SessionPhase.ENDED:
                    break
                self.judge(session, frame, relay.allowed)
            return False
        may_relay, sender = self._may_relay, session.user_id
        receiver = user_part(run.dest_user_id)
        raw, start = run.raw, run.header_length
        unpack = _I32.unpack_from
        offset = count = 0
        answer: Any = _UNDECIDED
        while offset < len(raw):
            size = unpack(raw, offset + 8)[0]  # the header's BodyLength
            if size < 4:
                break  # no information type: judge() refuses it
            answer = outcome(may_relay, (sender, receiver, _SEND, unpack(raw, offset + start)[0]))
            if answer is not True:
                break
            offset += start + size
            count += 1
        else:
            return True
        if count and relay.forward(session, targets, raw[:offset], count):
            relay.count(_SEND, count, offset)
        frames = run.frames()[count:]
        if answer is not _UNDECIDED and answer is not True:
            self._answered(session, frames.pop(0), answer, relay.allowed, ())
        for frame in frames:
            if session.state is SessionPhase.ENDED:
                break
            self.judge(session, frame, relay.allowed)
        return False

    def _answered(
        self,
        session: Session,
        frame: Frame,
        answer: Any,
        then: Callable[..., None],
        args: tuple[Any, ...],
    ) -> None:
        """
        Act on C{answer}, the policy's about C{frame}, while none of
        C{session}'s frames waits: at once, unless it is a Deferred.
        """
        if not isinstance(answer, Deferred):
            refusal = self._verdict(answer, session, frame)
            if refusal is None:
                then(session, frame, *args)
            else:
                self._refuse(session, frame, refusal)
            return
        if not self.engine.budget.fits(len(frame.raw) + WAITING_COST):
            answer.cancel()
            self._refuse(session, frame, _BUDGET_SPENT)
            return
        waiting = self._waiting[session] = _Waiting()
        self._wait(session, waiting, frame, answer, then, args)

    def _wait(
        self,
        session: Session,
        waiting: _Waiting,
        frame: Frame,
        answer: Any,
        then: Callable[..., None],
        args: tuple[Any, ...],
    ) -> None:
        """
        Queue C{frame} behind C{session}'s frames that wait, with the
        policy's C{answer} (a decision now, or a Deferred of one later).
        """
        engine = self.engine
        config = engine.config
        cost = len(frame.raw) + WAITING_COST
        entry = _Entry(
            frame, then, args, cost, engine.clock.seconds() + config.relay_policy_timeout
        )
        waiting.entries.append(entry)
        engine.budget.used += cost
        if len(waiting.entries) >= config.relay_policy_pending and not waiting.holding:
            # Read no more from this peer until decisions come: the frames
            # of the read in progress still wait here (counted above).
            waiting.holding = True
            session.hold_back()
        if isinstance(answer, Deferred):
            entry.answer = answer
            if waiting.timer is None:
                waiting.timer = engine.clock.callLater(
                    config.relay_policy_timeout, self._late, session, waiting
                )
            answer.addBoth(self._decided, session, entry)
        else:
            entry.decision = self._verdict(answer, session, frame)

    def _late(self, session: Session, waiting: _Waiting) -> None:
        """
        The timer of C{session}'s queue: refuse the frames whose decisions
        are late, cancelling their answers; let through what that frees;
        wait for the next undecided one.
        """
        waiting.timer = None
        now = self.engine.clock.seconds()
        for entry in waiting.entries:
            if entry.decision is not _UNDECIDED:
                continue
            if entry.deadline > now:
                break
            entry.decision = self._verdict(_TIMED_OUT, session, entry.frame)
            answer, entry.answer = entry.answer, None
            if answer is not None:
                answer.cancel()
        if self._waiting.get(session) is waiting:
            self._drain(session, waiting)
        if self._waiting.get(session) is waiting:
            self._wait_for_next(session, waiting)

    def _wait_for_next(self, session: Session, waiting: _Waiting) -> None:
        """
        Set C{waiting}'s timer for its first undecided frame, if any.
        """
        if waiting.timer is not None:
            return
        for entry in waiting.entries:
            if entry.decision is _UNDECIDED:
                clock = self.engine.clock
                delay = max(0.0, entry.deadline - clock.seconds())
                waiting.timer = clock.callLater(delay, self._late, session, waiting)
                return

    def _decided(self, answer: Any, session: Session, entry: _Entry) -> None:
        """
        The policy's Deferred for C{entry} fired (or was cancelled, by the
        timeout or because the session ended): note the decision and let
        through what is decided at the head of the session's queue.
        """
        entry.answer = None
        waiting = self._waiting.get(session)
        if entry.decision is not _UNDECIDED or waiting is None:
            return None  # the session ended: dropped
        entry.decision = self._verdict(answer, session, entry.frame)
        self._drain(session, waiting)
        return None

    def _drain(self, session: Session, waiting: _Waiting) -> None:
        entries = waiting.entries
        if not entries or entries[0].decision is _UNDECIDED:
            return
        batch = self.engine.batch
        outermost = batch.begin()
        try:
            while entries and entries[0].decision is not _UNDECIDED:
                entry = entries.popleft()
                self.engine.budget.used -= entry.cost
                if entry.decision is None:
                    entry.then(session, entry.frame, *entry.args)
                else:
                    self._refuse(session, entry.frame, entry.decision)
                if self._waiting.get(session) is not waiting:
                    return  # the session ended meanwhile
        finally:
            if outermost:
                batch.flush()
        if not entries:
            del self._waiting[session]
            if waiting.timer is not None:
                waiting.timer.cancel()
                waiting.timer = None
        if waiting.holding and len(entries) < self.engine.config.relay_policy_pending:
            waiting.holding = False
            session.let_go()

    def session_ended(self, session: Session) -> None:
        """
        C{session} ended: drop its frames that wait, cancelling the
        decisions they wait for.
        """
        waiting = self._waiting.pop(session, None)
        if waiting is None:
            return
        if waiting.timer is not None:
            waiting.timer.cancel()
            waiting.timer = None
        budget = self.engine.budget
        for entry in waiting.entries:
            budget.used -= entry.cost
            entry.decision = None
            answer, entry.answer = entry.answer, None
            if answer is not None:
                answer.cancel()
        waiting.entries.clear()

    def waiting(self, session: Session) -> int:
        """
        How many frames of C{session} wait for decisions, or for the
        frames before them.
        """
        waiting = self._waiting.get(session)
        return len(waiting.entries) if waiting is not None else 0

    def stop(self) -> None:
        """
        Log what the interval counts still hold, and stop their timers.
        """
        self._failures.stop()
        self._timeouts.stop()

    # -- answers ---------------------------------------------------------------

    def _verdict(self, answer: Any, session: Session, frame: Frame) -> _Refusal | None:
        """
        What C{answer}, the policy's about C{frame}, decides: C{None}
        (allowed) or why it is refused.
        """
        if answer is True:
            return None
        if answer is False:
            verb = "broadcast" if frame.message_type == MessageType.BROADCAST else "send"
            receiver = frame.dest_user_id
            if frame.message_type != MessageType.BROADCAST:
                receiver = user_part(receiver)
            return _Refusal(
                ErrorCode.NOT_AUTHORIZED, f"{session.user_id} may not {verb} to {receiver}", True
            )
        if answer is _TIMED_OUT:
            self._timeouts.count()
            timeout = self.engine.config.relay_policy_timeout
            return _Refusal(
                ErrorCode.TIMEOUT,
                f"the relay policy did not decide within {timeout:g} s; not relayed",
                False,
            )
        if isinstance(answer, Failure):
            if isinstance(answer.value, RelayRefused):
                return _Refusal(ErrorCode.NOT_AUTHORIZED, str(answer.value.reason), True)
            failure = answer
        else:
            failure = Failure(TypeError(f"may_relay answered {answer!r}, not a bool"))
        self.counters[Count.HANDLER_ERRORS] += 1
        self._last_failure = failure
        self._failures.count()
        return _Refusal(
            ErrorCode.HANDLER_ERROR,
            f"the relay policy failed ({type(failure.value).__name__}); not relayed",
            False,
        )

    def _refuse(self, session: Session, frame: Frame, refusal: _Refusal) -> None:
        """
        Refuse C{frame}: a request is answered with an Error, a one-way
        frame is dropped; counted either way.
        """
        if session.state is SessionPhase.ENDED:
            return
        self.counters[Count.RELAY_REFUSED] += 1
        if frame.message_id:
            session.error(frame, refusal.code, refusal.text)
        if refusal.answered and session.may_log():
            log.info(
                "{message_type} #{message_id} from {session!r} to {dest} refused: {reason}",
                esf_event="relay_refused",
                message_type=frame.message_type,
                message_id=frame.message_id,
                session=session,
                user_id=session.user_id,
                dest=frame.dest_user_id,
                reason=refusal.text,
            )

    def _log_failures(self, count: int, interval: float) -> None:
        log.failure(
            "the relay policy failed {count} time(s) (at most one such line per "
            "{interval:g} s; the last failure below): those frames were refused",
            self._last_failure,
            esf_event="relay_policy_failed",
            count=count,
            interval=interval,
        )
        self._last_failure = None

    def _log_timeouts(self, count: int, interval: float) -> None:
        log.warn(
            "the relay policy did not decide on {count} frame(s) within {timeout:g} s "
            "(at most one such line per {interval:g} s): those frames were refused",
            esf_event="relay_policy_timeout",
            count=count,
            timeout=self.engine.config.relay_policy_timeout,
            interval=interval,
        )


def judged(
    gate: RelayGate | None, session: Session, frame: Frame, then: Callable[..., None], *args: Any
) -> None:
    """
    C{then(session, frame, *args)} once C{gate} allows C{frame}: at once
    when there is no gate (no relay policy).  How the application services
    have a Broadcast judged before its group manager is asked.
    """
    if gate is None:
        then(session, frame, *args)
    else:
        gate.judge(session, frame, then, *args)


#: Why a frame that would wait is refused when the memory budget is spent.
_BUDGET_SPENT = _Refusal(
    ErrorCode.RATE_LIMITED,
    "the server's memory budget is spent: no room for a frame to wait for the relay "
    "policy; try later",
    False,
)
