"""
What an application asks of the server engine: kick a user out, send a
user a message, ask one of its devices a question
(L{ServerApplicationAPI}, a base of L{esf.server._engine.ServerEngine}).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from esf.wire import _messages as m
from esf.wire._events import Event
from esf.wire._frames import SERVER_ID, ErrorCode, MessageType, device_address, encode_frame

from ._counters import Count

if TYPE_CHECKING:
    from esf.wire._pending import PendingRequests

    from ._config import ServerConfig
    from ._logon import Logons
    from ._router import Router

__all__ = ["ServerApplicationAPI"]

log = Logger(namespace="esf.server")


class ServerApplicationAPI:
    """
    The application-facing calls of the engine (C{kick_out}, C{send},
    C{query}); the engine provides the parts they use.
    """

    config: ServerConfig
    counters: collections.Counter[str]
    router: Router
    logons: Logons
    pending: PendingRequests
    transmit_failed: Event

    def _devices(self, user_id: str, client_type: int | None) -> Any:
        return self.router.resolve(device_address(user_id, client_type)) or ()

    def kick_out(
        self,
        user_id: str,
        reason: str = "",
        client_type: int | None = None,
        *,
        operator: str = SERVER_ID,
        origin: str = "server_api",
    ) -> int:
        """
        Kick C{user_id} off (one device, or every device when
        C{client_type} is C{None}): each gets C{BeingKickedOutNotify} with
        the operator and reason, then its connection is closed.  The user
        manager's C{device_kicked_out} fires for each, on the device's node.

        @param origin: where the kick comes from, for the log and the audit
            (C{"server_api"}, C{"client"}, C{"admin_api"}).

        @return: how many devices were kicked.
        """
        targets = tuple(self._devices(user_id, client_type))
        self.logons.record.flush_for(operator, user_id)  # their logons are logged first
        log.info(
            "kick: {operator} kicks {user_id} ({count} devices): {reason}",
            esf_event="kick_out",
            operator=operator,
            user_id=user_id,
            client_type=client_type,
            count=len(targets),
            reason=reason,
            origin=origin,
        )
        text = f"kicked by {operator}: {reason}"
        for target in targets:
            target.kick_out(operator, reason, text)
        return len(targets)

    def send(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        client_type: int | None = None,
    ) -> int:
        """
        Send C{user_id} a one-way application message (Send, 202) from the
        server: to every device, or to C{client_type} only.

        @return: how many devices it was written to (0: not online).
        """
        targets = self._devices(user_id, client_type)
        body = m.Information(information_type, payload).encode()
        if not targets:
            dest = device_address(user_id, client_type)
            self.counters[Count.TRANSMIT_FAILED] += 1
            self.transmit_failed.fire(
                SERVER_ID,
                dest,
                MessageType.SEND,
                encode_frame(
                    self.config.wire, MessageType.SEND, body, user_id=SERVER_ID, dest_user_id=dest
                ),
            )
            return 0
        for target in targets:
            target.notify(MessageType.SEND, body)
        return len(targets)

    def query(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        *,
        client_type: int | None = None,
        timeout: float | None = None,
    ) -> Deferred[bytes]:
        """
        Ask one device of C{user_id} (C{client_type}, or the first that
        logged on) a Request (203); its client's handler answers.

        @return: a Deferred firing with the answer's payload, or failing with
            L{esf.RequestError}: C{USER_OFFLINE}, C{TIMEOUT} (after
            C{timeout}, by default the configured query timeout), the
            client's own error, or C{USER_OFFLINE} again when the session
            ends first.
        """
        targets = self._devices(user_id, client_type)
        if not targets:
            return fail(m.RequestError(ErrorCode.USER_OFFLINE, f"{user_id} is not online"))
        target = targets[0]
        message_id = self.pending.next_id()
        d = self.pending.expect(message_id, target, timeout)
        body = m.Information(information_type, payload).encode()
        target.ask(message_id, body, self.config.query_timeout if timeout is None else timeout)
        return d
