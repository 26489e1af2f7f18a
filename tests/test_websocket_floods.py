"""
What a WebSocket peer's own frames (pings, pongs, fragments) cost it: each
is paid for from the session's budget before autobahn parses it, as a TCP
frame costs its sender.  Before logon a peer gets a few such frames, then
the connection ends; after logon each costs one unit of the work budget,
and a peer that has spent it is read no further until it refills.  On an
in-memory transport, with the engine's time on a L{task.Clock}.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from _helpers import Client, LogCapture, make_engine
from test_websocket_channel import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    Page,
    close_code,
)
from wsclient import client_frame

from esf import WebSocketFactory
from esf.server._counters import Count
from esf.wire import DisconnectedType, DisconnectNotice, Information, Logon, MessageType

MAX = 4096
#: What esf allows before logon and after the close began (esf.server._budget).
PRE_LOGON_FRAMES = 16
CLOSING_FRAMES = 64

#: One read's worth (64 KiB) of empty continuation fragments, and of empty
#: pings, as the flood that took a core sent them.
FRAGMENTS = client_frame(CONTINUATION, b"", fin=False) * (65536 // 6)
PINGS = client_frame(PING, b"") * (65536 // 6)


def test_the_allowances_are_esfs():
    from esf.server import _budget

    assert (_budget.PRE_LOGON_FRAMES, _budget.CLOSING_FRAMES) == (
        PRE_LOGON_FRAMES,
        CLOSING_FRAMES,
    )


class Counted:
    """
    Counts the frames autobahn parses for C{page} (each one it begins).
    """

    def __init__(self, page):
        self.frames = 0
        begin = page.protocol.onFrameBegin

        def counting():
            self.frames += 1
            begin()

        page.protocol.onFrameBegin = counting


def flood_engine(**settings):
    return make_engine(max_message_size=MAX, **settings)


def page_on(engine, factory=None, port=6001):
    return Page(engine, factory or WebSocketFactory(engine), port=port)


def ended_with(page, reason, code):
    messages = page.messages()
    notice = page.esf(messages)[-1]
    assert notice.message_type == MessageType.DISCONNECT_NOTICE, messages
    body = DisconnectNotice.decode(notice.body)
    assert body.reason == reason, body
    assert (messages[-1][0], close_code(messages[-1][1])) == (CLOSE, code), messages[-1]
    return body


@pytest.mark.parametrize("flood", ["fragments", "pings"])
def test_a_flood_before_logon_ends_the_connection_at_once(flood):
    """
    A peer that has not logged on floods a read of empty continuation
    fragments (after the first fragment of a message) or of empty pings:
    autobahn parses PRE_LOGON_FRAMES of them, no more, and the session ends
    NotLoggedOn with close 1008 and one log event.  What the peer sends
    after that is parsed only up to CLOSING_FRAMES, then the connection is
    closed.
    """
    engine = flood_engine()
    logs = LogCapture().start()
    try:
        page = page_on(engine)
        counted = Counted(page)
        if flood == "fragments":
            page.send(BINARY, b"", fin=False)
            page.protocol.dataReceived(FRAGMENTS)
        else:
            page.protocol.dataReceived(PINGS)
        assert counted.frames == PRE_LOGON_FRAMES
        body = ended_with(page, DisconnectedType.NOT_LOGGED_ON, 1008)
        assert "before logon" in body.text
        pongs = [m for m in page.messages() if m[0] == PONG]
        assert len(pongs) <= PRE_LOGON_FRAMES
        assert not page.transport.disconnecting  # its close frame may come
        page.protocol.dataReceived(PINGS)  # and it floods on
        assert counted.frames == PRE_LOGON_FRAMES + CLOSING_FRAMES
        assert page.transport.disconnecting
        assert page.messages() == []  # no pongs after the close
        page.lose()
    finally:
        logs.stop()
    [event] = logs.esf("session_ended")
    assert (event["reason"], event["logged_on"]) == ("NOT_LOGGED_ON", False)
    assert [
        e for e in logs.events if e.get("log_level").name in ("warn", "error", "critical")
    ] == []
    assert not engine.sessions


def test_a_logon_in_fragments_with_a_ping_is_within_the_allowance():
    """
    What a logon needs: a Logon message in a few fragments, with a ping
    among them, logs on.
    """
    engine = flood_engine()
    page = page_on(engine)
    page.user_id = "alice"
    logon = page.frame(MessageType.LOGON, Logon(1, "", "pw").encode(), message_id=1)
    cuts = [0, 10, 20, 30, 40, len(logon)]
    page.send(BINARY, logon[:10], fin=False)
    page.send(PING, b"p")
    for start, end in zip(cuts[1:-1], cuts[2:]):
        page.send(CONTINUATION, logon[start:end], fin=end == len(logon))
    assert engine.user_manager.is_user_online("alice")


def test_logged_on_frames_cost_the_work_budget():
    """
    After logon each ping or fragment costs one unit of the work budget:
    a read of 10,000 pings is parsed up to the bucket (200 pongs), then the
    connection is read no further until the budget refills, at work_rate
    frames a second; nothing is lost, only delayed.
    """
    engine = flood_engine(work_rate=100, work_burst=200, work_refusal_limit=1000)
    alice = page_on(engine).logon("alice")
    counted = Counted(alice)
    alice.protocol.dataReceived(PINGS)
    assert counted.frames == 200
    assert len(alice.messages()) == 200
    assert alice.transport.producerState == "paused"
    assert engine.counters[Count.WORK_REFUSED] == 1
    for second in range(1, 6):
        for _ in range(20):  # a second, tick by tick
            engine.clock.advance(0.05)
        assert 200 + 100 * second - 5 <= counted.frames <= 200 + 100 * second + 5
    assert all(m[0] == PONG for m in alice.messages())
    assert engine.user_manager.is_user_online("alice")


def test_fragments_after_logon_cost_the_work_budget_too():
    engine = flood_engine(work_rate=100, work_burst=200, work_refusal_limit=1000)
    alice = page_on(engine).logon("alice")
    counted = Counted(alice)
    alice.send(BINARY, b"", fin=False)
    alice.protocol.dataReceived(FRAGMENTS)
    assert counted.frames == 200
    assert alice.transport.producerState == "paused"
    for _ in range(20):
        engine.clock.advance(0.05)
    assert 295 <= counted.frames <= 305


def test_whole_messages_cost_what_they_cost_over_tcp():
    """
    Whole messages are charged as the frames they hold are over TCP: Sends
    relayed to a reading user cost no work, requests one unit each.
    """
    engine = flood_engine(work_rate=100, work_burst=200)
    alice = page_on(engine).logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    bob.take()
    send = alice.frame(MessageType.SEND, Information(1, b"hi").encode(), dest_user_id="bob")
    alice.protocol.dataReceived(client_frame(BINARY, send) * 1000)
    assert len(bob.take()) == 1000
    alice.send(PING, b"after")
    assert alice.messages()[-1] == (PONG, b"after")  # the budget was untouched
    ping = alice.frame(MessageType.PING_BY_SERVER, message_id=7)
    alice.protocol.dataReceived(client_frame(BINARY, ping) * 300)
    replies = alice.esf()
    # 199: the WebSocket ping took one unit.
    assert len([r for r in replies if r.message_type == MessageType.PING_ACK]) == 199
    assert len([r for r in replies if r.message_type == MessageType.ERROR]) == 101


def test_a_session_that_keeps_its_budget_spent_is_ended_as_over_tcp():
    """
    A logged-on peer that keeps flooding pings is held back, and once it
    has kept its budget spent for work_refusal_limit seconds it is ended
    BeingKickedOut, as a TCP peer that keeps asking for too much work.
    """
    engine = flood_engine(work_rate=100, work_burst=200, work_refusal_limit=5)
    alice = page_on(engine).logon("alice")
    for _ in range(100):  # 300 pings a second against 100
        alice.protocol.dataReceived(client_frame(PING, b"") * 30)
        engine.clock.advance(0.1)
        if alice.protocol._closing:
            break
    messages = alice.messages()
    notices = alice.esf(messages)
    assert DisconnectNotice.decode(notices[-1].body).reason == DisconnectedType.BEING_KICKED_OUT
    assert "budget" in DisconnectNotice.decode(notices[-1].body).text
    assert close_code(messages[-1][1]) == 1000
    assert 5 <= engine.clock.seconds() <= 6


def test_push_back_and_the_budget_both_hold_the_reading():
    """
    A sender held back by its budget and by a receiver that is behind is
    read again only once both let it go.
    """
    engine = flood_engine(work_rate=100, work_burst=200, max_output_buffer=8 * 1024)
    alice = page_on(engine).logon("alice")
    alice.protocol.dataReceived(client_frame(PING, b"") * 300)
    assert alice.transport.producerState == "paused"
    alice.protocol.pause_reading()  # a receiver of hers is behind
    alice.protocol.resume_reading()  # ...and drains: the budget still holds
    assert alice.transport.producerState == "paused"
    engine.clock.advance(0.05)
    assert alice.transport.producerState == "paused"  # 95 pings still wait
    alice.protocol.pause_reading()
    for _ in range(40):  # two seconds: every ping paid for
        engine.clock.advance(0.05)
    assert len(alice.messages()) == 300
    assert alice.transport.producerState == "paused"
    alice.protocol.resume_reading()
    assert alice.transport.producerState == "producing"


def test_a_host_that_floods_again_and_again_is_refused_at_connect():
    """
    A host whose connections were ended three times within a minute for
    frames before logon has its next connections refused before their
    handshake (one warning when that starts), until the first of them is a
    minute old.
    """
    engine = flood_engine()
    factory = WebSocketFactory(engine)
    logs = LogCapture().start()
    try:
        for n in range(3):
            page = page_on(engine, factory, port=7000 + n)
            page.protocol.dataReceived(PINGS)
            ended_with(page, DisconnectedType.NOT_LOGGED_ON, 1008)
            page.lose()
            engine.clock.advance(1)
        refused = page_on(engine, factory, port=7100)
        other = Page(engine, factory, port=7101, host_ip="10.0.0.10")
        engine.clock.advance(57)
        again = page_on(engine, factory, port=7102)
    finally:
        logs.stop()
    assert refused.transport.value() == b""  # no handshake answered
    assert refused.transport.disconnected
    refused.lose()  # its connectionLost, as the reactor calls it
    assert other.response().startswith(b"HTTP/1.1 101")
    assert again.response().startswith(b"HTTP/1.1 101")
    assert engine.counters[Count.WEBSOCKET_FLOODERS_REFUSED] == 1
    [warning] = logs.esf("websocket_flooder_refused")
    assert warning["host"] == "10.0.0.9"
    # One session_ended each for the three floods, none for the refusal.
    ended = [(e["address"], e["reason"]) for e in logs.esf("session_ended")]
    assert ended == [(f"10.0.0.9:{7000 + n}", "NOT_LOGGED_ON") for n in range(3)] + [
        ("10.0.0.10:7101", "LOGON_TIMEOUT")
    ]


def test_the_flood_limit_is_the_configs():
    engine = flood_engine(websocket_flood_limit=1)
    factory = WebSocketFactory(engine)
    page = page_on(engine, factory)
    page.protocol.dataReceived(PINGS)
    page.lose()
    assert page_on(engine, factory, port=7100).transport.disconnected


def test_a_peer_kicked_while_it_streams_gets_its_notice():
    """
    The close allowance: a logged-on peer ended while messages of its are
    on the way may still send CLOSING_FRAMES, whose close frame ends the
    close cleanly.
    """
    engine = flood_engine()
    alice = page_on(engine).logon("alice")
    engine.kick_out("alice", "bye")
    heartbeat = alice.frame(MessageType.HEARTBEAT)
    alice.protocol.dataReceived(client_frame(BINARY, heartbeat) * (CLOSING_FRAMES - 1))
    alice.send(CLOSE, (1000).to_bytes(2, "big"))
    messages = alice.messages()
    assert DisconnectNotice.decode(alice.esf(messages)[-1].body).reason == (
        DisconnectedType.BEING_KICKED_OUT
    )
    assert messages[-1][0] == CLOSE
    # Its close frame, the 64th, was taken: the close ended cleanly.
    assert alice.protocol.state == alice.protocol.STATE_CLOSED
    assert alice.protocol.wasClean


# -- the refusal at connect, on the real reactor: over ws, the web demo and wss ------


def _listen(variant, tmp_path):
    """
    An engine refusing a host after one flood, and a WebSocket listener of
    C{variant} on loopback: C{(engine, service, connect)}.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
    from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
    from wsclient import connect

    from esf import ServerConfig, ServerEngine, ServerService, WireConfig
    from esf.server._web_demo import web_demo_site

    config = ServerConfig(wire=WireConfig(max_message_size=MAX), websocket_flood_limit=1)
    engine = ServerEngine(config, clock=reactor)
    service = ServerService(engine, serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    tls = options = None
    if variant == "wss":
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from test_tls import make_certificate

        cert_path, key_path, cert_pem = make_certificate(tmp_path)
        tls = CertificateOptions(
            privateKey=serialization.load_pem_private_key(key_path.read_bytes(), None),
            certificate=x509.load_pem_x509_certificate(cert_path.read_bytes()),
        )
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))
        endpoint = SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1")
    else:
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    if variant == "web-demo":
        factory = web_demo_site(engine, reactor=reactor)
    else:
        factory = WebSocketFactory(engine, reactor=reactor)
    listener = service.listen(endpoint, factory)
    service.startService()
    return engine, service, listener, lambda port: connect(port, tls=options, timeout=5)


@pytest.mark.parametrize("variant", ["ws", "web-demo", "wss"])
@pytest_twisted.inlineCallbacks
def test_a_flooding_host_is_refused_on_every_kind_of_listener(variant, tmp_path):
    from wsclient import ConnectionRefusedByServer

    engine, service, listener, connect = _listen(variant, tmp_path)
    logs = LogCapture().start()
    try:
        port = (yield listener._waitingForPort).getHost().port
        flooder = yield connect(port)
        for _ in range(PRE_LOGON_FRAMES + 1):
            flooder.sendPing(b"")
        closed = yield flooder.closed.addTimeout(5, _reactor())
        assert closed.code == 1008
        with pytest.raises(ConnectionRefusedByServer):
            yield connect(port)
        assert engine.counters[Count.WEBSOCKET_FLOODERS_REFUSED] == 1
    finally:
        yield service.stopService().addTimeout(10, _reactor())
        logs.stop()
    assert logs.failures() == []
    assert len(logs.esf("websocket_flooder_refused")) == 1


def _reactor():
    from twisted.internet import reactor

    return reactor
