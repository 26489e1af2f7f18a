"""
The router: which devices a DestUserID names.
"""

from __future__ import annotations

from typing import Any, Sequence

from ._policy import RESERVED_IDS
from ._wire import DEVICE_MARK
from .interfaces import IPresence

__all__ = ["Router"]


class Router:
    """
    Resolves destinations against an L{IPresence}: C{"alice"} is every
    device of user alice, C{"alice#5"} her device kind 5.
    """

    def __init__(self, presence: IPresence):
        self.presence = presence
        self._devices = presence.devices

    def resolve(self, dest: str) -> Sequence[Any] | None:
        """
        The device handles C{dest} names: empty when nobody is there, C{None}
        when C{dest} is not a user's address (the server, C{"*"}, a bad
        device mark).
        """
        devices = self._devices(dest)
        if devices:  # the relay's common case: a plain user ID, online
            return devices
        if dest in RESERVED_IDS:
            return None
        user_id, mark, kind = dest.rpartition(DEVICE_MARK)
        if not mark:
            return ()  # a user, offline
        if not (user_id and kind.isascii() and kind.isdigit()):
            return None
        handle = self.presence.get(user_id, int(kind))
        return (handle,) if handle is not None else ()
