"""
The calls a client makes (ESFramework's C{RapidPassiveEngine} API): each
sends one request and waits for its answer in one L{PendingRequests} table.

An answer counts only from the party asked: the server answers for itself
and for users it cannot reach (C{USER_OFFLINE}, ...); a user's client
answers only what was asked of that user (of that device, when a device
was named).  A Response, Error, Ack or PingAck from anyone else that
happens to carry a waiting MessageID is dropped and counted, and the call
goes on waiting.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from esf.wire import _messages as m
from ._state import NotConnected
from ._state import ClientCount
from esf.wire._frames import DEVICE_MARK, SERVER_ID, ClientType, ErrorCode, Frame, MessageType
from esf.wire._frames import WireConfig, as_client_type, device_address, encode_frame

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from ._engine import ClientProtocol
    from ._state import LogonResponse
    from esf.wire._pending import PendingRequests

__all__ = ["ClientCalls", "Party", "SERVER", "STORED"]

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

#: What a call that a receiver acknowledges fires with when the server
#: stored the message for a receiver who is offline.
STORED = "stored"


def _delivery(answer: Frame, dest: str) -> str | None:
    """
    C{None} for an Ack from the receiver (or from the server for a message
    to the server itself), L{STORED} for an Ack the server sent for a user
    who is offline: stored, not yet delivered.
    """
    if answer.user_id == SERVER_ID and dest not in ("", SERVER_ID):
        return STORED
    return None

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


class ClientCalls:
    """
    The request/answer half of L{esf.ClientEngine}: the public calls and the
    table of their outstanding requests.

    Its host (the engine) provides C{clock}, C{wire}, C{user_id},
    C{client_type}, C{logon_response}, C{logged_on}, C{counters},
    C{_protocol} (the current L{ClientProtocol}, or C{None}),
    C{_drain_waiters} (a list) and C{_pending} (a L{PendingRequests}).
    """

    if TYPE_CHECKING:
        # What the host provides, declared for type checkers only.
        clock: IReactorTime
        wire: WireConfig
        user_id: str
        client_type: int
        logon_response: LogonResponse | None
        counters: collections.Counter[str]
        _protocol: ClientProtocol | None
        _drain_waiters: list[Deferred[None]]
        _pending: PendingRequests
        _blob_ids: itertools.count[int]

        @property
        def logged_on(self) -> bool: ...

    # -- output and flow control ------------------------------------------------

    def _write(
        self,
        message_type: int,
        body: bytes = b"",
        *,
        message_id: int = 0,
        dest: str = SERVER_ID,
    ) -> None:
        protocol = self._protocol
        if protocol is None or not self.logged_on:
            raise NotConnected("not logged on")
        protocol.write(
            encode_frame(
                self.wire,
                message_type,
                body,
                client_type=self.client_type,
                message_id=message_id,
                user_id=self.user_id,
                dest_user_id=dest,
            )
        )

    @property
    def channel_is_busy(self) -> bool:
        """
        Whether the connection's unsent output is above the transport's
        buffer threshold; L{wait_for_drain} fires when it no longer is.
        """
        return self._protocol is not None and self._protocol.paused

    def wait_for_drain(self) -> Deferred[None]:
        """
        A Deferred that fires once the channel is not busy.
        """
        if not self.channel_is_busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def _drained(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    # -- requests and answers ---------------------------------------------------

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
            self._write(message_type, body, message_id=message_id, dest=dest)
        except ValueError as e:
            d.cancel()
            d.addErrback(lambda _: None)
            return fail(m.RequestError(ErrorCode.TOO_LARGE, str(e)))
        return d.addCallback(raise_error)

    def _take_answer(self, frame: Frame) -> None:
        """
        Hand an answer to the request it answers, if its sender is whom
        that request asked.
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

    # -- framework calls -----------------------------------------------------------

    def ping(self, timeout: float | None = None) -> Deferred[float]:
        """
        Round-trip time to the server, in seconds.
        """
        start = self.clock.seconds()
        d = self._request(MessageType.PING_BY_SERVER, timeout=timeout)
        return d.addCallback(lambda _: self.clock.seconds() - start)

    def ping_by_server(self, user_id: str, timeout: float | None = None) -> Deferred[float]:
        """
        Round-trip time to another user's client, through the server.
        """
        start = self.clock.seconds()
        d = self._request(MessageType.PING_BY_SERVER, dest=user_id, timeout=timeout)
        return d.addCallback(lambda _: self.clock.seconds() - start)

    def get_my_ipe(self) -> Deferred[str]:
        """
        This client's address as the server sees it, C{"host:port"}.
        """
        d = self._request(MessageType.GET_MY_IPE)
        return d.addCallback(lambda f: m.GetMyIPEReply.decode(f.body).address)

    async def _all_online_users(self) -> list[str]:
        users: list[str] = []
        while True:
            frame = await self._request(
                MessageType.GET_ALL_ONLINE_USERS, m.GetAllOnlineUsers(len(users), 0).encode()
            )
            page = m.GetAllOnlineUsersReply.decode(frame.body)
            users.extend(page.user_ids)
            if not page.user_ids or len(users) >= page.total:
                return users

    def get_all_online_users(self) -> Deferred[list[str]]:
        """
        Every online user's ID, sorted (as many requests as it takes).
        """
        return Deferred.fromCoroutine(self._all_online_users())

    def is_user_online(self, user_id: str) -> Deferred[bool]:
        """
        Whether C{user_id} is online.
        """
        d = self._request(MessageType.QUERY_ONLINE, dest=user_id)
        return d.addCallback(lambda f: m.QueryOnlineReply.decode(f.body).online)

    def query_onlines(self, user_ids: Iterable[str]) -> Deferred[dict[str, bool]]:
        """
        C{{user_id: online}} for several users at once.
        """
        user_ids = list(user_ids)
        d = self._request(MessageType.QUERY_ONLINES, m.QueryOnlines(user_ids).encode())
        return d.addCallback(
            lambda f: dict(zip(user_ids, m.QueryOnlinesReply.decode(f.body).online))
        )

    def get_my_devices(self) -> Deferred[list[ClientType | int]]:
        """
        The L{ClientType}s of this user's devices online now, this one
        included.
        """
        d = self._request(MessageType.GET_MY_DEVICES)
        return d.addCallback(
            lambda f: [as_client_type(k) for k in m.GetMyDevicesReply.decode(f.body).client_types]
        )

    def kick_out(self, user_id: str, reason: str = "") -> Deferred[None]:
        """
        Ask the server to kick C{user_id}; fails with L{esf.RequestError}
        (C{NOT_AUTHORIZED}) when the server refuses.
        """
        d = self._request(MessageType.KICK_OUT, m.KickOut(reason).encode(), dest=user_id)

        def answered(frame: Frame) -> None:
            reply = m.KickOutReply.decode(frame.body)
            if not reply.ok:
                raise m.RequestError(ErrorCode.NOT_AUTHORIZED, reply.cause)

        return d.addCallback(answered)

    # -- application messages ----------------------------------------------------------

    def send(
        self, user_id: str, information_type: int, payload: bytes = b"", client_type: int | None = None
    ) -> None:
        """
        Send a one-way message to a user (every device, or C{client_type})
        or to the server (C{"_0"}).

        @raise NotConnected: not logged on.
        """
        self._write(
            MessageType.SEND,
            m.Information(information_type, payload).encode(),
            dest=device_address(user_id, client_type),
        )

    def query(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        timeout: float | None = None,
        client_type: int | None = None,
    ) -> Deferred[bytes]:
        """
        Ask a user's client (or the server, C{"_0"}) and get its answer's
        payload; remote errors fail with L{esf.RequestError}.
        """
        d = self._request(
            MessageType.REQUEST,
            m.Information(information_type, payload).encode(),
            dest=device_address(user_id, client_type),
            timeout=timeout,
        )
        return d.addCallback(lambda f: m.Information.decode(f.body).payload)

    def send_certainly(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        timeout: float | None = None,
        client_type: int | None = None,
    ) -> Deferred[str | None]:
        """
        Send a message that the receiver acknowledges once its handler has
        run; fires then, with C{None}.  When the receiver is offline and the
        server keeps the message for it, fires with L{esf.STORED} instead,
        once the server has stored it.
        """
        d = self._request(
            MessageType.SEND_CERTAINLY,
            m.Information(information_type, payload).encode(),
            dest=device_address(user_id, client_type),
            timeout=timeout,
        )
        return d.addCallback(_delivery, device_address(user_id, client_type))

    def send_blob(
        self,
        user_id: str,
        information_type: int,
        payload: bytes,
        fragment_size: int | None = None,
        timeout: float | None = None,
    ) -> Deferred[str | None]:
        """
        Send a payload of any size (up to the receiver's blob bound) in
        fragments; fires when the receiver has acknowledged the last one
        (with C{None}), or when the server has stored the blob for a
        receiver who is offline (with L{esf.STORED}).  Fragments are written
        only while the channel is not busy.
        """
        return Deferred.fromCoroutine(
            self._send_blob(user_id, information_type, payload, fragment_size, timeout)
        )

    async def _send_blob(
        self,
        user_id: str,
        information_type: int,
        payload: bytes,
        fragment_size: int | None,
        timeout: float | None,
    ) -> str | None:
        limit = self.logon_response.max_message_size if self.logon_response else 1 << 20
        size = fragment_size or (min(limit, self.wire.max_message_size) - self.wire.header_length - 13)
        fragments = m.fragment_blob(information_type, next(self._blob_ids), payload, size)
        for fragment in fragments[:-1]:
            await self.wait_for_drain()
            self._write(MessageType.BLOB, fragment.encode(), dest=user_id)
        await self.wait_for_drain()
        answer = await self._request(
            MessageType.BLOB, fragments[-1].encode(), dest=user_id, timeout=timeout
        )
        return _delivery(answer, user_id)

    def broadcast(
        self, group_id: str, information_type: int, payload: bytes = b"", timeout: float | None = None
    ) -> Deferred[None]:
        """
        Broadcast to a group's online members (or C{"*"}); fires once the
        server has fanned it out.
        """
        d = self._request(
            MessageType.BROADCAST,
            m.Information(information_type, payload).encode(),
            dest=group_id,
            timeout=timeout,
        )
        return d.addCallback(lambda _: None)
