"""
WebSocket clients for the tests of esf's WebSocket channel.

  - L{WSClient} is autobahn's own Twisted client protocol, over real
    loopback TCP (L{connect}): it sends ESF frames as binary messages and
    keeps every message it receives, decoded, and how the connection
    closed.
  - L{handshake}, L{client_frame} and L{server_frames} are a small RFC 6455
    codec written from the RFC, for tests that drive the server protocol on
    an in-memory transport and need frames autobahn's client would never
    send (a frame that announces more than it holds, say).
"""

from __future__ import annotations

import base64
import os
import struct

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred

from esf.wire import REPLY_BODIES, FrameDecoder, Logon, MessageType, WireConfig, encode_frame

__all__ = ["Closed", "WSClient", "client_frame", "connect", "handshake", "server_frames"]


class Closed:
    """
    How a connection ended: C{was_clean}, the close C{code} and C{reason}
    (autobahn reports 1006 for a connection that ended without a close
    frame, or whose handshake failed).
    """

    def __init__(self, was_clean, code, reason):
        self.was_clean = was_clean
        self.code = code
        self.reason = reason or ""

    def __repr__(self):
        return f"<Closed clean={self.was_clean} code={self.code} reason={self.reason!r}>"


class WSClient(WebSocketClientProtocol):
    """
    One WebSocket client connection.

    @ivar frames: every binary message received, decoded as one ESF frame:
        C{(frame, body)} with the body decoded by L{REPLY_BODIES}.
    @ivar opened: fires with this protocol once the handshake is done.
    @ivar closed: fires with a L{Closed}.
    """

    wire = WireConfig()

    def __init__(self):
        super().__init__()
        self.frames = []
        self.texts = []
        self.opened = Deferred()
        self.closed = Deferred()
        self._waiters = []
        self._unclaimed = []

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        if not isBinary:
            self.texts.append(payload)
            return
        [frame] = FrameDecoder(self.wire).feed(payload)
        cls = REPLY_BODIES.get(frame.message_type)
        body = cls.decode(frame.body) if cls is not None else bytes(frame.body)
        self.frames.append((frame, body))
        self._unclaimed.append((frame, body))
        self._check_waiters()

    def onClose(self, wasClean, code, reason):
        closed = Closed(wasClean, code, reason)
        if not self.opened.called:
            self.opened.errback(ConnectionRefusedByServer(closed))
        if not self.closed.called:
            self.closed.callback(closed)
        for message_type, d in self._waiters:
            d.errback(AssertionError(f"closed ({closed}) before a {message_type} arrived"))
        self._waiters = []

    def send_frame(
        self, message_type, body=b"", *, message_id=0, user_id="", dest="_0", client_type=3
    ):
        self.sendMessage(
            encode_frame(
                self.wire,
                message_type,
                body,
                client_type=client_type,
                message_id=message_id,
                user_id=user_id,
                dest_user_id=dest,
            ),
            isBinary=True,
        )

    def logon(self, user_id, password="pw", message_id=1):
        """
        Send a Logon; fires with the reply's body.
        """
        self.user_id = user_id
        d = self.next_frame(MessageType.LOGON)
        self.send_frame(
            MessageType.LOGON,
            Logon(1, "", password).encode(),
            message_id=message_id,
            user_id=user_id,
        )
        return d.addCallback(lambda frame_body: frame_body[1])

    def next_frame(self, message_type):
        """
        Fires with the first C{(frame, body)} of C{message_type} not yet
        taken (already received or still to come).
        """
        d = Deferred()
        self._waiters.append((message_type, d))
        self._check_waiters()
        return d

    def _check_waiters(self):
        for entry in list(self._waiters):
            message_type, d = entry
            for item in self._unclaimed:
                if item[0].message_type == message_type:
                    self._unclaimed.remove(item)
                    self._waiters.remove(entry)
                    d.callback(item)
                    break


class ConnectionRefusedByServer(Exception):
    """
    The server refused the handshake; C{args[0]} is the L{Closed}.
    """


def connect(
    port, *, path="/esf", protocols=("esf.v1",), origin=None, headers=None, timeout=10, tls=None
):
    """
    Connect to C{ws://127.0.0.1:port/path}; fire with the L{WSClient} once
    the handshake is done (or fail with L{ConnectionRefusedByServer}).
    C{tls}: client TLS options (C{optionsForClientTLS("localhost", ...)}),
    to connect to C{wss://localhost:port/path} instead.
    """
    from twisted.internet import reactor

    url = f"wss://localhost:{port}{path}" if tls is not None else f"ws://127.0.0.1:{port}{path}"
    factory = WebSocketClientFactory(
        url,
        protocols=list(protocols),
        origin=origin,
        headers=headers or {},
        reactor=reactor,
    )
    factory.protocol = WSClient
    factory.setProtocolOptions(openHandshakeTimeout=timeout, closeHandshakeTimeout=timeout)
    made = []

    def build(addr):
        protocol = WebSocketClientFactory.buildProtocol(factory, addr)
        made.append(protocol)
        return protocol

    factory.buildProtocol = build
    if tls is not None:
        reactor.connectSSL("127.0.0.1", port, factory, tls, timeout=timeout)
    else:
        reactor.connectTCP("127.0.0.1", port, factory, timeout=timeout)
    d = Deferred()

    def poll():
        if made:
            made[0].opened.chainDeferred(d)
        else:
            reactor.callLater(0.01, poll)

    poll()
    return d.addTimeout(timeout, reactor)


# -- a small RFC 6455 codec for in-memory tests ---------------------------------


def handshake(path="/esf", protocols=("esf.v1",), origin=None, host="127.0.0.1:4531", extra=()):
    """
    The bytes of a client's opening handshake.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode, payload=b"", *, fin=True, length=None, mask=b"\x11\x22\x33\x44"):
    """
    One masked client frame; C{length} overrides the announced payload
    length (to announce more than is sent).
    """
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def server_frames(data):
    """
    Split what the server wrote: C{(http_response, [(opcode, payload)...])}.
    """
    end = data.find(b"\r\n\r\n")
    assert end >= 0, data
    response, rest = data[: end + 4], data[end + 4 :]
    frames = []
    while rest:
        opcode, n = rest[0] & 0x0F, rest[1] & 0x7F
        assert not rest[1] & 0x80, "server frames are not masked"
        offset = 2
        if n == 126:
            n, offset = struct.unpack("!H", rest[2:4])[0], 4
        elif n == 127:
            n, offset = struct.unpack("!Q", rest[2:10])[0], 10
        frames.append((opcode, rest[offset : offset + n]))
        rest = rest[offset + n :]
    return response, frames


class BlockingWS:
    """
    A blocking WebSocket client on a plain socket, for end-to-end tests
    against a C{twistd} process: C{send(payload)} sends one binary message,
    C{recv()} returns the next C{(opcode, payload)} (unfragmented frames
    only, as the server sends them).
    """

    def __init__(self, port, timeout=5.0, **handshake_args):
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        try:
            self.sock.sendall(handshake(host=f"127.0.0.1:{port}", **handshake_args))
            while b"\r\n\r\n" not in self.buffer:
                self._more()
        except BaseException:
            self.sock.close()
            raise
        end = self.buffer.index(b"\r\n\r\n") + 4
        self.response, self.buffer = self.buffer[:end], self.buffer[end:]

    def _more(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    def _take(self, n):
        while len(self.buffer) < n:
            self._more()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, payload, opcode=2):
        self.sock.sendall(client_frame(opcode, payload))

    def recv(self):
        head = self._take(2)
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._take(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._take(8))[0]
        return opcode, self._take(n)

    def close(self):
        self.sock.close()
