"""
Tests of the Prometheus metrics (esf.operations._metrics): the collector on an engine
driven in memory on a task.Clock, and its text as a scraper parses it.
The same figures against a real C{twistd esf} are in test_admin_e2e.py.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
from _helpers import Client, connect, make_engine
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from esf import DisconnectedType, MessageType
from esf.interfaces import IBasicHandler
from esf.operations._metrics import (
    MetricsResource,
    MetricsService,
    ServerMetrics,
    make_registry,
    server_version,
)
from esf.operations._series import CLUSTER_METRICS, COUNTER_METRICS
from esf.server._counters import RELAYED_BYTES, RELAYED_MESSAGES, Count
from esf.wire import BlobFragment, FrameError, Information, KickOut, WireConfig, encode_frame


@implementer(IBasicHandler)
class Passwords:
    """Accepts the password "pw" only; admins may kick (--admin)."""

    def verify_user(self, system_token, user_id, password, client_type, address):
        return password == "pw"

    def can_kick_out(self, operator_id, target_id, client_type):
        return False


@pytest.fixture
def engine():
    return make_engine(handler=Passwords(), admins={"carol"}, heartbeat_timeout=30)


@pytest.fixture
def metrics(engine):
    metrics = ServerMetrics(engine, publisher=globalLogPublisher)
    metrics.start()
    yield metrics
    metrics.stop()


@pytest.fixture
def registry(metrics):
    return make_registry(metrics, process=False)


def value(registry, name, **labels):
    found = registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


def test_an_idle_server(engine, registry):
    assert value(registry, "esf_connections", transport="tcp") == 0
    assert value(registry, "esf_users_online") == 0
    assert value(registry, "esf_devices_online", kind="android") == 0
    assert value(registry, "esf_logons_total", result="succeed") == 0
    assert value(registry, "esf_pending_queries") == 0
    (info,) = [s for f in registry.collect() if f.name == "esf_server_info" for s in f.samples]
    assert info.labels == {"version": server_version(), "node": engine.node_id}
    assert info.value == 1
    assert value(registry, "esf_start_time_seconds") == engine.clock.seconds()


def test_logons_devices_and_disconnects(engine, registry):
    alice_phone = connect(engine, "alice", 5)
    connect(engine, "alice", 0)
    connect(engine, "bob", 5)
    refused = Client(engine)
    refused.logon("mallory", password="wrong")
    Client(engine)  # connected, never logs on
    assert value(registry, "esf_connections", transport="tcp") == 4
    assert value(registry, "esf_users_online") == 2
    assert value(registry, "esf_devices_online", kind="android") == 2
    assert value(registry, "esf_devices_online", kind="dotnet") == 1
    assert value(registry, "esf_devices_online", kind="ios") == 0
    assert value(registry, "esf_logons_total", result="succeed") == 3
    assert value(registry, "esf_logons_total", result="failed") == 1
    assert value(registry, "esf_disconnects_total", reason="logon_failed") == 1

    alice_phone.lose()
    assert value(registry, "esf_devices_online", kind="android") == 1
    assert value(registry, "esf_users_online") == 2
    assert value(registry, "esf_disconnects_total", reason="network_interrupted") == 1


def test_push_outs_kicks_and_heartbeat_timeouts(engine, registry):
    connect(engine, "alice", 5)
    connect(engine, "alice", 5, host="10.0.0.2")  # pushes the first out
    assert value(registry, "esf_push_outs_total") == 1
    assert value(registry, "esf_disconnects_total", reason="being_pushed_out") == 1
    assert value(registry, "esf_devices_online", kind="android") == 1
    assert value(registry, "esf_logons_total", result="succeed") == 2

    connect(engine, "bob", 0)
    connect(engine, "bob", 4)
    assert engine.kick_out("bob", "spam") == 2
    assert value(registry, "esf_kicks_total", origin="server_api") == 2
    carol = connect(engine, "carol", 0)
    connect(engine, "dave", 0)
    carol.send(MessageType.KICK_OUT, KickOut("rude"), dest="dave", message_id=7)
    assert value(registry, "esf_kicks_total", origin="client") == 1
    assert value(registry, "esf_kicks_total", origin="admin_api") == 0
    assert value(registry, "esf_disconnects_total", reason="being_kicked_out") == 3

    for _ in range(6):  # every session falls silent; the reaper looks every 7.5 s
        engine.clock.advance(30 / 4)
    assert value(registry, "esf_heartbeat_timeouts_total") == 2  # alice and carol
    assert value(registry, "esf_users_online") == 0
    assert value(registry, "esf_devices_online", kind="android") == 0


def test_refusals(engine, registry):
    small = make_engine(max_connections=2, max_message_size=200, logon_rate_limit=1)
    metrics = ServerMetrics(small)
    metrics.start()
    try:
        registry = make_registry(metrics, process=False)
        first = connect(small, "alice")
        connect(small, "bob", host="10.0.0.9")
        Client(small)  # one connection too many
        assert value(registry, "esf_refusals_total", cause="max_connections") == 1
        first.send_raw(
            encode_frame(
                WireConfig(11, 10_000),
                MessageType.SEND,
                Information(1, b"x" * 300).encode(),
                user_id="alice",
                dest_user_id="bob",
            )
        )
        assert value(registry, "esf_refusals_total", cause="message_too_large") == 1
        late = Client(small, host="10.0.0.9")  # a second logon from bob's host
        late.logon("carol")
        assert value(registry, "esf_refusals_total", cause="logon_rate_limit") == 1
        assert value(registry, "esf_logons_total", result="busy") == 1
    finally:
        metrics.stop()


def test_relayed_messages_are_read_from_the_engine_counters(engine, registry):
    """
    The engine counts relayed frames per read under the keys esf.server._counters
    names (RELAYED_MESSAGES, RELAYED_BYTES); the collector reports them by
    type.
    """
    engine.counters[RELAYED_MESSAGES[MessageType.SEND]] += 5
    engine.counters[RELAYED_BYTES[MessageType.SEND]] += 5 * 140
    engine.counters[RELAYED_MESSAGES[MessageType.REQUEST]] += 1
    assert value(registry, "esf_messages_relayed_total", type="send") == 5
    assert value(registry, "esf_relayed_bytes_total", type="send") == 700
    assert value(registry, "esf_messages_relayed_total", type="request") == 1
    assert value(registry, "esf_messages_relayed_total", type="blob") == 0


def test_every_engine_counter_is_exported(engine, registry):
    for key in Count:
        engine.counters[key] += 3
    names = {s.name for family in registry.collect() for s in family.samples}
    for key in Count:
        spec = COUNTER_METRICS.get(key)
        if spec is not None:
            assert f"esf_{spec[0]}_total" in names
    assert value(registry, "esf_transmit_failed_total") == 3
    assert value(registry, "esf_refusals_total", cause="takeover_limit") == 3
    assert value(registry, "esf_refusals_total", cause="blob") == 3


def cluster_counts() -> set[str]:
    """
    The names the cluster counts in its stats, read from its source: the
    string literals of every line that counts (C{stats[...]}) or picks the
    name to count (C{counter = {...}}).
    """
    names = set()
    for path in (ROOT / "esf" / "cluster").glob("*.py"):
        for line in path.read_text().splitlines():
            if "stats[" in line or re.match(r"\s*counter = \{", line):
                names |= set(re.findall(r'"([a-z_]+)"', line))
    return names


def test_every_count_of_the_cluster_is_exported(engine, registry):
    """
    Every count a cluster's presence keeps is a series of its own (what
    becomes of a record sent to another node is always counted in one),
    and whether the node is in the cluster is a gauge.
    """
    counted = cluster_counts()
    assert len(counted) >= 20, counted  # the source was read
    assert sorted(counted - set(CLUSTER_METRICS)) == [], "counted, not exported"
    assert sorted(set(CLUSTER_METRICS) - counted) == [], "exported, never counted"
    engine.presence.stats = collections.Counter(dict.fromkeys(counted, 2))
    engine.presence.up = True
    for name in counted:
        assert value(registry, f"esf_cluster_{name}_total") == 2, name
    assert value(registry, "esf_cluster_up") == 1
    engine.presence.up = False
    assert value(registry, "esf_cluster_up") == 0


def test_output_backlog_blobs_and_pending_queries(engine, registry):
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    bob.protocol.pauseProducing()  # bob's transport is full
    sent = alice.send(MessageType.SEND, Information(1, b"y" * 100), dest="bob")
    assert value(registry, "esf_sessions_behind") == 1
    assert value(registry, "esf_output_backlog_bytes") == len(sent)
    bob.protocol.resumeProducing()
    assert value(registry, "esf_output_backlog_bytes") == 0

    # Blobs to the server are reassembled only when a handler will read them.
    engine.customize_handler = object()
    alice.send(MessageType.BLOB, BlobFragment(1, 9, 0, False, b"z" * 50), dest="_0")
    assert value(registry, "esf_blobs_in_progress") == 1
    assert value(registry, "esf_blob_buffered_bytes") == 50

    engine.query("bob", 1, b"?")
    assert value(registry, "esf_pending_queries") == 1


def test_no_user_id_in_any_label(engine, registry):
    names = ["alice", "x-secret-1", "bob"]
    for name in names:
        connect(engine, name)
    engine.kick_out("bob", "spam")
    for family in registry.collect():
        for sample in family.samples:
            for label in sample.labels.values():
                assert label not in names, (family.name, sample)


def test_stop_unsubscribes(engine):
    metrics = ServerMetrics(engine)
    metrics.start()
    metrics.stop()
    registry = make_registry(metrics, process=False)
    connect(engine, "alice")
    engine.kick_out("alice")
    assert value(registry, "esf_logons_total", result="succeed") == 0
    assert value(registry, "esf_kicks_total", origin="server_api") == 0


def test_devices_already_online_are_counted(engine):
    connect(engine, "alice", 5)
    metrics = ServerMetrics(engine)
    metrics.start()
    try:
        registry = make_registry(metrics, process=False)
        assert value(registry, "esf_devices_online", kind="android") == 1
    finally:
        metrics.stop()


def test_resource_text_parses(engine, registry):
    connect(engine, "alice", 5)
    request = DummyRequest([b""])
    body = MetricsResource(registry).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
    assert all(name.startswith("esf_") for name in families)
    (sample,) = [
        s for s in families["esf_devices_online"].samples if s.labels["kind"] == "android"
    ]
    assert sample.value == 1
    assert families["esf_logons"].type == "counter"


def test_resource_speaks_openmetrics_when_asked(registry):
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(
        b"accept", [b"application/openmetrics-text; version=1.0.0"]
    )
    body = MetricsResource(registry).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
        b"application/openmetrics-text"
    )
    assert body.rstrip().endswith(b"# EOF")


def test_a_scrape_answers_the_scrapes_of_the_next_second_in_its_format(engine, registry):
    """
    A scrape walks every session; the text it made answers the scrapes of
    the next second (per format), so that a peer sending the port request
    after request makes the reactor render at most one a second.
    """
    from esf.operations._metrics import SCRAPE_REUSED_FOR

    resource = MetricsResource(registry, engine.clock)

    def scrape(accept: bytes = b"") -> bytes:
        request = DummyRequest([b""])
        if accept:
            request.requestHeaders.setRawHeaders(b"accept", [accept])
        return resource.render_GET(request)

    def online(body: bytes) -> float:
        families = text_string_to_metric_families(body.decode("utf-8").replace("# EOF\n", ""))
        (family,) = [f for f in families if f.name == "esf_devices_online"]
        return sum(s.value for s in family.samples)

    connect(engine, "alice", 5)
    first = scrape()
    assert online(first) == 1
    connect(engine, "bob", 5)
    engine.clock.advance(SCRAPE_REUSED_FOR / 2)
    assert scrape() is first  # the same text, not made again
    openmetrics = scrape(b"application/openmetrics-text; version=1.0.0")
    assert openmetrics.rstrip().endswith(b"# EOF") and online(openmetrics) == 2
    engine.clock.advance(SCRAPE_REUSED_FOR / 2)
    assert online(scrape()) == 2


def test_process_metrics_have_the_standard_names(metrics):
    """
    The process's figures are process_*, as every exporter names them and
    off-the-shelf dashboards expect (before, esf_process_*); everything
    else is esf_*.
    """
    registry = make_registry(metrics)
    assert registry.get_sample_value("process_open_fds") > 0  # Linux's /proc
    assert registry.get_sample_value("process_resident_memory_bytes") > 0
    names = {f.name for f in registry.collect()}
    assert not {n for n in names if n.startswith("esf_process")}, names
    assert all(n.startswith(("esf_", "process_")) for n in names), names


def test_disconnect_reasons_cover_every_type(engine, registry):
    for reason in DisconnectedType:
        assert value(registry, "esf_disconnects_total", reason=reason.name.lower()) == 0


def test_relayed_messages_are_counted_by_the_engine(engine, registry):
    """
    What the relay forwards shows up in the metrics: Sends on the read
    loop's fast path (counted once per read), Requests and their answers
    through engine.relay; a frame counts once however many devices it
    reached.
    """
    alice = connect(engine, "alice")
    connect(engine, "bob")
    connect(engine, "bob", 5)
    sends = b"".join(
        alice.frame(MessageType.SEND, Information(7, b"x" * 10), dest="bob") for _ in range(3)
    )
    alice.send_raw(sends)
    alice.send(MessageType.REQUEST, Information(7, b"?"), dest="bob#5", message_id=9)
    assert value(registry, "esf_messages_relayed_total", type="send") == 3
    assert value(registry, "esf_relayed_bytes_total", type="send") == len(sends)
    assert value(registry, "esf_messages_relayed_total", type="request") == 1


def test_offline_store_size_is_read_every_look():
    from twisted.internet.defer import fail

    from esf.offline import MemoryOfflineStore
    from esf.operations._metrics import OFFLINE_LOOK
    from esf.testing import MemoryServer

    store = MemoryOfflineStore()
    server = MemoryServer(offline_store=store)
    try:
        metrics = ServerMetrics(server.engine, publisher=globalLogPublisher)
        metrics.start()
        registry = make_registry(metrics, process=False)
        assert value(registry, "esf_offline_stored_messages") == 0  # the first look, at start
        alice = server.logged_on("alice")
        for n in range(3):
            alice.send("bob", 1, b"x" * (10 + n))
        server.pump()
        messages, size = server.result(store.total_counts())
        assert messages == 3
        # Scrapes show the last look's answer, not a query each.
        assert value(registry, "esf_offline_stored_messages") == 0
        server.clock.advance(OFFLINE_LOOK)
        assert value(registry, "esf_offline_stored_messages") == 3
        assert value(registry, "esf_offline_stored_bytes") == size
        # A store that cannot answer: the gauges are left out, not stale.
        store.total_counts = lambda: fail(RuntimeError("store down"))
        server.clock.advance(OFFLINE_LOOK)
        assert registry.get_sample_value("esf_offline_stored_messages") is None
        metrics.stop()
        assert not metrics._offline_looks
    finally:
        server.close()


def test_no_offline_gauges_without_a_store(engine, registry):
    assert registry.get_sample_value("esf_offline_stored_messages") is None


def test_every_engine_counter_is_described(engine, registry):
    """
    Every engine counter has a name and a help text of its own (no
    placeholder), so that the docs can say what it counts.
    """
    undescribed = [key for key in Count if key not in COUNTER_METRICS]
    assert undescribed == []
    helps = {f.name: f.documentation for f in registry.collect()}
    for key, spec in COUNTER_METRICS.items():
        if spec is not None:
            text = helps[f"esf_{spec[0]}"]
            assert "Engine counter" not in text and "no description" not in text, (key, text)


def _traffic(registry, name, transport, **labels):
    return value(registry, name, transport=transport, **labels)


def test_traffic_is_counted_by_transport(registry):
    """
    Connections, sessions, bytes, frames, reads and writes by transport:
    what went over TCP and over WebSocket, each counted on its own side.
    """
    from test_websocket_channel import BINARY, Page
    from wsclient import client_frame

    from esf import WebSocketFactory

    engine = make_engine(handler=Passwords(), max_connections=3)
    metrics = ServerMetrics(engine)
    metrics.start()
    registry = make_registry(metrics, process=False)
    factory = WebSocketFactory(engine)
    pages = []
    try:
        assert _traffic(registry, "esf_connections_accepted_total", "websocket") == 0
        alice = connect(engine, "alice", password="pw")
        bob = Page(engine, factory).logon("bob")
        pages.append(bob)
        assert _traffic(registry, "esf_connections", "tcp") == 1
        assert _traffic(registry, "esf_connections", "websocket") == 1
        assert _traffic(registry, "esf_sessions_logged_on", "tcp") == 1
        assert _traffic(registry, "esf_sessions_logged_on", "websocket") == 1
        assert _traffic(registry, "esf_connections_accepted_total", "tcp") == 1
        assert _traffic(registry, "esf_connections_accepted_total", "websocket") == 1

        def counts(transport):
            return [
                _traffic(registry, f"esf_{name}_total", transport)
                for name in (
                    "received_bytes",
                    "messages_received",
                    "reads",
                    "sent_bytes",
                    "writes",
                )
            ]

        tcp, ws = counts("tcp"), counts("websocket")
        sends = b"".join(
            alice.frame(MessageType.SEND, Information(7, b"x" * n), dest="bob") for n in range(3)
        )
        alice.send_raw(sends)  # one read of three frames
        to_bob = [payload for opcode, payload in bob.messages() if opcode == BINARY]
        assert b"".join(to_bob) == sends
        assert [a - b for a, b in zip(counts("tcp"), tcp)] == [len(sends), 3, 1, 0, 0]
        # To bob: the three frames, in one write, WebSocket framing not counted.
        assert [a - b for a, b in zip(counts("websocket"), ws)] == [0, 0, 0, len(sends), 1]

        tcp, ws = counts("tcp"), counts("websocket")
        messages = [
            client_frame(
                BINARY,
                bob.frame(MessageType.SEND, Information(1, b"y").encode(), dest_user_id="alice"),
            )
            for _ in range(2)
        ]
        for message in messages:
            bob.protocol.dataReceived(message)  # two reads
        written = alice.transport.value()
        assert [a - b for a, b in zip(counts("websocket"), ws)] == [
            sum(map(len, messages)),
            2,
            2,
            0,
            0,
        ]
        assert counts("tcp")[3:] == [
            tcp[3]
            + 2
            * len(
                bob.frame(MessageType.SEND, Information(1, b"y").encode(), dest_user_id="alice")
            ),
            tcp[4] + 2,
        ]
        assert counts("tcp")[3] == len(written)  # everything the server wrote to alice

        # What closed connections received still counts, and ended sessions
        # whose connection is not closed yet count too: the totals never go
        # back (Prometheus would take that for a restart).
        received = counts("tcp")[1], counts("websocket")[1]
        bob.protocol.sendClose()  # the session ends; the connection is still open
        assert (counts("tcp")[1], counts("websocket")[1]) == received
        bob.lose()
        alice.lose()
        assert (counts("tcp")[1], counts("websocket")[1]) == received
        assert _traffic(registry, "esf_connections", "tcp") == 0
        alice = connect(engine, "alice", password="pw")
        assert counts("tcp")[1] == received[0] + 1  # its logon

        # Refused: one connection past --max-connections (3), on either
        # transport; a WebSocket handshake for the wrong path.
        connect(engine, "carol", password="pw")
        pages.append(Page(engine, factory, port=6099).logon("bob"))
        Client(engine)
        pages += [
            Page(engine, factory, port=6100),
            Page(engine, factory, port=6101, path="/elsewhere"),
        ]
        assert (
            _traffic(registry, "esf_connections_refused_total", "tcp", reason="max_connections")
            == 1
        )
        assert (
            _traffic(
                registry, "esf_connections_refused_total", "websocket", reason="max_connections"
            )
            == 1
        )
        assert (
            _traffic(registry, "esf_connections_refused_total", "websocket", reason="handshake")
            == 1
        )
        assert (
            _traffic(registry, "esf_connections_refused_total", "websocket", reason="flooding")
            == 0
        )
        assert (
            _traffic(registry, "esf_connections_refused_total", "tcp", reason="shutting_down") == 0
        )
        assert _traffic(registry, "esf_connections_accepted_total", "tcp") == 3
        assert _traffic(registry, "esf_connections", "tcp") == 2
    finally:
        metrics.stop()
        for page in pages:  # autobahn's timers run on the global reactor
            for name in ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall"):
                call = getattr(page.protocol, name, None)
                if call is not None:
                    call.cancel()


def test_broadcast_fanout():
    """
    A Broadcast counts once in esf_broadcast_fanout, in the bucket of the
    devices it was sent to (the sender's own are not among them).
    """
    from _helpers import Rooms

    engine = make_engine(handler=Passwords())
    engine.group_manager = Rooms()
    metrics = ServerMetrics(engine)
    metrics.start()
    registry = make_registry(metrics, process=False)
    try:
        alice = connect(engine, "alice", password="pw")
        connect(engine, "bob", 0, password="pw")
        connect(engine, "bob", 5, password="pw")
        alice.send(MessageType.BROADCAST, Information(1, b"hi"), dest="room")
        alice.send(MessageType.BROADCAST, Information(1, b"hi"), dest="room")
        connect(engine, "bob", 5, password="pw").lose()  # pushes bob's phone out; gone
        alice.send(MessageType.BROADCAST, Information(1, b"hi"), dest="room")
        assert value(registry, "esf_broadcast_fanout_count") == 3
        assert value(registry, "esf_broadcast_fanout_sum") == 2 + 2 + 1
        assert value(registry, "esf_broadcast_fanout_bucket", le="0.0") == 0
        assert value(registry, "esf_broadcast_fanout_bucket", le="1.0") == 1
        assert value(registry, "esf_broadcast_fanout_bucket", le="10.0") == 3
        assert value(registry, "esf_broadcast_fanout_bucket", le="+Inf") == 3
    finally:
        metrics.stop()


# -- the docs and the Grafana dashboard against a real scrape --------------------

ROOT = Path(__file__).resolve().parent.parent
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"job", "instance"}


@pytest.fixture
def scrape():
    """
    Every family a server shows, as a scraper parses its text: with an
    offline store (whose gauges are otherwise absent) and the process
    collector.  Returns {family name: (type, label names)} and the sample
    names.
    """
    from esf.offline import MemoryOfflineStore
    from esf.testing import MemoryServer

    server = MemoryServer(offline_store=MemoryOfflineStore())
    # A cluster's presence has stats (ClusterPresence.stats), and the
    # series read from them are shown only then: given, they are checked.
    server.engine.presence.stats = collections.Counter()
    # As served: the metrics site counts what it closes (never listened on).
    metrics = MetricsService(server.engine, object()).metrics
    metrics.start()
    try:
        body = MetricsResource(make_registry(metrics)).render_GET(DummyRequest([b""]))
    finally:
        metrics.stop()
        server.close()
    families, samples = {}, set()
    for family in text_string_to_metric_families(body.decode("utf-8")):
        labels = {name for sample in family.samples for name in sample.labels} - {"le"}
        families[family.name] = (family.type, labels)
        samples |= {sample.name for sample in family.samples}
    return families, samples


def documented_metrics():
    """
    The rows of docs/operations.md's table of every metric: {name: (type,
    label names)}.
    """
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("### Every metric", 1)[1].split("\n###", 1)[0]
    rows = {}
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        name, kind, labels = [cell.strip() for cell in line.strip("|").split("|")[:3]]
        assert re.fullmatch(r"`[a-z_]+`", name), f"one metric per row, in backticks: {line}"
        assert name.strip("`") not in rows, f"{name} documented twice"
        rows[name.strip("`")] = (kind, set(re.findall(r"`([a-z_]+)`", labels)))
    return rows


def test_the_docs_name_every_series_and_only_those(scrape):
    families, _ = scrape
    exposed = {}
    for name, (kind, labels) in families.items():
        exposed[name + "_total" if kind == "counter" else name] = (kind, labels)
    documented = documented_metrics()
    assert sorted(set(exposed) - set(documented)) == [], "exposed but not documented"
    assert sorted(set(documented) - set(exposed)) == [], "documented but not exposed"
    wrong = {
        name: (documented[name], exposed[name])
        for name in exposed
        if documented[name] != exposed[name]
    }
    assert wrong == {}, "type or labels differ (documented, exposed)"


#: PromQL words that are not series names.
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def series_in(expr):
    """
    The series names and label names an expression uses: [(series,
    {label names in its matcher})], and the label names of by/without.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings, e.g. label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, [$__rate_interval]
    grouping = set()
    for names in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouping |= {n.strip() for n in names.split(",") if n.strip()}
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)
    used = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matcher, call = match.groups()
        if call or name in PROMQL_WORDS:
            continue
        used.append((name, set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*[=!]~?", matcher or ""))))
    return used, grouping


def test_series_in():
    assert series_in(
        'sum by (kind) (rate(esf_x_total{job=~"$job", a!="b"}[$__rate_interval])) / esf_y'
    ) == (
        [("esf_x_total", {"job", "a"}), ("esf_y", set())],
        {"kind"},
    )


def test_the_grafana_dashboard_loads_and_names_only_series_that_exist(scrape):
    families, samples = scrape
    labels_of = {}
    for name, (_kind, labels) in families.items():
        for suffix in ("", "_total", "_bucket", "_sum", "_count"):
            labels_of.setdefault(name + suffix, set()).update(
                labels, {"le"} if suffix == "_bucket" else ()
            )
    dashboard = json.loads((ROOT / "docs" / "grafana" / "esf.json").read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for key, item in node.items():
                if key == "expr" or (key == "query" and isinstance(item, str) and "(" in item):
                    exprs.append(item)
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    assert len(exprs) > 40
    every_label = set().union(*labels_of.values()) | TARGET_LABELS
    for expr in exprs:
        used, grouping = series_in(
            re.sub(r"label_values\(([a-z_]+),\s*([a-z_]+)\)", r"\1{\2=\"\"}", expr)
        )
        assert used, expr
        for name, matched in used:
            assert name in samples, f"{name} is no series a server shows ({expr})"
            assert matched <= labels_of[name] | TARGET_LABELS, (
                f"{name} has no label {matched} ({expr})"
            )
        assert grouping <= every_label, expr
    # Every panel has a title and a target; ids are unique.
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["title"] and p["targets"] for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_docs_queries_name_only_series_that_exist(scrape):
    _, samples = scrape
    text = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```promql\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    queries = [line for line in lines if line]
    assert len(queries) > 20
    for query in queries:
        used, _ = series_in(query)
        assert used and all(name in samples for name, _ in used), query


def test_the_decoder_counts_every_frame_of_a_run():
    """
    FrameDecoder.decoded, which esf_messages_received_total reads, counts
    each frame of a FrameRun, whole or cut anywhere, and those handed on
    before a bad frame.
    """
    from esf.wire import FrameDecoder, FrameRun

    wire = WireConfig()
    sends = [encode_frame(wire, MessageType.SEND, Information(1, b"x" * n).encode(), user_id="a", dest_user_id=d)
             for n, d in enumerate("bbbcbb")]  # fmt: skip
    other = encode_frame(wire, MessageType.HEARTBEAT, user_id="a")
    stream = b"".join(sends) + other + sends[0]
    for cut in (len(stream), 1, 7, 50):
        decoder = FrameDecoder(wire)
        items = []
        for offset in range(0, len(stream), cut):
            items += decoder.feed_runs(stream[offset : offset + cut], MessageType.SEND)
        assert (
            decoder.decoded
            == 8
            == sum(FrameRun(*i).count if isinstance(i, tuple) else 1 for i in items)
        ), cut
    decoder = FrameDecoder(wire)
    with pytest.raises(FrameError):
        decoder.feed_runs(b"".join(sends[:3]) + b"\x00" * 40, MessageType.SEND)
    assert decoder.decoded == 3


def test_each_counter_is_described_once():
    """
    COUNTER_METRICS names each counter once: a key written twice in the
    dict's source would silently replace the first description (as
    senders_paused's and output_dropped's did).
    """
    import ast

    source = (ROOT / "esf" / "operations" / "_series.py").read_text()
    [table] = [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign)
        and any(getattr(target, "id", None) == "COUNTER_METRICS" for target in node.targets)
    ]
    keys = [ast.unparse(key) for key in table.keys]
    assert sorted(key for key in set(keys) if keys.count(key) > 1) == []
    assert "relay policy" in COUNTER_METRICS[Count.SENDERS_PAUSED][1]
