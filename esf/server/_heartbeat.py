"""
Heartbeats: the reaper that ends sessions whose peer has gone silent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["Reaper"]


class Reaper:
    """
    Every quarter of C{timeout}, looks at the sessions C{sessions()} lists:
    one that received no complete frame since the last look has its
    C{last_active} left alone, and once that is C{timeout} seconds old it is
    handed to C{expire}.  A silent session therefore ends between 1x and
    1.25x the timeout after its last frame (plus one scan).

    A session is anything with C{logged_on}, C{active} (set by whoever
    reads its frames) and C{last_active}.  C{tick(now)}, when given, runs
    after each scan (for other idle bookkeeping).

    One reactor turn ends at most L{MAX_ENDED_PER_TURN} sessions, the rest
    in the turns after: a node whose peers all went silent at once (a
    network cut) ends them without holding its reactor for seconds (ending
    10,000 sessions took 4 s here), while its other sessions, Redis's
    answers and its cluster lease wait.
    """

    MAX_ENDED_PER_TURN = 1000

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        sessions: Callable[[], Iterable[Any]],
        expire: Callable[[Any], None],
        tick: Callable[[float], None] | None = None,
    ):
        self.clock = clock
        self.timeout = timeout
        self._sessions = sessions
        self._expire = expire
        self._tick = tick
        self._loop = LoopingCall(self.scan)
        self._loop.clock = clock
        self._ending: IDelayedCall | None = None  # the next turn's share of the expired

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.timeout / 4, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._ending is not None and self._ending.active():
            self._ending.cancel()
        self._ending = None

    def scan(self) -> None:
        now = self.clock.seconds()
        deadline = now - self.timeout
        expired = []
        for session in self._sessions():
            if not session.logged_on:
                continue
            if session.active:
                session.active = False
                session.last_active = now
            elif session.last_active <= deadline:
                expired.append(session)
        if self._ending is not None and self._ending.active():
            # This scan found them again (still silent), with any new ones.
            self._ending.cancel()
        self._end(expired)
        if self._tick is not None:
            self._tick(now)

    def _end(self, expired: list[Any], start: int = 0) -> None:
        self._ending = None
        stop = start + self.MAX_ENDED_PER_TURN
        for session in expired[start:stop]:
            if session.logged_on:  # not ended meanwhile by an earlier one's subscriber
                self._expire(session)
        if stop < len(expired):
            self._ending = self.clock.callLater(0, self._end, expired, stop)
