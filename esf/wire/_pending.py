"""
The requests one end of a session waits on, by MessageID: one table, one
shape, for the server's queries to clients and for a client's calls.

Each entry remembers whom it asked, so that an answer is accepted only from
there (another user cannot complete or fail a call with an answer of its
own), and has a timer; the entries of a connection that goes away fail
together.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ._frames import ErrorCode
from ._messages import RequestError

__all__ = ["PendingRequests"]

#: MessageIDs are positive signed 32-bit numbers; 0 means "no answer wanted".
_MAX_MESSAGE_ID = 0x7FFFFFFF


class _Entry:
    __slots__ = ("deferred", "asked", "timer")

    def __init__(self, deferred: Deferred[Any], asked: Any, timer: IDelayedCall):
        self.deferred = deferred
        self.asked = asked
        self.timer = timer


class PendingRequests:
    """
    Outstanding requests keyed by MessageID.

    @param clock: where timeouts come from.
    @param timeout: seconds a request waits by default.
    """

    def __init__(self, clock: IReactorTime, timeout: float):
        self.clock = clock
        self.timeout = timeout
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, message_id: int) -> bool:
        return message_id in self._entries

    def next_id(self) -> int:
        """
        A MessageID no outstanding request uses (1 .. 2**31 - 1).
        """
        while True:
            message_id = next(self._ids) % _MAX_MESSAGE_ID + 1
            if message_id not in self._entries:
                return message_id

    def expect(self, message_id: int, asked: Any, timeout: float | None = None) -> Deferred[Any]:
        """
        Wait for the answer to request C{message_id}, sent to C{asked}.

        @return: a Deferred that fires with what L{answer} is given, or
            fails with L{RequestError}C{(TIMEOUT)}; cancelling it forgets
            the request.
        """
        if message_id in self._entries:
            raise ValueError(f"MessageID {message_id} is already outstanding")
        d: Deferred[Any] = Deferred(lambda _: self._forget(message_id))
        timer = self.clock.callLater(
            self.timeout if timeout is None else timeout, self._timed_out, message_id
        )
        self._entries[message_id] = _Entry(d, asked, timer)
        return d

    def asked(self, message_id: int) -> Any:
        """
        Whom request C{message_id} was sent to, or C{None} if it is not
        outstanding.
        """
        entry = self._entries.get(message_id)
        return entry.asked if entry is not None else None

    def answer(self, message_id: int, answerer: Any, result: Any) -> bool:
        """
        Fire request C{message_id} with C{result} (a L{Failure} or exception
        fails it) if C{answerer} is whom it asked.

        @return: whether a request took the answer.
        """
        entry = self._entries.get(message_id)
        if entry is None or entry.asked != answerer:
            return False
        del self._entries[message_id]
        if entry.timer.active():
            entry.timer.cancel()
        if isinstance(result, BaseException):
            entry.deferred.errback(result)
        else:
            entry.deferred.callback(result)
        return True

    def fail_where(self, asked: Callable[[Any], bool], error: BaseException) -> int:
        """
        Fail every request whose C{asked} satisfies the predicate.

        @return: how many failed.
        """
        doomed = [i for i, e in self._entries.items() if asked(e.asked)]
        for message_id in doomed:
            self._fail(message_id, error)
        return len(doomed)

    def fail_all(self, error: BaseException) -> int:
        """
        Fail every outstanding request (the connection is gone).
        """
        return self.fail_where(lambda _: True, error)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._entries))

    def _fail(self, message_id: int, error: BaseException) -> None:
        entry = self._entries.pop(message_id, None)
        if entry is None:
            return
        if entry.timer.active():
            entry.timer.cancel()
        entry.deferred.errback(error)

    def _forget(self, message_id: int) -> None:
        entry = self._entries.pop(message_id, None)
        if entry is not None and entry.timer.active():
            entry.timer.cancel()

    def _timed_out(self, message_id: int) -> None:
        entry = self._entries.pop(message_id, None)
        if entry is not None:
            entry.deferred.errback(RequestError(ErrorCode.TIMEOUT, "no answer in time"))
