"""
ESF over WebSocket, with autobahn's own client over loopback TCP: the
handshake rules (path, subprotocol, origin), every close case with its
DisconnectNotice and close code, and a WebSocket session behaving as a TCP
one does (relay both ways, relogon, kick, heartbeats, shutdown).

The server is a L{ServerService} on the real reactor in this process, as in
C{test_tls.py}; every wait is bounded.
"""

from __future__ import annotations

import struct

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from wsclient import ConnectionRefusedByServer, connect
from zope.interface import implementer

from esf import ClientEngine, ServerConfig, ServerEngine, ServerService, WebSocketFactory
from esf.interfaces import ICustomizeHandler
from esf.server._web_demo import web_demo_site
from esf.wire import (
    DisconnectedType,
    FrameDecoder,
    Information,
    LogonResult,
    MessageType,
    WireConfig,
    encode_frame,
)

MAX = 4096  # the servers' maximum message size in these tests


def with_timeout(d, seconds=10):
    from twisted.internet import reactor

    return d.addTimeout(seconds, reactor)


def start_server(config=None, origins=(), web_demo=False):
    """
    An engine on the real reactor serving TCP and WebSocket on loopback:
    C{(engine, service, tcp_port, ws_port)}.
    """
    from twisted.internet import reactor

    config = config or ServerConfig(wire=WireConfig(max_message_size=MAX))
    engine = ServerEngine(config, clock=reactor)
    service = ServerService(engine, serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    if web_demo:
        factory = web_demo_site(engine, origins, reactor=reactor)
    else:
        factory = WebSocketFactory(engine, origins, reactor=reactor)
    ws = service.listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), factory)
    service.startService()
    ports = []
    for listener in (service.listener, ws):
        listener._waitingForPort.addCallback(lambda p: ports.append(p.getHost().port) or p)
    return engine, service, ports[0], ports[1]


@pytest.fixture
def server():
    engine, service, _, ws_port = start_server()
    yield engine, ws_port
    pytest_twisted.blockon(with_timeout(service.stopService()))


@defer.inlineCallbacks
def logged_on(port, user_id, **kwargs):
    client = yield connect(port, **kwargs)
    reply = yield with_timeout(client.logon(user_id))
    assert reply.result == LogonResult.SUCCEED
    return client


@defer.inlineCallbacks
def closed_with(client, reason, code):
    """
    Wait for the close; check that the last message was a DisconnectNotice
    with C{reason} and that the close code is C{code}.
    """
    closed = yield with_timeout(client.closed)
    frame, notice = client.frames[-1]
    assert frame.message_type == MessageType.DISCONNECT_NOTICE, client.frames
    assert notice.reason == reason, notice
    assert closed.code == code, closed
    assert closed.was_clean, closed
    return notice


def frame(message_type, body=b"", user_id="alice", dest="_0", message_id=0, wire=None):
    return encode_frame(
        wire or WireConfig(max_message_size=MAX),
        message_type,
        body,
        client_type=3,
        message_id=message_id,
        user_id=user_id,
        dest_user_id=dest,
    )


def session_end_events(logs):
    return logs.esf("session_ended")


# -- the handshake -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_logon_over_websocket(server):
    engine, port = server
    alice = yield logged_on(port, "alice")
    assert engine.user_manager.is_user_online("alice")
    [session] = [s for s in engine.sessions if s.user_id == "alice"]
    assert session.client_type == 3  # as the client declared it
    assert session.address.startswith("127.0.0.1:")
    assert alice.websocket_protocol_in_use == "esf.v1"
    alice.sendClose(1000)
    yield with_timeout(alice.closed)


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"path": "/"}, "404"),
        ({"path": "/esf/more"}, "404"),
        ({"protocols": ()}, "400"),
        ({"protocols": ("chat", "esf.v2")}, "400"),
        ({"origin": "http://evil.example"}, "403"),
        # Same host, other port or scheme: another origin.
        ({"origin": "http://127.0.0.1:1"}, "403"),
        ({"origin": "https://127.0.0.1"}, "403"),
        ({"origin": "null"}, "403"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_refused_handshakes(server, logs, kwargs, status):
    engine, port = server
    with pytest.raises(ConnectionRefusedByServer) as info:
        yield connect(port, **kwargs)
    closed = info.value.args[0]
    assert status in closed.reason, closed
    assert not engine.sessions
    [event] = [e for e in logs.events if e.get("esf_event") == "websocket_refused"]
    assert event["address"].startswith("127.0.0.1:")


@pytest_twisted.inlineCallbacks
def test_origins(logs):
    """
    The page's own origin and the listed ones may connect; a client that
    sends no Origin (not a browser) is not checked.
    """
    _, service, _, port = start_server(origins=["https://chat.example.com", "http://*.test"])
    try:
        for origin in (
            None,
            f"http://127.0.0.1:{port}",
            "https://chat.example.com",
            "HTTPS://CHAT.EXAMPLE.COM",
            "http://a.b.test",
        ):
            client = yield connect(port, origin=origin)
            client.sendClose(1000)
            yield with_timeout(client.closed)
        for origin in (
            "https://chat.example.com.evil",
            "http://chat.example.com",
            "https://x.test",
        ):
            with pytest.raises(ConnectionRefusedByServer):
                yield connect(port, origin=origin)
    finally:
        yield with_timeout(service.stopService())


# -- close cases: DisconnectNotice, then the close code -------------------------------


@pytest_twisted.inlineCallbacks
def test_text_message(server, logs):
    engine, port = server
    alice = yield logged_on(port, "alice")
    alice.sendMessage(b"hello", isBinary=False)
    notice = yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1003)
    assert "text message" in notice.text
    assert not engine.user_manager.is_user_online("alice")
    [event] = session_end_events(logs)
    assert event["reason"] == DisconnectedType.INVALID_MESSAGE.name


@pytest_twisted.inlineCallbacks
def test_text_message_before_logon(server):
    _, port = server
    client = yield connect(port)
    client.sendMessage(b"{}", isBinary=False)
    yield closed_with(client, DisconnectedType.INVALID_MESSAGE, 1003)


@pytest_twisted.inlineCallbacks
def test_two_frames_in_one_message(server):
    _, port = server
    alice = yield logged_on(port, "alice")
    heartbeat = frame(MessageType.HEARTBEAT)
    alice.sendMessage(heartbeat + heartbeat, isBinary=True)
    notice = yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1002)
    assert "more than one frame" in notice.text


@pytest.mark.parametrize("cut", [1, 20, 35, 36 + 3])
@pytest_twisted.inlineCallbacks
def test_partial_frame_in_a_message(server, cut):
    _, port = server
    alice = yield logged_on(port, "alice")
    send = frame(MessageType.SEND, Information(1, b"hello").encode(), dest="bob")
    alice.sendMessage(send[:cut], isBinary=True)
    notice = yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1002)
    assert "part of a frame" in notice.text or "shorter than one" in notice.text


@pytest_twisted.inlineCallbacks
def test_empty_message(server):
    _, port = server
    alice = yield logged_on(port, "alice")
    alice.sendMessage(b"", isBinary=True)
    yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1002)


@pytest_twisted.inlineCallbacks
def test_oversized_message(server, logs):
    _, port = server
    alice = yield logged_on(port, "alice")
    body = Information(1, b"x" * MAX).encode()
    too_big = frame(MessageType.SEND, body, dest="bob", wire=WireConfig(max_message_size=2 * MAX))
    alice.sendMessage(too_big, isBinary=True)
    notice = yield closed_with(alice, DisconnectedType.MESSAGE_TOO_LARGE, 1009)
    assert str(MAX) in notice.text
    [event] = session_end_events(logs)
    assert event["reason"] == DisconnectedType.MESSAGE_TOO_LARGE.name


@pytest_twisted.inlineCallbacks
def test_largest_message_passes(server):
    _, port = server
    alice = yield logged_on(port, "alice")
    bob = yield logged_on(port, "bob")
    payload = b"y" * (MAX - 36 - 4)
    alice.sendMessage(
        frame(MessageType.SEND, Information(1, payload).encode(), dest="bob"), isBinary=True
    )
    received, body = yield with_timeout(bob.next_frame(MessageType.SEND))
    assert body == Information(1, payload)
    assert len(received.raw) == MAX


@pytest_twisted.inlineCallbacks
def test_oversized_before_logon(server):
    """
    Before logon the bound is 64 KiB, as on TCP, whatever the maximum.
    """
    from twisted.internet import reactor

    config = ServerConfig(wire=WireConfig(max_message_size=1024 * 1024))
    _, service, _, port = start_server(config)
    try:
        client = yield connect(port)
        big = encode_frame(config.wire, MessageType.LOGON, b"\0" * (64 * 1024), user_id="alice")
        client.sendMessage(big, isBinary=True)
        yield closed_with(client, DisconnectedType.MESSAGE_TOO_LARGE, 1009)
    finally:
        yield with_timeout(service.stopService())
    del reactor


@pytest_twisted.inlineCallbacks
def test_header_announcing_too_much(server):
    """
    A small message whose header announces a body beyond the maximum.
    """
    _, port = server
    alice = yield logged_on(port, "alice")
    data = bytearray(frame(MessageType.SEND, Information(1, b"hi").encode(), dest="bob"))
    data[8:12] = (MAX * 2).to_bytes(4, "little")
    alice.sendMessage(bytes(data), isBinary=True)
    yield closed_with(alice, DisconnectedType.MESSAGE_TOO_LARGE, 1009)


@pytest_twisted.inlineCallbacks
def test_bad_frame(server):
    """
    A frame the codec refuses (here its start token) inside a well-sized
    message: the session's own InvalidMessage, then 1002.
    """
    _, port = server
    alice = yield logged_on(port, "alice")
    data = bytearray(frame(MessageType.HEARTBEAT))
    data[0] = 0xFE
    alice.sendMessage(bytes(data), isBinary=True)
    notice = yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1002)
    assert "start token" in notice.text


@pytest_twisted.inlineCallbacks
def test_negative_body_length(server):
    _, port = server
    alice = yield logged_on(port, "alice")
    data = bytearray(frame(MessageType.HEARTBEAT))
    data[8:12] = (-1).to_bytes(4, "little", signed=True)
    alice.sendMessage(bytes(data), isBinary=True)
    yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1002)


@pytest_twisted.inlineCallbacks
def test_frame_before_logon(server):
    _, port = server
    client = yield connect(port)
    client.sendMessage(frame(MessageType.HEARTBEAT), isBinary=True)
    yield closed_with(client, DisconnectedType.NOT_LOGGED_ON, 1002)


@pytest_twisted.inlineCallbacks
def test_wrong_user_id(server):
    _, port = server
    alice = yield logged_on(port, "alice")
    alice.sendMessage(frame(MessageType.HEARTBEAT, user_id="bob"), isBinary=True)
    yield closed_with(alice, DisconnectedType.MESSAGE_WITH_WRONG_USER_ID, 1002)


@pytest_twisted.inlineCallbacks
def test_a_bad_client_touches_no_other_session(server):
    engine, port = server
    alice = yield logged_on(port, "alice")
    bob = yield logged_on(port, "bob")
    alice.sendMessage(b"\xff" * 3, isBinary=True)
    yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1002)
    assert engine.user_manager.get_online_user_list() == ["bob"]
    bob.send_frame(MessageType.HEARTBEAT, user_id="bob")
    yield with_timeout(bob.next_frame(MessageType.HEARTBEAT))


# -- the same sessions as over TCP ------------------------------------------------------


@implementer(ICustomizeHandler)
class Echo:
    def handle_information(self, user_id, client_type, information_type, payload):
        pass

    def handle_query(self, user_id, client_type, information_type, payload):
        return payload.upper()


@pytest_twisted.inlineCallbacks
def test_websocket_and_tcp_users_talk():
    """
    A browser-like WebSocket user and a desktop TCP user see each other and
    exchange one-way messages and queries both ways.
    """
    from twisted.internet import reactor

    _, service, tcp_port, ws_port = start_server()
    bob = ClientEngine(
        TCP4ClientEndpoint(reactor, "127.0.0.1", tcp_port, timeout=5),
        "bob",
        "pw",
        clock=reactor,
        handler=Echo(),
        wire=WireConfig(max_message_size=MAX),
        request_timeout=5,
    )
    received = defer.Deferred()
    bob.information_received.subscribe(lambda *a: received.called or received.callback(a))
    try:
        yield with_timeout(bob.logon())
        alice = yield logged_on(ws_port, "alice")
        assert (yield with_timeout(bob.is_user_online("alice"))) is True
        # WebSocket -> TCP
        alice.send_frame(
            MessageType.SEND, Information(7, b"hi bob").encode(), user_id="alice", dest="bob"
        )
        sender, client_type, information_type, payload = yield with_timeout(received)
        assert (sender, client_type, information_type, payload) == ("alice", 3, 7, b"hi bob")
        # TCP -> WebSocket
        bob.send("alice", 8, b"hi alice")
        got, body = yield with_timeout(alice.next_frame(MessageType.SEND))
        assert (got.user_id, body) == ("bob", Information(8, b"hi alice"))
        # A WebSocket query answered by the TCP client's handler.
        alice.send_frame(
            MessageType.REQUEST,
            Information(9, b"shout").encode(),
            user_id="alice",
            dest="bob",
            message_id=5,
        )
        got, body = yield with_timeout(alice.next_frame(MessageType.RESPONSE))
        assert (got.message_id, got.user_id, body) == (5, "bob", Information(9, b"SHOUT"))
    finally:
        yield with_timeout(bob.logoff())
        yield with_timeout(service.stopService())


@pytest_twisted.inlineCallbacks
def test_relogon_pushes_the_first_page_out(server, logs):
    engine, port = server
    first = yield logged_on(port, "alice")
    second = yield logged_on(port, "alice")
    _, pushed = yield with_timeout(first.next_frame(MessageType.BEING_PUSHED_OUT_NOTIFY))
    assert "127.0.0.1" in pushed.cause
    yield closed_with(first, DisconnectedType.BEING_PUSHED_OUT, 1000)
    assert engine.user_manager.is_user_online("alice")
    second.send_frame(MessageType.HEARTBEAT, user_id="alice")
    yield with_timeout(second.next_frame(MessageType.HEARTBEAT))


@pytest_twisted.inlineCallbacks
def test_kick(server):
    engine, port = server
    alice = yield logged_on(port, "alice")
    assert engine.kick_out("alice", "spam")
    _, kicked = yield with_timeout(alice.next_frame(MessageType.BEING_KICKED_OUT_NOTIFY))
    assert (kicked.operator, kicked.reason) == ("_0", "spam")
    yield closed_with(alice, DisconnectedType.BEING_KICKED_OUT, 1000)


@pytest_twisted.inlineCallbacks
def test_messages_go_through_the_write_behind_and_before_the_close(server, monkeypatch):
    """
    On TCP, what a session writes over WebSocket is gathered and sent at
    the next reactor turn (the write-behind, as on TCP): on the wire,
    everything relayed to bob comes in order, and the notices of his kick
    before the close frame that autobahn sends after them.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from wsclient import client_frame, handshake, server_frames

    from esf.server._protocol import WriteBehind
    from esf.wire import Logon

    flushes = []
    flush = WriteBehind.flush
    monkeypatch.setattr(WriteBehind, "flush", lambda self: flushes.append(1) or flush(self))
    engine, port = server
    alice = yield logged_on(port, "alice")
    received = []
    gone = defer.Deferred()
    waiting = []  # (how many whole messages, the Deferred that waits for them)

    def messages(count):
        d = defer.Deferred()
        waiting.append((count, d))
        return with_timeout(d)

    class Raw(Protocol):  # bob, reading the bytes as they come on the wire
        def dataReceived(self, data):
            received.append(data)
            have = _whole_messages(b"".join(received))
            for entry in [w for w in waiting if w[0] <= have]:
                waiting.remove(entry)
                entry[1].callback(None)

        def connectionLost(self, reason):
            gone.callback(None)

    bob = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Raw))
    bob.transport.write(handshake(host=f"127.0.0.1:{port}"))
    logon = frame(MessageType.LOGON, Logon(1, "", "pw").encode(), user_id="bob", message_id=1)
    bob.transport.write(client_frame(2, logon))
    yield messages(1)  # the Logon reply
    channel = next(s for s in engine.sessions if s.user_id == "bob").channel
    assert channel._behind is not None and channel._tcp is not None
    for n in range(50):
        alice.send_frame(MessageType.SEND, struct.pack("<i", n), user_id="alice", dest="bob")
    yield messages(1 + 50)  # and the Sends
    assert engine.kick_out("bob", "done")
    yield messages(1 + 50 + 3)  # and the notices and the close
    bob.transport.loseConnection()
    yield with_timeout(gone)
    _, frames = server_frames(b"".join(received))
    opcodes = [opcode for opcode, _ in frames]
    assert opcodes == [2] * (1 + 50 + 2) + [8], opcodes  # Logon reply, Sends, notices, close
    decoded = [FrameDecoder(WireConfig(max_message_size=MAX)).feed(p)[0] for _, p in frames[:-1]]
    # (Each message one frame, as the server sends them.)
    assert [f.message_type for f in decoded[1:51]] == [MessageType.SEND] * 50
    assert [struct.unpack_from("<i", f.body)[0] for f in decoded[1:51]] == list(range(50))
    assert [f.message_type for f in decoded[51:]] == [
        MessageType.BEING_KICKED_OUT_NOTIFY,
        MessageType.DISCONNECT_NOTICE,
    ]
    assert flushes
    alice.sendClose(1000)
    yield with_timeout(alice.closed)


def _whole_messages(data: bytes) -> int:
    """
    How many whole unmasked messages (of less than 64 KiB) follow the
    handshake's response in C{data}.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return 0
    offset, count = end + 4, 0
    while len(data) - offset >= 2:
        n, head = data[offset + 1] & 0x7F, 2
        if n == 126:
            if len(data) - offset < 4:
                break
            n, head = struct.unpack_from("!H", data, offset + 2)[0], 4
        if len(data) - offset < head + n:
            break
        offset += head + n
        count += 1
    return count


@pytest_twisted.inlineCallbacks
def test_heartbeat_is_echoed(server):
    _, port = server
    alice = yield logged_on(port, "alice")
    alice.send_frame(MessageType.HEARTBEAT, user_id="alice")
    echo, _ = yield with_timeout(alice.next_frame(MessageType.HEARTBEAT))
    assert (echo.user_id, echo.dest_user_id, echo.message_id) == ("_0", "alice", 0)


@pytest_twisted.inlineCallbacks
def test_logoff_closes_normally(server, logs):
    _, port = server
    alice = yield logged_on(port, "alice")
    alice.send_frame(MessageType.LOGOFF, user_id="alice")
    closed = yield with_timeout(alice.closed)
    assert closed.code == 1000 and closed.was_clean
    assert not any(f.message_type == MessageType.DISCONNECT_NOTICE for f, _ in alice.frames)
    [event] = session_end_events(logs)
    assert event["reason"] == DisconnectedType.LOGGED_OFF.name


@pytest_twisted.inlineCallbacks
def test_client_close_ends_the_session(server, logs):
    engine, port = server
    alice = yield logged_on(port, "alice")
    alice.sendClose(1000)
    yield with_timeout(alice.closed)
    for _ in range(100):
        if not engine.sessions:
            break
        yield deferLater(0.01)
    assert not engine.user_manager.is_user_online("alice")
    [event] = session_end_events(logs)
    assert event["reason"] == DisconnectedType.NETWORK_INTERRUPTED.name


def deferLater(seconds):
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_shutdown_sends_server_shutdown_to_websocket_sessions():
    engine, service, _, port = start_server()
    alice = yield logged_on(port, "alice")
    client = yield connect(port)  # not logged on yet
    stopped = service.stopService()
    yield closed_with(alice, DisconnectedType.SERVER_SHUTDOWN, 1001)
    yield closed_with(client, DisconnectedType.SERVER_SHUTDOWN, 1001)
    yield with_timeout(stopped)
    assert not engine.sessions


@pytest_twisted.inlineCallbacks
def test_connection_limit_counts_websocket_sessions():
    """
    The engine's connection limit counts TCP and WebSocket sessions alike;
    a WebSocket listener also refuses handshakes past it (HTTP 503), so
    that connections still shaking hands are bounded too.
    """
    from twisted.internet import reactor

    config = ServerConfig(wire=WireConfig(max_message_size=MAX), max_connections=1)
    engine, service, tcp_port, port = start_server(config)
    bob = ClientEngine(
        TCP4ClientEndpoint(reactor, "127.0.0.1", tcp_port, timeout=5),
        "bob",
        clock=reactor,
        wire=config.wire,
        request_timeout=5,
    )
    try:
        yield with_timeout(bob.logon())
        alice = yield connect(port)
        yield closed_with(alice, DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED, 1013)
        yield with_timeout(bob.logoff())
        for _ in range(100):
            if not engine.sessions:
                break
            yield deferLater(0.01)
        alice = yield logged_on(port, "alice")
        with pytest.raises(ConnectionRefusedByServer, match="503"):
            yield connect(port)
        assert engine.user_manager.get_online_user_list() == ["alice"]
    finally:
        yield with_timeout(service.stopService())


# -- the web demo ---------------------------------------------------------------------------


def http_get(port, path):
    """
    C{(status, headers, body)} of a GET, over a plain socket (in a thread).
    """
    import http.client

    from twisted.internet import threads

    def get():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    return with_timeout(threads.deferToThread(get))


@pytest_twisted.inlineCallbacks
def test_web_demo_serves_the_page_the_module_and_the_websocket():
    _, service, _, port = start_server(web_demo=True)
    try:
        for path, content_type, marker in [
            ("/", b"text/html", b"chat.js"),
            ("/esf.js", b"text/javascript", b"export class EsfClient"),
            ("/chat.js", b"text/javascript", b"EsfClient"),
            ("/chat.css", b"text/css", b"body"),
        ]:
            status, headers, body = yield http_get(port, path)
            assert status == 200, path
            assert headers["content-type"].encode().startswith(content_type)
            assert headers["x-content-type-options"] == "nosniff"
            assert "connect-src 'self'" in headers["content-security-policy"]
            assert marker in body, path
        # A page of another origin may import the module (CORS), not the chat's files.
        _, headers, _ = yield http_get(port, "/esf.js")
        assert headers["access-control-allow-origin"] == "*"
        _, headers, _ = yield http_get(port, "/chat.js")
        assert "access-control-allow-origin" not in headers
        status, _, _ = yield http_get(port, "/nope")
        assert status == 404
        # The WebSocket at /esf, from the page's own origin.
        alice = yield logged_on(port, "alice", origin=f"http://127.0.0.1:{port}")
        alice.send_frame(MessageType.HEARTBEAT, user_id="alice")
        yield with_timeout(alice.next_frame(MessageType.HEARTBEAT))
        alice.sendMessage(b"text", isBinary=False)
        yield closed_with(alice, DisconnectedType.INVALID_MESSAGE, 1003)
        with pytest.raises(ConnectionRefusedByServer):
            yield connect(port, origin="http://evil.example")
        with pytest.raises(ConnectionRefusedByServer):
            yield connect(port, protocols=())
    finally:
        yield with_timeout(service.stopService())


@pytest_twisted.inlineCallbacks
def test_wss_on_an_ssl_endpoint(tmp_path):
    """
    An C{ssl:} endpoint gives wss: a page of the server's own https origin
    logs on; an http origin of the same host and port is another origin.
    """
    from test_tls import make_certificate
    from twisted.internet import reactor
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    cert_path, key_path, cert_pem = make_certificate(tmp_path)
    engine = ServerEngine(ServerConfig(wire=WireConfig(max_message_size=MAX)), clock=reactor)
    service = ServerService(engine, serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    # Cryptography objects, not the ssl: endpoint string, which would hand
    # pyOpenSSL its own deprecated ones (the wss path is the same).
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.ssl import CertificateOptions

    tls = CertificateOptions(
        privateKey=serialization.load_pem_private_key(key_path.read_bytes(), None),
        certificate=x509.load_pem_x509_certificate(cert_path.read_bytes()),
    )
    listener = service.listen(
        SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1"),
        WebSocketFactory(engine, reactor=reactor),
    )
    service.startService()
    port = (yield listener._waitingForPort).getHost().port

    def connect_tls(origin):
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))
        return connect(port, origin=origin, tls=options, timeout=5)

    try:
        alice = yield connect_tls(f"https://localhost:{port}")
        reply = yield with_timeout(alice.logon("alice"))
        assert reply.result == LogonResult.SUCCEED
        [session] = engine.sessions
        assert session.address.startswith("127.0.0.1:")
        with pytest.raises(ConnectionRefusedByServer, match="403"):
            yield connect_tls(f"http://localhost:{port}")
    finally:
        yield with_timeout(service.stopService())
