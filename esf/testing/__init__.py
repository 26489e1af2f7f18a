"""
Helpers for testing applications built on esf: a whole server and its
clients in memory, on one clock.

  - L{MemoryServer}: a real L{esf.ServerEngine} on a L{task.Clock}, and real
    L{esf.ClientEngine}s that reach it through in-memory endpoints (so
    Twisted's own reconnect logic runs).  Nothing moves until the test
    calls L{MemoryServer.pump} (bytes) or L{MemoryServer.advance} (time).
  - L{Connection}: one client's connection; L{Connection.freeze} makes it
    half-open (nothing moves, nobody is told), L{Connection.cut} drops it on
    both sides.
  - L{record_events}: every event of an L{esf.interfaces.IUserManager} or of
    a L{esf.ClientEngine}, in order.
  - L{LogCapture}: esf's structured log events; L{LoggedErrors}: the errors
    logged during a test, as trial's C{flushLoggedErrors} sees them.
  - L{TwistdServer}: a real C{twistd esf} process, for the few end-to-end
    tests (in L{esf.testing._process}).

In memory no reactor runs and no socket opens, so the same test works
under trial (C{SynchronousTestCase} or C{TestCase}), plain pytest and
pytest-twisted.  C{esf.pytest_plugin} holds pytest fixtures built on these
helpers.  The recorders are in L{esf.testing._records}.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any, cast

from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.client._engine import ClientEngine
from esf.interfaces import IPresence
from esf.server._application import engine_for
from esf.server._config import ServerConfig
from esf.server._engine import ServerEngine
from esf.server._protocol import ServerFactory
from esf.wire._decoder import FrameDecoder
from esf.wire._frames import ClientType, Frame, WireConfig

from ._process import TwistdFailed, TwistdServer
from ._records import EventRecorder, LogCapture, LoggedErrors, record_events

__all__ = [
    "MemoryServer",
    "MemoryEndpoint",
    "Connection",
    "MemoryTransport",
    "EventRecorder",
    "record_events",
    "LogCapture",
    "LoggedErrors",
    "TwistdServer",
    "TwistdFailed",
    "doubling_retry_policy",
]

#: What Twisted's TCP transports buffer before they pause their producer.
BUFFER_SIZE = 64 * 1024

#: The address clients reach the in-memory server at.
SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 4530)


def doubling_retry_policy(attempt: int) -> float:
    """
    The reconnect delays of L{MemoryServer.client}s: 1, 2, 4 ... seconds,
    at most 30, with no jitter, so that tests know when a client is back.
    """
    return float(min(2 ** (attempt - 1), 30))


# -- the wire ---------------------------------------------------------------------------------
#
# Twisted's public test transports do not fit: StringTransport keeps what is
# written but delivers nothing and never closes; twisted.protocols.loopback
# runs a conversation to its end.  A connection that can be frozen half-open,
# cut, or closed after its output is delivered needs both ends and the bytes
# in between, which is what follows.


@implementer(ITransport, IConsumer, IPushProducer)
class MemoryTransport:
    """
    One end of a L{Connection}, as its protocol sees it.

    Writes wait in the transport until L{Connection.pump} delivers them.  As
    a TCP transport does, it pauses a registered streaming producer while
    more than L{BUFFER_SIZE} bytes wait, and resumes it once they are taken.
    Its protocol may pause its reading (L{pauseProducing}): bytes for it
    then stay with the sender.

    @ivar disconnecting: C{loseConnection} or C{abortConnection} was
        called.
    @ivar disconnected: the protocol was told the connection is lost.
    """

    def __init__(self, connection: Connection, host: IAddress, peer: IAddress):
        self.connection = connection
        self.host = host
        self.peer = peer
        self.protocol: Any = None
        self.producer: Any = None
        self.streaming = False
        self.producer_paused = False
        self.reading = True
        self.disconnecting = False
        self.aborted = False
        self.disconnected = False
        self._out: list[bytes] = []
        self._waiting = 0

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.host} -> {self.peer}>"

    @property
    def waiting(self) -> int:
        """
        How many written bytes wait for delivery.
        """
        return self._waiting

    # ITransport

    def write(self, data: bytes) -> None:
        if self.disconnected or self.aborted or not data:
            return
        self._out.append(bytes(data))
        self._waiting += len(data)
        if (
            self.producer is not None
            and self.streaming
            and not self.producer_paused
            and self._waiting > BUFFER_SIZE
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """
        Close once the bytes written so far are delivered.
        """
        self.disconnecting = True

    def abortConnection(self) -> None:
        """
        Close now, dropping what was not delivered.
        """
        self.disconnecting = True
        self.aborted = True

    def getPeer(self) -> IAddress:
        return self.peer

    def getHost(self) -> IAddress:
        return self.host

    # IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{self!r} already has a producer")
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streaming = streaming
        self.producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    # IPushProducer: the protocol pausing its own reading.

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        self.loseConnection()

    # what the connection does

    def _take(self) -> bytes:
        data = b"".join(self._out)
        self._out = []
        self._waiting = 0
        producer = self.producer
        if producer is not None and (not self.streaming or self.producer_paused):
            self.producer_paused = False
            producer.resumeProducing()
        return data

    def _lost(self, reason: Exception) -> None:
        self.disconnected = True
        self.disconnecting = True
        self._out = []
        self._waiting = 0
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(Failure(reason))


class Connection:
    """
    One connection between a client protocol and the server, in memory.

    @ivar client: the client's L{MemoryTransport}.
    @ivar server: the server's L{MemoryTransport}.
    @ivar to_server: every byte delivered to the server.
    @ivar to_client: every byte delivered to the client.
    @ivar frozen: whether L{freeze} holds it.
    """

    def __init__(
        self,
        client_protocol: Any,
        server_protocol: Any,
        client_address: IAddress,
        server_address: IAddress,
    ):
        self.client = MemoryTransport(self, client_address, server_address)
        self.server = MemoryTransport(self, server_address, client_address)
        self.client.protocol = client_protocol
        self.server.protocol = server_protocol
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.frozen = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "frozen" if self.frozen else "open"
        return f"<Connection {self.client.host} {state}>"

    @property
    def address(self) -> str:
        """
        The client as the server sees it, C{"host:port"}.
        """
        return _address(self.client.host)

    @property
    def closed(self) -> bool:
        """
        Whether both ends have been told the connection is lost.
        """
        return self.client.disconnected and self.server.disconnected

    def start(self) -> None:
        self.server.protocol.makeConnection(self.server)
        self.client.protocol.makeConnection(self.client)

    def freeze(self) -> None:
        """
        Make the connection half-open, as when a peer's machine vanishes or
        a router drops it: from now on no byte moves either way and neither
        end learns anything.  Each end finds out only by its own timeouts
        (heartbeats, the close timeout), which L{MemoryServer.advance}
        runs.
        """
        self.frozen = True

    def thaw(self) -> None:
        """
        Let bytes (and closes) through again.
        """
        self.frozen = False

    def cut(self) -> None:
        """
        Drop the connection now: both ends are told it is lost
        (C{ConnectionLost}), whatever waited is gone.
        """
        for end in (self.server, self.client):
            if not end.disconnected:
                end._lost(ConnectionLost("the connection was cut"))

    def pump(self) -> bool:
        """
        Deliver what each end wrote, and the closes that are due; whether
        anything happened.
        """
        moved = False
        for source, sink, record in (
            (self.client, self.server, self.to_server),
            (self.server, self.client, self.to_client),
        ):
            if source.disconnected or source.aborted or not source._waiting:
                continue
            if self.frozen or sink.disconnected or not sink.reading:
                continue
            data = source._take()
            record.extend(data)
            sink.protocol.dataReceived(data)
            moved = True
        return self._close() or moved

    def _close(self) -> bool:
        changed = False
        for end, other in ((self.client, self.server), (self.server, self.client)):
            if end.disconnected:
                continue
            if end.aborted:
                end._lost(ConnectionAborted())
                changed = True
            elif end.disconnecting and not end._waiting:
                end._lost(ConnectionDone())
                changed = True
            elif other.disconnected and not self.frozen:
                # The peer is gone and the news gets through.
                reason = ConnectionLost() if other.aborted else ConnectionDone()
                end._lost(reason)
                changed = True
        return changed

    def frames(self, wire: WireConfig | None = None, to: str = "server") -> list[Frame]:
        """
        The frames delivered so far C{to} C{"server"} or C{"client"}.
        """
        data = self.to_server if to == "server" else self.to_client
        return FrameDecoder(wire or WireConfig()).feed(bytes(data))


def _address(address: Any) -> str:
    host = address.host
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """
    A client endpoint whose connections reach a L{MemoryServer}: give it to
    a L{esf.ClientEngine} (or any factory) in place of a TCP endpoint.

    @ivar connections: the connections made through this endpoint, oldest
        first.
    """

    def __init__(self, server: MemoryServer, host: str):
        self.server = server
        self.host = host
        self.connections: list[Connection] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        server = self.server
        server.attempts += 1
        if server.refusing:
            # As a reactor does: the failure arrives later, from the loop.
            d: Deferred[Any] = Deferred()
            server.clock.callLater(0, d.errback, ConnectionRefusedError("the server is down"))
            return d
        port = next(server._ports)
        if ":" in self.host:
            client_address: IAddress = IPv6Address("TCP", self.host, port)
        else:
            client_address = IPv4Address("TCP", self.host, port)
        client_protocol = factory.buildProtocol(SERVER_ADDRESS)
        server_protocol = ServerFactory(server.engine).buildProtocol(client_address)
        connection = Connection(client_protocol, server_protocol, client_address, SERVER_ADDRESS)
        self.connections.append(connection)
        server.connections.append(connection)
        connection.start()
        return succeed(client_protocol)


class MemoryServer:
    """
    An esf server in memory: a real L{ServerEngine} on a L{task.Clock}, and
    the L{ClientEngine}s a test makes with L{client}.

    Nothing moves by itself: L{pump} delivers bytes until both ends of
    every connection are quiet, L{advance} lets time pass (heartbeats,
    timeouts, reconnect delays) and pumps at every timer on the way.

    @ivar clock: the L{task.Clock} of the engine and of every client.
    @ivar engine: the L{ServerEngine}.
    @ivar connections: every connection made, oldest first.
    @ivar refusing: while true, new connections are refused (the server is
        down); L{restart} brings a fresh engine.
    @ivar attempts: connection attempts so far, refused ones included.
    """

    def __init__(
        self,
        *applications: Any,
        config: ServerConfig | None = None,
        clock: task.Clock | None = None,
        presence: IPresence | None = None,
        node_id: str | None = None,
        engine: ServerEngine | None = None,
        offline_store: Any = None,
    ):
        """
        Build the engine with L{esf.engine_for}: each application object is
        used for the interfaces it provides.  Or give a ready C{engine} whose
        clock is a L{task.Clock} (and no applications).
        """
        if engine is not None:
            if applications or config is not None or presence is not None:
                raise TypeError("give either an engine or the applications to build one")
            if not isinstance(engine.clock, task.Clock):
                raise TypeError("the engine's clock must be a twisted.internet.task.Clock")
            clock = engine.clock
        self.clock = clock = clock if clock is not None else task.Clock()
        self._applications = applications
        self._node_id = node_id
        #: The offline store given (it outlives L{restart}, like a file).
        self.offline_store = offline_store
        if engine is None:
            engine = engine_for(
                *applications,
                config=config,
                clock=clock,
                presence=presence,
                node_id=node_id,
                offline_store=offline_store,
            )
        self.engine = engine
        self.connections: list[Connection] = []
        self.clients: list[ClientEngine] = []
        self.refusing = False
        self.attempts = 0
        self._ports = itertools.count(40001)

    @property
    def config(self) -> ServerConfig:
        return self.engine.config

    # -- clients ------------------------------------------------------------------------------

    def endpoint(self, host: str = "127.0.0.1") -> MemoryEndpoint:
        """
        A new client endpoint; its connections come from C{host}.
        """
        return MemoryEndpoint(self, host)

    def client(
        self,
        user_id: str,
        password: str = "",
        client_type: int = ClientType.OTHERS,
        *,
        host: str = "127.0.0.1",
        **options: Any,
    ) -> ClientEngine:
        """
        A L{ClientEngine} on its own L{MemoryEndpoint} and this server's
        clock; call its C{logon()}.  C{options} are the engine's keyword
        arguments; by default the server's wire settings and
        L{doubling_retry_policy}.
        """
        options.setdefault("wire", self.config.wire)
        options.setdefault("retry_policy", doubling_retry_policy)
        client = ClientEngine(
            self.endpoint(host), user_id, password, client_type, clock=self.clock, **options
        )
        self.clients.append(client)
        return client

    def logged_on(
        self,
        user_id: str,
        password: str = "",
        client_type: int = ClientType.OTHERS,
        **options: Any,
    ) -> ClientEngine:
        """
        A L{client} that has logged on.

        @raise esf.LogonFailed: the server refused the logon.
        """
        client = self.client(user_id, password, client_type, **options)
        self.result(client.logon())
        return client

    def connection(self, client: ClientEngine) -> Connection:
        """
        C{client}'s current connection (its latest one).

        @raise LookupError: C{client} has made none through this server.
        """
        endpoint = client.endpoint
        if not isinstance(endpoint, MemoryEndpoint) or not endpoint.connections:
            raise LookupError(f"{client!r} has no connection to this server")
        return endpoint.connections[-1]

    def open_connections(self) -> list[Connection]:
        """
        The connections not yet closed at both ends.
        """
        return [c for c in self.connections if not c.closed]

    # -- time and bytes ---------------------------------------------------------------------

    def pump(self) -> None:
        """
        Run the calls due now and deliver bytes until nothing moves.

        @raise AssertionError: it never goes quiet (something writes
            forever).
        """
        for _ in range(100_000):
            self.clock.advance(0)
            moved = False
            for connection in self.connections:
                if not connection.closed and connection.pump():
                    moved = True
            if not moved and not self._due():
                return
        raise AssertionError("the in-memory network never went quiet")

    def _due(self) -> bool:
        now = self.clock.seconds()
        return any(call.getTime() <= now for call in self.clock.getDelayedCalls())

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass: stop at every timer due on the way, run it and
        pump, as a reactor left alone would.
        """
        self.pump()
        end = self.clock.seconds() + seconds
        for _ in range(1_000_000):
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            target = min(due) if due else end
            amount = max(target - self.clock.seconds(), 0.0)
            while self.clock.seconds() + amount < target:  # float rounding
                amount = math.nextafter(amount, math.inf)
            self.clock.advance(amount)
            self.pump()
            if not due:
                return
        raise AssertionError("timers kept firing without time passing")

    def result(self, d: Deferred[Any]) -> Any:
        """
        Pump, then return what C{d} fired with (like trial's
        C{successResultOf}).

        @raise AssertionError: C{d} has not fired.
        @raise Exception: C{d} failed: its exception.
        """
        self.pump()
        outcome = _outcome(d)
        if isinstance(outcome, Failure):
            outcome.raiseException()
        return outcome

    def failure(self, d: Deferred[Any], *expected: type[BaseException]) -> BaseException:
        """
        Pump, then return the exception C{d} failed with (like trial's
        C{failureResultOf}, but the exception rather than the Failure).

        @raise AssertionError: C{d} has not fired, succeeded, or failed with
            none of the C{expected} types.
        """
        self.pump()
        outcome = _outcome(d)
        if not isinstance(outcome, Failure):
            raise AssertionError(f"{d!r} succeeded with {outcome!r}")
        if expected and not outcome.check(*expected):
            names = ", ".join(t.__name__ for t in expected)
            raise AssertionError(f"{d!r} failed with {outcome.value!r}, not {names}")
        return cast(BaseException, outcome.value)

    # -- the server's life ----------------------------------------------------------------

    def restart(self, engine: ServerEngine | None = None) -> ServerEngine:
        """
        The server dies and comes back: every connection is cut; new ones
        reach C{engine}, by default a fresh one built like the first (same
        applications, settings and clock; L{esf.interfaces.IEngineAware}
        objects are initialized again).
        """
        for connection in self.open_connections():
            connection.cut()
        self.pump()
        if engine is None:
            engine = engine_for(
                *self._applications,
                config=self.config,
                clock=self.clock,
                node_id=self._node_id,
                offline_store=self.offline_store,
            )
        self.engine = engine
        return engine

    def close(self) -> None:
        """
        The end of a test: close every client made here, stop the engine
        and cut what is still open.
        """
        for client in self.clients:
            client.close()
        self.pump()
        self.engine.stop()
        self.pump()
        for connection in self.open_connections():
            connection.cut()
        self.pump()


def _outcome(d: Deferred[Any]) -> Any:
    """
    What C{d} fired with (its result stays in place; a failure is taken as
    handled), or raise L{AssertionError} if it has not fired.
    """
    out: list[Any] = []

    def keep(outcome: Any) -> Any:
        out.append(outcome)
        return outcome

    d.addBoth(keep)
    if not out:
        raise AssertionError(f"{d!r} has not fired")
    if isinstance(out[0], Failure):
        d.addErrback(lambda _: None)
    return out[0]
