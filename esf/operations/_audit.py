"""
The audit log: one JSON record per logon, refused logon, push-out, kick and
admin action, written to its file at once, in the order things happen,
before the action is visible to anyone (a logon before its reply, a kick
before the kicked device hears of it).

The records are made from what the server does anyway.  L{AuditLog}
observes the log publisher and turns the structured events it knows (by
their C{esf_event} field, see L{WATCHED}) into audit records; logons come
from the logon record's C{logged_on} event, one by one as they are made
(the log gathers them in a storm), and push-outs from the user manager's
C{device_being_pushed_out} event.

What one user can make the audit write is bounded (L{AuditBudget}): past
its budget for the minute, its records are counted and summarised in one
C{suppressed} record when the minute ends.  Text a client chose is cut to
L{TEXT_LIMIT} characters.

Records are JSON objects, one per line (L{jsonFileLogObserver} with no
record separator), in an L{AuditFile} that rotates by size and removes
rotated files only as the operator's retention says; read them back with
L{twisted.logger.eventsFromJSONLogFile}.  docs/operations.md describes
every field.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import (
    ILogObserver,
    LogLevel,
    LogPublisher,
    globalLogPublisher,
    jsonFileLogObserver,
)
from zope.interface import implementer

from ._audit_file import (
    ROTATE_LENGTH,
    AuditFile,
    Retention,
    check_audit_path,
    open_audit_file,
)

if TYPE_CHECKING:
    from twisted.logger import LogEvent

    from esf.server._config import UserData
    from esf.server._engine import ServerEngine


__all__ = [
    "AuditBudget",
    "AuditFile",
    "AuditLog",
    "AuditService",
    "check_audit_path",
    "Retention",
    "WATCHED",
    "kick_origin",
    "logon_refusal",
    "open_audit_file",
    "PER_USER",
    "ROTATE_LENGTH",
    "TEXT_LIMIT",
]

#: The C{esf_event} names of the log events the audit log (and the
#: metrics) read, by namespace.  Renaming one of them in the engine silently
#: empties a part of the audit log: tests/test_audit.py pins them.
WATCHED = {
    "esf.server": frozenset({"logged_on", "session_ended", "kick_out", "kick_refused"}),
    "esf.admin": frozenset({"admin_action", "admin_auth_failed"}),
}

#: Characters of one text field of a record (a kick's reason, a refusal's
#: cause); longer text is cut there and the record names the field in
#: C{truncated}.  The admin API cuts reasons at the same length.
TEXT_LIMIT = 1000

#: Records one user (or one host, for refused logons and admin requests
#: without a valid token) may add to the audit log per minute, by default.
PER_USER = 60

_REFUSED = re.compile(r"logon refused \((?P<result>\w+)\): (?P<cause>.*)", re.DOTALL)


def kick_origin(event: LogEvent) -> str:
    """
    Where the kick of a C{kick_out} log event came from: the engine's
    C{origin} field (C{"admin_api"}, C{"server_api"}: the application called
    C{engine.kick_out}, C{"client"}: a client's KickOut message).
    """
    return str(event.get("origin") or "server_api")


def logon_refusal(event: LogEvent) -> tuple[str, str] | None:
    """
    C{(result, cause)} if C{event} is the C{session_ended} event of a
    refused logon (the engine ends such a session with the text
    C{"logon refused (RESULT): cause"}), else C{None}.
    """
    if event.get("esf_event") != "session_ended" or event.get("logged_on"):
        return None
    match = _REFUSED.match(event.get("text") or "")
    if match is None:
        return None
    return match.group("result"), match.group("cause")


def _plain(value: Any) -> Any:
    """
    A JSON-friendly form of a field: bytes as hex, enums as their value.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple, frozenset, set)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and hasattr(value, "name"):  # an Enum
        return value.value
    return value


def _host(address: Any) -> str:
    """
    The host part of C{"host:port"}.
    """
    return str(address or "").rpartition(":")[0] or str(address)


class AuditBudget:
    """
    How many records each actor may add to the audit log in a window: at
    most C{limit}; the rest are counted, by kind, until L{roll} ends the
    window.  An actor is a string, C{"user:alice"} or C{"host:10.0.0.7"}.

    (A count per actor in a fixed window, rather than a token bucket, so
    that the summary can say exactly how many records of which kinds one
    window lost.)
    """

    def __init__(self, limit: int = PER_USER):
        if limit < 1:
            raise ValueError("the audit budget is at least 1 record")
        self.limit = limit
        self._used: dict[str, int] = {}
        self._suppressed: dict[str, dict[str, int]] = {}

    def take(self, actor: str, kind: str) -> bool:
        """
        Whether C{actor} may add a record of kind C{kind} now.
        """
        used = self._used.get(actor, 0)
        if used < self.limit:
            self._used[actor] = used + 1
            return True
        kinds = self._suppressed.setdefault(actor, {})
        kinds[kind] = kinds.get(kind, 0) + 1
        return False

    def roll(self) -> dict[str, dict[str, int]]:
        """
        End the window: what was suppressed in it, by actor and kind; the
        next window starts with every budget whole.
        """
        suppressed = self._suppressed
        self._used = {}
        self._suppressed = {}
        return suppressed


@implementer(ILogObserver)
class AuditLog:
    """
    Turns the server's log events into audit records and hands them to
    C{write} (an L{twisted.logger.ILogObserver}; by default JSON lines to C{out}).

    @param out: a file (such as L{open_audit_file}'s) that the records are
        written to as JSON lines, when C{write} is not given.
    @param engine: the server, for logons and push-outs (optional).
    @param publisher: the log publisher to observe.
    @param budget: the records each user may add per C{window} seconds.
    @param clock: what times the windows (by default the engine's).
    """

    def __init__(
        self,
        out: Any = None,
        *,
        engine: ServerEngine | None = None,
        publisher: LogPublisher = globalLogPublisher,
        write: Callable[[LogEvent], None] | None = None,
        budget: AuditBudget | None = None,
        window: float = 60.0,
        clock: Any = None,
    ):
        if write is None:
            if out is None:
                raise TypeError("AuditLog needs out or write")
            write = jsonFileLogObserver(out, recordSeparator="")
        self.out = out
        self.engine = engine
        self.publisher = publisher
        self.write = write
        self.budget = budget or AuditBudget()
        self.window = window
        if clock is None and engine is not None:
            clock = engine.clock
        self.clock = clock
        self._roller = LoopingCall(self._roll)
        if clock is not None:
            self._roller.clock = clock
        self._window_start = 0.0
        self._unsubscribe: list[Callable[[], None]] = []

    def start(self) -> None:
        self.publisher.addObserver(self)
        if self.engine is not None:
            um = self.engine.user_manager
            self._unsubscribe = [
                um.device_being_pushed_out.subscribe(self._pushed_out),
                self.engine.logons.record.logged_on.subscribe(self._logged_on),
            ]
        self._window_start = self._now()
        self._roller.start(self.window, now=False)

    def stop(self) -> None:
        self.publisher.removeObserver(self)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._roller.running:
            self._roller.stop()
            self._roll()  # what this window suppressed so far
        close = getattr(self.out, "close", None)
        if close is not None:
            close()

    # -- records -------------------------------------------------------------------

    def record(
        self, audit: str, log_format: str, *, charge_to: str | None = None, **fields: Any
    ) -> None:
        """
        Write one audit record of kind C{audit}, if C{charge_to}, the actor
        it is counted against (C{"user:ID"}, C{"host:HOST"}; C{None}: the
        server or an administrator, never suppressed), is within its
        budget.  Text fields are cut at L{TEXT_LIMIT} characters.
        """
        if charge_to is not None and not self.budget.take(charge_to, audit):
            return
        event = {k: _plain(v) for k, v in fields.items()}
        truncated = [k for k, v in event.items() if isinstance(v, str) and len(v) > TEXT_LIMIT]
        for name in truncated:
            event[name] = event[name][:TEXT_LIMIT]
        if truncated:
            event["truncated"] = truncated
        event.update(
            audit=audit,
            log_format=log_format,
            log_namespace="esf.audit",
            log_level=LogLevel.info,
            log_time=fields.get("log_time") or self._now(),
        )
        self.write(event)

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def _roll(self) -> None:
        """
        End the budget's window (each minute): summarise what it suppressed,
        and let the file's retention look at the rotated files' ages.
        """
        start, self._window_start = self._window_start, self._now()
        for actor, kinds in sorted(self.budget.roll().items()):
            count = sum(kinds.values())
            self.record(
                "suppressed",
                "audit: {count} more records of {actor} suppressed between {since} and {until}",
                actor=actor,
                count=count,
                kinds=kinds,
                since=start,
                until=self._window_start,
            )
        apply_retention = getattr(self.out, "apply_retention", None)
        if apply_retention is not None:
            apply_retention()

    def file_removed(self, path: str, size: int, last_written: float) -> None:
        """
        The retention removed the rotated audit file C{path}.
        """
        self.record(
            "retention_removed",
            "audit: retention removed {path} ({size} bytes, last written at {last_written})",
            path=path,
            size=size,
            last_written=last_written,
        )

    def __call__(self, event: LogEvent) -> None:
        name = event.get("esf_event")
        if name is None or name not in WATCHED.get(event.get("log_namespace", ""), ()):
            return
        when = event.get("log_time")
        if name == "session_ended":
            refusal = logon_refusal(event)
            if refusal is not None:
                # Nobody is logged on yet: the refused host is the actor.
                self.record(
                    "logon_refused",
                    "logon refused: {user_id}/{client_type} from {address}: {result}: {cause}",
                    charge_to=f"host:{_host(event.get('address'))}",
                    log_time=when,
                    user_id=event.get("user_id"),
                    client_type=event.get("client_type"),
                    address=event.get("address"),
                    result=refusal[0],
                    cause=refusal[1],
                )
        elif name == "kick_out":
            origin = kick_origin(event)
            self.record(
                "kick",
                "kick: {operator} ({origin}) kicked {user_id}/{client_type} "
                "({count} devices): {reason}",
                charge_to=f"user:{event.get('operator')}" if origin == "client" else None,
                log_time=when,
                operator=event.get("operator"),
                origin=origin,
                user_id=event.get("user_id"),
                client_type=event.get("client_type"),
                count=event.get("count"),
                reason=event.get("reason"),
            )
        elif name == "kick_refused":
            self.record(
                "kick_refused",
                "kick refused: {operator} ({origin}) may not kick {user_id}: {reason}",
                charge_to=f"user:{event.get('operator')}",
                log_time=when,
                operator=event.get("operator"),
                origin="client",
                user_id=event.get("target"),
                reason=event.get("reason"),
            )
        elif name == "admin_action":
            fields = {
                k: v
                for k, v in event.items()
                if not k.startswith("log_") and k not in ("esf_event", "format")
            }
            self.record(
                "admin",
                "admin: {action} by {peer}: {status}",
                log_time=when,
                **fields,
            )
        elif name == "admin_auth_failed":
            self.record(
                "admin_auth_failed",
                "admin API: {method} {path} from {peer} without a valid token",
                charge_to=f"host:{_host(event.get('peer'))}",
                log_time=when,
                peer=event.get("peer"),
                method=event.get("method"),
                path=event.get("path"),
            )

    def _logged_on(self, user_id: str, client_type: int, address: str, at: float) -> None:
        self.record(
            "logon",
            "logon: {user_id}/{client_type} from {address}",
            charge_to=f"user:{user_id}",
            log_time=at,
            user_id=user_id,
            client_type=client_type,
            address=address,
        )

    def _pushed_out(self, user_data: UserData, new_address: str) -> None:
        self.record(
            "push_out",
            "push-out: {user_id}/{client_type} from {address} replaced by a logon from "
            "{new_address}",
            charge_to=f"user:{user_data.user_id}",
            user_id=user_data.user_id,
            client_type=user_data.client_type,
            address=user_data.address,
            new_address=new_address,
        )


class AuditService(Service):
    """
    Writes C{engine}'s audit log to C{path} while running.

    @param per_user: records one user (or host) may add per minute.
    @param retention: which rotated files are removed.
    """

    def __init__(
        self,
        engine: ServerEngine,
        path: str,
        *,
        per_user: int = PER_USER,
        retention: Retention = Retention(),
    ):
        self.engine = engine
        self.path = path
        self.per_user = per_user
        self.retention = retention
        self.audit: AuditLog | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service has no annotations
        out = open_audit_file(self.path, self.retention)
        self.audit = AuditLog(out, engine=self.engine, budget=AuditBudget(self.per_user))
        out.removed = self.audit.file_removed
        self.audit.start()
        out.apply_retention()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.audit is not None:
            self.audit.stop()
            self.audit = None
