"""
C{twistd esf}: the options and the service of an esf server.
"""

from __future__ import annotations

import importlib

from twisted.cred import credentials, error, strcred
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from ._engine import (
    LogonRefused,
    RelogonMode,
    ServerConfig,
    ServerEngine,
    call,
)
from ._protocol import ServerService
from ._websocket import WebSocketFactory, web_demo_site
from ._wire import ClientType, WireConfig
from .interfaces import IBasicHandler, ICustomizeHandler, IEngineAware, IGroupManager

__all__ = ["Options", "makeService", "CheckerHandler"]

log = Logger(namespace="esf.server")


_HANDLER_INTERFACES = (IBasicHandler, ICustomizeHandler, IGroupManager, IEngineAware)


def _int_option(name: str, low: int, high: int | None = None):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--{name} takes a whole number, not {value!r}") from None
        if number < low or (high is not None and number > high):
            span = f"{low}..{high}" if high is not None else f"at least {low}"
            raise usage.UsageError(f"--{name} must be {span}, not {number}")
        return number

    parse.coerceDoc = ""
    return parse


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

    optParameters = [
        ["port", "p", "tcp:4530", "Endpoint to listen on (e.g. tcp:4530, ssl:4531:...), or a bare port."],
        ["handler", None, None, "An application object, module:attribute, providing IBasicHandler (and the other handler interfaces)."],
        ["relogon-mode", None, "replace-old", "replace-old or ignore-new: what a second logon of the same user and device does."],
        ["heartbeat-interval", None, 10, "Seconds between client heartbeats, announced at logon.", _int_option("heartbeat-interval", 1, 65535)],
        ["heartbeat-timeout", None, 30, "Seconds of silence after which a session ends.", _int_option("heartbeat-timeout", 2, 65535)],
        ["logon-timeout", None, 10, "Seconds a new connection has to log on.", _int_option("logon-timeout", 1)],
        ["max-message-size", None, 1048576, "Largest frame in bytes, header included.", _int_option("max-message-size", 64, 0x7FFFFFFF)],
        ["max-userid-length", None, 11, "Maximum UserID length n (header = 2n+14 rounded up to 4).", _int_option("max-userid-length", 1, 255)],
        ["system-token", None, "", "Token every client must send; empty accepts any."],
        ["max-connections", None, None, "Most connections at once; more are refused.", _int_option("max-connections", 1)],
        ["max-output-buffer", None, 2097152, "Bytes that may wait for a peer that does not read before its session ends.", _int_option("max-output-buffer", 1024)],
        ["max-blob-size", None, 67108864, "Largest Blob addressed to the server, reassembled, in bytes.", _int_option("max-blob-size", 1)],
        ["query-timeout", None, 30, "Seconds the server's own queries to clients wait for an answer.", _int_option("query-timeout", 1)],
        ["logon-rate-limit", None, 200, "Logons one host may attempt per 10 s; more get Busy.", _int_option("logon-rate-limit", 1)],
        ["takeover-limit", None, 5, "Takeovers of one user's device per 60 s; one more gets Busy for 60 s.", _int_option("takeover-limit", 1)],
        ["client-types", None, None, "Comma-separated device kinds allowed to log on [0-8].", _client_types],
    ]

    optFlags = [
        ["web-demo", None, "Serve the JavaScript client and the chat page at / on every --websocket endpoint."],
    ]

    def __init__(self):
        super().__init__()
        self["admins"] = []
        self["websocket"] = []
        self["websocket-origins"] = []

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

    def postOptions(self) -> None:
        self["port"] = _bare_port(self["port"])
        self["websocket"] = [_bare_port(e) for e in self["websocket"]]
        self["endpoint"] = _endpoint("port", self["port"])
        self["websocket-endpoints"] = [_endpoint("websocket", e) for e in self["websocket"]]
        if self["web-demo"] and not self["websocket"]:
            raise usage.UsageError("--web-demo serves pages on the --websocket endpoints: give one")
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
        if self["handler"] is not None:
            app = self["handler"] = load_object(self["handler"])
            if not any(i.providedBy(app) for i in _HANDLER_INTERFACES):
                raise usage.UsageError(
                    f"--handler {app!r} provides none of "
                    + ", ".join(i.__name__ for i in _HANDLER_INTERFACES)
                )
        try:
            self["config"] = ServerConfig(
                wire=WireConfig(self["max-userid-length"], self["max-message-size"]),
                relogon_mode=self["relogon-mode"],
                heartbeat_interval=self["heartbeat-interval"],
                heartbeat_timeout=self["heartbeat-timeout"],
                logon_timeout=self["logon-timeout"],
                system_token=self["system-token"],
                admins=self["admins"],
                max_connections=self["max-connections"],
                max_output_buffer=self["max-output-buffer"],
                max_blob_size=self["max-blob-size"],
                query_timeout=self["query-timeout"],
                client_types=self["client-types"] or frozenset(ClientType),
                logon_rate_limit=self["logon-rate-limit"],
                takeover_limit=self["takeover-limit"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _bare_port(description: str) -> str:
    """
    A bare number is a TCP port.
    """
    return f"tcp:{description}" if description.isdigit() else description


def _endpoint(option: str, description: str):
    """
    The server endpoint for an option's value.
    """
    # Parsed with the options, not in makeService, so that a bad endpoint is
    # a usage error; twistd has installed its reactor by the time it gets
    # here.
    from twisted.internet import endpoints, reactor

    try:
        return endpoints.serverFromString(reactor, description)
    except Exception as e:  # parsers raise many kinds; all mean a bad endpoint
        raise usage.UsageError(f"--{option} {description!r} is not an endpoint: {e}") from None


def load_object(spec: str):
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

    def __init__(self, checkers, handler=None):
        self.checkers = list(checkers)
        self.handler = handler

    def verify_user(self, system_token, user_id, password, client_type, address):
        d = Deferred.fromCoroutine(self._verify(user_id, password))

        def then(ok):
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
            credentials.UsernamePassword(user_id, password),
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

    def can_kick_out(self, operator_id, target_id, client_type):
        if self.handler is None:
            return False
        return call(self.handler.can_kick_out, operator_id, target_id, client_type)


def basic_handler(options: Options):
    """
    The L{IBasicHandler} that C{options} ask for, or C{None} to accept all.
    """
    handler = options["handler"]
    if handler is not None and not IBasicHandler.providedBy(handler):
        handler = None
    if options.get("credCheckers"):
        return CheckerHandler(options["credCheckers"], handler)
    return handler


def makeService(options: Options):
    """
    The esf server service for C{twistd}.
    """
    from twisted.internet import reactor

    handler = basic_handler(options)
    if handler is None:
        log.warn(
            "esf: neither --auth nor an IBasicHandler --handler was given: "
            "EVERY LOGON IS ACCEPTED, whatever the password",
            esf_event="accept_all_warning",
        )
    app = options["handler"]
    engine = ServerEngine(
        options["config"],
        clock=reactor,
        handler=handler,
        customize_handler=app if ICustomizeHandler.providedBy(app) else None,
        group_manager=app if IGroupManager.providedBy(app) else None,
    )
    if IEngineAware.providedBy(app):
        app.initialize(engine)
    service = ServerService(engine, options["endpoint"])
    origins = options["websocket-origins"]
    for endpoint in options["websocket-endpoints"]:
        if options["web-demo"]:
            factory = web_demo_site(engine, origins, reactor=reactor)
        else:
            factory = WebSocketFactory(engine, origins, reactor=reactor)
        service.listen(endpoint, factory)
    return service
