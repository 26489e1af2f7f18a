"""
What one peer may make the server spend: work (a token bucket of work
units, L{PeerLimits.charge}) and log lines (L{PeerLimits.may_log}).
L{PeerLimits} is a base of L{esf.server._session.Session}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger

from esf.wire._frames import DisconnectedType

from ._config import EngineBasics
from ._counters import Count

if TYPE_CHECKING:
    pass

__all__ = ["PeerLimits", "LimitsOwner", "LOG_LIMIT", "LOG_WINDOW"]

log = Logger(namespace="esf.server")

#: A peer may cause at most this many log events at info level or above
#: per this many seconds; the rest are counted and summarised.
LOG_LIMIT = 10
LOG_WINDOW = 60.0


class LimitsOwner(EngineBasics, Protocol):
    """
    What a peer's limits need of the engine: the settings, the clock and
    the counters.
    """


class PeerLimits:
    """
    The work budget and the log limiter of one peer (the root of a
    session's bases).  The session provides C{owner}, C{user_id},
    C{address} and C{end}, and starts the budget (L{_init_limits}).
    """

    __slots__ = ("_tokens", "_tokens_at", "_refused_since", "_log")

    owner: LimitsOwner
    user_id: str | None
    address: str

    def _init_limits(self, tokens: float, now: float) -> None:
        #: The work budget (L{charge}): a token bucket, full at the start.
        self._tokens = tokens  # one float for all sessions, until spent
        self._tokens_at = now
        self._refused_since: float | None = None
        #: The log limiter (L{may_log}): [window start, events logged in
        #: it, events suppressed], made when the peer first causes one.
        self._log: list[Any] | None = None

    if TYPE_CHECKING:

        def end(self, reason: DisconnectedType, text: str = "") -> None: ...

    # -- what a peer may make the server log --------------------------------------

    def may_log(self) -> bool:
        """
        Whether an event this peer caused may be logged at info level or
        above: at most L{LOG_LIMIT} per L{LOG_WINDOW} seconds.  The rest are
        counted (C{logs_suppressed}) and summarised in one event when the
        next window opens, and in the session's end event.
        """
        now = self.owner.clock.seconds()
        limiter = self._log
        if limiter is None:
            limiter = self._log = [now, 0, 0]
        elif now - limiter[0] >= LOG_WINDOW:
            self.summarise_logs()
            limiter[0], limiter[1] = now, 0
        if limiter[1] < LOG_LIMIT:
            limiter[1] += 1
            return True
        limiter[2] += 1
        self.owner.counters[Count.LOGS_SUPPRESSED] += 1
        return False

    @property
    def suppressed_logs(self) -> int:
        """
        How many log events of this peer were suppressed and not yet
        summarised.
        """
        return self._log[2] if self._log is not None else 0

    def summarise_logs(self) -> None:
        """
        Log how many events were suppressed, if any, once.
        """
        limiter = self._log
        if limiter is not None and limiter[2]:
            log.info(
                "{count} more log events caused by {session!r} were suppressed",
                esf_event="logs_suppressed",
                count=limiter[2],
                session=self,
                user_id=self.user_id,
                address=self.address,
            )
            limiter[2] = 0

    # -- the work budget ---------------------------------------------------------

    def charge(self, cost: float) -> bool:
        """
        Take C{cost} from the session's work budget (a token bucket on the
        clock, written here because it is four lines and must not allocate
        per request).  A request is refused while the bucket is empty; an
        accepted one may take it below zero (a big answer), which the
        following requests then wait for.

        @return: whether the request may be handled.
        """
        config = self.owner.config
        now = self.owner.clock.seconds()
        tokens = self._tokens + (now - self._tokens_at) * config.work_rate
        if tokens > config.work_burst:
            tokens = config.work_burst
        self._tokens_at = now
        if tokens < 1:
            self._tokens = tokens
            if self._refused_since is None:
                self._refused_since = now
            return False
        self._tokens = tokens - cost
        if tokens * 2 >= config.work_burst:
            # Let the bucket refill halfway: no longer a flood.
            self._refused_since = None
        return True

    def charge_all(self, count: int) -> bool:
        """
        Take C{count} units at once (a run of C{count} requests), if the
        budget holds a unit for each: exactly when L{charge} would accept
        each of them one after another.  Else take nothing.
        """
        config = self.owner.config
        now = self.owner.clock.seconds()
        tokens = min(self._tokens + (now - self._tokens_at) * config.work_rate, config.work_burst)
        if tokens < count:
            return False
        self._tokens, self._tokens_at = tokens - count, now
        if tokens * 2 >= config.work_burst:
            self._refused_since = None
        return True

    def refused_for(self) -> float:
        """
        Seconds since this session's first refused request, if it has not
        let its budget refill halfway since.
        """
        if self._refused_since is None:
            return 0.0
        return self.owner.clock.seconds() - self._refused_since

    def over_budget(self) -> bool:
        """
        This session found its work budget spent (L{charge} said no, to a
        request or, over WebSocket, to a frame): count it, and end the
        session if it has kept its budget spent for C{work_refusal_limit}
        seconds.

        @return: whether the session was ended.
        """
        self.owner.counters[Count.WORK_REFUSED] += 1
        config = self.owner.config
        limit = config.work_refusal_limit
        if self.refused_for() < limit:
            return False
        self.end(
            DisconnectedType.BEING_KICKED_OUT,
            f"asked the server for more work than its budget "
            f"({config.work_rate:g} a second) for {limit:g} s",
        )
        return True
