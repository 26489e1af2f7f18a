"""
A client's output and the table of its outstanding requests: each request
waits for its answer in one L{PendingRequests} table.

An answer counts only from the party asked: the server answers for itself
and for users it cannot reach (C{USER_OFFLINE}, ...); a user's client
answers only what was asked of that user (of that device, when a device
was named).  A Response, Error, Ack or PingAck from anyone else that
happens to carry a waiting MessageID is dropped and counted, and the call
goes on waiting.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from esf.wire import _messages as m
from esf.wire._frames import (
    DEVICE_MARK,
    SERVER_ID,
    DisconnectedType,
    ErrorCode,
    Frame,
    MessageType,
    WireConfig,
    encode_frame,
)

from ._state import ClientCount, Ending, EndingKind, LogonResponse, NotConnected

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from esf.wire._pending import PendingRequests

    from ._connection import ClientProtocol

__all__ = ["ANSWER_TYPES", "SERVER", "ClientRequests", "Party", "raise_error"]

log = Logger(namespace="esf.client")


@attrs.frozen
class Party:
    """
    Whom a request asked: the server, a user (any of its devices) or one
    device of a user.
    """

    user_id: str
    client_type: int | None = None

    @classmethod
    def of(cls, dest: str) -> Party:
        """
        The party a DestUserID names (C{"_0"} or C{""}: the server;
        C{"bob#5"}: bob's device kind 5).
        """
        if dest in ("", SERVER_ID):
            return SERVER
        user_id, mark, kind = dest.rpartition(DEVICE_MARK)
        if mark and user_id and kind.isascii() and kind.isdigit():
            return cls(user_id, int(kind))
        return cls(dest)

    def answered_by(self, frame: Frame) -> bool:
        """
        Whether C{frame} may answer a request to this party: the server may
        always (it answers for users it cannot reach), a user only for
        itself.
        """
        if frame.user_id == SERVER_ID:
            return True
        return frame.user_id == self.user_id and (
            self.client_type is None or frame.client_type == self.client_type
        )


SERVER = Party(SERVER_ID)

#: Requests the server relays to the party named by DestUserID, who answers;
#: the server answers every other request itself.
_RELAYED = frozenset(
    {
        MessageType.REQUEST,
        MessageType.SEND_CERTAINLY,
        MessageType.BLOB,
        MessageType.PING_BY_SERVER,
    }
)

#: Message types that answer this client's own requests, by MessageID.
ANSWER_TYPES = frozenset(
    {
        MessageType.LOGON,
        MessageType.GET_MY_IPE,
        MessageType.PING_ACK,
        MessageType.KICK_OUT,
        MessageType.GET_ALL_ONLINE_USERS,
        MessageType.QUERY_ONLINE,
        MessageType.QUERY_ONLINES,
        MessageType.GET_MY_DEVICES,
        MessageType.ERROR,
        MessageType.RESPONSE,
        MessageType.ACK,
    }
)


def raise_error(frame: Frame) -> Frame:
    """
    Turn an Error answer into a L{esf.RequestError}.
    """
    if frame.message_type == MessageType.ERROR:
        error = m.Error.decode(frame.body)
        raise m.RequestError(error.code, error.text)
    return frame


class ClientRequests:
    """
    The output half of L{esf.ClientEngine}: writing to the current
    connection, its flow control, and the table of outstanding requests.

    Its host (the engine) provides C{wire}, C{user_id}, C{client_type},
    C{logged_on}, C{counters}, C{clock}, C{request_timeout},
    C{max_output_buffer}, C{_protocol} (the
    current L{ClientProtocol}, or C{None}), C{_drain_waiters} (a list) and
    C{_pending} (a L{PendingRequests}).

    The answers the client writes on its own (C{answer=True}: Acks, Errors,
    query answers) are bounded: a connection to which more than
    C{max_output_buffer} bytes of them were written while the transport held
    its output unsent (the server reads nothing) is closed as broken, as the
    server closes a client that does not read (C{CHANNEL_CACHE_OVERFLOW});
    the engine then reconnects.  What the application sends is not counted:
    it paces itself with C{channel_is_busy} and L{wait_for_drain}.
    """

    if TYPE_CHECKING:
        # What the host provides, declared for type checkers only.
        clock: IReactorTime
        request_timeout: float
        max_output_buffer: int
        wire: WireConfig
        user_id: str
        client_type: int
        counters: collections.Counter[str]
        _protocol: ClientProtocol | None
        _drain_waiters: list[Deferred[None]]
        _pending: PendingRequests

        @property
        def logged_on(self) -> bool: ...

    def write_message(
        self,
        message_type: int,
        body: bytes = b"",
        *,
        message_id: int = 0,
        dest: str = SERVER_ID,
        answer: bool = False,
    ) -> None:
        """
        Write one message from this client to the logged-on connection,
        waiting for nothing (the engine's parts answer and acknowledge
        with it); C{answer}: one the client writes on its own, to a message
        from the server, which counts towards C{max_output_buffer} while the
        server reads nothing.

        @raise NotConnected: not logged on.
        @raise ValueError: the body does not fit in a frame.
        """
        protocol = self._protocol
        if protocol is None or not self.logged_on:
            raise NotConnected("not logged on")
        if protocol.broken is not None:
            raise NotConnected(f"the connection is closing: {protocol.broken}")
        data = self._encode(message_type, body, message_id, dest)
        protocol.write(data)
        if answer and protocol.paused:
            protocol.answers_while_busy += len(data)
            if protocol.answers_while_busy > self.max_output_buffer:
                self._backed_up(protocol)

    def _backed_up(self, protocol: ClientProtocol) -> None:
        """
        The server has not read what this client wrote, past the bound:
        close the connection as broken (its waiting calls fail, the
        C{disconnected} event says why, and the engine reconnects).
        """
        why = (
            f"the server read nothing while this client answered it with "
            f"{protocol.answers_while_busy} bytes (max_output_buffer is {self.max_output_buffer})"
        )
        self.counters[ClientCount.OUTPUT_OVERFLOWS] += 1
        log.warn("closing the connection: {why}", why=why)
        if protocol.ending is None:
            protocol.ending = Ending(
                EndingKind.DISCONNECTED, DisconnectedType.CHANNEL_CACHE_OVERFLOW, why
            )
        protocol.give_up(why)

    def _encode(self, message_type: int, body: bytes, message_id: int, dest: str) -> bytes:
        return encode_frame(
            self.wire,
            message_type,
            body,
            client_type=self.client_type,
            message_id=message_id,
            user_id=self.user_id,
            dest_user_id=dest,
        )

    @property
    def channel_is_busy(self) -> bool:
        """
        Whether the connection's unsent output is above the transport's
        buffer threshold; L{wait_for_drain} fires when it no longer is.
        """
        return self._protocol is not None and self._protocol.paused

    def wait_for_drain(self, *, timeout: float | None = None) -> Deferred[None]:
        """
        A Deferred that fires once the channel is not busy; fails with
        L{esf.RequestError} (C{TIMEOUT}) if it is still busy after
        C{timeout} seconds (by default the engine's C{request_timeout}),
        and with L{NotConnected} if the connection is lost first.
        """
        if not self.channel_is_busy:
            return succeed(None)
        seconds = self.request_timeout if timeout is None else timeout

        def forget(d: Deferred[None]) -> None:
            if d in self._drain_waiters:
                self._drain_waiters.remove(d)

        def timed_out(result: object, timeout: float) -> None:
            raise m.RequestError(
                ErrorCode.TIMEOUT,
                f"the channel stayed busy for {timeout:g} s: the server reads nothing",
            )

        d: Deferred[None] = Deferred(forget)
        self._drain_waiters.append(d)
        return d.addTimeout(seconds, self.clock, onTimeoutCancel=timed_out)

    def drained(self) -> None:
        """
        The connection's output went below its threshold: whoever waits
        for the drain goes on.
        """
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    def _fail_waiting(self, why: str) -> None:
        """
        The connection is gone: every request and drain waiting on it fails
        with L{NotConnected}C{(why)}.
        """
        self._pending.fail_all(NotConnected(why))
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.errback(NotConnected(why))

    def _request(
        self,
        message_type: int,
        body: bytes = b"",
        dest: str = SERVER_ID,
        timeout: float | None = None,
    ) -> Deferred[Frame]:
        """
        Send a request; fire with the answer's frame, fail with
        L{esf.RequestError} on an Error answer or a timeout, or with
        L{NotConnected}.
        """
        if not self.logged_on:
            return fail(NotConnected("not logged on"))
        asked = Party.of(dest) if message_type in _RELAYED else SERVER
        message_id = self._pending.next_id()
        d = self._pending.expect(message_id, asked, timeout)
        try:
            self.write_message(message_type, body, message_id=message_id, dest=dest)
        except (ValueError, NotConnected) as e:
            d.cancel()
            d.addErrback(lambda _: None)
            if isinstance(e, NotConnected):
                return fail(e)
            return fail(m.RequestError(ErrorCode.TOO_LARGE, str(e)))
        return d.addCallback(raise_error)

    def _request_logon(
        self, protocol: ClientProtocol, body: bytes, timeout: float
    ) -> Deferred[LogonResponse]:
        """
        Send a Logon on C{protocol}, a connection not logged on yet; fire
        with the server's reply, read, or fail as L{_request} does.
        """
        message_id = self._pending.next_id()
        answer = self._pending.expect(message_id, SERVER, timeout)
        protocol.write(self._encode(MessageType.LOGON, body, message_id, SERVER_ID))
        return answer.addCallback(raise_error).addCallback(_logon_response)

    def take_answer(self, frame: Frame) -> None:
        """
        Hand an answer to the request it answers, if its sender is whom
        that request asked; count and drop it otherwise.
        """
        asked = self._pending.asked(frame.message_id)
        if asked is None:
            self.counters[ClientCount.UNEXPECTED_ANSWERS] += 1
            # Text fields only, here and in every client log event: an
            # event may be kept (Twisted keeps the last 200 of a process
            # that has not begun logging; an application's observer may
            # keep more), and a frame in it would keep up to a whole
            # message of someone else's bytes alive.
            log.debug(
                "dropped an answer nobody waits for: message type {message_type}, "
                "request {message_id} from {sender}#{client_type}",
                message_type=frame.message_type,
                message_id=frame.message_id,
                sender=frame.user_id,
                client_type=frame.client_type,
            )
        elif not asked.answered_by(frame):
            self.counters[ClientCount.FORGED_ANSWERS] += 1
            log.debug(
                "dropped an answer to request {message_id} from {sender}#{client_type}, "
                "who was not asked ({asked})",
                message_id=frame.message_id,
                sender=frame.user_id,
                client_type=frame.client_type,
                asked=asked,
            )
        else:
            self._pending.answer(frame.message_id, asked, frame)


def _logon_response(frame: Frame) -> LogonResponse:
    reply = m.LogonReply.decode(frame.body)
    return LogonResponse(
        reply.result,
        reply.failure_cause,
        reply.heartbeat_interval,
        reply.heartbeat_timeout,
        reply.max_message_size,
    )
