"""
The router: which devices a DestUserID names, and which device an answer
from a user goes to (L{AnswerRouter}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esf.interfaces import IPresence
from esf.wire._frames import DEVICE_MARK, MessageType

from ._policy import RESERVED_IDS

__all__ = ["Router", "AnswerRouter", "ANSWERS", "ANSWERED_BY", "is_request", "user_part"]


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


#: What answers each request a user may relay to another user (an Error
#: answers any of them).  A Blob is acknowledged when it carries a
#: MessageID; every fragment of one Blob carries the same one.
ANSWERED_BY = {
    MessageType.REQUEST: MessageType.RESPONSE,
    MessageType.SEND_CERTAINLY: MessageType.ACK,
    MessageType.PING_BY_SERVER: MessageType.PING_ACK,
    MessageType.BLOB: MessageType.ACK,
}

#: Message types that answer a request.
ANSWERS = frozenset(
    {MessageType.RESPONSE, MessageType.ACK, MessageType.PING_ACK, MessageType.ERROR}
)


def is_request(frame: Any) -> bool:
    """
    Whether C{frame}, relayed to a device, asks that device's user for an
    answer: a non-zero MessageID on anything but a Send (always one-way), a
    Broadcast (its sender's own node answers it, with an Ack once it is
    written to the members) or an answer.
    """
    message_type = frame.message_type
    return (
        bool(frame.message_id)
        and message_type != MessageType.SEND
        and message_type != MessageType.BROADCAST
        and message_type not in ANSWERS
    )


def user_part(dest: str) -> str:
    """
    The user a DestUserID names: C{"bob"} for C{"bob"} and C{"bob#5"}.
    """
    user_id, mark, _ = dest.rpartition(DEVICE_MARK)
    return user_id if mark else dest


class AnswerRouter:
    """
    Lets an answer through only when it answers a request relayed the other
    way, and to the device that asked.

    Each asking session keeps its own table, C{session.asked}:
    C{(MessageID, answerer user) -> (deadline, request type)}, in insertion
    order.  Entries live C{timeout} seconds (the query timeout, as long as a
    client waits); since every entry lives as long, insertion order is
    deadline order and expired entries are pruned from the front, which
    keeps the cost of each request constant.  A table holds at most
    C{limit} entries.
    """

    def __init__(self, router: Router, clock: Any, timeout: float, limit: int):
        self.router = router
        self.clock = clock
        self.timeout = timeout
        self.limit = limit

    def asked(self, asker: Any, frame: Any) -> bool:
        """
        C{asker} relayed the request C{frame} (with a MessageID) to
        C{frame.dest_user_id}; remember it.

        @return: C{False} when C{asker} already waits for C{limit} answers.
        """
        table = asker.asked
        if table is None:
            table = asker.asked = {}
        now = self.clock.seconds()
        while table:
            first = next(iter(table))
            if table[first][0] > now:
                break
            del table[first]
        key = (frame.message_id, user_part(frame.dest_user_id))
        if table.pop(key, None) is None and len(table) >= self.limit:
            return False
        table[key] = (now + self.timeout, frame.message_type)
        return True

    def forget(self, asker: Any, frame: Any) -> bool:
        """
        The request C{frame} that C{asker} relayed (L{asked}) was not
        delivered: no answer can come.  Whether it was waiting.
        """
        table = asker.asked
        if not table:
            return False
        return table.pop((frame.message_id, user_part(frame.dest_user_id)), None) is not None

    def answer(self, answerer: Any, frame: Any) -> Sequence[Any]:
        """
        Where C{frame}, an answer from C{answerer}, goes: the local device
        that asked (its entry is used up), or the devices on other nodes it
        is addressed to (their node checks it on arrival: L{accept}), or
        nowhere (empty): nobody asked.
        """
        key = (frame.message_id, answerer.user_id)
        remote = []
        for target in self.router.resolve(frame.dest_user_id) or ():
            table: Any = getattr(target, "asked", _REMOTE)
            if table is _REMOTE:
                remote.append(target)
            elif table and self._take(table, key, frame.message_type):
                return (target,)
        return remote

    def accept(self, asker: Any, frame: Any) -> bool:
        """
        Whether C{frame}, an answer relayed from another node, answers a
        request C{asker} (a local session) made (its entry is used up).
        """
        table = asker.asked
        key = (frame.message_id, frame.user_id)
        return bool(table) and self._take(table, key, frame.message_type)

    def _take(self, table: dict[Any, Any], key: tuple[Any, ...], answer_type: int) -> bool:
        entry = table.get(key)
        if entry is None:
            return False
        deadline, request_type = entry
        if deadline <= self.clock.seconds():
            del table[key]
            return False
        if answer_type == MessageType.ERROR or ANSWERED_BY[request_type] == answer_type:
            del table[key]
            return True
        return False


#: What a handle on another node has instead of an C{asked} table.
_REMOTE = object()
