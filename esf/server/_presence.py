"""
Presence: which devices are logged on, and the user manager applications
read and subscribe to.

L{LocalPresence} is the in-process L{IPresence}: this node's own sessions.
Its claim and release answer at once (with fired Deferreds), so a
single-node server never waits on them; a registry shared by several nodes
keeps the same contract with real round trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from sortedcontainers import SortedList  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from esf.interfaces import IPresence, IUserManager
from esf.wire._events import Event
from esf.wire._frames import ClientType, as_client_type

from ._config import RelogonMode, ServerConfig, UserData

__all__ = ["Claim", "LocalPresence", "UserManager"]


@attrs.frozen
class Claim:
    """
    What L{IPresence.claim} found: whether the claimant holds the device
    now, and the holder it found there (C{None} if none).
    """

    won: bool
    previous: Any = None


@implementer(IPresence)
class LocalPresence:
    """
    The in-process registry: this node's own sessions.
    """

    def __init__(self) -> None:
        # user ID -> that user's handles in logon order.  A tuple: the relay
        # reads it for every message and must not copy it, and a handle may
        # leave while a caller is still iterating over it.
        self._users: dict[str, tuple[Any, ...]] = {}
        # The same user IDs, sorted, so that a page of them costs its size.
        self._sorted: SortedList = SortedList()

    #: The in-process registry is always at hand.
    up = True

    def attach(self, engine: Any) -> None:
        pass  # nothing to take: the engine reads this node's own sessions

    def forward_answer(self, session: Any, frame: Any) -> bool:
        return False  # no other node asks through this one

    def kept_offline(self, user_id: str, client_type: int | None) -> None:
        pass  # its view is the truth: no device of the user is online

    def claim(self, handle: Any, replace: bool) -> Deferred[Claim]:
        user_id = handle.user_id
        devices = self._users.get(user_id, ())
        previous = None
        for holder in devices:
            if holder.client_type == handle.client_type:
                previous = holder
                break
        if previous is not None and not replace:
            return succeed(Claim(False, previous))
        if previous is not None:
            devices = tuple(h for h in devices if h is not previous)
        elif not devices:
            self._sorted.add(user_id)
        self._users[user_id] = devices + (handle,)
        return succeed(Claim(True, previous))

    def release(self, handle: Any) -> Deferred[bool]:
        user_id = handle.user_id
        devices = self._users.get(user_id, ())
        rest = tuple(h for h in devices if h.session_id != handle.session_id)
        if len(rest) == len(devices):
            return succeed(False)  # a newer holder, or gone already
        if rest:
            self._users[user_id] = rest
            return succeed(False)
        del self._users[user_id]
        self._sorted.remove(user_id)
        return succeed(True)

    def get(self, user_id: str, client_type: int) -> Any:
        for handle in self._users.get(user_id, ()):
            if handle.client_type == client_type:
                return handle
        return None

    def devices(self, user_id: str) -> Sequence[Any]:
        return self._users.get(user_id, ())

    def user_count(self) -> int:
        return len(self._users)

    def user_ids(self, offset: int = 0, limit: int | None = None) -> list[str]:
        stop = None if limit is None else offset + limit
        return list(self._sorted.islice(offset, stop))


@implementer(IUserManager)
class UserManager:
    """
    The online users, read from an L{IPresence}, and the events applications
    subscribe to.
    """

    def __init__(self, presence: IPresence, config: ServerConfig):
        self.presence = presence
        self._config = config
        self.user_connected = Event("user_connected")
        self.user_disconnected = Event("user_disconnected")
        self.device_connected = Event("device_connected")
        self.device_disconnected = Event("device_disconnected")
        self.device_being_pushed_out = Event("device_being_pushed_out")
        self.device_kicked_out = Event("device_kicked_out")
        self.new_connection_ignored = Event("new_connection_ignored")
        self.user_count_changed = Event("user_count_changed")
        self.heartbeat_timed_out = Event("heartbeat_timed_out")

    @property
    def relogon_mode(self) -> RelogonMode:
        """
        The server's relogon mode (C{ServerConfig.relogon_mode}, fixed while
        it runs).
        """
        return self._config.relogon_mode

    @property
    def user_count(self) -> int:
        return self.presence.user_count()

    def is_user_online(self, user_id: str) -> bool:
        return bool(self.presence.devices(user_id))

    def get_user_data(self, user_id: str, client_type: int | None = None) -> UserData | None:
        if client_type is None:
            devices = self.presence.devices(user_id)
            return devices[0].user_data if devices else None
        handle = self.presence.get(user_id, client_type)
        return handle.user_data if handle is not None else None

    def get_online_user_list(self) -> list[str]:
        return self.presence.user_ids()

    def get_all_user_data(self) -> list[UserData]:
        return [
            handle.user_data
            for user_id in self.presence.user_ids()
            for handle in self.presence.devices(user_id)
        ]

    def get_all_login_devices(self, user_id: str) -> list[ClientType | int]:
        return [as_client_type(h.client_type) for h in self.presence.devices(user_id)]
