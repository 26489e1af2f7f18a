"""
A WebSocket connection as the engine sees it: an L{IChannel} (frames out,
one binary message each; a close with the code that matches the reason)
and the transport's push producer (L{WebSocketChannel}, the base of
L{esf.server._websocket.WebSocketProtocol}, which reads).
"""

from __future__ import annotations

import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from esf.interfaces import IChannel
from esf.wire._frames import DisconnectedType

from ._counters import Traffic
from ._protocol import GatheredOutput
from ._session import Session
from ._websocket_frames import binary_messages

__all__ = ["CLOSE_CODES", "WebSocketChannel"]

log = Logger(namespace="esf.server")

#: The WebSocket close code sent after the C{DisconnectNotice} of each
#: reason; every reason not listed closes with 1000 (the notice says why).
CLOSE_CODES = {
    DisconnectedType.INVALID_MESSAGE: 1002,  # protocol error
    DisconnectedType.MESSAGE_WITH_WRONG_USER_ID: 1002,
    DisconnectedType.NOT_LOGGED_ON: 1002,
    DisconnectedType.MESSAGE_TOO_LARGE: 1009,  # message too big
    DisconnectedType.CHANNEL_CACHE_OVERFLOW: 1008,  # policy violation
    DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED: 1013,  # try again later
    DisconnectedType.SERVER_SHUTDOWN: 1001,  # going away
}
_BODY_LENGTH = struct.Struct("<i")


@implementer(IChannel, IPushProducer)
class WebSocketChannel(GatheredOutput, WebSocketServerProtocol):  # type: ignore[misc]  # (autobahn's own bases disagree)
    """
    The output side of a WebSocket connection to an esf server: what the
    session writes, its close, and the flow control both ways (the
    session's push back pauses reading; the transport's full buffer
    pauses the session).

    On TCP the session's messages go through the write-behind, as on a
    TCP connection (L{GatheredOutput}); whatever autobahn sends itself (a
    pong, a close, a large message) first sends what was gathered
    (L{sendData}), so that nothing overtakes it and nothing follows a
    close.
    """

    session: Session | None = None
    address = "?"
    _closing = False
    _paused = False
    # autobahn's transport: TCP or TLS, a producer and a consumer too.
    transport: Any
    #: A close code the adapter chose (a text message, say), which wins
    #: over the one for the session's reason.
    _close_code: int | None = None
    #: While the session's work budget is spent: the call that reads on.
    _held: Any = None
    #: Whether the session paused reading (push back).
    _pushed_back = False
    #: Where this connection's reads and writes are counted
    #: (C{engine.traffic}); set when it is made.
    _traffic: Traffic
    #: Once autobahn has closed the connection gracefully: the call that
    #: aborts it if it has not gone within the close timeout.
    _abort_call: Any = None

    def dropConnection(self, abort: bool = False) -> None:
        # autobahn closes gracefully, with no deadline of its own, after the
        # peer's close frame and after a refused handshake: a TLS connection
        # then waits for the peer's close_notify, a TCP one for a peer that
        # does not read to take its last bytes.  A peer that does neither
        # would keep the descriptor (and a handshake's place under
        # --websocket-max-handshakes) for good.
        closing = self.state != self.STATE_CLOSED
        if abort:
            self._gathered = None
        else:
            self.send_gathered()  # (ahead of the close)
        super().dropConnection(abort)
        if closing and not abort and self._abort_call is None:
            engine = self.factory.engine
            self._abort_call = engine.clock.callLater(engine.config.close_timeout, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        # (Debug: the close itself was logged, and one line per connection
        # at this level would let a peer that opens connection after
        # connection write to the log at will.)
        log.debug(
            "aborting {address}: its WebSocket connection did not close within {timeout} s",
            address=self.address,
            timeout=self.factory.engine.config.close_timeout,
            esf_event="websocket_close_timed_out",
        )
        self.transport.abortConnection()

    def onPing(self, payload: bytes) -> None:
        # A peer that does not read gets no pongs: they would pile up in
        # the transport's buffer, beyond the session's output bound.
        if not self._paused:
            super().onPing(payload)

    # -- IChannel --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Send frames, one binary message each.  C{data} holds one or more
        whole frames, as the session writes them.
        """
        if self.state != self.STATE_OPEN:
            return  # closing: what is still sent for the session is dropped
        hlen = self.factory.header_length
        size = len(data)
        traffic = self._traffic
        traffic.writes += 1
        traffic.bytes_sent += size
        if size > 0xFFFF:
            # Large output: autobahn frames it (and checks its size).
            offset = 0
            while offset < size:
                end = offset + hlen + _BODY_LENGTH.unpack_from(data, offset + 8)[0]
                self.sendMessage(bytes(data[offset:end]), isBinary=True)  # type: ignore[no-untyped-call]
                offset = end
            return
        # The common case: a few small frames, in one write, as the engine
        # gathered them (autobahn's sendMessage would make one per frame).
        if self._behind is None:
            self.sendData(binary_messages(data, hlen))
        else:
            self.gather(binary_messages(data, hlen))

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Everything autobahn writes comes here: what the session wrote
        # before goes first.
        if self._gathered:
            self.send_gathered()
        super().sendData(data, sync, chopsize)

    def close(self, reason: DisconnectedType | None = None) -> None:
        """
        Close with the code that matches why: the adapter's own, or the one
        for the session's C{reason} (its name is the close reason's text).
        autobahn aborts the connection when the peer does not answer the
        close within the close timeout.
        """
        if self._closing:
            return
        self._closing = True
        code = self._close_code
        name = ""
        if reason is not None:
            name = reason.name
            if code is None:
                code = CLOSE_CODES.get(reason)
        if self.state == self.STATE_OPEN:
            # sendClose() accepts only 1000 and 3000-4999, the codes for
            # applications; 1001-1013 are the endpoint's own, as here.
            self.sendCloseFrame(code=code or 1000, reasonUtf8=name.encode("ascii"))
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    # -- push back: the session stops reading a sender whose receivers are
    # backed up, as on TCP (the frames of the read in progress still go on).

    def pause_reading(self) -> None:
        self._pushed_back = True
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._pushed_back = False
        if self._held is None:  # else the budget's own timer reads on
            self.transport.resumeProducing()

    # -- IPushProducer: the transport calls these as its buffer fills and drains.

    def pauseProducing(self) -> None:
        self._paused = True
        if self.session is not None:
            self.session.pause_writing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self.session is not None:
            self.session.resume_writing()

    def stopProducing(self) -> None:
        pass
