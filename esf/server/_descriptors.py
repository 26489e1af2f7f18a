"""
File descriptors: how the server's ports share them, and what is logged
when they run out.

A process may hold C{RLIMIT_NOFILE} descriptors at once; past it every
C{accept} on every port fails.  L{share_descriptors} decides, at start,
how many ESF connections the server takes (C{--max-connections}) beside
what the HTTP sites may hold (their connection caps) and a reserve for
the rest of the process (log and audit files, the offline store, Redis,
the reactor's own), so that an attack on one HTTP site cannot take the ESF
port's share.

When descriptors run out anyway (another part of the process, or a limit
lowered under a running server), Twisted logs every accept that failed
and every connection it closed to recover: a peer that keeps connecting
turns that into a line per attempt.  L{QuietAcceptErrors} makes it one
line per interval, with a count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from zope.interface import implementer

__all__ = [
    "DESCRIPTOR_RESERVE",
    "DescriptorShare",
    "IntervalCount",
    "QuietAcceptErrors",
    "nofile_limits",
    "quiet_accept_errors",
    "raise_soft_limit",
    "share_descriptors",
]

log = Logger(namespace="esf.server")

#: Descriptors kept for everything but connections: standard streams, the
#: reactor's own (epoll, the waker), listening sockets, log, audit and
#: offline store files, Redis, Twisted's reserve for running out.
DESCRIPTOR_RESERVE = 32

#: Seconds between two log lines about the same kind of refusal.
LOG_INTERVAL = 10.0


class IntervalCount:
    """
    Counts events of one kind and logs at most one line per interval about
    them: the first event at once, then, at the end of each interval that
    had more, how many.

    @param emit: called with the number of events the line is about and
        the interval in seconds; it logs the line.
    """

    def __init__(
        self,
        clock: IReactorTime,
        emit: Callable[[int, float], None],
        interval: float = LOG_INTERVAL,
    ):
        self.clock = clock
        self.emit = emit
        self.interval = interval
        self.total = 0
        self._pending = 0
        self._call: IDelayedCall | None = None

    def count(self, number: int = 1) -> None:
        """
        C{number} more events happened.
        """
        self.total += number
        if self._call is not None:
            self._pending += number
            return
        self.emit(number, self.interval)
        self._call = self.clock.callLater(self.interval, self._flush)

    def _flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, 0
        if pending:
            self.emit(pending, self.interval)
            self._call = self.clock.callLater(self.interval, self._flush)

    def stop(self) -> None:
        """
        Log what is pending now and stop the timer.
        """
        if self._call is not None:
            self._call.cancel()
            self._call = None
        pending, self._pending = self._pending, 0
        if pending:
            self.emit(pending, self.interval)


# -- running out of descriptors -----------------------------------------------------

#: The formats of what Twisted's TCP port logs about accepts that failed
#: (twisted.internet.tcp._accept): one event per attempt.
_ACCEPT_FORMATS = {
    "Could not accept new connection ({acceptError})": "accept_failed",
    "EMFILE encountered; releasing reserved file descriptor.": "emfile",
    "EMFILE recovery: Closed socket from {address}": "closed",
    "Re-reserving EMFILE recovery file descriptor.": "",
}


@implementer(ILogObserver)
class _AcceptErrorObserver:
    """
    The observer of one listening port's accept loop: what it says about
    failed accepts is counted; everything else goes on to C{publisher}.
    """

    def __init__(self, counter: IntervalCount, publisher: ILogObserver):
        self.counter = counter
        self.publisher = publisher

    def __call__(self, event: LogEvent) -> None:
        kind = _ACCEPT_FORMATS.get(event.get("log_format") or "")
        if kind is None:
            self.publisher(event)
        elif kind in ("accept_failed", "closed"):
            self.counter.count()


@implementer(IStreamServerEndpoint)
class QuietAcceptErrors:
    """
    An endpoint whose port logs running out of descriptors once per
    interval, with a count of the connections it could not take (failed
    accepts and connections closed at once to recover), instead of a line
    for each.

    Twisted's C{tcp.Port} (and the TLS and UNIX ports built on it) logs
    those through its C{_logger}; the port this endpoint listens on gets a
    logger of its own whose observer counts them.  (No public hook exists:
    a C{Port} subclass would mean writing every endpoint type again.)  A
    port of another kind is left as it is.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, clock: IReactorTime, *, publisher: Any = None
    ):
        self.endpoint = endpoint
        self.clock = clock
        self.publisher = publisher if publisher is not None else globalLogPublisher

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            quiet_accept_errors(port, self.clock, self.publisher)
            return port

        return self.endpoint.listen(factory).addCallback(listening)


def quiet_accept_errors(port: Any, clock: IReactorTime, publisher: Any = None) -> None:
    """
    Make C{port} (a C{tcp.Port}) log failed accepts once per interval.
    """
    old = getattr(port, "_logger", None)
    if not isinstance(old, Logger):
        return
    publisher = publisher if publisher is not None else globalLogPublisher
    name = getattr(getattr(port, "factory", None), "logPrefix", lambda: "a port")()
    try:
        where = f"{name} on {port.getHost().port}"
    except Exception:  # a port with no TCP address
        where = str(name)

    def emit(count: int, interval: float) -> None:
        log.error(
            "esf: out of file descriptors: {where} could not take {count} connection(s) "
            "(at most one such line per {interval:g} s; see --max-connections and "
            "ulimit -n)",
            where=where,
            count=count,
            interval=interval,
            esf_event="descriptors_exhausted",
        )

    counter = IntervalCount(clock, emit)
    observer = _AcceptErrorObserver(counter, publisher)
    port._logger = Logger(namespace=old.namespace, observer=observer)
    port.esf_accept_errors = counter


# -- sharing them ---------------------------------------------------------------------


@attrs.frozen
class DescriptorShare:
    """
    How many descriptors each part of the server may hold.

    @ivar limit: the soft C{RLIMIT_NOFILE} the share is made of, or C{None}
        where there is none.
    @ivar max_connections: ESF connections (TCP and WebSocket, all ports),
        or C{None} for no cap (no limit to share).
    @ivar http: the HTTP sites' caps, by name.
    @ivar reserve: what is kept for everything else.
    @ivar raise_to: the soft limit to set first, or C{None} to leave it.
    """

    limit: int | None
    max_connections: int | None
    http: tuple[tuple[str, int], ...]
    reserve: int
    raise_to: int | None = None


def share_descriptors(
    soft: int | None,
    hard: int | None,
    max_connections: int | None,
    http: Sequence[tuple[str, int]],
    reserve: int = DESCRIPTOR_RESERVE,
) -> DescriptorShare:
    """
    Share C{soft} descriptors between the ESF port and the HTTP sites.

    With no C{--max-connections}, the ESF connections get what the HTTP
    sites' caps and the reserve leave.  With one that does not fit, the
    soft limit is raised to what is needed when the hard limit allows it.

    @param soft: the soft C{RLIMIT_NOFILE}, C{None} if unlimited.
    @param hard: the hard one, C{None} if unlimited.
    @param http: C{(option, cap)} of each HTTP site.

    @raise ValueError: the caps cannot fit, with a one-line reason.
    """
    caps = tuple(http)
    others = sum(cap for _, cap in caps) + reserve
    if soft is None:
        return DescriptorShare(None, max_connections, caps, reserve)
    if max_connections is None:
        left = soft - others
        if left < 1:
            raise ValueError(
                f"the descriptor limit ({soft}, ulimit -n) leaves no connections for ESF "
                f"beside {_spent(caps, reserve)}: raise it or lower those caps"
            )
        return DescriptorShare(soft, left, caps, reserve)
    need = max_connections + others
    if need <= soft:
        return DescriptorShare(soft, max_connections, caps, reserve)
    if hard is None or need <= hard:
        return DescriptorShare(need, max_connections, caps, reserve, raise_to=need)
    raise ValueError(
        f"--max-connections {max_connections} and {_spent(caps, reserve)} need {need} "
        f"descriptors; the hard limit is {hard} (ulimit -Hn): lower them or raise it"
    )


def _spent(caps: tuple[tuple[str, int], ...], reserve: int) -> str:
    parts = [f"--{name} {cap}" for name, cap in caps]
    parts.append(f"{reserve} kept for the process")
    return ", ".join(parts)


def nofile_limits() -> tuple[int | None, int | None]:
    """
    The soft and hard C{RLIMIT_NOFILE}, C{None} for unlimited (or where
    there is no such limit).
    """
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    return (None if soft == unlimited else soft), (None if hard == unlimited else hard)


def raise_soft_limit(to: int) -> None:
    """
    Set the soft C{RLIMIT_NOFILE} to C{to} (at most the hard limit).
    """
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (to, hard))
