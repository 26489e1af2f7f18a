"""
What happened during a test, as L{esf.testing} records it: the events of a
user manager or a client (L{EventRecorder}, L{record_events}), esf's log
events (L{LogCapture}) and the errors logged (L{LoggedErrors}).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from functools import partial
from types import TracebackType
from typing import Any, Callable

from twisted.logger import ILogObserver, LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.interfaces import IEvent

__all__ = ["EventRecorder", "record_events", "event_names", "LogCapture", "LoggedErrors"]


# -- events -----------------------------------------------------------------------------------


def event_names(source: Any) -> list[str]:
    """
    The names of C{source}'s event attributes (those providing
    L{IEvent}), in the order it made them.
    """
    attributes = vars(source) if hasattr(source, "__dict__") else {}
    names = [name for name, value in attributes.items() if IEvent.providedBy(value)]
    if not names:
        names = [name for name in dir(source) if IEvent.providedBy(getattr(source, name, None))]
    return names


class EventRecorder:
    """
    Records the events of one source as C{(name, *arguments)} tuples, in
    the order they fire.

    @ivar events: what was recorded.
    """

    def __init__(
        self,
        source: Any,
        names: Sequence[str] | None = None,
        convert: Callable[[Any], Any] | None = None,
    ):
        """
        @param names: the events to record (by default every one).
        @param convert: applied to each argument before it is recorded.
        """
        self.events: list[tuple[Any, ...]] = []
        self._convert = convert
        self._unsubscribe = [
            getattr(source, name).subscribe(partial(self._record, name))
            for name in (names if names is not None else event_names(source))
        ]
        if not self._unsubscribe:
            raise ValueError(f"{source!r} has no events")

    def _record(self, name: str, *args: Any) -> None:
        if self._convert is not None:
            args = tuple(self._convert(a) for a in args)
        self.events.append((name, *args))

    def names(self) -> list[str]:
        """
        The names of the events recorded, in order.
        """
        return [event[0] for event in self.events]

    def of(self, name: str) -> list[tuple[Any, ...]]:
        """
        The arguments of each C{name} event recorded.
        """
        return [event[1:] for event in self.events if event[0] == name]

    def clear(self) -> None:
        """
        Forget what was recorded so far.
        """
        del self.events[:]

    def stop(self) -> None:
        """
        Stop recording.
        """
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []


def record_events(source: Any, *names: str) -> EventRecorder:
    """
    Record C{source}'s events: an L{esf.interfaces.IUserManager}
    (C{engine.user_manager}), a L{ClientEngine}, or anything whose event
    attributes provide L{IEvent}.  Every event is recorded unless C{names}
    are given.
    """
    return EventRecorder(source, names or None)


# -- logs -------------------------------------------------------------------------------------


def _in_namespace(event: dict[str, Any], namespace: str | None) -> bool:
    if namespace is None:
        return True
    found = event.get("log_namespace") or ""
    return bool(found == namespace or found.startswith(namespace + "."))


def _is_error(event: dict[str, Any]) -> bool:
    level = event.get("log_level")
    return (
        event.get("log_failure") is not None
        or bool(event.get("isError"))
        or (isinstance(level, type(LogLevel.error)) and level >= LogLevel.error)
    )


@implementer(ILogObserver)
class LogCapture:
    """
    Collects the log events of a namespace (C{"esf"}: the server's
    C{esf.server}, the client's C{esf.client} and the rest of esf's; C{None}:
    every event) from the global log publisher while started.  A context
    manager::

        with LogCapture() as logs:
            ...
        [ended] = logs.esf_events("session_ended")

    @ivar events: the events captured.
    """

    def __init__(self, namespace: str | None = "esf", publisher: LogPublisher | None = None):
        self.namespace = namespace
        self.events: list[dict[str, Any]] = []
        self._publisher = publisher if publisher is not None else globalLogPublisher

    def __call__(self, event: dict[str, Any]) -> None:
        if _in_namespace(event, self.namespace):
            self.events.append(event)

    def start(self) -> LogCapture:
        self._publisher.addObserver(self)
        return self

    def stop(self) -> None:
        self._publisher.removeObserver(self)

    def __enter__(self) -> LogCapture:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def esf_events(self, esf_event: str) -> list[dict[str, Any]]:
        """
        The captured events whose C{esf_event} field is C{esf_event} (for
        instance C{"session_ended"}, C{"logged_on"}, C{"kick_out"}).
        """
        return [e for e in self.events if e.get("esf_event") == esf_event]

    def errors(self) -> list[dict[str, Any]]:
        """
        The captured events logged as errors (a failure, C{isError}, or
        level error and above).
        """
        return [e for e in self.events if _is_error(e)]

    def messages(self) -> list[str]:
        """
        Every captured event as its formatted text.
        """
        return [formatEvent(e) for e in self.events]


@implementer(ILogObserver)
class LoggedErrors:
    """
    The errors logged anywhere during a test, failures in Deferreds
    garbage-collected unhandled included: what trial turns into test
    errors.  Under pytest, L{check} at the end of a test does the same; a
    test that expects an error takes it out with L{flush}, as trial's
    C{flushLoggedErrors} does.

    @ivar errors: the error events not flushed yet.
    """

    def __init__(self, publisher: LogPublisher | None = None):
        self.errors: list[dict[str, Any]] = []
        self._publisher = publisher if publisher is not None else globalLogPublisher

    def __call__(self, event: dict[str, Any]) -> None:
        if _is_error(event):
            self.errors.append(event)

    def start(self) -> LoggedErrors:
        self._publisher.addObserver(self)
        return self

    def stop(self) -> None:
        self._publisher.removeObserver(self)

    def flush(self, *types: type[BaseException]) -> list[dict[str, Any]]:
        """
        Remove and return the errors that carry a failure of one of
        C{types} (every error when none is given).
        """
        taken = [
            e
            for e in self.errors
            if not types
            or (isinstance(e.get("log_failure"), Failure) and e["log_failure"].check(*types))
        ]
        self.errors = [e for e in self.errors if not any(e is t for t in taken)]
        return taken

    def check(self) -> None:
        """
        Collect garbage (so that unhandled failures in Deferreds are
        logged), then fail if any error is left.

        @raise AssertionError: naming each error.
        """
        gc.collect()
        if self.errors:
            texts = [formatEvent(e) for e in self.errors]
            failures = [e["log_failure"] for e in self.errors if e.get("log_failure")]
            details = "".join(f.getTraceback() for f in failures if isinstance(f, Failure))
            raise AssertionError(f"errors were logged: {texts}\n{details}")
