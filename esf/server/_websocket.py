"""
ESF over WebSocket: the same frames, one per binary WebSocket message, on
the same engine as TCP.

L{WebSocketProtocol} is autobahn's Twisted server protocol made into one
more L{IChannel}: it calls C{engine.connection_made(self)} once the
WebSocket handshake is done and feeds each binary message to the session's
C{data_received}, after checking that the message holds exactly one whole
frame.  The engine never learns that a channel is a WebSocket.  Its
output side (writes, the close, flow control) is
L{esf.server._websocket_channel.WebSocketChannel}, and who may open one
L{WebSocketHandshake}.

L{WebSocketFactory} configures autobahn for a server that faces the
internet (its defaults do not): payload limits, handshake timeouts, a clean
close rather than a dropped connection, the C{esf.v1} subprotocol, the
C{/esf} path and an origin policy.

The whole binary messages of the relay's common case are parsed without
autobahn, by L{esf.server._websocket_frames}; the C{--web-demo} site is
L{esf.server._web_demo}.

See C{docs/websocket.md}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import wildcards2patterns
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.wire._frames import DisconnectedType

from ._budget import PRE_LOGON_FRAMES, FrameCost, FrameMeter
from ._counters import Count
from ._engine import ServerEngine
from ._http import handed_over
from ._policy import SlidingWindow
from ._protocol import WritesBehind, peer_address
from ._session import Session
from ._websocket_channel import CLOSE_CODES, WebSocketChannel
from ._websocket_frames import MessageParser, refuse_message

__all__ = [
    "CLOSE_CODES",
    "WEBSOCKET_PATH",
    "WEBSOCKET_SUBPROTOCOL",
    "WebSocketFactory",
    "WebSocketProtocol",
]

log = Logger(namespace="esf.server")

#: The URL path of the WebSocket endpoint.
WEBSOCKET_PATH = "/esf"
#: The WebSocket subprotocol a client must ask for.
WEBSOCKET_SUBPROTOCOL = "esf.v1"

#: A text message is refused with this code (unsupported data).
_TEXT_CLOSE_CODE = 1003

#: Bytes a peer may send before its WebSocket handshake is complete.
MAX_HANDSHAKE_SIZE = 16 * 1024

#: Seconds a session whose work budget is spent is read no further before
#: its next frame is paid for again (at the default work rate, 100 units'
#: refill).
HOLD_TIME = 0.05

_BODY_LENGTH = struct.Struct("<i")
_PAID = FrameCost.PAID
_process_data = WebSocketServerProtocol.processData


class WebSocketHandshake(WebSocketChannel):
    """
    Who may open an ESF WebSocket: the handshake's path, subprotocol and
    origin (L{onConnect}); every refusal counted and logged.
    """

    def onConnect(self, request: Any) -> str:
        """
        Accept only C{/esf}, the C{esf.v1} subprotocol and an allowed origin.
        """
        if request.path != WEBSOCKET_PATH:
            self._refuse(f"path {request.path!r} is not {WEBSOCKET_PATH}")
            raise ConnectionDeny(  # type: ignore[no-untyped-call]
                404, "Not Found"
            )
        if WEBSOCKET_SUBPROTOCOL not in request.protocols:
            self._refuse(f"subprotocols {request.protocols!r} lack {WEBSOCKET_SUBPROTOCOL}")
            raise ConnectionDeny(  # type: ignore[no-untyped-call]
                400, f"Subprotocol {WEBSOCKET_SUBPROTOCOL} required"
            )
        origin = request.headers.get("origin")
        if origin is not None and not self.factory.origin_allowed(
            origin, request.headers.get("host", ""), ISSLTransport.providedBy(self.transport)
        ):
            self._refuse(f"origin {origin!r} is not allowed")
            raise ConnectionDeny(  # type: ignore[no-untyped-call]
                403, "Origin Not Allowed"
            )
        handed_over(self)  # out of --websocket-max-handshakes: an ESF connection now
        return WEBSOCKET_SUBPROTOCOL

    def _refuse(self, why: str) -> None:
        self._traffic.refused["handshake"] += 1
        log.info(
            "refused a WebSocket handshake from {address}: {why}",
            address=self.address,
            why=why,
            esf_event="websocket_refused",
        )


class WebSocketProtocol(WebSocketHandshake):
    """
    One WebSocket connection to an esf server: an L{IChannel} for the
    engine, and the transport's push producer, as L{esf.ServerProtocol} is
    (that side is L{WebSocketChannel}'s); this side reads.

    Incoming messages are gathered here (L{onMessageFrameData}) rather than
    by autobahn, so that one size check, against the session's current
    limit, runs before any of a message's payload is kept, and a message
    sent in many tiny fragments costs one buffer, not one object per
    fragment.
    """

    #: Whole frames received during the current read, not yet handed on.
    _frames: list[bytes] | None = None
    #: The message being received, and its announced size so far.
    _message: bytearray | None = None
    _size = 0
    #: The whole binary messages of the common case, parsed without autobahn.
    _parser: MessageParser
    #: What the frames autobahn parses cost the session (made with it).
    _meter: FrameMeter | None = None
    #: Whether the frame whose header autobahn parses next is paid for.
    _paid = False
    #: Whether the connection was refused as it was made (L{WebSocketFactory.refuses}).
    _refused = False
    #: The label of this kind of connection in the metrics.
    transport_label = "websocket"

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._traffic = self.factory.engine.traffic[self.transport_label]
        self.address = peer_address(self.transport.getPeer())
        if self.factory.refuses(self.address):
            self._traffic.refused["flooding"] += 1
            # Its host keeps flooding: closed before anything is read (a
            # protocol, rather than None from buildProtocol, so that TLS
            # and twisted.web, which wrap what buildProtocol returns, can
            # close it too).
            self._refused = True
            self.transport.abortConnection()
            return
        self._parser = MessageParser(self.factory.header_length)
        self.transport.registerProducer(self, True)
        self.write_behind_on(self.transport, self.factory)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        traffic = self._traffic
        traffic.reads += 1
        traffic.bytes_received += len(data)
        if self.state == self.STATE_CLOSED or self.transport.disconnecting:
            # Closing: nothing more is parsed.  A TLS transport still
            # delivers what the peer sends until its close_notify, which
            # autobahn would append to its buffer, copying it whole.
            return
        if self.state == self.STATE_CONNECTING and len(self.data) + len(data) > MAX_HANDSHAKE_SIZE:
            self._refuse(f"a handshake of more than {MAX_HANDSHAKE_SIZE} bytes")
            self.failHandshake("Request Header Fields Too Large", 431)
            return
        # The frames of every message that this read completes are handed
        # to the session together, as the bytes of one TCP read are: the
        # engine then writes each receiver's output once per read.
        self._frames = []
        try:
            parser = self._parser
            if (
                self.state == self.STATE_OPEN
                and self.current_frame is None
                and not self.inside_message
                and not self.data
                and not self._closing
            ):
                # Between frames: the whole messages at the start of the
                # read are the parser's, the rest autobahn's.
                self._frames, refusal, data = parser.feed(data, self._max_message_size())
                if refusal is not None:
                    self._fail(refusal.reason, refusal.text, refusal.code)
            elif parser.pending is not None:
                data = parser.gather(data)  # autobahn's once whole
            if data:
                super().dataReceived(data)
        finally:
            self._deliver()

    def _deliver(self) -> None:
        frames, self._frames = self._frames, None
        session = self.session
        if session is None:
            return
        if frames:
            session.data_received(frames[0] if len(frames) == 1 else b"".join(frames))
        # What is held of messages not yet whole (a message cut off by the
        # read's end, one arriving in fragments, autobahn's buffer) counts
        # in the server's memory budget as a TCP session's partial frame.
        message, tail = self._message, self._parser.pending
        session.channel_holds(
            len(self.data)
            + (len(message) if message is not None else 0)
            + (len(tail) if tail is not None else 0)
        )

    def onOpen(self) -> None:
        self._meter = FrameMeter()
        engine = self.factory.engine
        self.session = engine.connection_made(self)
        self._traffic.connected(self.session, engine.stopping)
        if self._paused:
            self.session.pause_writing()

    # -- what frames cost: every frame autobahn parses is paid for first ------

    def processData(self) -> bool:
        # autobahn calls this in a loop while it holds bytes; each time it
        # is between frames it is about to parse one more header.  Paying
        # for the frame here, before the header is parsed, lets the rest of
        # a read wait unparsed when the frame is not paid for (a flood of
        # pings or empty fragments costs about 3.5 µs a frame in autobahn,
        # 40-70 ms for one read of 64 KiB).
        if self.current_frame is None and not self._paid and len(self.data) >= 2:
            session, meter = self.session, self._meter
            if session is not None and meter is not None:
                cost = meter.pay(session, self._closing)
                if cost is not _PAID:
                    self._unpaid(cost)
                    return False
            self._paid = True
        more: bool = _process_data(self)
        if self.current_frame is not None:
            self._paid = False  # begun: the next frame is paid for on its own
        return more

    def _unpaid(self, cost: FrameCost) -> None:
        """
        Act on a frame the session could not pay for (L{FrameMeter.pay}).
        """
        if cost is FrameCost.HELD:
            # As a relay to a receiver that is behind: read no further (the
            # rest of this read waits unparsed) until the budget refills.
            if self._held is None:
                self.transport.pauseProducing()
                clock = self.factory.engine.clock
                self._held = clock.callLater(HOLD_TIME, self._read_on)
        elif cost is FrameCost.NOT_LOGGED_ON:
            self.factory.flooded(self.address)
            self._fail(
                DisconnectedType.NOT_LOGGED_ON,
                f"more than {PRE_LOGON_FRAMES} WebSocket frames (pings, pongs, fragments) "
                "before logon; a logon needs one message",
                1008,
            )
        elif cost is FrameCost.CLOSED and not self.transport.disconnecting:
            # Still sending after the close: take nothing more from it, and
            # close once the notice and close frame are out.
            self.transport.unregisterProducer()
            self.transport.loseConnection()
        # FrameCost.ENDED: the engine ended the session, which began the close.

    def _read_on(self) -> None:
        """
        The session's budget has had time to refill: go on with the frames
        held back, then read again.
        """
        self._held = None
        if not self._pushed_back:
            self.transport.resumeProducing()
        self._frames = []
        try:
            self.consumeData()
        finally:
            self._deliver()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._refused:
            return  # autobahn never knew of it
        # autobahn leaves its closing handshake timer running once the
        # connection is gone; until it fired, it would keep this protocol
        # and the transport's unwritten backlog.
        timer, self.closeHandshakeTimeoutCall = self.closeHandshakeTimeoutCall, None
        if timer is not None:
            timer.cancel()  # pending: autobahn sets it to None when it fires
        held, self._held = self._held, None
        if held is not None:
            held.cancel()
        aborting, self._abort_call = self._abort_call, None
        if aborting is not None and aborting.active():
            aborting.cancel()
        self._gathered = None  # (no one to send it to)
        super().connectionLost(reason)
        # Let go of the session, as ServerProtocol does: the two hold each
        # other, and the transport's unwritten backlog with them.
        session, self.session = self.session, None
        if session is None:
            return
        if self.failedByMe and not self._closing:
            # autobahn failed the connection for a breach of WebSocket
            # itself (an unmasked frame, a bad opcode...); its close frame
            # said why, and the session ends with that reason too.
            why: bytes = self.localCloseReason or b""
            session.kick(
                DisconnectedType.INVALID_MESSAGE,
                "WebSocket protocol error: " + why.decode("utf-8", "replace"),
            )
        session.connection_lost()
        self._traffic.disconnected(session)

    # -- messages --------------------------------------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._message = bytearray()
        self._size = 0
        if not isBinary and not self._closing:
            self._fail(
                DisconnectedType.INVALID_MESSAGE,
                "a text message: ESF frames travel in binary messages",
                _TEXT_CLOSE_CODE,
            )

    def onMessageFrameBegin(self, length: int) -> None:
        if self._closing:
            return  # what is left of this message is read and dropped
        self._size += length
        limit = self._max_message_size()
        if self._size > limit:
            self._fail(
                DisconnectedType.MESSAGE_TOO_LARGE,
                f"a message of at least {self._size} bytes exceeds the maximum "
                f"message size {limit}",
                1009,
            )
            return
        # autobahn's own limits (the engine's maximum) stay as a second line.
        super().onMessageFrameBegin(length)

    def onMessageFrameData(self, payload: bytes) -> None:
        if not self._closing and self._message is not None:
            self._message += payload

    def onMessageFrameEnd(self) -> None:
        pass  # the fragments are gathered in _message

    def onMessageEnd(self) -> None:
        message, self._message = self._message, None
        if self._closing or self.session is None or message is None:
            return
        if self.state != self.STATE_OPEN:
            # autobahn failed the connection at this frame (a breach of
            # WebSocket: unmasked, say) but, not dropping the connection,
            # still reads it through: it is not the peer's message.
            return
        self._message_received(bytes(message))

    def _max_message_size(self) -> int:
        session: Session | None = self.session
        if session is None:
            size: int = self.factory.engine.config.wire.max_message_size
            return size
        # Small until the peer has logged on, as on TCP.
        return session.decoder.max_message_size

    def _message_received(self, data: bytes) -> None:
        """
        Feed one message to the session if it holds exactly one frame.
        """
        hlen = self.factory.header_length
        size = len(data)
        if size < hlen or hlen + _BODY_LENGTH.unpack_from(data, 8)[0] != size:
            refusal = refuse_message(data, hlen, self._max_message_size())
            self._fail(refusal.reason, refusal.text, refusal.code)
            return
        if self._frames is not None:
            self._frames.append(data)
        elif self.session is not None:
            self.session.data_received(data)

    def _fail(self, reason: DisconnectedType, text: str, code: int) -> None:
        """
        End the session for C{reason} (the engine logs it and sends the
        DisconnectNotice), then close with C{code}.
        """
        self._close_code = code
        self._deliver()  # the frames before the bad one count
        if self.session is not None:
            self.session.kick(reason, text)
        self.close(reason)


class WebSocketFactory(WritesBehind, WebSocketServerFactory):
    """
    Builds a L{WebSocketProtocol} for every connection to C{engine}, with
    autobahn set up for a public server.

    @param allowed_origins: the browser origins allowed besides the page's
        own (C{"https://chat.example.com"}; C{*} is a wildcard, C{"*"} alone
        allows every origin).  A page may always connect to the server that
        served it (its Origin names the host and port it connects to); a
        client that sends no Origin (not a browser) is not checked.
    """

    protocol = WebSocketProtocol
    noisy = False

    def __init__(
        self, engine: ServerEngine, allowed_origins: Iterable[str] = (), *, reactor: Any = None
    ):
        # No Server header: it would name autobahn and its version.
        super().__init__(  # type: ignore[no-untyped-call]
            url=None, protocols=[WEBSOCKET_SUBPROTOCOL], server=None, reactor=reactor
        )
        self.engine = engine
        config = engine.config
        self.header_length = config.wire.header_length
        #: Hosts whose connections were ended for frames before logon.
        self.flooders = SlidingWindow(config.websocket_flood_window, config.websocket_flood_limit)
        self.allowed_origins = tuple(allowed_origins)
        lowered = [o.lower() for o in self.allowed_origins]
        self._origin_patterns = wildcards2patterns(lowered)  # type: ignore[no-untyped-call]
        size = config.wire.max_message_size
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            versions=[13],
            webStatus=False,  # no HTML status page for a plain GET
            utf8validateIncoming=False,  # text messages are refused anyway
            maxFramePayloadSize=size,
            maxMessagePayloadSize=size,
            autoFragmentSize=0,
            failByDrop=False,  # a close frame with a code, never a bare drop
            openHandshakeTimeout=config.logon_timeout,
            closeHandshakeTimeout=config.close_timeout,
            autoPingInterval=0,  # ESF heartbeats detect dead peers
            allowedOrigins=["*"],  # checked by origin_allowed, in onConnect
            allowNullOrigin=True,  # "null" too is judged by origin_allowed
            maxConnections=config.max_connections or 0,
            trustXForwardedFor=0,
        )

    def refuses(self, address: str) -> bool:
        """
        Whether a new connection from C{address} is to be closed at once,
        before its handshake: its host is refused for its floods
        (L{flooded}).  Counted, not logged.
        """
        flooders = self.flooders
        host = address.rpartition(":")[0]
        if flooders.count(host, self.engine.clock.seconds()) < flooders.limit:
            return False
        self.engine.counters[Count.WEBSOCKET_FLOODERS_REFUSED] += 1
        return True

    def flooded(self, address: str) -> None:
        """
        A connection from C{address} is being ended for sending more frames
        before logon than a logon needs.  The host's new connections are
        refused once it has done so C{websocket_flood_limit} times within
        C{websocket_flood_window} seconds: a peer that reconnects to flood
        again gets no further than the connection.  One event is logged
        when the refusal starts.
        """
        host = address.rpartition(":")[0]
        flooders = self.flooders
        if flooders.hit(host, self.engine.clock.seconds()) == flooders.limit:
            log.warn(
                "refusing WebSocket connections from {host} for up to {window:g} s: "
                "{count} of its connections sent more frames before logon than a logon needs",
                esf_event="websocket_flooder_refused",
                host=host,
                count=flooders.limit,
                window=flooders.window,
            )

    def origin_allowed(self, origin: str, host: str, secure: bool) -> bool:
        """
        Whether a browser page from C{origin} may connect, given the Host
        header it connected to and whether the connection is TLS.
        """
        origin = origin.strip().lower()
        if _same_origin(origin, host.strip().lower(), secure):
            return True
        return any(pattern.match(origin) for pattern in self._origin_patterns)


def _same_origin(origin: str, host: str, secure: bool) -> bool:
    """
    Whether C{origin} (C{scheme://host[:port]}) is the page's own origin:
    the scheme that matches the connection and the host and port of the
    Host header.
    """
    try:
        o = urlsplit(origin)
        h = urlsplit("//" + host)
        scheme = "https" if secure else "http"
        default = 443 if secure else 80
        return (
            o.scheme == scheme
            and not o.path.strip("/")
            and o.hostname is not None
            and o.hostname == h.hostname
            and (o.port or default) == (h.port or default)
        )
    except ValueError:  # a port that is not a number
        return False
