"""
Bounds on what peers can make an HTTP site hold: a cap on its connections
and a deadline for each request's head and body.

twisted.web's own timer is an idle timer: every byte restarts it, so a
peer that sends one byte every few seconds keeps a connection (and its
descriptor) for as long as it likes.  L{limit_site} wraps a L{Site} so
that

  - it holds at most C{max_connections} connections; one more is closed
    as soon as it is accepted (L{ConnectionCap}, a L{WrappingFactory},
    which caps the WebSocket handshakes of C{--websocket} as well);
  - a request's whole head and body must arrive within
    C{request_timeout} seconds of the accept, or of the end of the
    previous response on the same connection (a total, like nginx's
    C{client_header_timeout}, not an idle timer); past it the peer gets
    C{408} and the connection is closed (L{DeadlineChannel});
  - requests pipelined in one read are answered one per reactor turn,
    and not while the peer leaves its answers unread (L{DeadlineChannel}).

Each site logs what it refused at most once per interval, with a count.
The time a response takes to render is not timed; once it is handed to
the connection the next request's deadline runs, so a peer that does not
read it is closed (and aborted) all the same.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from ._descriptors import IntervalCount

__all__ = [
    "HTTP_LIMITS",
    "MAX_BODY",
    "BoundedRequest",
    "ConnectionCap",
    "DeadlineChannel",
    "HTTPLimits",
    "LimitedSite",
    "QuietSite",
    "UnnamedRequest",
    "handed_over",
    "connections_closed",
    "limit_site",
]

log = Logger(namespace="esf.server")

_REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)


@attrs.frozen
class HTTPLimits:
    """
    The bounds of one HTTP site.

    @ivar max_connections: connections it may hold at once.
    @ivar request_timeout: seconds a request's head and body may take to
        arrive, from the accept or from the end of the previous response.
    """

    max_connections: int = attrs.field(validator=attrs.validators.ge(1))
    request_timeout: float = attrs.field(validator=attrs.validators.gt(0))


#: The bounds of the admin API and the metrics site unless told otherwise
#: (C{--admin-api-max-connections}, C{--metrics-max-connections},
#: C{--http-request-timeout}).
HTTP_LIMITS = HTTPLimits(max_connections=64, request_timeout=10.0)


#: The largest request body an HTTP site keeps, in bytes; a bigger one gets
#: 413 and a close.
MAX_BODY = 64 * 1024


class BoundedRequest(Request):
    """
    A request whose body may be at most L{MAX_BODY} bytes.  A bigger one,
    announced by Content-Length or sent chunked, is answered C{413} and the
    connection is closed without reading (or keeping) the rest.

    (C{twisted.web} keeps any body whole, in memory or in a temporary
    file, before it renders; this is where a bound can go.  Without it one
    connection writes to disk whatever it sends within the deadline.)
    """

    max_body = MAX_BODY
    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            # (twisted.web.http.Request has no annotations.)
            super().gotLength(0)  # type: ignore[no-untyped-call]
            self._refuse_body()
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse_body()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if not self._refused:
            super().process()  # type: ignore[no-untyped-call]

    def _refuse_body(self) -> None:
        self._refused = True
        # What was kept of the body (a temporary file, for a chunked one)
        # is not wanted: let it go now, not when the connection is gone.
        if self.content is not None:
            self.content.close()
            self.content = io.BytesIO()
        message = f"request bodies are at most {self.max_body} bytes"
        answer = {"error": "too_large", "message": message}
        body = json.dumps(answer, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        head = (
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n"
        )
        transport = self.channel.transport
        assert transport is not None  # a body is arriving on it
        transport.write(head + body)
        self.channel.loseConnection()


class UnnamedRequest(BoundedRequest):
    """
    A request answered without a C{Server} header: esf's HTTP sites do not
    tell a scanner which twisted.web version to aim at (the WebSocket port
    does not either).  Its body is bounded (L{BoundedRequest}).
    """

    def write(self, data: bytes) -> None:
        if not self.startedWriting:  # the head goes out with the first write
            self.responseHeaders.removeHeader(b"server")
        super().write(data)  # type: ignore[no-untyped-call]


class QuietSite(Site):
    """
    A L{Site} that writes no access-log line per request, and whose
    requests name no server and have bounded bodies (L{UnnamedRequest}).

    twisted.web writes one to the server's log for every request, up to the
    head's 16 KiB (its path, C{Referer} and C{User-Agent}): a peer that
    pipelines requests on one connection would fill the log at the rate it
    sends them, whatever else bounds it.  What these sites do is logged by
    them, within bounds of its own.
    """

    requestFactory = UnnamedRequest

    def log(self, request: Any) -> None:
        pass


class DeadlineChannel(HTTPChannel):
    """
    An L{HTTPChannel} that must receive each request's head and body
    within L{request_timeout} seconds of the accept or of the end of the
    previous response; past it the peer gets C{408} and the connection is
    closed (aborted if it has not closed after as long again).

    L{ConnectionCap} sets L{clock}, L{request_timeout} and L{timed_out}
    before the connection is made.
    """

    clock: IReactorTime
    request_timeout: float = 10.0
    timed_out: IntervalCount | None = None
    _deadline: IDelayedCall | None = None
    #: The call that parses the next pipelined request.
    _next: IDelayedCall | None = None
    _gone = False

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]  # HTTPChannel has no annotations
        self._arm()

    def allContentReceived(self) -> None:
        # The whole head and body are here: what follows (rendering, the
        # response, a WebSocket taking the connection over) is not timed.
        self._disarm()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Any) -> None:
        # Armed before the parent looks at what the peer has already sent
        # of its next request (it may hold the whole of it).
        if self.persistent and not self._gone:
            self._arm()
        # What came while the request was handled is parsed with what is
        # left of the read, not by the parent at once.
        self._buffer += b"".join(self._dataBuffer)
        self._dataBuffer = []
        super().requestDone(request)  # type: ignore[no-untyped-call]
        if self._buffer and self.persistent and not self._gone:
            # Requests pipelined in one read: the parent would answer them
            # all now.  The next one waits for the next reactor turn, and
            # for the peer to read while the transport's buffer is full;
            # the connection is read no further meanwhile.
            self.paused = True
            self._networkProducer.pauseProducing()
            if not self._waitingForTransport:
                self._next_later()

    def resumeProducing(self) -> None:
        super().resumeProducing()  # type: ignore[no-untyped-call]
        if self.paused and not self._gone:
            self._networkProducer.pauseProducing()  # (the parent resumed it)
            self._next_later()

    def _next_later(self) -> None:
        if self._next is None:
            self._next = self.clock.callLater(0, self._next_request)

    def _next_request(self) -> None:
        self._next = None
        if self._gone or self._waitingForTransport:
            return  # (resumeProducing calls again)
        self.paused = False
        self._networkProducer.resumeProducing()
        self.dataReceived(b"")  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._disarm()
        if self._next is not None:
            self._next.cancel()
            self._next = None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.clock.callLater(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.timed_out is not None:
            self.timed_out.count()
        transport: Any = self.transport  # a TCP or TLS transport: it can abort
        if transport is None:
            return
        # (The idle timer: this closes the connection already.)
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        transport.write(_REQUEST_TIMEOUT_RESPONSE)
        self.loseConnection()  # type: ignore[no-untyped-call]
        # A peer that does not read keeps even a closing connection: it is
        # aborted after as long again.
        self._deadline = self.clock.callLater(self.request_timeout, transport.abortConnection)


class _Refused(Protocol):
    """
    A connection past the cap: closed as soon as it is made, unread.

    A plain TCP connection is closed at once, in the accept loop: an
    aborted transport lets go of its socket only at the reactor's next
    turn, and the listening port accepts up to a hundred and more
    connections in one turn, each holding a descriptor meanwhile; a peer
    that keeps connecting to a full site would so take, for moments, the
    descriptors the ESF port needs (its accepts would fail, and Twisted
    closes what it accepts then).  A TLS connection is aborted as usual.
    """

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if isinstance(transport, tcp.Server):
            transport.connectionLost(Failure(ConnectionAborted()))
        else:
            transport.abortConnection()


def _protocol_of(transport: Any) -> Any:
    """
    The protocol C{transport} delivers to: a TLS transport is a
    L{ProtocolWrapper} (C{wrappedProtocol}); a TCP one names its
    C{protocol}.
    """
    if isinstance(transport, ProtocolWrapper):
        return transport.wrappedProtocol
    return getattr(transport, "protocol", None)


class _Held(ProtocolWrapper):
    """
    One connection L{ConnectionCap} counts until it closes or is handed
    over (L{handed_over}).

    It sits only on the way in, to learn of the connection's end: the
    wrapped protocol gets the real transport as its own (autobahn wants a
    TLS transport to be one, and writes cost nothing more), and once
    handed over this steps out of the way altogether.
    """

    counted = True

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(transport)

    def release(self) -> None:
        if not self.counted:
            return
        self.counted = False
        self.factory.unregisterProtocol(self)
        transport: Any = self.transport
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = self.wrappedProtocol
        elif getattr(transport, "protocol", None) is self:
            transport.protocol = self.wrappedProtocol
        # (Elsewhere it stays in the way, counting no more.)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.counted:
            self.counted = False
            self.factory.unregisterProtocol(self)
        self.wrappedProtocol.connectionLost(reason)


class ConnectionCap(WrappingFactory):
    """
    A factory whose connections are at most C{max_connections} at once,
    until they are handed over (L{handed_over}); one connection more is
    closed as soon as it is accepted.

    (Twisted's C{LimitTotalConnectionsFactory} builds its own protocols;
    this one wraps a factory that is already built, as
    C{LimitConnectionsByPeer} does.)

    @ivar refused: the connections closed for the cap.
    @ivar label: the site's name in the metrics (C{admin}, C{metrics},
        C{web_demo}, C{websocket}).
    """

    protocol = _Held
    noisy = False

    def __init__(
        self,
        factory: Any,
        max_connections: int,
        clock: IReactorTime,
        name: str,
        what: str = "connections",
        *,
        label: str = "http",
    ):
        super().__init__(factory)  # type: ignore[no-untyped-call]
        self.max_connections = max_connections
        self.clock = clock
        self.name = name
        self.label = label

        def refused(count: int, interval: float) -> None:
            log.warn(
                "esf: {site} holds its maximum of {cap} {what}: closed {count} more "
                "(at most one such line per {interval:g} s)",
                site=name,
                cap=max_connections,
                what=what,
                count=count,
                interval=interval,
                esf_event="http_connections_refused",
            )

        self.refused = IntervalCount(clock, refused)

    def logPrefix(self) -> str:
        # The wrapped factory's name, as if it were not wrapped: "AdminSite
        # starting on 8530".
        prefix: str = self.wrappedFactory.logPrefix()
        return prefix

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.max_connections:
            self.refused.count()
            # A protocol, not None: TLS wraps what this returns, and
            # would fail on None.
            return _Refused()
        return super().buildProtocol(addr)

    def doStop(self) -> None:
        self.refused.stop()
        super().doStop()  # type: ignore[no-untyped-call]


class LimitedSite(ConnectionCap):
    """
    A L{Site} holding at most C{limits.max_connections} connections, each
    of whose requests must arrive within C{limits.request_timeout}
    (L{DeadlineChannel}).

    @ivar timed_out: the connections closed for the deadline.
    """

    def __init__(
        self,
        site: Site,
        limits: HTTPLimits,
        clock: IReactorTime,
        name: str,
        *,
        label: str = "http",
    ):
        super().__init__(site, limits.max_connections, clock, name, label=label)
        # A plain HTTP/1.1 channel, not the one that may become HTTP/2: the
        # deadline is in the channel.
        site.protocol = DeadlineChannel  # type: ignore[assignment,method-assign]
        self.limits = limits

        def timed_out(count: int, interval: float) -> None:
            log.info(
                "esf: {site}: closed {count} connection(s) that did not send a whole request "
                "within {timeout:g} s (at most one such line per {interval:g} s)",
                site=name,
                count=count,
                timeout=limits.request_timeout,
                interval=interval,
                esf_event="http_request_timeout",
            )

        self.timed_out = IntervalCount(clock, timed_out)

    def buildProtocol(self, addr: Any) -> Any:
        held = super().buildProtocol(addr)
        if isinstance(held, _Held):
            channel: Any = held.wrappedProtocol
            channel.clock = self.clock
            channel.request_timeout = self.limits.request_timeout
            channel.timed_out = self.timed_out
        return held

    def doStop(self) -> None:
        self.timed_out.stop()
        super().doStop()


def limit_site(
    site: Site, limits: HTTPLimits, clock: IReactorTime, name: str, *, label: str = "http"
) -> LimitedSite:
    """
    C{site} bounded by C{limits}, named C{name} in the log and C{label} in
    the metrics, timed by C{clock}: the factory to listen with.
    """
    return LimitedSite(site, limits, clock, name, label=label)


def connections_closed(caps: Iterable[ConnectionCap]) -> dict[tuple[str, str], int]:
    """
    How many connections C{caps} closed, by site label and reason
    (C{max_connections}: over the cap; C{request_timeout}: no whole request
    in time), summed over caps of the same label.
    """
    closed: dict[tuple[str, str], int] = {}
    for cap in caps:
        counts = [("max_connections", cap.refused.total)]
        if isinstance(cap, LimitedSite):
            counts.append(("request_timeout", cap.timed_out.total))
        for reason, total in counts:
            closed[cap.label, reason] = closed.get((cap.label, reason), 0) + total
    return closed


def handed_over(protocol: Any) -> None:
    """
    C{protocol}'s connection is done with its handshake (an HTTP request
    that a WebSocket takes over, a WebSocket handshake accepted) and no
    longer counts against its L{ConnectionCap}: it is an ESF connection
    now.  Call it while C{protocol.transport} still delivers to the cap's
    wrapper of C{protocol}.
    """
    held = _protocol_of(getattr(protocol, "transport", None))
    if isinstance(held, _Held) and held.wrappedProtocol is protocol:
        held.release()
