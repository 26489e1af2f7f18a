"""
The calls a client makes (ESFramework's C{RapidPassiveEngine} API): each
sends one request through L{esf.client._requests} and reads its answer.

C{client_type} and C{timeout} are keyword-only wherever a call takes them,
as on L{esf.ServerEngine.query}.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from esf.wire import _messages as m
from esf.wire._frames import (
    SERVER_ID,
    ClientType,
    ErrorCode,
    Frame,
    MessageType,
    as_client_type,
    device_address,
)

from ._requests import ClientRequests

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from ._state import LogonResponse

__all__ = ["MAX_ONLINE_USERS", "ClientCalls", "STORED"]

#: How many user IDs C{get_all_online_users} gathers at most, by default.
MAX_ONLINE_USERS = 100_000

_U32_MAX = 0xFFFFFFFF

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


class ClientCalls(ClientRequests):
    """
    The public calls of L{esf.ClientEngine}, each one request and the
    reading of its answer.

    Its host (the engine) provides, besides what L{ClientRequests} needs,
    C{clock}, C{logon_response} and C{_blob_ids} (the source of blob IDs).
    """

    if TYPE_CHECKING:
        # What the host provides, declared for type checkers only.
        clock: IReactorTime
        logon_response: LogonResponse | None
        _blob_ids: itertools.count[int]

    # -- framework calls -----------------------------------------------------------

    def ping(self, *, timeout: float | None = None) -> Deferred[float]:
        """
        Round-trip time to the server, in seconds.
        """
        return self._round_trip(SERVER_ID, timeout)

    def ping_by_server(self, user_id: str, *, timeout: float | None = None) -> Deferred[float]:
        """
        Round-trip time to another user's client, through the server.
        """
        return self._round_trip(user_id, timeout)

    def _round_trip(self, dest: str, timeout: float | None) -> Deferred[float]:
        start = self.clock.seconds()
        d = self._request(MessageType.PING_BY_SERVER, dest=dest, timeout=timeout)
        return d.addCallback(lambda _: self.clock.seconds() - start)

    def get_my_ipe(self) -> Deferred[str]:
        """
        This client's address as the server sees it, C{"host:port"}.
        """
        d = self._request(MessageType.GET_MY_IPE)
        return d.addCallback(lambda f: m.GetMyIPEReply.decode(f.body).address)

    async def _all_online_users(self, limit: int) -> list[str]:
        # The server's total is a claim, not a bound: pages are asked for
        # only while each brings an ID not seen yet, and at most limit IDs
        # are kept (so at most limit requests are made).
        users: set[str] = set()
        offset = 0
        while len(users) < limit:
            request = m.GetAllOnlineUsers(offset, limit - len(users))
            frame = await self._request(MessageType.GET_ALL_ONLINE_USERS, request.encode())
            page = m.GetAllOnlineUsersReply.decode(frame.body)
            offset += len(page.user_ids)
            before = len(users)
            users.update(page.user_ids[: limit - before])
            if len(users) == before or offset >= min(page.total, _U32_MAX):
                break
        return sorted(users)

    def get_all_online_users(self, *, limit: int = MAX_ONLINE_USERS) -> Deferred[list[str]]:
        """
        Every online user's ID, sorted, at most C{limit} of them (as many
        requests as it takes).  An ID the server sends again is kept once;
        a page that brings no new ID ends the list, whatever total the
        server announced.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        return Deferred.fromCoroutine(self._all_online_users(min(limit, _U32_MAX)))

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
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        client_type: int | None = None,
    ) -> None:
        """
        Send a one-way message to a user (every device, or C{client_type})
        or to the server (C{"_0"}).

        @raise NotConnected: not logged on.
        """
        self.write_message(
            MessageType.SEND,
            m.Information(information_type, payload).encode(),
            dest=device_address(user_id, client_type),
        )

    def _inform(
        self,
        message_type: int,
        dest: str,
        information_type: int,
        payload: bytes,
        timeout: float | None,
    ) -> Deferred[Frame]:
        """
        The shape of Request, SendCertainly and Broadcast: an Information
        body to C{dest}, and the answer's frame.
        """
        body = m.Information(information_type, payload).encode()
        return self._request(message_type, body, dest=dest, timeout=timeout)

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
        Ask a user's client (any device, or C{client_type}; or the server,
        C{"_0"}) and get its answer's payload; remote errors fail with
        L{esf.RequestError}, and no answer within C{timeout} (by default
        the engine's C{request_timeout}) with its C{TIMEOUT}.
        """
        dest = device_address(user_id, client_type)
        d = self._inform(MessageType.REQUEST, dest, information_type, payload, timeout)
        return d.addCallback(lambda f: m.Information.decode(f.body).payload)

    def send_certainly(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        *,
        client_type: int | None = None,
        timeout: float | None = None,
    ) -> Deferred[str | None]:
        """
        Send a message that the receiver acknowledges once its handler has
        run; fires then, with C{None}.  When the receiver is offline and the
        server keeps the message for it, fires with L{esf.STORED} instead,
        once the server has stored it.
        """
        dest = device_address(user_id, client_type)
        d = self._inform(MessageType.SEND_CERTAINLY, dest, information_type, payload, timeout)
        return d.addCallback(_delivery, dest)

    def send_blob(
        self,
        user_id: str,
        information_type: int,
        payload: bytes,
        fragment_size: int | None = None,
        *,
        timeout: float | None = None,
    ) -> Deferred[str | None]:
        """
        Send a payload of any size (up to the receiver's blob bound) in
        fragments; fires when the receiver has acknowledged the last one
        (with C{None}), or when the server has stored the blob for a
        receiver who is offline (with L{esf.STORED}).  Fragments are written
        only while the channel is not busy; C{timeout} (by default the
        engine's C{request_timeout}) bounds the wait for the answer and
        each wait for the drain, which fails the call with C{TIMEOUT}.
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
        size = fragment_size or (
            min(limit, self.wire.max_message_size) - self.wire.header_length - 13
        )
        fragments = m.fragment_blob(information_type, next(self._blob_ids), payload, size)
        for fragment in fragments[:-1]:
            await self.wait_for_drain(timeout=timeout)
            self.write_message(MessageType.BLOB, fragment.encode(), dest=user_id)
        await self.wait_for_drain(timeout=timeout)
        answer = await self._request(
            MessageType.BLOB, fragments[-1].encode(), dest=user_id, timeout=timeout
        )
        return _delivery(answer, user_id)

    def broadcast(
        self,
        group_id: str,
        information_type: int,
        payload: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> Deferred[None]:
        """
        Broadcast to a group's online members (or C{"*"}); fires once the
        server has fanned it out.
        """
        d = self._inform(MessageType.BROADCAST, group_id, information_type, payload, timeout)
        return d.addCallback(lambda _: None)
