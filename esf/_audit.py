"""
The audit log: one JSON record per logon, refused logon, push-out, kick and
admin action, written through C{twisted.logger}.

The records are made from what the server logs anyway.  L{AuditLog}
observes the log publisher and turns the structured events it knows (by
their C{esf_event} field, see L{WATCHED}) into audit records; push-outs
come from the user manager's C{device_being_pushed_out} event, which has
the new connection's address as a field.  Nothing is added to the engine.

Records are JSON objects, one per line (L{jsonFileLogObserver} with no
record separator), in a L{LogFile} that rotates by size; read them back
with L{twisted.logger.eventsFromJSONLogFile}.  docs/operations.md describes
every field.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import (
    ILogObserver,
    LogLevel,
    LogPublisher,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.application.service import Service
from twisted.python.logfile import LogFile
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.logger import LogEvent

    from ._config import UserData
    from ._engine import ServerEngine


__all__ = [
    "AuditLog",
    "AuditService",
    "check_audit_path",
    "WATCHED",
    "kick_origin",
    "logon_refusal",
    "open_audit_file",
    "ROTATE_LENGTH",
    "MAX_ROTATED_FILES",
]

#: The C{esf_event} names of the log events the audit log (and the
#: metrics) read, by namespace.  Renaming one of them in the engine silently
#: empties a part of the audit log: tests/test_audit.py pins them.
WATCHED = {
    "esf.server": frozenset({"logged_on", "session_ended", "kick_out", "kick_refused"}),
    "esf.admin": frozenset({"admin_action", "admin_auth_failed"}),
}

#: Bytes an audit file may reach before it is rotated, and how many rotated
#: files are kept (C{PATH.1} the newest ... C{PATH.10} the oldest).
ROTATE_LENGTH = 10_000_000
MAX_ROTATED_FILES = 10

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


def open_audit_file(path: str) -> LogFile:
    """
    The audit file at C{path}: appended to, readable by its owner only,
    rotated past L{ROTATE_LENGTH} bytes.
    """
    log_file: LogFile = LogFile.fromFullPath(
        path,
        rotateLength=ROTATE_LENGTH,
        maxRotatedFiles=MAX_ROTATED_FILES,
        defaultMode=0o600,
    )
    return log_file


@implementer(ILogObserver)
class AuditLog:
    """
    Turns the server's log events into audit records and hands them to
    C{write} (an L{ILogObserver}; by default JSON lines to C{out}).

    @param out: a file (such as L{open_audit_file}'s) that the records are
        written to as JSON lines, when C{write} is not given.
    @param engine: the server, for push-outs (optional).
    @param publisher: the log publisher to observe.
    """

    def __init__(
        self,
        out: Any = None,
        *,
        engine: ServerEngine | None = None,
        publisher: LogPublisher = globalLogPublisher,
        write: Callable[[LogEvent], None] | None = None,
    ):
        if write is None:
            if out is None:
                raise TypeError("AuditLog needs out or write")
            write = jsonFileLogObserver(out, recordSeparator="")
        self.out = out
        self.engine = engine
        self.publisher = publisher
        self.write = write
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self.publisher.addObserver(self)
        if self.engine is not None:
            um = self.engine.user_manager
            self._unsubscribe = um.device_being_pushed_out.subscribe(self._pushed_out)

    def stop(self) -> None:
        self.publisher.removeObserver(self)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        close = getattr(self.out, "close", None)
        if close is not None:
            close()

    # -- records -------------------------------------------------------------------

    def record(self, audit: str, log_format: str, **fields: Any) -> None:
        """
        Write one audit record of kind C{audit}.
        """
        event = {k: _plain(v) for k, v in fields.items()}
        event.update(
            audit=audit,
            log_format=log_format,
            log_namespace="esf.audit",
            log_level=LogLevel.info,
            log_time=fields.get("log_time") or self._now(),
        )
        self.write(event)

    def _now(self) -> float:
        return self.engine.clock.seconds() if self.engine is not None else time.time()

    def __call__(self, event: LogEvent) -> None:
        name = event.get("esf_event")
        if name is None or name not in WATCHED.get(event.get("log_namespace", ""), ()):
            return
        when = event.get("log_time")
        if name == "logged_on":
            # One event may record several logons (esf._logon.LogonRecord).
            for user_id, client_type, address, at in event.get("logons", ()):
                self.record(
                    "logon",
                    "logon: {user_id}/{client_type} from {address}",
                    log_time=at,
                    user_id=user_id,
                    client_type=client_type,
                    address=address,
                )
        elif name == "session_ended":
            refusal = logon_refusal(event)
            if refusal is not None:
                self.record(
                    "logon_refused",
                    "logon refused: {user_id}/{client_type} from {address}: {result}: {cause}",
                    log_time=when,
                    user_id=event.get("user_id"),
                    client_type=event.get("client_type"),
                    address=event.get("address"),
                    result=refusal[0],
                    cause=refusal[1],
                )
        elif name == "kick_out":
            self.record(
                "kick",
                "kick: {operator} ({origin}) kicked {user_id}/{client_type} "
                "({count} devices): {reason}",
                log_time=when,
                operator=event.get("operator"),
                origin=kick_origin(event),
                user_id=event.get("user_id"),
                client_type=event.get("client_type"),
                count=event.get("count"),
                reason=event.get("reason"),
            )
        elif name == "kick_refused":
            self.record(
                "kick_refused",
                "kick refused: {operator} ({origin}) may not kick {user_id}: {reason}",
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
                log_time=when,
                peer=event.get("peer"),
                method=event.get("method"),
                path=event.get("path"),
            )

    def _pushed_out(self, user_data: UserData, new_address: str) -> None:
        self.record(
            "push_out",
            "push-out: {user_id}/{client_type} from {address} replaced by a logon from "
            "{new_address}",
            user_id=user_data.user_id,
            client_type=user_data.client_type,
            address=user_data.address,
            new_address=new_address,
        )


class AuditService(Service):
    """
    Writes C{engine}'s audit log to C{path} while running.
    """

    def __init__(self, engine: ServerEngine, path: str):
        self.engine = engine
        self.path = path
        self.audit: AuditLog | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service has no annotations
        self.audit = AuditLog(open_audit_file(self.path), engine=self.engine)
        self.audit.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.audit is not None:
            self.audit.stop()
            self.audit = None


def check_audit_path(path: str) -> None:
    """
    @raise ValueError: C{path} cannot be an audit file (its directory is
        missing or not writable, or it is a directory).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory")
    if not os.path.isdir(directory):
        raise ValueError(f"the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"the directory {directory} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{path} is not writable")
