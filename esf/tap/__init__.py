"""
C{twistd esf}: the options and the service of an esf server.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any, Callable, cast

from twisted.application.service import MultiService
from twisted.cred import credentials, error, strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from esf.cluster._inbox import DEFAULT_INBOX_BYTES
from esf.cluster._presence import (
    ClusterPresence,
    ClusterService,
    RedisURL,
    check_node_id,
    default_node_id,
)
from esf.interfaces import IBasicHandler
from esf.offline._redis import RedisOfflineStore
from esf.offline._sqlite import SQLiteOfflineStore, check_database
from esf.offline._store import OfflineBounds, OfflineStoreError
from esf.operations._admin import AdminService, endpoint_is_local, read_token_file
from esf.operations._admin_policy import allowed_host_name
from esf.operations._audit import PER_USER, AuditService, Retention, check_audit_path
from esf.operations._memory import GC_THRESHOLD, GCTuning, MemoryTrimmer
from esf.operations._metrics import MetricsService
from esf.server._application import Applications
from esf.server._descriptors import (
    DescriptorShare,
    QuietAcceptErrors,
    nofile_limits,
    raise_soft_limit,
    share_descriptors,
)
from esf.server._engine import (
    LogonRefused,
    RelogonMode,
    ServerConfig,
    ServerEngine,
    call,
)
from esf.server._http import ConnectionCap, HTTPLimits, limit_site
from esf.server._protocol import ServerService
from esf.server._proxied import ProxiedEndpoint, proxied_description
from esf.server._web_demo import web_demo_site
from esf.server._websocket import WebSocketFactory
from esf.wire._decoder import COMPILED
from esf.wire._frames import ClientType, WireConfig

from ._listening import PortFile, announce_web_demo
from ._loglevel import TwistdLogRoot, parse_level
from ._startup import OptionEndpoint, quiet_start_failures, start_failed

__all__ = ["Options", "makeService", "CheckerHandler"]

log = Logger(namespace="esf.server")


def _int_option(name: str, low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--{name} takes a whole number, not {value!r}") from None
        if number < low or (high is not None and number > high):
            span = f"{low}..{high}" if high is not None else f"at least {low}"
            raise usage.UsageError(f"--{name} must be {span}, not {number}")
        return number

    # usage.Options shows a coercer's coerceDoc in --help; there is none to show.
    setattr(parse, "coerceDoc", "")
    return parse


def _seconds_option(name: str, low: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} takes seconds, not {value!r}") from None
        if not number >= low or number == float("inf"):
            raise usage.UsageError(f"--{name} must be at least {low:g}, not {value}")
        return number

    setattr(parse, "coerceDoc", "")
    return parse


#: The offline store's default bounds, the defaults of the --offline-max-* options.
_OFFLINE = OfflineBounds()
_MIN_BYTES = OfflineBounds.MIN_BYTES


def _client_types(value: str) -> frozenset[int]:
    try:
        kinds = frozenset(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise usage.UsageError(
            f"--client-types takes comma-separated numbers 0..255, not {value!r}"
        ) from None
    if not kinds or not all(0 <= k <= 255 for k in kinds):
        raise usage.UsageError(f"--client-types takes numbers 0..255, not {value!r}")
    return kinds


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    The options of C{twistd esf}.
    """

    synopsis = "[options]"
    longdesc = (
        "Run an esf server: long-lived, authenticated binary sessions over TCP "
        "and WebSocket (ESF v1 protocol). With neither --auth nor --handler every "
        "logon is accepted."
    )
    supportedInterfaces = [credentials.IUsernamePassword]

    # One option per line, as twistd's --help lists them: a table the formatter
    # leaves alone.
    # fmt: off
    optParameters = [
        ["port", "p", "tcp:4530", "Endpoint to listen on (e.g. tcp:4530, ssl:4531:...), or a bare port."],
        ["relogon-mode", None, "replace-old", "replace-old or ignore-new: what a second logon of the same user and device does, unless an IRelogonPolicy --handler decides."],
        ["heartbeat-interval", None, 10, "Seconds between client heartbeats, announced at logon.", _int_option("heartbeat-interval", 1, 65535)],
        ["heartbeat-timeout", None, 30, "Seconds of silence after which a session ends.", _int_option("heartbeat-timeout", 2, 65535)],
        ["logon-timeout", None, 10, "Seconds a new connection has to log on.", _int_option("logon-timeout", 1)],
        ["max-message-size", None, 1048576, "Largest frame in bytes, header included.", _int_option("max-message-size", 64, 0x7FFFFFFF)],
        ["max-userid-length", None, 11, "Maximum UserID length n (header = 2n+14 rounded up to 4).", _int_option("max-userid-length", 1, 255)],
        ["system-token", None, "", "Token every client must send; empty accepts any."],
        ["max-connections", None, None, "Most ESF connections at once (TCP and WebSocket); more are refused. [what the descriptor limit (ulimit -n) leaves beside the HTTP sites' caps and 32 for the process]", _int_option("max-connections", 1)],
        ["max-output-buffer", None, 2097152, "Bytes that may wait for a peer that does not read; past half of it its senders are held back briefly, past it relays to it are refused.", _int_option("max-output-buffer", 1024)],
        ["output-drain-timeout", None, 10, "Seconds a peer's output may stay over half --max-output-buffer before its session ends.", _int_option("output-drain-timeout", 1)],
        ["push-back-timeout", None, 0.05, "Seconds at most a sender is read no further because a peer it relays to is backed up; then relays to that peer past --max-output-buffer are refused (0: never hold a sender back).", _seconds_option("push-back-timeout", 0)],
        ["max-blob-size", None, 67108864, "Largest Blob addressed to the server, reassembled, in bytes.", _int_option("max-blob-size", 1)],
        ["max-blob-bytes-per-user", None, 67108864, "Bytes of blobs to the server one user may have in progress, over all devices.", _int_option("max-blob-bytes-per-user", 1)],
        ["max-buffered-bytes", None, 536870912, "Bytes the server may hold for peers (output backlogs, partial frames, blobs); new work past it is refused.", _int_option("max-buffered-bytes", 1048576)],
        ["relay-policy-pending", None, 64, "Frames of one session that may wait for an IRelayPolicy --handler's later decisions; past it the session is read no further until they come.", _int_option("relay-policy-pending", 1)],
        ["relay-policy-timeout", None, 5.0, "Seconds a frame may wait for an IRelayPolicy --handler's decision; then it is refused (a request gets Timeout).", _seconds_option("relay-policy-timeout", 0.01)],
        ["max-query-ids", None, 1000, "Most user IDs one QueryOnlines may name; more get TooLarge.", _int_option("max-query-ids", 1)],
        ["work-rate", None, 2000, "Units of server-handled work one session may ask for per second (1 per request, 1 more per 10 user IDs); more get RateLimited.", _int_option("work-rate", 1)],
        ["query-timeout", None, 30, "Seconds the server's own queries to clients wait for an answer.", _int_option("query-timeout", 1)],
        ["logon-rate-limit", None, 200, "Logons one host may attempt per 10 s; more get Busy.", _int_option("logon-rate-limit", 1)],
        ["websocket-flood-limit", None, 3, "WebSocket connections of one host that may be ended per 60 s for sending more frames before logon than a logon needs; then the host's WebSocket connections are refused until the first is 60 s old.", _int_option("websocket-flood-limit", 1)],
        ["takeover-limit", None, 5, "Takeovers of one user's device per 60 s; one more gets Busy for 60 s.", _int_option("takeover-limit", 1)],
        ["client-types", None, None, "Comma-separated device kinds allowed to log on [0-8].", _client_types],
        ["port-file", None, None, "File to write, once the server listens, a JSON object naming every port it listens on (for port 0); removed when it stops."],
        ["metrics", None, None, "Endpoint to serve Prometheus metrics at /metrics on (e.g. tcp:9464:interface=127.0.0.1)."],
        ["admin-api", None, None, "Endpoint for the admin HTTP API and dashboard (e.g. tcp:8530:interface=127.0.0.1)."],
        ["admin-api-max-connections", None, 64, "Most connections the admin API holds at once; more are closed when accepted.", _int_option("admin-api-max-connections", 1)],
        ["metrics-max-connections", None, 64, "Most connections the metrics site holds at once; more are closed when accepted.", _int_option("metrics-max-connections", 1)],
        ["http-request-timeout", None, 10.0, "Seconds the admin API and metrics sites give a request's whole head and body, from the accept or the end of the previous response (a total: a trickling peer is not given more).", _seconds_option("http-request-timeout", 0.1)],
        ["websocket-max-handshakes", None, 256, "Most connections each --websocket endpoint holds before their WebSocket handshake is done (with --web-demo, page loads too); more are closed when accepted.", _int_option("websocket-max-handshakes", 1)],
        ["admin-token-file", None, None, "File holding the admin API's bearer token (mode 600); without one the API only reads, and --admin-api must be loopback."],
        ["audit-log", None, None, "File to append the audit log to (JSON lines, rotated at 10 MB; rotated files are kept until --audit-keep-files or --audit-keep-days removes them)."],
        ["audit-max-per-user", None, PER_USER, "Audit records one user (or, for refused logons and admin requests without a valid token, one host) may add per minute; the rest are counted in one summary record.", _int_option("audit-max-per-user", 1)],
        ["audit-keep-files", None, 0, "Rotated audit files to keep; older ones are removed, each removal recorded. 0: keep all.", _int_option("audit-keep-files", 0)],
        ["audit-keep-days", None, 0.0, "Days a rotated audit file is kept after its last record; then it is removed, the removal recorded. 0: keep all.", _seconds_option("audit-keep-days", 0)],
        ["log-level", None, "info", "Lowest level of event written to the log (debug, info, warn, error, critical); those below are never formatted."],
        ["cluster", None, None, "Join a cluster of nodes through Redis: redis://[:password@]HOST:PORT/DB (rediss:// for TLS), or through Sentinel: redis+sentinel://[:password@]HOST:PORT[,HOST:PORT...]/SERVICE/DB."],
        ["node-id", None, None, "This node's ID in the cluster, unique among its nodes [host-pid-random]."],
        ["offline", None, None, "Keep messages to offline users and deliver them at their next logon: sqlite:PATH, or redis (the --cluster's Redis)."],
        ["offline-max-messages", None, _OFFLINE.max_messages, "Most messages kept for one offline user; more are refused (the sender gets UserOffline).", _int_option("offline-max-messages", 1)],
        ["offline-max-bytes", None, _OFFLINE.max_bytes, "Most bytes kept for one offline user; more are refused (the sender gets UserOffline).", _int_option("offline-max-bytes", _MIN_BYTES)],
        ["offline-max-per-sender", None, _OFFLINE.max_sender_messages, "Most messages one user may have waiting in the offline store, for all receivers together; more are refused.", _int_option("offline-max-per-sender", 1)],
        ["offline-max-bytes-per-sender", None, _OFFLINE.max_sender_bytes, "Most bytes one user may have waiting in the offline store, for all receivers together; more are refused.", _int_option("offline-max-bytes-per-sender", _MIN_BYTES)],
        ["offline-max-total-messages", None, _OFFLINE.max_total_messages, "Most messages the offline store keeps in all; more are refused.", _int_option("offline-max-total-messages", 1)],
        ["offline-max-total-bytes", None, _OFFLINE.max_total_bytes, "Most bytes the offline store keeps in all; more are refused.", _int_option("offline-max-total-bytes", _MIN_BYTES)],
        ["offline-ack-timeout", None, 10, "Seconds a device has to acknowledge stored messages delivered at logon.", _int_option("offline-ack-timeout", 1)],
        ["cluster-lease", None, 15.0, "Seconds a node's lease lasts: a dead node's users go offline within about 4/3 of it.", _seconds_option("cluster-lease", 0.3)],
        ["cluster-inbox-bytes", None, DEFAULT_INBOX_BYTES, "Most bytes this node's inbox in Redis holds (what other nodes told its users, not yet read); past it other nodes' messages are refused (requests answered RateLimited).", _int_option("cluster-inbox-bytes", 1024 * 1024)],
        ["gc-threshold", None, GC_THRESHOLD, "CPython's cyclic GC while the server runs: what start-up made is frozen out of its reach, and its youngest generation is collected every this many allocations (CPython's own: 700), which makes the full collections of a growing heap that much rarer. 0: leave the GC as it is. (PyPy: nothing to set.)", _int_option("gc-threshold", 0)],
        ["malloc-trim", None, 5.0, "Seconds between looks at the memory the C allocator holds freed; when it holds 16 MiB or more and the RSS moved since the last trim, it is given back to the system (glibc only). On PyPy a full collection, in steps, comes first when the RSS grew by a quarter since the last one. 0: never.", _seconds_option("malloc-trim", 0)],
    ]

    optFlags = [
        ["web-demo", None, "Serve the JavaScript client and the chat page at / on every --websocket endpoint."],
    ]
    # fmt: on

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # usage.Options has no annotations
        self["admins"] = []
        self["admin-hosts"] = []
        self["handlers"] = []
        self["websocket"] = []
        self["websocket-origins"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse C{options}.  Under C{twistd} (as its subcommand), a usage error
        ends the process with one line on stderr and exit status 1; twistd
        itself would print the help of every option above it.

        @raise usage.UsageError: the options are wrong, when parsed by a
            caller of its own (a test, a program).
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            if self.parent is None:
                raise
            text = str(e)
            if text.startswith("option "):  # getopt's: an unknown or incomplete option
                text += " (twistd esf --help lists the options)"
            start_failed(text)

    def opt_handler(self, spec: str) -> None:
        """
        An application object, module:attribute, providing IBasicHandler,
        ICustomizeHandler, IGroupManager, IOfflinePolicy, IRelogonPolicy,
        IRelayPolicy or IEngineAware (repeatable: each object is used for the
        interfaces it provides; two providing the same one are refused).
        """
        self["handlers"].append(load_object(spec))

    def opt_websocket(self, endpoint: str) -> None:
        """
        Also serve WebSocket clients on this endpoint, at the path /esf
        (repeatable; tcp:4531, or ssl:... for wss).
        """
        self["websocket"].append(endpoint)

    def opt_websocket_origin(self, origin: str) -> None:
        """
        A browser origin allowed to connect over WebSocket besides the
        server's own pages, e.g. https://chat.example.com; * is a wildcard
        (repeatable).
        """
        self["websocket-origins"].append(origin)

    def opt_admin(self, user_id: str) -> None:
        """
        A user allowed to kick anyone (repeatable).
        """
        self["admins"].append(user_id)

    def opt_admin_host(self, name: str) -> None:
        """
        A name (or address) by which the --admin-api is reached, besides
        localhost and the loopback and listening addresses: requests whose
        Host header names anything else are refused (repeatable).
        """
        try:
            self["admin-hosts"].append(allowed_host_name(name))
        except ValueError as e:
            raise usage.UsageError(f"--admin-host: {e}") from None

    def postOptions(self) -> None:
        self["port"] = _bare_port(self["port"])
        self["websocket"] = [_bare_port(e) for e in self["websocket"]]
        wait = self["logon-timeout"]
        self["endpoint"] = _endpoint("port", self["port"], wait)
        self["websocket-endpoints"] = [_endpoint("websocket", e, wait) for e in self["websocket"]]
        if self["web-demo"] and not self["websocket"]:
            raise usage.UsageError(
                "--web-demo serves pages on the --websocket endpoints: give one"
            )
        try:
            self["relogon-mode"] = RelogonMode(self["relogon-mode"])
        except ValueError:
            raise usage.UsageError(
                f"--relogon-mode is replace-old or ignore-new, not {self['relogon-mode']!r}"
            ) from None
        if self["heartbeat-timeout"] <= self["heartbeat-interval"]:
            raise usage.UsageError(
                f"--heartbeat-timeout ({self['heartbeat-timeout']}) must exceed "
                f"--heartbeat-interval ({self['heartbeat-interval']})"
            )
        try:
            self["applications"] = Applications.sort(self["handlers"])
        except ValueError as e:
            raise usage.UsageError(f"--handler: {e}") from None
        self._ops_options()
        self._share_descriptors()
        try:
            self["config"] = ServerConfig(
                wire=WireConfig(self["max-userid-length"], self["max-message-size"]),
                relogon_mode=self["relogon-mode"],
                heartbeat_interval=self["heartbeat-interval"],
                heartbeat_timeout=self["heartbeat-timeout"],
                logon_timeout=self["logon-timeout"],
                system_token=self["system-token"],
                admins=self["admins"],
                max_connections=self["descriptors"].max_connections,
                max_output_buffer=self["max-output-buffer"],
                output_drain_timeout=self["output-drain-timeout"],
                push_back_timeout=self["push-back-timeout"],
                max_blob_size=self["max-blob-size"],
                max_blob_bytes_per_user=self["max-blob-bytes-per-user"],
                max_buffered_bytes=self["max-buffered-bytes"],
                query_timeout=self["query-timeout"],
                max_query_ids=self["max-query-ids"],
                relay_policy_pending=self["relay-policy-pending"],
                relay_policy_timeout=self["relay-policy-timeout"],
                work_rate=self["work-rate"],
                work_burst=2 * self["work-rate"],
                client_types=self["client-types"] or frozenset(ClientType),
                logon_rate_limit=self["logon-rate-limit"],
                websocket_flood_limit=self["websocket-flood-limit"],
                takeover_limit=self["takeover-limit"],
                offline_ack_timeout=self["offline-ack-timeout"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["cluster"] is not None:
            try:
                self["cluster-url"] = RedisURL.parse(self["cluster"])
            except ValueError as e:
                raise usage.UsageError(f"--cluster: {e}") from None
            try:
                import txredisapi  # type: ignore[import-untyped]  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    "--cluster needs txredisapi: pip install 'esf[cluster]'"
                ) from None
        self._offline_option()
        if self["node-id"] is not None:
            try:
                check_node_id(self["node-id"])
            except ValueError as e:
                raise usage.UsageError(f"--node-id: {e}") from None

    def _share_descriptors(self) -> None:
        """
        Share the descriptor limit between the ESF connections and the
        HTTP sites' caps (see L{share_descriptors}).
        """
        caps = []
        if self["admin-api"] is not None:
            caps.append(("admin-api-max-connections", self["admin-api-max-connections"]))
        if self["metrics"] is not None:
            caps.append(("metrics-max-connections", self["metrics-max-connections"]))
        cap = self["websocket-max-handshakes"]
        caps.extend(("websocket-max-handshakes", cap) for _ in self["websocket"])
        soft, hard = nofile_limits()
        try:
            self["descriptors"] = share_descriptors(soft, hard, self["max-connections"], caps)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def _offline_option(self) -> None:
        spec = self["offline"]
        self["offline-path"] = None
        # Each option's parser has checked its bound as OfflineBounds does.
        self["offline-bounds"] = OfflineBounds(
            max_messages=self["offline-max-messages"],
            max_bytes=self["offline-max-bytes"],
            max_sender_messages=self["offline-max-per-sender"],
            max_sender_bytes=self["offline-max-bytes-per-sender"],
            max_total_messages=self["offline-max-total-messages"],
            max_total_bytes=self["offline-max-total-bytes"],
        )
        if spec is None:
            return
        kind, _, path = spec.partition(":")
        if kind == "sqlite" and path:
            try:
                check_database(path)
            except OfflineStoreError as e:
                raise usage.UsageError(f"--offline: {e}") from None
            self["offline-path"] = path
        elif spec == "redis":
            if self["cluster"] is None:
                raise usage.UsageError(
                    "--offline redis keeps messages in the cluster's Redis: give --cluster"
                )
        else:
            raise usage.UsageError(f"--offline takes sqlite:PATH or redis, not {spec!r}")

    def _ops_options(self) -> None:
        if self["port-file"] is not None:
            directory = os.path.dirname(os.path.abspath(self["port-file"]))
            if not os.path.isdir(directory):
                raise usage.UsageError(f"--port-file: {directory} is not a directory")
        for name in ("metrics", "admin-api"):
            if self[name] is not None:
                self[f"{name}-endpoint"] = _endpoint(name, self[name], self["logon-timeout"])
        if self["audit-log"] is not None:
            try:
                check_audit_path(self["audit-log"])
            except ValueError as e:
                raise usage.UsageError(f"--audit-log: {e}") from None
        self["audit-retention"] = Retention(self["audit-keep-files"], self["audit-keep-days"])
        try:
            self["log-level"] = parse_level(self["log-level"])
        except ValueError as e:
            raise usage.UsageError(f"--log-level: {e}") from None
        self["admin-token"] = None
        if self["admin-hosts"] and self["admin-api"] is None:
            raise usage.UsageError("--admin-host is for --admin-api, which is not given")
        if self["admin-token-file"] is not None:
            if self["admin-api"] is None:
                raise usage.UsageError("--admin-token-file is for --admin-api, which is not given")
            try:
                self["admin-token"] = read_token_file(self["admin-token-file"])
            except ValueError as e:
                raise usage.UsageError(f"--admin-token-file: {e}") from None
        elif self["admin-api"] is not None and not endpoint_is_local(self["admin-api"]):
            raise usage.UsageError(
                f"--admin-api {self['admin-api']!r} is reachable from other machines: "
                "give --admin-token-file, or listen on a loopback interface "
                "(tcp:PORT:interface=127.0.0.1)"
            )


def _bare_port(description: str) -> str:
    """
    A bare number is a TCP port.
    """
    return f"tcp:{description}" if description.isdigit() else description


def _endpoint(option: str, description: str, header_timeout: float) -> Any:
    """
    The server endpoint for an option's value.  C{haproxy:DESCRIPTION} is
    DESCRIPTION's endpoint behind a PROXY protocol balancer: its
    connections reach esf once their header has come, which they have
    C{header_timeout} seconds to send (L{esf.server._proxied}).
    """
    # Parsed with the options, not in makeService, so that a bad endpoint is
    # a usage error; twistd has installed its reactor by the time it gets
    # here.
    from twisted.internet import endpoints, reactor

    inner = proxied_description(description)
    try:
        endpoint = endpoints.serverFromString(reactor, description if inner is None else inner)
    except Exception as e:  # parsers raise many kinds; all mean a bad endpoint
        raise usage.UsageError(f"--{option} {description!r} is not an endpoint: {e}") from None
    # The TCP and TLS parsers take any number; the socket would refuse it
    # only when the server starts.  (Twisted keeps the port as _port.)
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise usage.UsageError(f"--{option} {description!r}: port {port} is not 0..65535")
    if inner is not None:
        # Twisted's own haproxy: wrapper would connect esf's protocol before
        # the header, when the peer's address is still the balancer's.
        endpoint = ProxiedEndpoint(endpoint, header_timeout, reactor)
    return OptionEndpoint(option, description, endpoint)


def load_object(spec: str) -> Any:
    """
    Import C{"module:attribute"} (dots allowed in the attribute).

    @raise usage.UsageError: it cannot be found.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise usage.UsageError(f"--handler takes module:attribute, not {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise usage.UsageError(f"--handler: cannot import {module_name!r}: {e}") from None
    except Exception as e:  # the module's own code failed: say so in one line
        raise usage.UsageError(
            f"--handler: importing {module_name!r} raised {type(e).__name__}: {e}"
        ) from None
    for name in attribute.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise usage.UsageError(f"--handler: {module_name!r} has no {attribute!r}") from None
    return obj


@implementer(IBasicHandler)
class CheckerHandler:
    """
    Verifies logons with twisted.cred checkers (C{--auth}), then, when
    given, with the application's handler; kicks are decided by the
    application's handler (nobody may kick without one).
    """

    def __init__(self, checkers: Iterable[ICredentialsChecker], handler: Any = None):
        self.checkers = list(checkers)
        self.handler = handler

    def verify_user(
        self, system_token: str, user_id: str, password: str, client_type: int, address: str
    ) -> Deferred[bool]:
        d = Deferred.fromCoroutine(self._verify(user_id, password))

        def then(ok: bool) -> Any:
            if not ok or self.handler is None:
                return ok
            return call(
                self.handler.verify_user, system_token, user_id, password, client_type, address
            )

        return d.addCallback(then)

    async def _verify(self, user_id: str, password: str) -> bool:
        # Twisted's checkers disagree on text or bytes (the in-memory one
        # keeps what strcred gave it, text; the file one reads bytes), so
        # each is asked in both forms.
        attempts = [
            credentials.UsernamePassword(user_id, password),  # type: ignore[arg-type]
            credentials.UsernamePassword(user_id.encode("utf-8"), password.encode("utf-8")),
        ]
        for checker in self.checkers:
            if credentials.IUsernamePassword not in checker.credentialInterfaces:
                continue
            for creds in attempts:
                try:
                    await call(checker.requestAvatarId, creds)
                except (error.UnauthorizedLogin, error.UnhandledCredentials, TypeError):
                    continue
                return True
        raise LogonRefused("invalid user ID or password")

    def can_kick_out(
        self, operator_id: str, target_id: str, client_type: int | None
    ) -> bool | Deferred[bool]:
        if self.handler is None:
            return False
        return call(self.handler.can_kick_out, operator_id, target_id, client_type)


def basic_handler(options: Options) -> IBasicHandler | None:
    """
    The L{IBasicHandler} that C{options} ask for, or C{None} to accept all.
    """
    handler = options["applications"].handler
    if options.get("credCheckers"):
        return CheckerHandler(options["credCheckers"], handler)
    return cast("IBasicHandler | None", handler)


def makeService(options: Options) -> MultiService:
    """
    The esf server service for C{twistd}.  Under twistd (C{options} are its
    subcommand's), its root is a L{TwistdLogRoot}, which filters the log at
    C{--log-level}.
    """
    service = server_service(options)
    if options.parent is None:
        return service
    root = TwistdLogRoot(options["log-level"], options.parent)
    service.setServiceParent(root)
    return root


def server_service(options: Options) -> MultiService:
    """
    The esf server's services for C{options}.
    """
    from twisted.internet import reactor

    under_twistd = options.parent is not None
    if under_twistd:
        quiet_start_failures()
    handler = basic_handler(options)
    if handler is None:
        log.warn(
            "esf: neither --auth nor an IBasicHandler --handler was given: "
            "EVERY LOGON IS ACCEPTED, whatever the password",
            esf_event="accept_all_warning",
        )
    apps: Applications = options["applications"]
    config = options["config"]
    ports = PortFile(options["port-file"], reactor) if options.get("port-file") else None
    if ports is not None:
        watch_listeners(ports, options)
    node_id = options["node-id"] or default_node_id()
    presence = None
    if options["cluster"] is not None:
        presence = ClusterPresence(
            reactor,
            options["cluster-url"],
            node_id,
            lease=options["cluster-lease"],
            inbox_bytes=options["cluster-inbox-bytes"],
        )
    store: Any = None
    bounds = options["offline-bounds"]
    if options["offline-path"] is not None:
        store = SQLiteOfflineStore(options["offline-path"], bounds=bounds)
    elif options["offline"] == "redis" and presence is not None:
        store = RedisOfflineStore(presence.link, bounds=bounds)
    engine = ServerEngine(
        config,
        clock=reactor,
        handler=handler,
        customize_handler=apps.customize_handler,
        group_manager=apps.group_manager,
        presence=presence,
        node_id=node_id,
        offline_store=store,
        offline_policy=apps.offline_policy,
        relogon_policy=apps.relogon_policy,
        relay_policy=apps.relay_policy,
    )
    try:
        apps.initialize(engine)
    except Exception as e:
        if not under_twistd:
            raise
        start_failed(f"--handler: initialize(engine) raised {type(e).__name__}: {e}")
    _apply_share(options["descriptors"])
    server = ServerService(engine, QuietAcceptErrors(options["endpoint"], reactor))
    if store is not None:
        log.info(
            "esf: offline messages are kept in {store!r}", store=store, esf_event="offline_store"
        )
    log.info(
        "esf: the frame decoder runs its {loop} loop",
        loop="compiled" if COMPILED else "pure-Python",
        esf_event="decoder_loop",
    )
    origins = options["websocket-origins"]
    # What the metrics count the closed connections of (add_operations).
    sites: list[ConnectionCap] = []
    for description, endpoint in zip(options["websocket"], options["websocket-endpoints"]):
        factory: Any
        listening = endpoint
        cap = options["websocket-max-handshakes"]
        if options["web-demo"]:
            # Until its handshake is done a connection is the site's: its
            # page loads and its handshake have --logon-timeout in all.
            site = web_demo_site(engine, origins, reactor=reactor)
            limits = HTTPLimits(cap, config.logon_timeout)
            factory = limit_site(
                site, limits, reactor, f"the web demo on {description}", label="web_demo"
            )
            listening = announce_web_demo(endpoint)
        else:
            # (autobahn times the handshake itself: --logon-timeout in all.)
            ws = WebSocketFactory(engine, origins, reactor=reactor)
            name = f"the WebSocket endpoint {description}"
            factory = ConnectionCap(
                ws, cap, reactor, name, "connections in their handshake", label="websocket"
            )
        sites.append(factory)
        server.listen(QuietAcceptErrors(listening, reactor), factory)
    add_operations(server, engine, options, sites)
    if options["malloc-trim"]:
        MemoryTrimmer(reactor, options["malloc-trim"]).setServiceParent(server)  # type: ignore[no-untyped-call]
    if options["gc-threshold"]:
        GCTuning(options["gc-threshold"]).setServiceParent(server)  # type: ignore[no-untyped-call]
    if ports is not None:
        ports.setServiceParent(server)  # type: ignore[no-untyped-call]
    if presence is None:
        # The engine opens the offline store as it starts and closes it
        # once its sessions have ended.
        return server
    # The cluster starts first and stops last: the engine's sessions end
    # (releasing their devices) before the node leaves.
    top = MultiService()
    ClusterService(presence).setServiceParent(top)  # type: ignore[no-untyped-call]
    server.setServiceParent(top)  # type: ignore[no-untyped-call]
    top.engine = engine  # type: ignore[attr-defined]
    presence.delivery_batch = engine.batch
    log.info(
        "esf: node {node_id} joins the cluster at {url}",
        node_id=node_id,
        url=str(options["cluster-url"]),
        esf_event="cluster_node",
    )
    top.presence = presence  # type: ignore[attr-defined]
    return top


def watch_listeners(ports: PortFile, options: Options) -> None:
    """
    Replace the endpoints in C{options} with ones that tell C{ports} the
    port each listens on.
    """
    options["endpoint"] = ports.watch("esf", options["endpoint"])
    options["websocket-endpoints"] = [
        ports.watch("websocket", e) for e in options["websocket-endpoints"]
    ]
    for name in ("metrics", "admin-api"):
        if options.get(name) is not None:
            options[f"{name}-endpoint"] = ports.watch(name, options[f"{name}-endpoint"])


def _apply_share(share: DescriptorShare) -> None:
    """
    Raise the soft descriptor limit if the share needs it, and say how
    the descriptors are shared.
    """
    if share.raise_to is not None:
        raise_soft_limit(share.raise_to)
    log.info(
        "esf: file descriptors: limit {limit}; at most {esf} ESF connections{http}; "
        "{reserve} kept for the process",
        limit=share.limit if share.limit is not None else "none",
        esf=share.max_connections if share.max_connections is not None else "unlimited",
        http="".join(f", {cap} for --{name}" for name, cap in share.http),
        reserve=share.reserve,
        esf_event="descriptor_share",
    )


def add_operations(
    service: ServerService,
    engine: ServerEngine,
    options: Options,
    sites: list[ConnectionCap] | None = None,
) -> None:
    """
    Add what C{--audit-log}, C{--metrics} and C{--admin-api} ask for to
    C{service}.  The metrics count the connections closed by C{sites} (the
    WebSocket ports') and by the admin and metrics sites.
    """
    sites = sites if sites is not None else []
    from twisted.internet import reactor

    if options.get("audit-log"):
        AuditService(
            engine,
            options["audit-log"],
            per_user=options.get("audit-max-per-user", PER_USER),
            retention=options.get("audit-retention", Retention()),
        ).setServiceParent(service)  # type: ignore[no-untyped-call]
    if options.get("metrics"):
        limits = HTTPLimits(options["metrics-max-connections"], options["http-request-timeout"])
        endpoint = QuietAcceptErrors(options["metrics-endpoint"], reactor)
        MetricsService(engine, endpoint, limits=limits, sites=sites).setServiceParent(service)  # type: ignore[no-untyped-call]
    if options.get("admin-api"):
        token = options.get("admin-token")
        if token is None:
            log.warn(
                "esf: the admin API on {endpoint} has no token, so it only reads: anyone "
                "who can connect to it from this machine may see who is online and from "
                "where; give --admin-token-file to kick or send notices",
                esf_event="admin_without_token",
                endpoint=options["admin-api"],
            )
        limits = HTTPLimits(options["admin-api-max-connections"], options["http-request-timeout"])
        endpoint = QuietAcceptErrors(options["admin-api-endpoint"], reactor)
        admin = AdminService(
            engine, endpoint, token, options.get("admin-hosts", ()), limits=limits
        )
        admin.setServiceParent(service)  # type: ignore[no-untyped-call]
        sites.append(admin.factory)
