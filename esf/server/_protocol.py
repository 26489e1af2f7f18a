"""
The thin layer between Twisted's transports and the server engine.

L{ServerProtocol} turns bytes into L{esf.server._engine.Session} calls and the
engine's output into writes; it is also the transport's push producer, so
the engine learns when a peer stops reading.  On TCP its writes go through
L{WriteBehind}.  L{ServerService} listens on an endpoint and stops the
engine gracefully.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IPushProducer, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.tcp import Server as TCPServer
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.interfaces import IChannel
from esf.wire._frames import DisconnectedType

from ._counters import Traffic
from ._engine import ServerEngine
from ._session import Session

__all__ = [
    "send_now",
    "GatheredOutput",
    "ServerProtocol",
    "ServerFactory",
    "ServerService",
    "WriteBehind",
    "WritesBehind",
]

log = Logger(namespace="esf.server")

#: Most bytes a connection gathers for the write-behind before they are
#: written at once (Twisted's own transport buffer size): what waits there
#: is bounded, and a peer that does not read pauses its session as before.
WRITE_BEHIND_MAX = 65536


def peer_address(peer: object) -> str:
    """
    C{"host:port"} for an address object, C{"[host]:port"} for IPv6.
    """
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer)
    if ":" in host:
        return f"[{host}]:{getattr(peer, 'port')}"
    return f"{host}:{getattr(peer, 'port')}"


class WriteBehind:
    """
    What the TCP connections of one reactor write during one of its turns,
    sent at the start of the next one (a call of 0 s), straight to each
    socket whose transport holds nothing yet
    (L{GatheredOutput.send_gathered}).

    Twisted's TCP transport buffers every write, registers the socket for
    writability (an C{epoll_ctl}), sends in the next turn once the poll
    says so, and unregisters it (another C{epoll_ctl}).  A relay pays that
    for every receiver of every turn: with Broadcasts to groups of 10, 40%
    of the server's time was in the transport's C{doWrite} and 8% in the
    registering and unregistering (py-spy, CPython).  A socket with room takes the
    bytes at once, with one C{send}, and what it does not take goes to the
    transport, which then does what it always does (buffering, flow
    control, pausing the session when the peer does not read).  Gathering
    until the turn ends keeps what Twisted's buffering gave: the output of
    many reads to one receiver in one turn goes in one C{send}.
    (Written here because Twisted's transports have no such path; it reads
    two of their private attributes, C{_tempDataLen} and C{dataBuffer}, to
    know that nothing is buffered ahead.)
    """

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.pending: list[GatheredOutput] = []
        self._call: Any = None

    def add(self, protocol: GatheredOutput) -> None:
        """
        C{protocol} has gathered bytes: send them once this turn ends.
        """
        self.pending.append(protocol)
        if self._call is None:
            self._call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        pending, self.pending = self.pending, []
        for protocol in pending:
            try:
                protocol.send_gathered()
            except Exception:
                log.failure("writing to {address} failed", address=protocol.address)


class GatheredOutput:
    """
    A connection's side of the L{WriteBehind}: on TCP (or TCP through the
    PROXY protocol's wrapper; never TLS, whose bytes are not these), what
    it writes in a reactor turn is gathered (L{gather}) and sent at the
    start of the next (L{send_gathered}).  The base of L{ServerProtocol}
    and of the WebSocket channel.
    """

    # What Twisted gives a connected protocol: a TCP or TLS transport, which
    # is also an IProducer and IConsumer (ITransport alone names none of it).
    transport: Any
    address = "?"
    #: On TCP: the socket, the write-behind its writes go through, and
    #: what they gathered this turn (L{WriteBehind}).
    _socket: Any = None
    _tcp: Any = None
    _behind: WriteBehind | None = None
    _gathered: list[bytes] | None = None
    _gathered_size = 0

    def write_behind_on(self, transport: Any, factory: Any) -> None:
        """
        Send through C{factory}'s write-behind when C{transport} is TCP.
        """
        tcp = transport.transport if isinstance(transport, HAProxyProtocolWrapper) else transport
        if isinstance(tcp, TCPServer):
            self._tcp, self._socket = tcp, tcp.socket
            self._behind = factory.write_behind(tcp.reactor)

    def gather(self, data: bytes) -> None:
        """
        Add C{data} to what this turn sends (at once past L{WRITE_BEHIND_MAX}).
        """
        gathered = self._gathered
        if gathered is None:
            self._gathered = [data]
            self._gathered_size = len(data)
            behind = self._behind
            assert behind is not None  # (gathered only behind a write-behind)
            behind.add(self)
            return
        gathered.append(data)
        self._gathered_size += len(data)
        if self._gathered_size >= WRITE_BEHIND_MAX:
            self.send_gathered()

    def send_gathered(self) -> None:
        """
        Send what L{gather} gathered: straight to the socket when the
        transport holds nothing (else it would overtake it), and what the
        socket does not take (or all, on any error, which the transport
        then finds for itself) through the transport.
        """
        gathered, self._gathered = self._gathered, None
        if not gathered:
            return
        data = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        rest = send_now(self._tcp, self._socket, data)
        if rest:
            self.transport.write(rest)


def send_now(tcp: Any, socket: Any, data: bytes) -> bytes:
    """
    Send C{data} on C{socket}, the socket of Twisted's TCP transport
    C{tcp}, at once when the transport holds nothing (else it would
    overtake what it holds); return what is left for the transport to
    write (all of it on any error, which the transport then finds for
    itself).
    """
    if not tcp._tempDataLen and not tcp.dataBuffer and tcp.connected and not tcp.disconnecting:
        try:
            sent = socket.send(data)
        except OSError:
            sent = 0
        return data[sent:] if sent else data
    return data


@implementer(IChannel, IPushProducer)
class ServerProtocol(GatheredOutput, Protocol):
    """
    One connection to an esf server.
    """

    session: Session | None = None
    address = "?"
    _abort_call = None
    _closing = False
    #: The label of this kind of connection in the metrics.
    transport_label = "tcp"
    #: Where this connection's reads and writes are counted
    #: (C{engine.traffic}); set when it is made.
    _traffic: Traffic

    def connectionMade(self) -> None:
        engine = self.factory.engine
        self._traffic = traffic = engine.traffic[self.transport_label]
        transport = self.transport
        self.address = peer_address(transport.getPeer())
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(transport, option, None)
            if setter is not None:
                try:
                    setter(True)
                except OSError:
                    pass
        transport.registerProducer(self, True)
        self.write_behind_on(transport, self.factory)
        self.session = engine.connection_made(self)
        traffic.connected(self.session, engine.stopping)

    def dataReceived(self, data: bytes) -> None:
        traffic = self._traffic
        traffic.reads += 1
        traffic.bytes_received += len(data)
        session = self.session
        if session is not None:  # None once the connection is lost
            session.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True  # nothing left to close: no abort timer
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        # Let go of the session: it holds this protocol as its channel, and
        # this protocol holds the transport with whatever it could not write
        # (a slow reader's whole backlog).  Left as a cycle, all of it would
        # wait for a full garbage collection, which an idle server may not
        # run for a long time.
        session, self.session = self.session, None
        self._gathered = None  # (no one to send it to)
        if session is not None:
            session.connection_lost()
            self._traffic.disconnected(session)

    # IChannel

    def write(self, data: bytes) -> None:
        traffic = self._traffic
        traffic.writes += 1
        traffic.bytes_sent += len(data)
        if self._behind is None:
            self.transport.write(data)
        else:
            self.gather(data)

    def pause_reading(self) -> None:
        """
        Read no more from the peer for now (its receivers are backed up).
        """
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    def close(self, reason: DisconnectedType | None = None) -> None:
        # (TCP has no close reason of its own: the DisconnectNotice says it.)
        if self._closing:
            return
        self._closing = True
        self.send_gathered()  # (ahead of the close)
        # A registered producer would keep the connection open.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._abort_call = self.factory.engine.clock.callLater(
            self.factory.engine.config.close_timeout, self._abort
        )

    def _abort(self) -> None:
        self._abort_call = None
        log.info(
            "aborting {address}: it did not take its last bytes within {timeout} s",
            address=self.address,
            timeout=self.factory.engine.config.close_timeout,
        )
        self.transport.abortConnection()

    # IPushProducer: the transport calls these as its buffer fills and drains.

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()

    def stopProducing(self) -> None:
        pass


class WritesBehind:
    """
    A factory whose TCP connections share one L{WriteBehind}.
    """

    _write_behind: WriteBehind | None = None

    def write_behind(self, reactor: Any) -> WriteBehind:
        """
        The L{WriteBehind} of this factory's TCP connections (on C{reactor},
        theirs).
        """
        if self._write_behind is None or self._write_behind.reactor is not reactor:
            self._write_behind = WriteBehind(reactor)
        return self._write_behind


class ServerFactory(WritesBehind, Factory):
    """
    Builds a L{ServerProtocol} for every connection to C{engine}.
    """

    protocol = ServerProtocol
    noisy = False

    def __init__(self, engine: ServerEngine):
        self.engine = engine


class _EngineService(Service):
    def __init__(self, engine: ServerEngine):
        self.engine = engine

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.engine.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.engine.stop()


class ServerService(MultiService):
    """
    Runs an engine and listens for it on an endpoint (and on more with
    L{listen}, e.g. WebSocket).  Stopping it stops listening first, then
    sends every session C{ServerShutdown} and waits for the connections to
    close.

    A port that cannot be bound makes C{startService} raise, so that
    C{twistd} exits with the error rather than run deaf.

    @ivar port: the L{IListeningPort} while listening, else C{None}; after
        listening on port 0, C{service.port.getHost().port} is the port the
        system chose.
    """

    port: IListeningPort | None = None

    def __init__(self, engine: ServerEngine, endpoint: IStreamServerEndpoint):
        super().__init__()  # type: ignore[no-untyped-call]
        self.engine = engine
        _EngineService(engine).setServiceParent(self)  # type: ignore[no-untyped-call]
        self.listener = self.listen(_PortTeller(endpoint, self), ServerFactory(engine))

    def listen(self, endpoint: IStreamServerEndpoint, factory: Any) -> StreamServerEndpointService:
        """
        Also listen on C{endpoint} with C{factory}, whose connections are
        channels of the same engine (see L{esf.WebSocketFactory}).  Like
        every listener, it stops before the engine does.
        """
        listener = StreamServerEndpointService(endpoint, factory)
        listener._raiseSynchronously = True
        listener.setServiceParent(self)
        return listener

    def stopService(self) -> Deferred[None]:
        self.port = None
        d: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return d


@implementer(IStreamServerEndpoint)
class _PortTeller:
    """
    An endpoint that sets C{service.port} to the port it listens on.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, service: ServerService):
        self.endpoint = endpoint
        self.service = service

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.service.port = port
            return port

        return self.endpoint.listen(factory).addCallback(listening)
