"""
One connection of a client engine, and Twisted's L{ClientService} that
makes a new one whenever the last is lost: bytes in, frames out to the
engine.

The connection knows its engine only as a L{ConnectionOwner}: what it
tells the engine, by public names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.wire._decoder import FrameDecoder
from esf.wire._frames import Frame, FrameError, WireConfig

from ._state import Ending, NotConnected

__all__ = ["ClientProtocol", "ConnectionOwner", "Reconnector"]

log = Logger(namespace="esf.client")


class ConnectionOwner(TypingProtocol):
    """
    What a L{ClientProtocol} needs of its engine (L{esf.ClientEngine} is
    one): the wire's bounds, and to be told of what happens to the
    connection.
    """

    @property
    def wire(self) -> WireConfig: ...

    def connection_made(self, protocol: ClientProtocol) -> None:
        """
        C{protocol} is connected (not yet logged on).
        """

    def frames_received(self, protocol: ClientProtocol, frames: list[Frame]) -> None:
        """
        C{protocol} read these frames (perhaps none: bytes of a frame not
        yet whole still show that the server is alive).
        """

    def connection_lost(self, protocol: ClientProtocol, reason: Failure | None) -> None:
        """
        C{protocol}'s connection is gone.
        """

    def drained(self) -> None:
        """
        The connection's output went below its threshold.
        """


@implementer(IPushProducer)
class ClientProtocol(Protocol):
    """
    One connection of a L{esf.ClientEngine}: bytes in, frames to the engine.

    @ivar ending: how this connection is ending, once known (L{Ending}).
    @ivar accepted: whether its logon succeeded (L{ClientService} then
        counts it as its connection).
    """

    # A stream transport: besides ITransport, it is an IConsumer
    # (registerProducer) and has abortConnection, which ITransport does not
    # declare.
    transport: Any

    def __init__(self, owner: ConnectionOwner, service_side: Protocol | None = None):
        self.owner = owner
        self.decoder = FrameDecoder(owner.wire)
        self.paused = False
        #: Bytes of the answers this client wrote on its own (L{Inbox}'s)
        #: since the transport paused this connection (the server is not
        #: reading them), until it resumes it.
        self.answers_while_busy = 0
        #: Why this client gave the connection up as broken, once it has:
        #: nothing more is written to it.
        self.broken: str | None = None
        self.service_side = service_side
        self.ending: Ending | None = None
        self.accepted = False
        #: What ClientService's prepareConnection waits on: fires once the
        #: logon succeeded, fails when it did not.
        self.prepared: Deferred[None] = Deferred()
        #: Fired once the connection is lost (after ClientService heard).
        self.lost: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(True)
        if self.service_side is not None:
            self.service_side.makeConnection(self.transport)
        self.owner.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            frames = e.frames
            log.error("the server sent an invalid frame: {error}", error=e.message)
            self.transport.abortConnection()
        self.owner.frames_received(self, frames)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.owner.connection_lost(self, reason)
        self.reject(Failure(NotConnected("the connection was lost during the logon")))
        if self.accepted and self.service_side is not None:
            self.service_side.connectionLost(cast(Failure, reason))
        lost, self.lost = self.lost, []
        for d in lost:
            d.callback(None)

    def accept(self) -> None:
        """
        The logon succeeded: ClientService counts this connection as made.
        """
        if not self.prepared.called:
            self.accepted = True
            self.prepared.callback(None)

    def reject(self, failure: Failure) -> None:
        """
        The logon failed: ClientService counts a failed attempt and retries
        after its backoff (unless stopped).
        """
        if not self.prepared.called:
            self.prepared.errback(failure)

    def write(self, data: bytes) -> None:
        if self.broken is not None:
            return
        self.transport.write(data)

    @property
    def writable(self) -> bool:
        """
        Whether the connection is open and not given up.
        """
        return self.transport is not None and self.broken is None

    def give_up(self, why: str) -> None:
        """
        Close the connection as broken: nothing more is written to it, and
        its transport is aborted (what waits unsent is dropped).
        """
        if self.broken is None:
            self.broken = why
            self.transport.abortConnection()

    def closed_within(self, clock: IReactorTime, timeout: float) -> Deferred[None]:
        """
        Wait for the other side to close the connection: fires once it is
        closed, cut off if still open after C{timeout} seconds.
        """
        closed: Deferred[None] = Deferred()
        self.lost.append(closed)
        cut_off = clock.callLater(timeout, self.transport.abortConnection)

        def gone(_: None) -> None:
            if cut_off.active():
                cut_off.cancel()

        return closed.addCallback(gone)

    def pauseProducing(self) -> None:
        self.paused = True
        self.answers_while_busy = 0

    def resumeProducing(self) -> None:
        self.paused = False
        self.answers_while_busy = 0
        self.owner.drained()

    def stopProducing(self) -> None:
        pass


class _ServiceSide(Protocol):
    """
    The connection as L{ClientService} sees it.

    Why not the L{ClientProtocol} itself: ClientService's state machine has
    no transition for the loss of a connection that its C{prepareConnection}
    is still preparing or has rejected (it raises C{NoTransition} from the
    transport).  So the transport talks to the L{ClientProtocol}, and
    ClientService hears of a connection's end only once it has accepted
    the connection, through this stand-in.
    """

    def __init__(self, protocol: ClientProtocol | None = None):
        self.protocol = protocol


@implementer(IStreamClientEndpoint)
class Endpoint:
    """
    The application's endpoint, making L{ClientProtocol}s for a
    L{ClientService} that is handed their L{_ServiceSide}s.
    """

    def __init__(self, owner: ConnectionOwner, endpoint: IStreamClientEndpoint):
        self.owner = owner
        self.endpoint = endpoint

    def connect(self, service_factory: Any) -> Deferred[IProtocol]:
        # service_factory: ClientService's wrapper of ServiceSideFactory.
        owner = self.owner

        class _Factory(Factory):
            noisy = False

            def buildProtocol(self, addr: IAddress | None) -> ClientProtocol:
                side = service_factory.buildProtocol(addr)
                protocol = ClientProtocol(owner, side)
                side.protocol = protocol
                return protocol

        d = self.endpoint.connect(_Factory())
        return d.addCallback(lambda p: cast(Any, p).service_side)


class ServiceSideFactory(Factory):
    noisy = False
    protocol = _ServiceSide


class Reconnector:
    """
    Twisted's L{ClientService} for one engine: it connects through the
    application's endpoint, retries with the engine's policy and clock, and
    runs the engine's logon as its C{prepareConnection}.

    @ivar service: the L{ClientService}, once started.
    """

    def __init__(
        self,
        owner: ConnectionOwner,
        endpoint: IStreamClientEndpoint,
        retry_policy: Callable[[int], float],
        clock: IReactorTime,
    ):
        self.owner = owner
        self.endpoint = endpoint
        self.retry_policy = retry_policy
        self.clock = clock
        self.service: ClientService | None = None

    @property
    def running(self) -> bool:
        return self.service is not None and bool(self.service.running)

    def start(
        self,
        prepare: Callable[[Any], Deferred[None]],
        first_failed: Callable[[Failure], None],
    ) -> None:
        """
        Start connecting; C{first_failed} is told, from the event loop, if
        the first connection cannot be made.
        """
        service = self.service = ClientService(
            Endpoint(self.owner, self.endpoint),
            ServiceSideFactory(),
            retryPolicy=self.retry_policy,
            clock=self.clock,
            prepareConnection=prepare,
        )
        # Asked before starting: an endpoint may fail at once.  Only the
        # first attempt's failure arrives here (success is announced by
        # the logon, once ClientService has taken the connection).
        connected = service.whenConnected(failAfterFailures=1)
        service.startService()

        def could_not_connect(failure: Failure) -> None:
            if not failure.check(CancelledError):
                # This runs inside ClientService's state machine, which must
                # not be re-entered (stopService, or a close() by whoever
                # waits for the logon): go on from the event loop.
                self.clock.callLater(0, first_failed, failure)

        connected.addCallbacks(lambda _: None, could_not_connect)

    def stop(self, protocol: ClientProtocol | None) -> Deferred[None]:
        """
        Stop reconnecting, and close C{protocol}, the current connection;
        fires once it is closed.
        """
        service = self.service
        if service is None or not service.running:
            return succeed(None)
        if protocol is not None and protocol.transport is not None:
            # A registered producer would hold the close back (TLS waits
            # for it to unregister before its shutdown).
            protocol.transport.unregisterProducer()
        return service.stopService().addBoth(lambda _: None)
