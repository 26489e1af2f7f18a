"""
A server behind a PROXY protocol balancer (C{--port haproxy:tcp:PORT}):
the wrapper on a clock, then a real C{haproxy} (Debian's package) in front
of a real C{twistd esf}, where GetMyIPE, the log, the audit and the admin
API show the client's address, not the balancer's.
"""

import json
import struct
import subprocess
import time
import urllib.request

import pytest
import pytest_twisted
import rawclient as rc
from _real_parts import need_program
from rawclient import GET_MY_IPE
from test_e2e import AUTH, ServerProcess
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import eventsFromJSONLogFile
from wsclient import BlockingWS

from esf.bench import free_port
from esf.server._proxied import ProxiedEndpoint, ProxiedFactory, proxied_description

V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 4530\r\n"


class Recorder(Protocol):
    def __init__(self):
        self.made, self.data, self.lost = [], [], []

    def connectionMade(self):
        self.made.append(self.transport.getPeer())

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)


def _connection(timeout=10):
    clock = Clock()
    recorder = Recorder()
    factory = ProxiedFactory(Factory.forProtocol(lambda: recorder), timeout, clock)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    protocol.makeConnection(transport)
    return clock, recorder, protocol, transport


def test_description():
    assert proxied_description("haproxy:tcp:4530") == "tcp:4530"
    assert proxied_description("tcp:4530") is None


def test_connected_once_the_header_is_read():
    """
    The wrapped protocol is connected only when the header has come, and
    then sees the client's address; what followed the header in the same
    read reaches it.
    """
    clock, recorder, protocol, transport = _connection()
    protocol.dataReceived(V1[:20])
    assert recorder.made == []
    protocol.dataReceived(V1[20:] + b"hello")
    assert [(a.host, a.port) for a in recorder.made] == [("203.0.113.7", 40001)]
    assert recorder.data == [b"hello"]
    protocol.dataReceived(b" again")
    assert recorder.data == [b"hello", b" again"]
    clock.advance(60)
    assert not transport.disconnecting and recorder.lost == []


def test_v2_header():
    """
    HAProxy's binary header (send-proxy-v2) works the same way.
    """
    _, recorder, protocol, _ = _connection()
    address = bytes([203, 0, 113, 8]) + bytes([192, 0, 2, 1]) + struct.pack("!HH", 40002, 4530)
    header = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(address)) + address
    protocol.dataReceived(header + b"x")
    assert [(a.host, a.port) for a in recorder.made] == [("203.0.113.8", 40002)]
    assert recorder.data == [b"x"]


def test_no_header_in_time_is_aborted():
    """
    A connection that sends no header within the timeout is aborted; the
    wrapped protocol never hears of it.
    """
    clock, recorder, protocol, transport = _connection(timeout=10)
    protocol.dataReceived(b"PROX")
    clock.advance(9.9)
    assert transport.connected and not getattr(transport, "aborted", False)
    clock.advance(0.2)
    assert transport.aborted if hasattr(transport, "aborted") else transport.disconnecting
    protocol.connectionLost(None)
    assert recorder.made == [] and recorder.lost == []
    assert clock.getDelayedCalls() == []


def test_bad_header_closes():
    """
    Bytes that are not a PROXY header close the connection; the wrapped
    protocol never hears of it, and the deadline is cancelled.
    """
    clock, recorder, protocol, transport = _connection()
    protocol.dataReceived(b"\x00" * 40)
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert recorder.made == [] and recorder.lost == []
    assert clock.getDelayedCalls() == []


def test_lost_after_the_header_reaches_the_protocol():
    _, recorder, protocol, _ = _connection()
    protocol.dataReceived(V1)
    protocol.connectionLost(None)
    assert len(recorder.lost) == 1


HAPROXY_CONFIG = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend esf
    bind 127.0.0.1:{front}
    default_backend nodes
backend nodes
    server node1 127.0.0.1:{node} send-proxy-v2
frontend websocket
    bind 127.0.0.1:{ws_front}
    default_backend websocket_nodes
backend websocket_nodes
    server node1 127.0.0.1:{ws_node} send-proxy
"""


@pytest.mark.e2e
def test_real_haproxy_passes_the_clients_address(tmp_path):
    """
    Through Debian's haproxy with send-proxy-v2 in front of C{twistd esf
    --port haproxy:tcp:PORT}, the client's own address (its port, as both
    ends are on 127.0.0.1) is what GetMyIPE answers, what the log's
    session_ended event, the audit's logon record and the admin API's
    sessions show; through send-proxy (version 1) in front of a
    C{--websocket haproxy:tcp:PORT}, a WebSocket connection's session has
    its client's address too.
    """
    haproxy = need_program("haproxy", "apt-get install haproxy (the PROXY protocol test)")
    node, front, admin = free_port(), free_port(), free_port()
    ws_node, ws_front = free_port(), free_port()
    audit = tmp_path / "audit.jsonl"
    server = ServerProcess(
        tmp_path / "server.log",
        AUTH
        + ["--audit-log", str(audit), "--admin-api", f"tcp:{admin}:interface=127.0.0.1"]
        + ["--websocket", f"haproxy:tcp:{ws_node}:interface=127.0.0.1"],
        port=f"haproxy:tcp:{node}:interface=127.0.0.1",
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(front=front, node=node, ws_front=ws_front, ws_node=ws_node)
    )
    with open(tmp_path / "haproxy.log", "wb") as balancer_log:
        balancer = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=balancer_log
        )
    try:
        server.wait_for_log(r"starting on \d+", timeout=15)
        client = _connect_through(front, balancer, tmp_path)
        try:
            reply = client.logon("alice", "pa")
            assert reply["result"] == 0, reply
            own = f"127.0.0.1:{client.sock.getsockname()[1]}"
            client.send(GET_MY_IPE, dest="_0", msg_id=7)
            _header, body = client.recv_until(GET_MY_IPE)
            assert rc.unpack_str(body)[0] == own
            with urllib.request.urlopen(
                f"http://127.0.0.1:{admin}/api/sessions?user=alice", timeout=5
            ) as response:
                sessions = json.load(response)["sessions"]
            assert [s["address"] for s in sessions] == [own]
        finally:
            client.close()
        server.wait_for_log(rf"session ended: alice/0 from {own}:", timeout=10)
        with open(audit) as f:
            logons = list(eventsFromJSONLogFile(f))
        assert [r["address"] for r in logons if r.get("audit") == "logon"] == [own]
        ws = BlockingWS(ws_front)
        try:
            assert ws.response.startswith(b"HTTP/1.1 101")
            own_ws = f"127.0.0.1:{ws.sock.getsockname()[1]}"
        finally:
            ws.close()
        server.wait_for_log(rf"session ended: .* from {own_ws}:", timeout=10)
    finally:
        balancer.terminate()
        balancer.wait(10)
        server.stop()


def _connect_through(port, balancer, tmp_path):
    deadline = time.monotonic() + 10
    while True:
        if balancer.poll() is not None:
            raise AssertionError(f"haproxy exited: {(tmp_path / 'haproxy.log').read_text()}")
        try:
            return rc.connect(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


#: docs/deploying.md's backend, without TLS (and on loopback): least
#: connections, each node checked through its metrics site.
HAPROXY_CLUSTER_CONFIG = """\
global
    maxconn 100
defaults
    mode tcp
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend esf
    bind 127.0.0.1:{front}
    default_backend esf_nodes
backend esf_nodes
    balance leastconn
    option httpchk GET /metrics
    server node1 127.0.0.1:{node1} send-proxy-v2 check port {metrics1} inter 500 maxconn 50
    server node2 127.0.0.1:{node2} send-proxy-v2 check port {metrics2} inter 500 maxconn 50
"""


def _sessions_on(metrics_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    (line,) = [
        x for x in text.splitlines() if x.startswith('esf_sessions_logged_on{transport="tcp"}')
    ]
    return float(line.split()[-1])


@pytest.mark.e2e
def test_real_haproxy_in_front_of_a_cluster_of_two(tmp_path, redis_server):
    """
    docs/deploying.md's cluster behind HAProxy: two C{twistd esf --cluster}
    nodes on C{haproxy:} ports, checked through their metrics sites, with
    least-connections balancing.  Two clients land on different nodes,
    each is told its own address (not the balancer's), a message between
    them crosses the nodes and is acknowledged, and the health checks keep
    the nodes in the pool.
    """
    haproxy = need_program("haproxy", "apt-get install haproxy (the PROXY protocol test)")
    front = free_port()
    ports = [(free_port(), free_port()) for _ in range(2)]
    nodes = []
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        HAPROXY_CLUSTER_CONFIG.format(
            front=front,
            node1=ports[0][0],
            metrics1=ports[0][1],
            node2=ports[1][0],
            metrics2=ports[1][1],
        )
    )
    balancer = None
    clients = []
    try:
        for i, (node, metrics) in enumerate(ports, start=1):
            server = ServerProcess(
                tmp_path / f"node{i}.log",
                AUTH
                + ["--cluster", redis_server.url, "--node-id", f"node{i}"]
                + ["--metrics", f"tcp:{metrics}:interface=127.0.0.1"],
                port=f"haproxy:tcp:{node}:interface=127.0.0.1",
            )
            nodes.append(server)
            server.wait_for_log(rf"in the cluster as node{i}", timeout=15)
        with open(tmp_path / "haproxy.log", "wb") as balancer_log:
            balancer = subprocess.Popen(
                [haproxy, "-db", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=balancer_log,
            )
        for user, password in (("alice", "pa"), ("bob", "pb")):
            client = _connect_through(front, balancer, tmp_path)
            clients.append(client)
            reply = client.logon(user, password)
            assert reply["result"] == 0, reply
        alice, bob = clients
        # Least connections: the second client went to the other node.  (A
        # scrape's text answers the scrapes of the next second, the health
        # checks' among them: read until it shows both.)
        deadline = time.monotonic() + 5
        while [_sessions_on(metrics) for _, metrics in ports] != [1, 1]:
            assert time.monotonic() < deadline, [_sessions_on(m) for _, m in ports]
            time.sleep(0.1)
        for client in clients:
            client.send(GET_MY_IPE, dest="_0", msg_id=7)
            _header, body = client.recv_until(GET_MY_IPE)
            assert rc.unpack_str(body)[0] == f"127.0.0.1:{client.sock.getsockname()[1]}"
        alice.send(205, struct.pack("<i", 3) + b"across", dest="bob", msg_id=10)
        header, body = bob.recv_until(205, timeout=10)
        assert (header["user_id"], header["message_id"], body[4:]) == ("alice", 10, b"across")
        bob.send(206, struct.pack("<i", 3), dest="alice", msg_id=10)
        header, _body = alice.recv_until(206, timeout=10)
        assert (header["user_id"], header["message_id"]) == ("bob", 10)
        # Past three health checks (fall 3, every 0.5 s): the metrics sites
        # answered them, so the nodes are still in the balancer's pool.
        time.sleep(2)
        carol = _connect_through(front, balancer, tmp_path)
        clients.append(carol)
        assert carol.logon("carol", "pc")["result"] == 0
    finally:
        for client in clients:
            client.close()
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for server in nodes:
            server.stop()


@pytest_twisted.ensureDeferred
async def test_tcp_writes_go_through_the_write_behind_behind_the_proxy_protocol_too():
    """
    On a real TCP connection through the PROXY protocol's wrapper, the
    session's writes take the write-behind (straight to the socket), and
    the client gets its Logon reply, after the header's address.
    """
    from _helpers import make_engine
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
    from twisted.internet.protocol import Factory as ClientFactory

    from esf.server._protocol import ServerFactory

    engine = make_engine()
    built = []

    class Recording(ServerFactory):
        def buildProtocol(self, addr):
            protocol = super().buildProtocol(addr)
            built.append(protocol)
            return protocol

    endpoint = ProxiedEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), 5, reactor)
    port = await endpoint.listen(Recording(engine))
    got = []
    header = Deferred()  # fires once a whole header has come

    class Client(Protocol):
        def connectionMade(self):
            body = struct.pack("<H", 1) + rc.pack_str("") + rc.pack_str("pw")
            logon = rc.pack_header(rc.LOGON, len(body), "alice", rc.SERVER, 1) + body
            self.transport.write(V1 + logon)

        def dataReceived(self, data):
            got.append(data)
            if len(b"".join(got)) >= rc.HEADER.size and not header.called:
                header.callback(None)

    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        ClientFactory.forProtocol(Client)
    )
    try:
        await header.addTimeout(5, reactor)
        (protocol,) = built
        assert protocol._behind is not None and protocol._tcp is protocol.transport.transport
        assert protocol.address == "203.0.113.7:40001"
        assert rc.parse_header(b"".join(got)[: rc.HEADER.size])["message_type"] == rc.LOGON
    finally:
        client.transport.loseConnection()
        await port.stopListening()
