"""
Tests for what one peer can make the HTTP sites hold: each site's
connection cap, the total deadline for a request's head and body, the
sharing of the descriptor limit, and the log of running out of them.

Time is a L{task.Clock} and connections are in-memory transports, except
in the test of Twisted's own accept loop running out of descriptors and
those over TLS, on the real reactor and 127.0.0.1.
"""

from __future__ import annotations

import os
import select
import socket
import time

import pytest
import pytest_twisted
from _helpers import LogCapture, make_engine
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from wsclient import handshake

from esf.operations._admin import AdminService
from esf.operations._metrics import MetricsService, make_registry
from esf.server._descriptors import (
    DescriptorShare,
    IntervalCount,
    QuietAcceptErrors,
    quiet_accept_errors,
    share_descriptors,
)
from esf.server._http import ConnectionCap, HTTPLimits, limit_site
from esf.server._web_demo import web_demo_site
from esf.server._websocket import WebSocketFactory

ENDPOINT = object()  # never listened on: the tests build protocols themselves
PEER = IPv4Address("TCP", "10.0.0.7", 40001)


def on_clock(factory, clock):
    """
    C{factory} (a capped site), its site's own timers (the idle timeout,
    the log's date) on C{clock}: left on the global reactor they would
    fire in a later test.
    """
    site = getattr(factory, "wrappedFactory", factory)
    site.reactor = clock
    return factory


def metrics_factory(engine, **kwargs):
    return on_clock(MetricsService(engine, ENDPOINT, **kwargs).listener.factory, engine.clock)


def admin_factory(engine, **kwargs):
    return on_clock(AdminService(engine, ENDPOINT, None, **kwargs).listener.factory, engine.clock)


def connect(factory):
    """
    A connection to C{factory}: C{(protocol, transport)}, or C{None} when
    the factory refuses it (closes it as soon as it is made, unread).
    """
    protocol = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    if transport.disconnected:  # aborted
        return None
    return protocol, transport


def lose(connection):
    protocol, transport = connection
    transport.disconnecting = True
    protocol.connectionLost(Failure(ConnectionDone()))


def closed(transport) -> bool:
    return bool(transport.disconnecting or transport.disconnected)


SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# -- the deadline of a request ------------------------------------------------------


@pytest.mark.parametrize("make", [admin_factory, metrics_factory], ids=["admin", "metrics"])
def test_a_trickling_request_is_closed_at_the_deadline(make, logs):
    """
    One byte every 2 s keeps twisted.web's idle timer from firing forever;
    the deadline is a total from the accept: 10 s by default.
    """
    engine = make_engine()
    factory = make(engine)
    protocol, transport = connect(factory)
    request = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 100
    for byte in request[:5]:
        protocol.dataReceived(bytes([byte]))
        engine.clock.advance(2)
        if engine.clock.seconds() < 10:
            assert not closed(transport), f"closed after {engine.clock.seconds()} s"
    assert engine.clock.seconds() == 10
    assert closed(transport)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    [line] = logs.esf("http_request_timeout")
    assert line["count"] == 1


def test_the_request_timeout_and_cap_are_options_of_the_site():
    engine = make_engine()
    factory = metrics_factory(engine, limits=HTTPLimits(max_connections=1, request_timeout=3))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /met")
    engine.clock.advance(2.9)
    assert not closed(transport)
    assert connect(factory) is None  # the cap: one connection
    engine.clock.advance(0.1)
    assert closed(transport)


def test_a_peer_that_does_not_take_its_408_is_aborted():
    engine = make_engine()
    factory = metrics_factory(engine, limits=HTTPLimits(4, 3))
    _protocol, transport = connect(factory)
    engine.clock.advance(3)
    assert transport.disconnecting and not transport.disconnected
    engine.clock.advance(3)
    assert transport.disconnected  # StringTransport's abortConnection


def test_keep_alive_each_request_has_the_deadline_from_the_last_response():
    """
    The deadline does not count the time between accept and the first
    request's end against the next request, nor rendering; it restarts
    when a response ends, so an idle keep-alive connection is closed
    after the deadline too.
    """
    engine = make_engine()
    factory = metrics_factory(engine, limits=HTTPLimits(4, 5))
    protocol, transport = connect(factory)
    engine.clock.advance(4)
    protocol.dataReceived(SCRAPE)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    transport.clear()
    engine.clock.advance(4)  # 8 s from the accept, 4 from the response
    assert not closed(transport)
    protocol.dataReceived(SCRAPE[:10])
    engine.clock.advance(0.9)
    assert not closed(transport)
    engine.clock.advance(0.1)
    assert closed(transport)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_pipelined_requests_are_answered_and_then_the_deadline_runs():
    engine = make_engine()
    factory = metrics_factory(engine, limits=HTTPLimits(4, 5))
    protocol, transport = connect(factory)
    protocol.dataReceived(SCRAPE + SCRAPE)
    assert transport.value().count(b"HTTP/1.1 200 ") == 1  # one per reactor turn
    engine.clock.advance(0)
    assert transport.value().count(b"HTTP/1.1 200 ") == 2
    deadlines = [c for c in engine.clock.getDelayedCalls() if "_expired" in repr(c.func)]
    assert len(deadlines) == 1
    engine.clock.advance(5)
    assert closed(transport)


# -- the connection cap -------------------------------------------------------------


@pytest.mark.parametrize("make", [admin_factory, metrics_factory], ids=["admin", "metrics"])
def test_a_site_holds_at_most_its_cap_of_connections(make, logs):
    engine = make_engine()
    factory = make(engine)  # the default cap: 64
    held = [connect(factory) for _ in range(64)]
    assert None not in held
    assert [connect(factory) for _ in range(100)] == [None] * 100
    lose(held.pop())
    assert connect(factory) is not None
    assert connect(factory) is None
    # Logged once at once, then once per 10 s with the count.
    [first] = logs.esf("http_connections_refused")
    assert (first["count"], first["cap"]) == (1, 64)
    engine.clock.advance(10)
    _, second = logs.esf("http_connections_refused")
    assert second["count"] == 100
    engine.clock.advance(100)
    assert len(logs.esf("http_connections_refused")) == 2


def test_the_cap_and_deadline_keep_the_site_name_in_the_log():
    engine = make_engine()
    service = MetricsService(engine, ENDPOINT)
    assert service.listener.factory.logPrefix() == "MetricsSite"


def test_web_demo_a_trickling_handshake_is_closed_at_the_logon_timeout():
    clock = task.Clock()
    engine = make_engine(logon_timeout=3)
    site = web_demo_site(engine, reactor=clock)
    site.reactor = clock
    factory = limit_site(site, HTTPLimits(2, 3), clock, "the web demo")
    protocol, transport = connect(factory)
    for byte in handshake()[:5]:
        protocol.dataReceived(bytes([byte]))
        clock.advance(0.5)
    assert not closed(transport)
    for byte in handshake()[5:10]:
        protocol.dataReceived(bytes([byte]))
        clock.advance(0.5)
    assert closed(transport)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert not engine.sessions


def test_web_demo_a_websocket_leaves_the_sites_cap_and_deadline():
    """
    Once its handshake is done a connection is an ESF session: the site's
    deadline no longer applies (the engine's logon timer does) and it no
    longer counts against the site's cap.
    """
    clock = task.Clock()
    engine = make_engine(logon_timeout=30)
    site = web_demo_site(engine, reactor=clock)
    site.reactor = clock
    factory = limit_site(site, HTTPLimits(1, 3), clock, "the web demo")
    protocol, transport = connect(factory)
    transport.protocol = protocol  # as a real transport has it
    protocol.dataReceived(handshake())
    assert transport.value().startswith(b"HTTP/1.1 101")
    [session] = engine.sessions
    assert transport.protocol is session.channel  # the wrapper stepped aside
    assert connect(factory) is not None  # the cap of 1 is free again
    clock.advance(10)
    assert not transport.disconnecting
    transport.protocol.connectionLost(Failure(ConnectionDone()))
    assert len(factory.protocols) == 1  # the other one


def test_websocket_handshakes_are_capped_until_done(logs):
    """
    Plain C{--websocket}: at most C{--websocket-max-handshakes} connections
    in their handshake; one whose handshake is accepted leaves the cap.
    """
    engine = make_engine()
    clock = engine.clock
    ws = WebSocketFactory(engine, reactor=clock)
    factory = ConnectionCap(ws, 2, clock, "ws", "connections in their handshake")
    a, b = connect(factory), connect(factory)
    assert connect(factory) is None
    held, transport = a
    transport.protocol = held  # as a TCP transport has it
    ws_protocol = held.wrappedProtocol
    held.dataReceived(handshake())
    assert transport.value().startswith(b"HTTP/1.1 101")
    assert len(engine.sessions) == 1
    # The cap's wrapper has stepped out of the connection's way.
    assert transport.protocol is ws_protocol and ws_protocol.transport is transport
    c = connect(factory)
    assert c is not None
    assert connect(factory) is None
    ws_protocol.connectionLost(Failure(ConnectionDone()))  # as the transport now calls it
    assert set(factory.protocols) == {b[0], c[0]}
    lose(b)
    assert set(factory.protocols) == {c[0]}
    [line] = logs.esf("http_connections_refused")
    assert line["what"] == "connections in their handshake"
    for call in clock.getDelayedCalls():
        call.cancel()


# -- sharing descriptors ------------------------------------------------------------

HTTP = (("admin-api-max-connections", 64), ("metrics-max-connections", 64))


@pytest.mark.parametrize(
    "soft, hard, given, expected",
    [
        # No --max-connections: what the sites and the reserve leave.
        (1024, 4096, None, DescriptorShare(1024, 1024 - 128 - 32, HTTP, 32)),
        # One that fits is kept; one that does not raises the soft limit.
        (1024, 4096, 500, DescriptorShare(1024, 500, HTTP, 32)),
        (1024, 4096, 2000, DescriptorShare(2160, 2000, HTTP, 32, raise_to=2160)),
        (1024, None, 2000, DescriptorShare(2160, 2000, HTTP, 32, raise_to=2160)),
        # No limit: nothing to share.
        (None, None, None, DescriptorShare(None, None, HTTP, 32)),
    ],
)
def test_share_descriptors(soft, hard, given, expected):
    assert share_descriptors(soft, hard, given, HTTP) == expected


def test_share_descriptors_refuses_what_cannot_fit():
    with pytest.raises(ValueError) as e:
        share_descriptors(1024, 1024, 2000, HTTP)
    assert str(e.value) == (
        "--max-connections 2000 and --admin-api-max-connections 64, "
        "--metrics-max-connections 64, 32 kept for the process need 2160 descriptors; "
        "the hard limit is 1024 (ulimit -Hn): lower them or raise it"
    )
    with pytest.raises(ValueError, match="leaves no connections for ESF"):
        share_descriptors(150, 150, None, HTTP)


def test_options_share_the_descriptor_limit(monkeypatch):
    from twisted.python import usage

    from esf import tap

    monkeypatch.setattr(tap, "nofile_limits", lambda: (256, 256))
    options = tap.Options()
    local = "tcp:0:interface=127.0.0.1"
    options = tap.Options()
    options.parseOptions(["--admin-api", local, "--metrics", local])
    assert options["config"].max_connections == 256 - 64 - 64 - 32
    options = tap.Options()
    options.parseOptions(
        ["--metrics", local, "--metrics-max-connections", "8", "--max-connections", "200"]
    )
    assert options["config"].max_connections == 200
    with pytest.raises(usage.UsageError, match="need 265 descriptors; the hard limit is 256"):
        tap.Options().parseOptions(
            ["--max-connections", "200", "--websocket", local, "--web-demo",
             "--websocket-max-handshakes", "33"]
        )  # fmt: skip


# -- running out of descriptors -----------------------------------------------------


def test_interval_count_logs_once_per_interval():
    clock = task.Clock()
    lines = []
    counter = IntervalCount(clock, lambda n, i: lines.append((clock.seconds(), n)), interval=10)
    for _ in range(50):
        counter.count(20)  # 50 s of 20 events a second
        clock.advance(1)
    clock.advance(10)
    assert lines == [(0, 20), (10, 180), (20, 200), (30, 200), (40, 200), (50, 200)]
    assert counter.total == 1000
    assert not clock.getDelayedCalls()


def _closed_by_server(peers, timeout=5.0):
    """
    How many of C{peers} the server has closed: each either reads end of
    file within C{timeout} or is still open when it ends.
    """
    open_peers = list(peers)
    closed = 0
    deadline = time.monotonic() + timeout
    while open_peers and time.monotonic() < deadline:
        readable, _, _ = select.select(open_peers, [], [], 0.2)
        if not readable:
            break
        for peer in readable:
            if peer.recv(1) == b"":
                closed += 1
            open_peers.remove(peer)
    return closed


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_running_out_of_descriptors_is_logged_once_per_interval():
    """
    Twisted's own accept loop, with the process at its descriptor limit:
    what it logs for every connection it cannot take becomes one line per
    interval with a count.
    """
    import resource

    from twisted.internet import reactor

    clock = task.Clock()
    capture = LogCapture().start()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    peers = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        quiet_accept_errors(port, clock)
        for _ in range(5):
            peers.append(socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5))
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
        try:
            port.doRead()
            port.doRead()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # Each pass of the loop closes one connection (with Twisted's
        # reserved descriptor) and fails to accept the next.
        [line] = capture.esf("descriptors_exhausted")
        assert line["count"] == 1 and line["log_level"].name == "error"
        clock.advance(10)
        _, more = capture.esf("descriptors_exhausted")
        # How many of the waiting connections each pass reaches is the
        # kernel's business; what is counted must be exactly the
        # connections that were taken and closed.
        assert 1 + more["count"] == _closed_by_server(peers)
        assert more["count"] >= 1
        # None of Twisted's lines for each connection went on.
        twisted_lines = [e for e in capture.events if "EMFILE" in (e.get("log_format") or "")]
        assert twisted_lines == []
    finally:
        capture.stop()
        for peer in peers:
            peer.close()
        port.stopListening()


def test_quiet_accept_errors_endpoint_sets_up_the_port_it_listens_on():
    from twisted.internet.defer import succeed
    from twisted.logger import Logger

    class Port:
        _logger = Logger(namespace="twisted.internet.tcp")
        factory = None

        def getHost(self):
            return IPv4Address("TCP", "127.0.0.1", 4530)

    class Endpoint:
        def listen(self, factory):
            return succeed(Port())

    ports = []
    QuietAcceptErrors(Endpoint(), task.Clock()).listen(None).addCallback(ports.append)
    [port] = ports
    assert isinstance(port.esf_accept_errors, IntervalCount)
    assert port._logger.namespace == "test_http_limits.Port"  # the class's, as before


# -- over TLS, on the real reactor --------------------------------------------------


def tls_listener(tmp_path, factory_for):
    """
    An engine and a service listening with C{factory_for(engine)} on a TLS
    endpoint: C{(engine, service, listener, cert_pem)}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from test_tls import make_certificate
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
    from twisted.internet.ssl import CertificateOptions

    from esf import ServerConfig, ServerEngine, ServerService

    cert_path, key_path, cert_pem = make_certificate(tmp_path)
    engine = ServerEngine(ServerConfig(), clock=reactor)
    service = ServerService(engine, serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    tls = CertificateOptions(
        privateKey=serialization.load_pem_private_key(key_path.read_bytes(), None),
        certificate=x509.load_pem_x509_certificate(cert_path.read_bytes()),
    )
    endpoint = SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1")
    listener = service.listen(endpoint, factory_for(engine))
    service.startService()
    return engine, service, listener, cert_pem


@pytest_twisted.inlineCallbacks
def test_over_tls_a_connection_past_the_cap_is_closed_cleanly(tmp_path):
    """
    TLS wraps whatever the factory builds, so the cap refuses with a
    protocol that closes the connection, not with None (which TLS would
    wrap, and fail on).
    """
    from test_websocket import with_timeout
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    def capped(engine):
        return ConnectionCap(WebSocketFactory(engine, reactor=reactor), 1, reactor, "ws")

    capture = LogCapture().start()
    _engine, service, listener, _ = tls_listener(tmp_path, capped)
    port = (yield listener._waitingForPort).getHost().port
    held = []
    try:
        for _ in range(2):

            class Held(Protocol):
                def __init__(self):
                    self.lost = Deferred()

                def connectionLost(self, reason):
                    self.lost.callback(None)

            protocol = Held()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
            held.append(protocol)
        yield with_timeout(held[1].lost, 5)  # the second: closed by the server
        assert not held[0].lost.called
        [refused] = capture.esf("http_connections_refused")
        assert refused["count"] == 1
        assert not capture.failures()
        assert not [e for e in capture.events if "Unhandled" in str(e.get("log_format"))]
    finally:
        capture.stop()
        for protocol in held:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        yield with_timeout(service.stopService())


@pytest.mark.parametrize("web_demo", [False, True], ids=["websocket", "web-demo"])
@pytest_twisted.inlineCallbacks
def test_wss_through_the_cap(tmp_path, web_demo):
    """
    Over TLS the cap's wrapper is under the TLS layer: once the handshake
    is accepted, the TLS layer hands bytes straight to the WebSocket
    protocol, which logs on.
    """
    from test_websocket import with_timeout
    from twisted.internet import reactor
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from wsclient import connect as ws_connect

    from esf import LogonResult

    def capped(engine):
        if web_demo:
            site = web_demo_site(engine, reactor=reactor)
            return limit_site(site, HTTPLimits(4, 5), reactor, "demo")
        return ConnectionCap(WebSocketFactory(engine, reactor=reactor), 4, reactor, "ws")

    engine, service, listener, cert_pem = tls_listener(tmp_path, capped)
    port = (yield listener._waitingForPort).getHost().port
    try:
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))
        alice = yield ws_connect(port, origin=f"https://localhost:{port}", tls=options, timeout=5)
        reply = yield with_timeout(alice.logon("alice"))
        assert reply.result == LogonResult.SUCCEED
        [session] = engine.sessions
        assert session.channel.transport.wrappedProtocol is session.channel  # the TLS layer
        assert not listener.factory.protocols
    finally:
        yield with_timeout(service.stopService())


def test_closed_connections_are_counted_in_the_metrics_by_site_and_reason():
    """
    What a site's cap and deadline close is counted, summed over the sites
    of one label (two web demo ports), and the metrics site counts its own.
    """
    clock = task.Clock()
    engine = make_engine(logon_timeout=3)
    demos = []
    for port in ("a", "b"):
        site = web_demo_site(engine, reactor=clock)
        site.reactor = clock
        demos.append(
            limit_site(site, HTTPLimits(1, 3), clock, f"the web demo {port}", label="web_demo")
        )
    service = MetricsService(engine, ENDPOINT, clock=clock, sites=list(demos))
    registry = make_registry(service.metrics, process=False)

    def closed(site, reason):
        return registry.get_sample_value(
            "esf_http_connections_closed_total", {"site": site, "reason": reason}
        )

    assert closed("web_demo", "max_connections") == 0
    assert closed("metrics", "request_timeout") == 0
    held = [connect(demo) for demo in demos]
    assert None not in held
    assert connect(demos[0]) is None and connect(demos[1]) is None  # over each cap
    assert connect(demos[1]) is None
    clock.advance(3)  # neither held connection sent a request
    assert closed("web_demo", "max_connections") == 3
    assert closed("web_demo", "request_timeout") == 2
    assert closed("metrics", "max_connections") == 0


# -- what a site writes to the log -----------------------------------------------------


def web_demo_factory(engine, **kwargs):
    site = web_demo_site(engine, reactor=engine.clock)
    return on_clock(
        limit_site(site, HTTPLimits(4, 10), engine.clock, "the web demo"), engine.clock
    )


@pytest.mark.parametrize(
    "make, path",
    [
        (admin_factory, b"/dashboard"),
        (admin_factory, b"/api/info"),
        (metrics_factory, b"/metrics"),
        (web_demo_factory, b"/chat.css"),
    ],
    ids=["admin", "admin-api", "metrics", "web_demo"],
)
def test_requests_write_no_log_line_each(make, path, logs):
    """
    A peer that pipelines requests on one connection makes the site write
    no line per request: twisted.web's access log (a line of up to the
    head's 16 KiB, its path, Referer and User-Agent, per request, to the
    server's log) is off.  The admin API's refusals keep their own bound.
    """
    engine = make_engine()
    factory = make(engine)
    factory.doStart()  # as a listening port does: twisted.web opens its access log here
    try:
        protocol, transport = connect(factory)
        request = (
            b"GET " + path + b"?probe-7f3a HTTP/1.1\r\nHost: evil.example\r\n"
            b"User-Agent: " + b"u" * 1000 + b"\r\n\r\n"
        )
        protocol.dataReceived(request * 100)
        for _ in range(100):
            engine.clock.advance(0)  # one answer per reactor turn
        assert transport.value().count(b"HTTP/1.1 ") == 100
        assert [e for e in logs.events if "probe-7f3a" in repr(e)] == []
        assert len(logs.esf("admin_request_refused")) <= 10
        assert len(logs.events) <= 12
    finally:
        factory.doStop()


@pytest.mark.parametrize(
    "path", [b"/", b"/chat.css", b"/esf.js", b"/nothing"], ids=["page", "css", "js", "404"]
)
def test_the_web_demo_does_not_name_its_software(path):
    """
    The web demo's pages carry no C{Server} header, as the admin and
    metrics sites and the WebSocket handshake: a scanner is not told which
    twisted.web to aim at.
    """
    engine = make_engine()
    protocol, transport = connect(web_demo_factory(engine))
    protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = transport.value().split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 ") and b"\r\ndate: " in head
    assert b"\r\nserver:" not in head


# -- request bodies -------------------------------------------------------------------


SITES_AND_PATHS = [
    (admin_factory, b"/api/info"),
    (metrics_factory, b"/metrics"),
    (web_demo_factory, b"/chat.css"),
    (web_demo_factory, b"/esf"),
]
SITE_IDS = ["admin", "metrics", "web_demo", "web_demo-websocket"]


@pytest.mark.parametrize("make, path", SITES_AND_PATHS, ids=SITE_IDS)
def test_a_body_announced_past_the_bound_is_refused_before_it_is_read(make, path):
    """
    twisted.web keeps a request's whole body before it renders, in a
    temporary file past 100 KB: without a bound one connection to the
    metrics site or the web demo wrote 2.4 GiB to disk within the request
    deadline.  Every site answers 413 and closes at once.
    """
    engine = make_engine()
    protocol, transport = connect(make(engine))
    protocol.dataReceived(
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000000\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert closed(transport)


@pytest.mark.parametrize("make, path", SITES_AND_PATHS, ids=SITE_IDS)
def test_a_chunked_body_past_the_bound_is_refused_as_it_passes_it(make, path):
    engine = make_engine()
    protocol, transport = connect(make(engine))
    protocol.dataReceived(
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"  # 16 KiB
    for _ in range(4):
        protocol.dataReceived(chunk)
    assert not closed(transport)  # 64 KiB: still within the bound
    protocol.dataReceived(chunk)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert closed(transport)
    [request] = protocol.wrappedProtocol.requests
    assert request.content.tell() == 0  # what was kept of it is let go


# -- pipelined requests -----------------------------------------------------------------


def turn(clock):
    """
    One turn of a reactor on C{clock}: the calls due now run, not those
    they make (C{Clock.advance(0)} would run those too).
    """
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


@pytest.mark.parametrize(
    "make, path",
    [(admin_factory, b"/api/info"), (metrics_factory, b"/metrics"), (web_demo_factory, b"/x")],
    ids=["admin", "metrics", "web_demo"],
)
def test_pipelined_requests_are_answered_one_per_turn(make, path):
    """
    twisted.web answers every request of a read in one call: one 64 KiB
    read of pipelined scrapes held the reactor for 5.8 s with 2,000 users
    online (1,560 scrapes) and queued 20 MiB of answers for a peer that
    need not read them.  A connection gets one answer per reactor turn.
    """
    engine = make_engine()
    protocol, transport = connect(make(engine))
    protocol.dataReceived((b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") * 50)
    assert transport.value().count(b"HTTP/1.1 ") == 1
    for answered in range(2, 51):
        turn(engine.clock)
        assert transport.value().count(b"HTTP/1.1 ") == answered
    turn(engine.clock)
    assert not closed(transport)


def test_pipelined_requests_wait_while_the_peer_does_not_read():
    """
    While the transport's buffer is full (it paused the channel) no
    further request is answered; the deadline then closes the connection.
    """
    engine = make_engine()
    protocol, transport = connect(metrics_factory(engine, limits=HTTPLimits(4, 5)))
    channel = protocol.wrappedProtocol
    protocol.dataReceived(SCRAPE * 20)
    channel.pauseProducing()  # what the transport does past its buffer's size
    engine.clock.advance(1)
    assert transport.value().count(b"HTTP/1.1 ") == 1
    channel.resumeProducing()  # the peer read
    turn(engine.clock)
    assert transport.value().count(b"HTTP/1.1 ") == 2
    channel.pauseProducing()
    engine.clock.advance(5)
    assert transport.value().count(b"HTTP/1.1 200 ") == 2
    assert closed(transport)
    assert transport.value().endswith(
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
