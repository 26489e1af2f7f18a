"""
Prometheus metrics of a server (C{twistd esf --metrics ENDPOINT}).

Nothing is measured on the relay path by this module.  L{ServerMetrics}
is a C{prometheus_client} collector that builds every metric family when
it is scraped, from:

  - plain counts the engine keeps anyway (C{engine.counters}, keyed by
    L{esf.server._counters} names) and its state (C{engine.sessions},
    C{engine.presence}, C{engine.pending});
  - what each transport carried (C{engine.traffic}, L{esf.server._counters.Traffic}),
    which the protocols count per read and per write;
  - the offline store's size (C{esf_offline_stored_*}), the answer of its
    C{total_counts} as of the last look, every L{OFFLINE_LOOK} seconds
    (a query to the store, so not at every scrape);
  - counts this module keeps from the user manager's events (devices
    online by kind, accepted logons, push-outs, heartbeat timeouts) and
    from the engine's structured log events (C{session_ended}: disconnects
    by reason and refused logons by result; C{kick_out}: kicks by origin),
    each a dict increment when the event happens.

Scrapes are served by L{MetricsResource}, a C{twisted.web} resource that
renders on the reactor thread: the collector reads the engine's state where
the engine changes it, never from another thread.  (The
C{prometheus_client.twisted.MetricsResource} that the library ships renders
in the reactor's thread pool, which is why it is not used.)
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, cast

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from esf.server._counters import (
    BROADCAST_DELIVERIES,
    BROADCASTS,
    FANOUT_BUCKET_KEYS,
    FANOUT_BUCKETS,
    RELAYED_BYTES,
    RELAYED_MESSAGES,
    Count,
    Traffic,
)
from esf.server._http import (
    HTTP_LIMITS,
    ConnectionCap,
    HTTPLimits,
    QuietSite,
    connections_closed,
    limit_site,
)
from esf.wire._frames import ClientType, DisconnectedType, LogonResult

from ._audit import kick_origin, logon_refusal
from ._series import (
    CLUSTER_METRICS,
    CONNECTION_REFUSALS,
    COUNTER_METRICS,
    KICK_ORIGINS,
    REFUSAL_COUNTERS,
    REFUSAL_REASONS,
    RELAY_TYPES,
    TRAFFIC_COUNTERS,
    TRANSPORTS,
)

if TYPE_CHECKING:
    from twisted.logger import LogEvent

    from esf.server._config import UserData
    from esf.server._engine import ServerEngine
    from esf.server._session import Session

__all__ = [
    "OnlineDevices",
    "ServerMetrics",
    "MetricsResource",
    "MetricsService",
    "SCRAPE_REUSED_FOR",
    "kind_label",
    "server_version",
]

log = Logger(namespace="esf.metrics")

#: Seconds between looks at the offline store's size.
OFFLINE_LOOK = 15.0


def kind_label(client_type: int) -> str:
    """
    A device kind as a label value: C{"android"}, or C{"42"} for a kind
    without a name.
    """
    try:
        return ClientType(client_type).name.lower()
    except ValueError:
        return str(int(client_type))


def server_version() -> str:
    """
    The installed esf's version.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esf")
    except PackageNotFoundError:
        return "unknown"


def _output_backlog(session: Session) -> tuple[bool, int]:
    # The session's own flow-control state: whether its peer is behind,
    # and the bytes queued for it since (bounded by --max-output-buffer).
    # The session keeps them in private slots, and this is the one place
    # outside it that reads them (the engine has no public name for them).
    return session._paused, session._backlog


class OnlineDevices:
    """
    The logged-on devices of an engine by kind, kept from the user
    manager's C{device_connected} and C{device_disconnected} events (so
    that reading them costs nothing).

    @ivar by_kind: device kind (L{int}) -> devices online.
    """

    def __init__(self, engine: ServerEngine):
        self.engine = engine
        self.by_kind: collections.Counter[int] = collections.Counter()
        self._unsubscribe: list[Callable[[], None]] = []

    def start(self) -> None:
        if self._unsubscribe:
            return
        um = self.engine.user_manager
        self._unsubscribe = [
            um.device_connected.subscribe(self._connected),
            um.device_disconnected.subscribe(self._disconnected),
        ]
        # Devices that logged on before (an engine embedded by hand).
        presence = self.engine.presence
        self.by_kind.clear()
        for user_id in presence.user_ids():
            for handle in presence.devices(user_id):
                self.by_kind[int(handle.client_type)] += 1

    def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    def _connected(self, user_data: UserData) -> None:
        self.by_kind[int(user_data.client_type)] += 1

    def _disconnected(self, user_data: UserData, reason: DisconnectedType) -> None:
        kind = int(user_data.client_type)
        self.by_kind[kind] -= 1
        if not self.by_kind[kind]:
            del self.by_kind[kind]


class ServerMetrics(Collector):
    """
    The metrics of one L{esf.ServerEngine}, as a C{prometheus_client}
    collector: register it in a C{CollectorRegistry}, L{start} it (it
    subscribes to the engine's events and to C{publisher}), and scrape.

    Every read happens in L{collect}, on the thread that scrapes, which must
    be the engine's (the reactor thread): L{MetricsResource} is.

    @ivar tally: the counts kept from events, keyed C{(family, label)}.
    @ivar sites: the server's HTTP sites and WebSocket handshake caps, whose
        closed connections are counted (a list the caller may add to later).
    """

    def __init__(
        self,
        engine: ServerEngine,
        *,
        publisher: LogPublisher = globalLogPublisher,
        sites: list[ConnectionCap] | None = None,
    ):
        self.engine = engine
        self.publisher = publisher
        self.sites: list[ConnectionCap] = sites if sites is not None else []
        self.tally: collections.Counter[tuple[str, Any]] = collections.Counter()
        self.devices = OnlineDevices(engine)
        self.started_at = engine.clock.seconds()
        #: The offline store's (messages, bytes) at the last look, if any.
        self.offline_totals: tuple[int, int] | None = None
        self._offline_looks: LoopingCall | None = None
        self._unsubscribe: list[Callable[[], None]] = []

    # -- keeping counts ------------------------------------------------------------

    def start(self) -> None:
        """
        Subscribe to the engine's events and log events.
        """
        if self._unsubscribe:
            return
        self.devices.start()
        um = self.engine.user_manager
        self._unsubscribe = [
            um.device_connected.subscribe(self._device_connected),
            um.device_being_pushed_out.subscribe(self._pushed_out),
            um.heartbeat_timed_out.subscribe(self._heartbeat_timed_out),
        ]
        self.publisher.addObserver(cast(ILogObserver, self._observe))
        if self.engine.offline is not None:
            looks = self._offline_looks = LoopingCall(self._look_at_offline_store)
            looks.clock = self.engine.clock
            looks.start(OFFLINE_LOOK)

    def stop(self) -> None:
        if self._offline_looks is not None:
            if self._offline_looks.running:
                self._offline_looks.stop()
            self._offline_looks = None
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        self.devices.stop()
        self.publisher.removeObserver(cast(ILogObserver, self._observe))

    def _look_at_offline_store(self) -> Deferred[None]:
        # The next look waits for this one's answer: a slow store is never
        # asked twice at once.
        offline = self.engine.offline
        assert offline is not None  # looked at only when there is one
        d = maybeDeferred(offline.store.total_counts)

        def got(totals: tuple[int, int]) -> None:
            self.offline_totals = (int(totals[0]), int(totals[1]))

        def failed(failure: Failure) -> None:
            self.offline_totals = None  # unknown, not stale
            log.failure(
                "reading the offline store's size failed", failure,
                level=LogLevel.warn, esf_event="offline_size_failed",
            )  # fmt: skip

        return d.addCallbacks(got, failed)

    def _device_connected(self, user_data: UserData) -> None:
        self.tally["logons", "succeed"] += 1

    def _pushed_out(self, user_data: UserData, new_address: str) -> None:
        self.tally["push_outs", None] += 1

    def _heartbeat_timed_out(self, user_data: UserData) -> None:
        self.tally["heartbeat_timeouts", None] += 1

    def _observe(self, event: LogEvent) -> None:
        name = event.get("esf_event")
        if name is None or event.get("log_namespace") != "esf.server":
            return
        if name == "session_ended":
            reason = event.get("reason")
            self.tally["disconnects", reason] += 1
            refusal = logon_refusal(event)
            if refusal is not None:
                self.tally["logons", refusal[0].lower()] += 1
        elif name == "kick_out":
            self.tally["kicks", kick_origin(event)] += event.get("count") or 0

    # -- scraping ------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        yield from _connection_families(engine, self.devices.by_kind)
        yield from self._traffic()
        yield self._http_closed()
        yield from _tallied_families(self.tally, engine.counters)
        yield from _relayed_families(engine.counters)
        cluster = getattr(engine.presence, "stats", None)  # a ClusterPresence's
        if cluster is not None:
            for name, text in CLUSTER_METRICS.items():
                yield _counter(f"esf_cluster_{name}", text, cluster[name])
            yield _gauge(
                "esf_cluster_up",
                "1 while this node is in the cluster, 0 while it runs alone (Redis not "
                "reachable, or not joined yet).",
                int(bool(getattr(engine.presence, "up", False))),
            )

        yield from _backlog_families(engine)
        if self.offline_totals is not None:
            count, size = self.offline_totals
            yield _gauge(
                "esf_offline_stored_messages",
                f"Messages in the offline store, as of the last look (every {OFFLINE_LOOK:g} s).",
                count,
            )
            yield _gauge(
                "esf_offline_stored_bytes",
                f"Bytes of messages in the offline store, as of the last look (every {OFFLINE_LOOK:g} s).",
                size,
            )
        yield _gauge(
            "esf_pending_queries",
            "The server's own queries to clients waiting for an answer.",
            len(engine.pending),
        )
        yield _gauge(
            "esf_start_time_seconds", "When the metrics started, in Unix time.", self.started_at
        )
        info = GaugeMetricFamily(
            "esf_server_info", "The server's version and node ID.", labels=["version", "node"]
        )
        info.add_metric([server_version(), str(engine.node_id)], 1)
        yield info

    def _traffic(self) -> Iterable[Metric]:
        """
        The per-transport counters the protocols keep (C{engine.traffic}).
        """
        traffic = self.engine.traffic
        transports = sorted(set(TRANSPORTS) | set(traffic))
        counted = {t: traffic.get(t) or Traffic() for t in transports}
        for name, attribute, text in TRAFFIC_COUNTERS:
            family = CounterMetricFamily(f"esf_{name}", text, labels=["transport"])
            for transport, counts in counted.items():
                family.add_metric([transport], getattr(counts, attribute))
            yield family
        refused = CounterMetricFamily(
            "esf_connections_refused",
            "Connections closed as they were made, by transport and reason.",
            labels=["transport", "reason"],
        )
        for transport, counts in counted.items():
            for reason in sorted(
                set(CONNECTION_REFUSALS.get(transport, ())) | set(counts.refused)
            ):
                refused.add_metric([transport, reason], counts.refused[reason])
        yield refused

    def _http_closed(self) -> Metric:
        closed = CounterMetricFamily(
            "esf_http_connections_closed",
            "Connections the HTTP sites (admin API, metrics, web demo) and WebSocket handshakes "
            "closed: over the site's connection cap, or without a whole request in time.",
            labels=["site", "reason"],
        )
        for (site, reason), total in sorted(connections_closed(self.sites).items()):
            closed.add_metric([site, reason], total)
        return closed


def _connection_families(engine: ServerEngine, by_kind: dict[int, int]) -> Iterable[Metric]:
    """
    Connections and logged-on sessions by transport, users and devices online.
    """
    connections = dict.fromkeys(TRANSPORTS, 0)
    logged_on = dict.fromkeys(TRANSPORTS, 0)
    for session in engine.sessions:
        transport = _transport_label(session)
        connections[transport] = connections.get(transport, 0) + 1
        if session.logged_on:
            logged_on[transport] = logged_on.get(transport, 0) + 1
    open_connections = GaugeMetricFamily(
        "esf_connections",
        "Open connections, logged on or not, by transport.",
        labels=["transport"],
    )
    sessions = GaugeMetricFamily(
        "esf_sessions_logged_on", "Logged-on sessions, by transport.", labels=["transport"]
    )
    for transport, count in connections.items():
        open_connections.add_metric([transport], count)
        sessions.add_metric([transport], logged_on.get(transport, 0))
    yield open_connections
    yield sessions
    yield _gauge(
        "esf_users_online",
        "Users with at least one device online.",
        engine.presence.user_count(),
    )
    online = GaugeMetricFamily(
        "esf_devices_online",
        "Logged-on sessions by device kind; a user has at most one per kind, so this is "
        "also the number of users online with that kind.",
        labels=["kind"],
    )
    for kind in sorted({int(k) for k in ClientType} | set(by_kind)):
        online.add_metric([kind_label(kind)], by_kind.get(kind, 0))
    yield online


def _tallied_families(
    tally: collections.Counter[tuple[str, Any]], counters: collections.Counter[str]
) -> Iterable[Metric]:
    """
    What the events counted: logons, ends, refusals, kicks, push-outs, timeouts.
    """
    logons = CounterMetricFamily("esf_logons", "Logons by result.", labels=["result"])
    for result in LogonResult:
        logons.add_metric([result.name.lower()], tally["logons", result.name.lower()])
    yield logons

    disconnects = CounterMetricFamily(
        "esf_disconnects",
        "Sessions ended, logged on or not, by reason (DisconnectedType).",
        labels=["reason"],
    )
    for reason in DisconnectedType:
        disconnects.add_metric([reason.name.lower()], tally["disconnects", reason.name])
    yield disconnects

    refusals = CounterMetricFamily(
        "esf_refusals",
        "What the server refused to protect itself, by cause.",
        labels=["cause"],
    )
    for cause, key in REFUSAL_COUNTERS.items():
        refusals.add_metric([cause], counters[key])
    for cause, reason in REFUSAL_REASONS.items():
        refusals.add_metric([cause], tally["disconnects", reason.name])
    yield refusals

    kicks = CounterMetricFamily(
        "esf_kicks", "Devices kicked, by where the kick came from.", labels=["origin"]
    )
    for origin in KICK_ORIGINS:
        kicks.add_metric([origin], tally["kicks", origin])
    yield kicks

    yield _counter(
        "esf_push_outs",
        "Sessions pushed out by a new logon of the same device.",
        tally["push_outs", None],
    )
    yield _counter(
        "esf_heartbeat_timeouts",
        "Sessions ended for silence (heartbeat timeout).",
        tally["heartbeat_timeouts", None],
    )


def _relayed_families(counters: collections.Counter[str]) -> Iterable[Metric]:
    """
    The relay's counts by message type, the broadcast fan-out, and every
    other engine counter.
    """
    messages = CounterMetricFamily(
        "esf_messages_relayed",
        "Frames relayed from a user's device to another user, by message type.",
        labels=["type"],
    )
    relayed_bytes = CounterMetricFamily(
        "esf_relayed_bytes",
        "Bytes of the frames relayed, header included, by message type.",
        labels=["type"],
    )
    for message_type in RELAY_TYPES:
        label = message_type.name.lower()
        messages.add_metric([label], counters[RELAYED_MESSAGES[message_type]])
        relayed_bytes.add_metric([label], counters[RELAYED_BYTES[message_type]])
    yield messages
    yield relayed_bytes

    fanout = HistogramMetricFamily(
        "esf_broadcast_fanout",
        "Broadcast messages by the number of devices each was sent to.",
    )
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, bucket in zip(FANOUT_BUCKETS, FANOUT_BUCKET_KEYS):
        cumulative += counters[bucket]
        buckets.append((str(float(bound)), cumulative))  # "10.0", as Prometheus' own
    buckets.append(("+Inf", counters[BROADCASTS]))
    fanout.add_metric([], buckets, sum_value=counters[BROADCAST_DELIVERIES])
    yield fanout

    for key in Count:
        if key in COUNTER_METRICS and COUNTER_METRICS[key] is None:
            continue
        # (A counter added to Count and not described here is exported
        # all the same; test_metrics asks for its description.)
        name, text = COUNTER_METRICS.get(key) or (key.value, f"{key.value} (no description).")
        yield _counter(f"esf_{name}", text, counters[key])


def _backlog_families(engine: ServerEngine) -> Iterable[Metric]:
    """
    What waits now: output for peers behind, blobs, offline deliveries.
    """
    paused = backlog = blobs = blob_bytes = 0
    for session in engine.sessions:
        behind, queued = _output_backlog(session)
        if behind:
            paused += 1
            backlog += queued
        assembler = session.blobs
        if assembler is not None and assembler.pending:
            blobs += assembler.pending
            blob_bytes += assembler.buffered
    yield _gauge("esf_sessions_behind", "Sessions whose peer is not reading fast enough.", paused)
    yield _gauge(
        "esf_output_backlog_bytes",
        "Bytes queued for peers that are behind, beyond the transports' own buffers.",
        backlog,
    )
    yield _gauge("esf_blobs_in_progress", "Blobs to the server being reassembled.", blobs)
    yield _gauge(
        "esf_blob_buffered_bytes",
        "Bytes of blobs to the server waiting for their rest.",
        blob_bytes,
    )
    offline = engine.offline
    yield _gauge(
        "esf_offline_deliveries",
        "Devices being delivered their stored messages now.",
        offline.deliveries if offline is not None else 0,
    )


def _transport_label(session: Session) -> str:
    label: str = getattr(session.channel, "transport_label", "other")
    return label


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def make_registry(metrics: ServerMetrics, process: bool = True) -> CollectorRegistry:
    """
    A registry with C{metrics} and, when C{process}, the process's own
    figures under the names every exporter gives them (C{process_*}: CPU,
    memory, open files), which off-the-shelf dashboards expect.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    if process:
        ProcessCollector(registry=registry)
    return registry


#: Seconds a scrape's text answers the next scrapes in the same format.
SCRAPE_REUSED_FOR = 1.0


class MetricsResource(Resource):
    """
    C{/metrics}: the registry in Prometheus' text format (or OpenMetrics,
    when the scraper asks for it), rendered on the reactor thread.  With a
    C{clock}, the text made for a scrape answers the scrapes of the next
    L{SCRAPE_REUSED_FOR} seconds too: a scrape walks every session, so
    that however many requests the port is sent (it has no token), the
    reactor renders at most one a second per format.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime | None = None):
        super().__init__()  # type: ignore[no-untyped-call]  # Resource has no annotations
        self.registry = registry
        self.clock = clock
        #: content type -> when its text was made, and the text.
        self._made: dict[str, tuple[float, bytes]] = {}

    def render_GET(self, request: IRequest) -> bytes:
        encoder, content_type = choose_encoder(request.getHeader("accept") or "")
        clock = self.clock
        if clock is None:
            body = encoder(self.registry)
        else:
            now = clock.seconds()
            made = self._made.get(content_type)
            if made is not None and 0 <= now - made[0] < SCRAPE_REUSED_FOR:
                body = made[1]
            else:
                body = encoder(self.registry)
                self._made[content_type] = (now, body)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    render_HEAD = render_GET


class MetricsSite(QuietSite):
    """
    The metrics site (a scrape every few seconds would fill the server's
    log, were each request logged).
    """


class _Attached(Service):
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service has no annotations
        self.metrics.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.metrics.stop()


class MetricsService(MultiService):
    """
    Serves C{engine}'s metrics at C{/metrics} on C{endpoint}, within
    C{limits} (timed by C{clock}, by default the engine's).  A port that
    cannot be bound makes C{startService} raise.
    """

    def __init__(
        self,
        engine: ServerEngine,
        endpoint: IStreamServerEndpoint,
        *,
        publisher: LogPublisher = globalLogPublisher,
        limits: HTTPLimits = HTTP_LIMITS,
        clock: IReactorTime | None = None,
        sites: list[ConnectionCap] | None = None,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = ServerMetrics(engine, publisher=publisher, sites=sites)
        self.registry = make_registry(self.metrics)
        root = Resource()
        root.putChild(b"metrics", MetricsResource(self.registry, clock or engine.clock))
        site = MetricsSite(root, timeout=60)  # type: ignore[no-untyped-call]
        site.displayTracebacks = False
        _Attached(self.metrics).setServiceParent(self)  # type: ignore[no-untyped-call]
        factory = limit_site(
            site, limits, clock or engine.clock, "the metrics site", label="metrics"
        )
        self.metrics.sites.append(factory)
        self.listener = StreamServerEndpointService(endpoint, factory)
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)
