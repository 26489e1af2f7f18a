"""
The admin HTTP API and dashboard (C{twistd esf --admin-api ENDPOINT}).

JSON over HTTP on C{twisted.web}, under C{/api/}::

    GET  /api/info                               counts, version, uptime, options
    GET  /api/history                            users and devices online, the last hour
    GET  /api/sessions?user=&user_prefix=&kind=&address=&offset=&limit=
    GET  /api/users/{id}                         one user's devices
    POST /api/users/{id}/kick                    {"reason": ...}
    POST /api/users/{id}/devices/{kind}/kick     {"reason": ...}
    POST /api/users/{id}/notice                  {"text": ...} or {"payload_hex": ...}
    POST /api/broadcast                          the same, to every online user

and the dashboard at C{/dashboard}.  Every C{/api/} request is judged
first (L{esf.operations._admin_policy}: its Host, its origin, the bearer token, and
for a change a token configured and a JSON body).  Errors are
JSON C{{"error": code, "message": text}} with the HTTP status; request
bodies are bounded (L{MAX_BODY}).  docs/operations.md is the reference.

Everything runs on the reactor thread, where the engine lives; the API
reads the engine's public state and calls C{kick_out} and C{send}.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from esf.interfaces import IDeviceHandle
from esf.server._config import ServerConfig
from esf.server._http import HTTP_LIMITS, MAX_BODY, HTTPLimits, QuietSite, limit_site
from esf.wire._frames import ClientType

from ._admin_policy import (
    Refusal,
    RefusalLog,
    RequestPolicy,
    endpoint_is_local,
    peer_of,
    read_token_file,
)
from ._metrics import OnlineDevices, kind_label, server_version

if TYPE_CHECKING:
    from esf.server._engine import ServerEngine

__all__ = [
    "AdminApi",
    "OnlineHistory",
    "AdminService",
    "ADMIN_OPERATOR",
    "NOTICE_INFORMATION_TYPE",
    "MAX_BODY",
    "endpoint_is_local",
    "read_token_file",
    "admin_site",
]

log = Logger(namespace="esf.admin")

#: The operator named in BeingKickedOutNotify (and in the log and audit)
#: for the admin API's kicks: a name no user can have, since user IDs may
#: not hold the device mark C{#}, so that a client can tell the API from a
#: user named "admin".  (Before, it was C{"admin"}; the audit's C{origin}
#: field, C{"admin_api"}, tells both apart in old records too.)
ADMIN_OPERATOR = "#admin"
#: The information type of a notice or broadcast that does not give one.
NOTICE_INFORMATION_TYPE = 0
#: Longest kick reason, in characters (what BeingKickedOutNotify carries).
MAX_REASON = 1000
DEFAULT_PAGE = 100
MAX_PAGE = 1000

_I32 = (-(2**31), 2**31 - 1)


# -- the online count over time ----------------------------------------------------


class OnlineHistory:
    """
    The users and devices online, sampled every C{interval} seconds on the
    engine's clock; the last C{keep} samples are kept (an hour by default).
    """

    def __init__(
        self, engine: ServerEngine, devices: OnlineDevices, interval: float = 10, keep: int = 360
    ):
        self.engine = engine
        self.devices = devices
        self.interval = interval
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=keep)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = engine.clock

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> None:
        self.samples.append(
            (
                self.engine.clock.seconds(),
                self.engine.presence.user_count(),
                sum(self.devices.by_kind.values()),
            )
        )


# -- HTTP plumbing -------------------------------------------------------------------


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"


@attrs.frozen
class ApiError(Exception):
    """
    An answer other than success: the HTTP C{status}, a short C{code} and
    a C{message} in words.
    """

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


#: Routes: a path shape (C{"*"} is one variable segment) -> {method: handler name}.
ROUTES: dict[tuple[str, ...], dict[bytes, str]] = {
    ("info",): {b"GET": "info"},
    ("history",): {b"GET": "history"},
    ("sessions",): {b"GET": "sessions"},
    ("users", "*"): {b"GET": "user"},
    ("users", "*", "kick"): {b"POST": "kick"},
    ("users", "*", "devices", "*", "kick"): {b"POST": "kick_device"},
    ("users", "*", "notice"): {b"POST": "notice"},
    ("broadcast",): {b"POST": "broadcast"},
}


def _route(segments: list[str]) -> tuple[dict[bytes, str], list[str]] | None:
    for shape, methods in ROUTES.items():
        if len(shape) != len(segments):
            continue
        args = []
        for want, got in zip(shape, segments):
            if want == "*":
                args.append(got)
            elif want != got:
                break
        else:
            return methods, args
    return None


# -- the API -------------------------------------------------------------------------


class AdminApi(Resource):
    """
    C{/api/}: see the module's docstring.

    @param token: the bearer token, or C{None} to answer every request that
        only reads and refuse every change (see L{RequestPolicy}).
    @param devices: the count of devices online by kind to report (made and
        started by the caller; see L{OnlineDevices}).
    @param hosts: names a request's Host header may give besides the
        loopback ones (C{--admin-host}).
    """

    isLeaf = True

    def __init__(
        self,
        engine: ServerEngine,
        token: str | None,
        devices: OnlineDevices,
        history: OnlineHistory | None = None,
        hosts: Iterable[str] = (),
    ):
        super().__init__()  # type: ignore[no-untyped-call]  # Resource has no annotations
        self.engine = engine
        self.policy = RequestPolicy(token, hosts)
        self.devices = devices
        self.online_history = history if history is not None else OnlineHistory(engine, devices)
        self.started_at = engine.clock.seconds()
        self.refusals = RefusalLog(engine.clock.seconds)

    # -- dispatch ------------------------------------------------------------------

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        method = b"GET" if request.method == b"HEAD" else request.method
        audit: dict[str, Any] = {}
        try:
            self._judge(request, self.policy.admit)
            assert request.postpath is not None  # set as the resource was found
            try:
                segments = [s.decode("utf-8") for s in request.postpath]
            except UnicodeDecodeError:
                raise _bad("the path is not UTF-8") from None
            if segments and segments[-1] == "":
                segments.pop()
            found = _route(segments)
            if found is None:
                raise ApiError(404, "not_found", f"no such resource: /api/{'/'.join(segments)}")
            methods, args = found
            if method not in methods:
                allowed = b", ".join(sorted(methods))
                raise ApiError(
                    405,
                    "method_not_allowed",
                    f"{request.method.decode('ascii', 'replace')} is not allowed here; "
                    f"use {allowed.decode('ascii')}",
                    ((b"allow", allowed),),
                )
            handler: Callable[..., Any] = getattr(self, methods[method])
            if method == b"POST":
                self._judge(request, self.policy.may_change)
                audit["action"] = methods[method]
                body = handler(request, audit, *args)
            else:
                body = handler(request, *args)
            status = 200
        except ApiError as e:
            status = e.status
            for name, value in e.headers:
                request.setHeader(name, value)
            body = {"error": e.code, "message": e.message}
        request.setResponseCode(status)
        if audit:
            self._log_action(request, status, audit)
        return _json_bytes(body)

    def _judge(self, request: Request, check: Callable[[Request], Refusal | None]) -> None:
        refusal = check(request)
        if refusal is not None:
            self.refusals.refused(request, refusal)
            raise ApiError(refusal.status, refusal.code, refusal.message, refusal.headers)

    def _log_action(self, request: Request, status: int, audit: dict[str, Any]) -> None:
        log.info(
            "admin {action} by {peer}: {status}",
            esf_event="admin_action",
            peer=peer_of(request),
            status=status,
            **audit,
        )

    # -- reading -------------------------------------------------------------------

    def info(self, request: Request) -> dict[str, Any]:
        engine = self.engine
        now = engine.clock.seconds()
        by_kind = {kind_label(k): n for k, n in sorted(self.devices.by_kind.items()) if n}
        return {
            "version": server_version(),
            "node": engine.node_id,
            "now": now,
            "started_at": self.started_at,
            "uptime_seconds": now - self.started_at,
            "connections": len(engine.sessions),
            "users_online": engine.presence.user_count(),
            "devices_online": sum(by_kind.values()),
            "devices_by_kind": by_kind,
            "pending_queries": len(engine.pending),
            "stopping": engine.stopping,
            "read_only": self.policy.read_only,
            "options": config_summary(engine.config),
        }

    def history(self, request: Request) -> dict[str, Any]:
        _query(request, set())
        history = self.online_history
        return {"interval": history.interval, "samples": [list(s) for s in history.samples]}

    def sessions(self, request: Request) -> dict[str, Any]:
        query = _query(request, {"user", "user_prefix", "kind", "address", "offset", "limit"})
        offset = _whole(query.get("offset", "0"), "offset", 0, None)
        limit = _whole(query.get("limit", str(DEFAULT_PAGE)), "limit", 1, MAX_PAGE)
        kind = _kind(query["kind"]) if "kind" in query else None
        address = query.get("address")
        prefix = query.get("user_prefix")
        presence = self.engine.presence
        if "user" in query:
            user_ids: list[str] = [query["user"]]
        else:
            user_ids = presence.user_ids()
        total, page = 0, []
        for user_id in user_ids:
            if prefix is not None and not user_id.startswith(prefix):
                continue
            for handle in presence.devices(user_id):
                if kind is not None and handle.client_type != kind:
                    continue
                if address is not None and not _address_of(handle).startswith(address):
                    continue
                if offset <= total < offset + limit:
                    page.append(self._device(handle))
                total += 1
        return {"total": total, "offset": offset, "limit": limit, "sessions": page}

    def user(self, request: Request, user_id: str) -> dict[str, Any]:
        _query(request, set())
        devices = self._online(user_id)
        return {"user_id": user_id, "devices": [self._device(h) for h in devices]}

    def _online(self, user_id: str, kind: int | None = None) -> tuple[IDeviceHandle, ...]:
        devices = tuple(self.engine.presence.devices(user_id))
        if kind is not None:
            devices = tuple(h for h in devices if h.client_type == kind)
        if not devices:
            what = user_id if kind is None else f"{user_id}'s {kind_label(kind)} device"
            raise ApiError(404, "not_online", f"{what} is not online")
        return devices

    def _device(self, handle: IDeviceHandle) -> dict[str, Any]:
        user_data = handle.user_data
        return {
            "user_id": handle.user_id,
            "client_type": int(handle.client_type),
            "kind": kind_label(handle.client_type),
            "address": _address_of(handle),
            "logon_time": user_data.logon_time if user_data is not None else None,
            # A session of this node has these; a handle held elsewhere may not.
            "connected_at": getattr(handle, "connected_at", None),
            "last_active": getattr(handle, "last_active", None),
            "session_id": handle.session_id,
            "node": handle.node,
        }

    # -- acting --------------------------------------------------------------------

    def _writable(self) -> None:
        if self.engine.stopping:
            raise ApiError(409, "stopping", "the server is shutting down")

    def kick(self, request: Request, audit: dict[str, Any], user_id: str) -> dict[str, Any]:
        return self._kick(request, audit, user_id, None)

    def kick_device(
        self, request: Request, audit: dict[str, Any], user_id: str, kind: str
    ) -> dict[str, Any]:
        return self._kick(request, audit, user_id, _kind(kind))

    def _kick(
        self, request: Request, audit: dict[str, Any], user_id: str, kind: int | None
    ) -> dict[str, Any]:
        audit.update(user_id=user_id, client_type=kind)
        body = _body(request, {"reason"})
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise _bad("reason is a string")
        if len(reason) > MAX_REASON:
            raise _bad(f"reason is at most {MAX_REASON} characters")
        audit["reason"] = reason
        self._writable()
        self._online(user_id, kind)
        count = self.engine.kick_out(
            user_id, reason, kind, operator=ADMIN_OPERATOR, origin="admin_api"
        )
        audit["count"] = count
        return {"user_id": user_id, "kicked": count}

    def notice(self, request: Request, audit: dict[str, Any], user_id: str) -> dict[str, Any]:
        audit["user_id"] = user_id
        information_type, payload, kind = self._message(request, audit, device=True)
        self._writable()
        self._online(user_id, kind)
        count = self.engine.send(user_id, information_type, payload, kind)
        audit["count"] = count
        return {"user_id": user_id, "devices": count}

    def broadcast(self, request: Request, audit: dict[str, Any]) -> dict[str, Any]:
        information_type, payload, _ = self._message(request, audit, device=False)
        self._writable()
        engine = self.engine
        users = devices = 0
        for user_id in engine.presence.user_ids():
            sent = engine.send(user_id, information_type, payload)
            if sent:
                users += 1
                devices += sent
        audit["count"] = devices
        return {"users": users, "devices": devices}

    def _message(
        self, request: Request, audit: dict[str, Any], device: bool
    ) -> tuple[int, bytes, int | None]:
        allowed = {"text", "payload_hex", "information_type"} | ({"kind"} if device else set())
        body = _body(request, allowed)
        if ("text" in body) == ("payload_hex" in body):
            raise _bad("give exactly one of text and payload_hex")
        if "text" in body:
            if not isinstance(body["text"], str):
                raise _bad("text is a string")
            payload = body["text"].encode("utf-8")
        else:
            if not isinstance(body["payload_hex"], str):
                raise _bad("payload_hex is a string of hex digits")
            try:
                payload = bytes.fromhex(body["payload_hex"])
            except ValueError:
                raise _bad("payload_hex is not hex") from None
        information_type = body.get("information_type", NOTICE_INFORMATION_TYPE)
        if (
            not isinstance(information_type, int)
            or isinstance(information_type, bool)
            or not _I32[0] <= information_type <= _I32[1]
        ):
            raise _bad("information_type is a 32-bit signed whole number")
        kind = None
        if "kind" in body:
            if not isinstance(body["kind"], (str, int)) or isinstance(body["kind"], bool):
                raise _bad("kind is a device kind number or name")
            kind = _kind(str(body["kind"]))
        wire = self.engine.config.wire
        room = wire.max_message_size - wire.header_length - 4
        if len(payload) > room:
            raise ApiError(
                413,
                "too_large",
                f"the payload is {len(payload)} bytes; at most {room} fit a frame",
            )
        audit.update(information_type=information_type, payload=payload, client_type=kind)
        return information_type, payload, kind


def _address_of(handle: IDeviceHandle) -> str:
    user_data = handle.user_data
    return user_data.address if user_data is not None else ""


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    query = {}
    for key, values in request.args.items():
        try:
            name = key.decode("utf-8")
            value = values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("the query string is not UTF-8") from None
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise _bad(f"unknown parameter {name!r} (known: {known})")
        if len(values) > 1:
            raise _bad(f"{name} is given more than once")
        query[name] = value
    return query


def _whole(text: str, name: str, low: int, high: int | None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(f"{name} is a whole number, not {text!r}") from None
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f"at least {low}"
        raise _bad(f"{name} is {span}, not {value}")
    return value


def _kind(text: str) -> int:
    """
    A device kind from its number (C{"5"}) or name (C{"android"}).
    """
    if text.isdigit():
        value = int(text)
        if value <= 255:
            return value
    else:
        try:
            return int(ClientType[text.upper()])
        except KeyError:
            pass
    names = ", ".join(k.name.lower() for k in ClientType)
    raise _bad(f"kind is a number 0..255 or one of {names}, not {text!r}")


def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    assert request.content is not None  # set once the length is known
    request.content.seek(0)
    data = request.content.read()
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("the body is a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise _bad(f"unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(allowed))})")
    return body


def config_summary(config: ServerConfig) -> dict[str, Any]:
    """
    The server's settings as JSON values; the system token only as whether
    one is set.
    """
    summary: dict[str, Any] = {}
    for field in attrs.fields(ServerConfig):
        value = getattr(config, field.name)
        if field.name == "system_token":
            summary["system_token_set"] = bool(value)
        elif field.name == "wire":
            summary["max_userid_length"] = value.max_userid_length
            summary["max_message_size"] = value.max_message_size
        elif isinstance(value, frozenset):
            summary[field.name] = sorted(value)
        elif hasattr(value, "value"):
            summary[field.name] = value.value
        else:
            summary[field.name] = value
    return summary


# -- the dashboard ---------------------------------------------------------------------


_SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


class StaticFile(Resource):
    """
    One file of the dashboard, read once from the package.
    """

    isLeaf = True

    def __init__(self, name: str, content_type: bytes):
        super().__init__()  # type: ignore[no-untyped-call]
        self.data = (resources.files("esf.operations") / "dashboard" / name).read_bytes()
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        for name, value in _SECURITY_HEADERS:
            request.setHeader(name, value)
        return self.data

    render_HEAD = render_GET


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return _Redirect(b"/dashboard")
        return notFound()  # (Resource's own NoResource is deprecated: it echoes unescaped)


class _Redirect(Resource):
    isLeaf = True

    def __init__(self, to: bytes):
        super().__init__()  # type: ignore[no-untyped-call]
        self.to = to

    def render_GET(self, request: Request) -> bytes:
        request.redirect(self.to)
        return b""


class AdminSite(QuietSite):
    """
    The admin API's site (its name shows in the log: "AdminSite starting
    on PORT"), without an access log: each change is logged and audited
    (C{admin_action}), each refusal logged within L{RefusalLog}'s bound.
    """


def admin_site(
    engine: ServerEngine,
    token: str | None,
    devices: OnlineDevices,
    history: OnlineHistory | None = None,
    hosts: Iterable[str] = (),
) -> Site:
    """
    The admin API and dashboard as a L{Site}.
    """
    root = _Root()  # type: ignore[no-untyped-call]
    root.putChild(b"api", AdminApi(engine, token, devices, history, hosts))
    root.putChild(b"dashboard", StaticFile("index.html", b"text/html; charset=utf-8"))
    root.putChild(b"dashboard.js", StaticFile("dashboard.js", b"text/javascript; charset=utf-8"))
    root.putChild(b"dashboard.css", StaticFile("dashboard.css", b"text/css; charset=utf-8"))
    site = AdminSite(root, timeout=60)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    return site


class _Attached(Service):
    def __init__(self, devices: OnlineDevices, history: OnlineHistory):
        self.devices = devices
        self.history = history

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service has no annotations
        self.devices.start()
        self.history.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.history.stop()
        self.devices.stop()


class AdminService(MultiService):
    """
    Serves the admin API and dashboard of C{engine} on C{endpoint}, within
    C{limits} (timed by C{clock}, by default the engine's).  A port that
    cannot be bound makes C{startService} raise.  C{token} and C{hosts} are
    L{AdminApi}'s.
    """

    def __init__(
        self,
        engine: ServerEngine,
        endpoint: IStreamServerEndpoint,
        token: str | None,
        hosts: Iterable[str] = (),
        *,
        limits: HTTPLimits = HTTP_LIMITS,
        clock: IReactorTime | None = None,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        devices = OnlineDevices(engine)
        history = OnlineHistory(engine, devices)
        _Attached(devices, history).setServiceParent(self)  # type: ignore[no-untyped-call]
        self.site = admin_site(engine, token, devices, history, hosts)
        #: The factory that listens: the admin site within its limits.
        self.factory = limit_site(
            self.site, limits, clock or engine.clock, "the admin API", label="admin"
        )
        factory = self.factory
        self.listener = StreamServerEndpointService(endpoint, factory)
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)
