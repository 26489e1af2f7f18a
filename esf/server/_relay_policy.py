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
from esf.wire._frames import ErrorCode, Frame, FrameRun, MessageType

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


class _Queue:
    """
    One session's frames waiting for decisions, let through or refused in
    the order they came (L{drain}); whether they hold the session's reading
    (past C{relay_policy_pending}); and the one timer that refuses those
    whose decisions are late (L{_late}).  (One timer per session rather
    than C{Deferred.addTimeout} per frame: that costs a delayed call and
    four closures a frame, about 1 KB, while the entries' deadlines come in
    the order of the queue.)
    """

    __slots__ = ("gate", "session", "entries", "holding", "timer", "dropped")

    def __init__(self, gate: RelayGate, session: Session) -> None:
        self.gate = gate
        self.session = session
        self.entries: collections.deque[_Entry] = collections.deque()
        self.holding = False
        self.timer: IDelayedCall | None = None
        #: The session ended: nothing more is let through.
        self.dropped = False

    def add(
        self, frame: Frame, answer: Any, then: Callable[..., None], args: tuple[Any, ...]
    ) -> None:
        """
        Queue C{frame} behind the frames that wait, with the policy's
        C{answer} about it (a decision now, or a Deferred of one later).
        """
        gate = self.gate
        engine = gate.engine
        config = engine.config
        cost = len(frame.raw) + WAITING_COST
        entry = _Entry(
            frame, then, args, cost, engine.clock.seconds() + config.relay_policy_timeout
        )
        self.entries.append(entry)
        engine.budget.used += cost
        if len(self.entries) >= config.relay_policy_pending and not self.holding:
            # Read no more from this peer until decisions come: the frames
            # of the read in progress still wait here (counted above).
            self.holding = True
            self.session.hold_back()
        if isinstance(answer, Deferred):
            entry.answer = answer
            if self.timer is None:
                self.timer = engine.clock.callLater(config.relay_policy_timeout, self._late)
            answer.addBoth(self._decided, entry)
        else:
            entry.decision = gate.verdict(answer, self.session, frame)

    def _decided(self, answer: Any, entry: _Entry) -> None:
        """
        The policy's Deferred for C{entry} fired (or was cancelled, by the
        timeout or because the session ended): note the decision and let
        through what is decided at the head of the queue.
        """
        entry.answer = None
        if entry.decision is not _UNDECIDED or self.dropped:
            return None  # late, or the session ended: dropped
        entry.decision = self.gate.verdict(answer, self.session, entry.frame)
        self.drain()
        return None

    def _late(self) -> None:
        """
        Refuse the frames whose decisions are late, cancelling their
        answers; let through what that frees; wait for the next undecided
        one.
        """
        self.timer = None
        now = self.gate.engine.clock.seconds()
        for entry in self.entries:
            if entry.decision is not _UNDECIDED:
                continue
            if entry.deadline > now:
                break
            entry.decision = self.gate.verdict(_TIMED_OUT, self.session, entry.frame)
            answer, entry.answer = entry.answer, None
            if answer is not None:
                answer.cancel()
        self.drain()
        if self.dropped:
            return
        for entry in self.entries:
            if entry.decision is _UNDECIDED:
                clock = self.gate.engine.clock
                self.timer = clock.callLater(
                    max(0.0, entry.deadline - clock.seconds()), self._late
                )
                return

    def drain(self) -> None:
        """
        Let through, or refuse, what is decided at the head of the queue;
        once it is empty, the gate forgets it.
        """
        entries, gate, session = self.entries, self.gate, self.session
        engine = gate.engine
        if self.dropped or not entries or entries[0].decision is _UNDECIDED:
            return
        batch = engine.batch
        outermost = batch.begin()
        try:
            while entries and entries[0].decision is not _UNDECIDED:
                entry = entries.popleft()
                engine.budget.used -= entry.cost
                if entry.decision is None:
                    entry.then(session, entry.frame, *entry.args)
                else:
                    gate.refuse(session, entry.frame, entry.decision)
                if self.dropped:
                    return  # the session ended meanwhile
        finally:
            if outermost:
                batch.flush()
        if not entries:
            gate.forget(session)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        if self.holding and len(entries) < engine.config.relay_policy_pending:
            self.holding = False
            session.let_go()

    def drop(self) -> None:
        """
        The session ended: forget what waits, cancelling the decisions it
        waits for.
        """
        self.dropped = True
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        budget = self.gate.engine.budget
        for entry in self.entries:
            budget.used -= entry.cost
            entry.decision = None
            answer, entry.answer = entry.answer, None
            if answer is not None:
                answer.cancel()
        self.entries.clear()


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
        #: The queues of the sessions with frames waiting (made on demand,
        #: dropped when the last one is through).
        self.queues: dict[Session, _Queue] = {}
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
        queue = self.queues.get(session)
        if queue is None:
            answer = outcome(self._may_relay, asked)
            if answer is True:  # the common case: allowed at once, nothing waits
                then(session, frame, *args)
            else:
                self._answered(session, frame, answer, then, args)
        elif self.engine.budget.fits(len(frame.raw) + WAITING_COST):
            # Behind frames that wait: asked now, let through in turn.
            queue.add(frame, outcome(self._may_relay, asked), then, args)
        else:
            self.refuse(session, frame, _BUDGET_SPENT)

    def admit(self, session: Session, run: FrameRun, targets: Any) -> bool:
        """
        Judge the Sends of C{run}, from C{session} to C{targets} (the
        devices of an online user), on the session's inline path for runs:
        C{True} when every one was allowed at once, and the session forwards
        the run as it is.  Otherwise they are handled here, in order: those
        allowed before the first that is not are forwarded, that one is
        answered as its answer says, and the rest are judged one by one.
        """
        relay = self.engine.relay
        if session in self.queues:
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
            refusal = self.verdict(answer, session, frame)
            if refusal is None:
                then(session, frame, *args)
            else:
                self.refuse(session, frame, refusal)
            return
        if not self.engine.budget.fits(len(frame.raw) + WAITING_COST):
            answer.cancel()
            self.refuse(session, frame, _BUDGET_SPENT)
            return
        queue = self.queues[session] = _Queue(self, session)
        queue.add(frame, answer, then, args)

    def session_ended(self, session: Session) -> None:
        """
        C{session} ended: drop its frames that wait, cancelling the
        decisions they wait for.
        """
        queue = self.queues.pop(session, None)
        if queue is not None:
            queue.drop()

    def forget(self, session: Session) -> None:
        """
        Nothing of C{session}'s waits any more (its queue is empty).
        """
        self.queues.pop(session, None)

    def waiting(self, session: Session) -> int:
        """
        How many frames of C{session} wait for decisions, or for the
        frames before them.
        """
        queue = self.queues.get(session)
        return len(queue.entries) if queue is not None else 0

    def stop(self) -> None:
        """
        Log what the interval counts still hold, and stop their timers.
        """
        self._failures.stop()
        self._timeouts.stop()

    # -- answers ---------------------------------------------------------------

    def verdict(self, answer: Any, session: Session, frame: Frame) -> _Refusal | None:
        """
        What C{answer}, the policy's about C{frame}, decides: C{None}
        (allowed) or why it is refused.
        """
        if answer is True:
            return None
        if answer is False:
            if frame.message_type == _BROADCAST:
                verb, receiver = "broadcast", frame.dest_user_id
            else:
                verb, receiver = "send", user_part(frame.dest_user_id)
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

    def refuse(self, session: Session, frame: Frame, refusal: _Refusal) -> None:
        """
        Refuse C{frame}: a request is answered with an Error, a one-way
        frame is dropped; counted either way.  A frame the policy refused
        costs its sender a unit of its work budget, as a frame that goes
        nowhere does (L{esf.server._relay.Relay}): nothing else holds back
        a sender whose frames are all refused, and each costs the policy's
        call.  A session that keeps its budget spent so is ended.
        """
        if session.state is SessionPhase.ENDED:
            return
        if refusal.answered and not session.charge(1) and session.over_budget():
            return  # ended: it kept its budget spent
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
