"""
What both ends of a session share: events applications subscribe to, and
calling application code that may answer now, later or as a coroutine.
"""

from __future__ import annotations

import inspect
from collections.abc import Coroutine
from typing import Any, Callable, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

__all__ = ["Event", "IEvent", "call", "call_then", "outcome"]

log = Logger(namespace="esf")


class IEvent(Interface):
    """
    Something that happens, to which any number of callables subscribe.

    Subscribers are called synchronously, in subscription order, with the
    event's arguments.  A subscriber that raises is logged and does not stop
    the others or the engine.
    """

    def subscribe(callback: Callable[..., Any]) -> Callable[[], None]:
        """
        Call C{callback} every time the event fires.

        @return: a no-argument callable that unsubscribes C{callback}.
        """

    def unsubscribe(callback: Callable[..., Any]) -> None:
        """
        Stop calling C{callback}; unknown callbacks are ignored.
        """


#: Types of answers that are never awaitable.
_PLAIN = frozenset({bool, list, tuple, set, frozenset, dict, str, bytes, int, type(None)})


def outcome(f: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """
    Call C{f(*args)}: its result, a L{Deferred} for a later one (a
    coroutine is run as one), or a L{Failure} if it raised.
    """
    try:
        result = f(*args)
    except BaseException:
        return Failure()
    if type(result) in _PLAIN:
        return result  # the common answers, without asking inspect
    if not isinstance(result, Deferred) and inspect.isawaitable(result):
        return Deferred.fromCoroutine(cast(Coroutine[Any, Any, Any], result))
    return result


def call(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Call an application method that may answer synchronously, with a
    Deferred or as a coroutine; always return a Deferred.
    """
    result = outcome(f, args)
    if isinstance(result, Deferred):
        return result
    if isinstance(result, Failure):
        return fail(result)
    return succeed(result)


def call_then(
    f: Callable[..., Any], args: tuple[Any, ...], then: Callable[..., Any], *extra: Any
) -> None:
    """
    Call C{f(*args)} as L{call} does, then C{then(outcome, *extra)}, where
    the outcome is its result or a L{Failure}: at once when C{f} answered
    synchronously (no Deferred made, as the common case of a logon has it),
    else when its answer comes.
    """
    result = outcome(f, args)
    if isinstance(result, Deferred):
        result.addBoth(then, *extra)
    else:
        then(result, *extra)


@implementer(IEvent)
class Event:
    """
    A list of subscribers, called in order; a subscriber's exception is
    logged and goes no further.
    """

    def __init__(self, name: str):
        self.name = name
        self._subscribers: list[Callable[..., Any]] = []

    def subscribe(self, callback: Callable[..., Any]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self.unsubscribe(callback)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    def fire(self, *args: Any) -> None:
        for callback in list(self._subscribers):
            try:
                callback(*args)
            except Exception:
                log.failure(
                    "subscriber {callback!r} of {event} raised",
                    callback=callback,
                    event=self.name,
                )

    def __repr__(self) -> str:
        return f"<Event {self.name} ({len(self._subscribers)} subscribers)>"
