"""
What an offline store is: the bounds it keeps to (L{OfflineBounds}), what it
answers when they are reached (L{OfflineStoreFull} and its kinds), what it
gives back (L{StoredMessage}), and one in memory (L{MemoryOfflineStore}, for
tests and development).  The stores on disk and in Redis are in
L{esf.offline._sqlite} and L{esf.offline._redis}; the engine's part, which
keeps and delivers, is L{esf.server._offline}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from zope.interface import implementer

from esf.interfaces import IOfflinePolicy, IOfflineStore
from esf.wire._frames import MessageType

__all__ = [
    "KEPT_TYPES",
    "KeepAll",
    "MAX_ID",
    "OfflineBounds",
    "OfflineStoreError",
    "OfflineStoreFull",
    "OfflineSenderFull",
    "OfflineServerFull",
    "StoredMessage",
    "MemoryOfflineStore",
]

#: The largest ID a stored message may have: it travels as a MessageID.
MAX_ID = 0x7FFFFFFF


class OfflineStoreError(Exception):
    """
    The offline store cannot be used: the text says why (corrupt,
    unwritable, a newer schema, unreachable).
    """


class OfflineStoreFull(OfflineStoreError):
    """
    Keeping more for C{user_id} would pass its bound.  The subclasses
    L{OfflineSenderFull} and L{OfflineServerFull} say that another bound
    was reached: the sender's, or the whole store's.

    Every one of them carries what was waiting and the bound that stopped
    more: C{user_id} (the sender's ID for L{OfflineSenderFull}, C{""} for
    L{OfflineServerFull}), C{count}, C{size}, C{max_messages} and
    C{max_bytes}.
    """

    #: The message, formatted with the attributes above.
    _text = (
        "{user_id} has {count} messages ({size} bytes) waiting, at most "
        "{max_messages} ({max_bytes} bytes) are kept: no room for more"
    )

    def __init__(self, user_id: str, count: int, size: int, max_messages: int, max_bytes: int):
        self.user_id = user_id
        self.count = count
        self.size = size
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        super().__init__(
            self._text.format(
                user_id=user_id,
                count=count,
                size=size,
                max_messages=max_messages,
                max_bytes=max_bytes,
            )
        )


class OfflineSenderFull(OfflineStoreFull):
    """
    Keeping more from C{sender_id} would pass the bound on what one sender
    may have waiting in the store, for all receivers together.
    """

    _text = (
        "{user_id} has {count} messages ({size} bytes) waiting for users who are "
        "offline, at most {max_messages} ({max_bytes} bytes) per sender: no room for more"
    )

    def __init__(self, sender_id: str, count: int, size: int, max_messages: int, max_bytes: int):
        self.sender_id = sender_id
        super().__init__(sender_id, count, size, max_messages, max_bytes)


class OfflineServerFull(OfflineStoreFull):
    """
    Keeping more would pass the bound on what the whole store holds, for
    all users together.
    """

    _text = (
        "the offline store holds {count} messages ({size} bytes), at most "
        "{max_messages} ({max_bytes} bytes) in all: no room for more"
    )

    def __init__(self, count: int, size: int, max_messages: int, max_bytes: int):
        super().__init__("", count, size, max_messages, max_bytes)


def _bound(default: int, low: int) -> Any:
    return attrs.field(
        default=default,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(low)],
    )


#: The message types an offline store may keep: one-way messages and
#: SendCertainly.  A Request (or an answer) needs its asker online.
KEPT_TYPES = frozenset({MessageType.SEND, MessageType.SEND_CERTAINLY, MessageType.BLOB})


@implementer(IOfflinePolicy)
class KeepAll:
    """
    The default policy: keep every Send, SendCertainly and Blob.
    """

    def keep_offline(
        self, sender_id: str, dest_user_id: str, message_type: int, information_type: int | None
    ) -> bool:
        return True


@attrs.frozen
class OfflineBounds:
    """
    What an offline store keeps at most: per receiving user, per sender
    (what one user has waiting for all its receivers together), and in the
    whole store; each as messages and as bytes (whole frames, headers
    included).  Every store takes one as C{bounds}.

    @raise ValueError: a message bound below 1, a byte bound below
        L{MIN_BYTES}.
    @raise TypeError: a bound that is not a whole number.
    """

    #: The least a byte bound may be.
    MIN_BYTES: ClassVar[int] = 1024

    #: Most messages kept for one user.
    max_messages: int = _bound(10_000, 1)
    #: Most bytes kept for one user.
    max_bytes: int = _bound(64 * 1024 * 1024, MIN_BYTES)
    #: Most messages one sender may have waiting, for all receivers together.
    max_sender_messages: int = _bound(1_000, 1)
    #: Most bytes one sender may have waiting, for all receivers together.
    max_sender_bytes: int = _bound(16 * 1024 * 1024, MIN_BYTES)
    #: Most messages the whole store keeps, for all users.
    max_total_messages: int = _bound(1_000_000, 1)
    #: Most bytes the whole store keeps, for all users.
    max_total_bytes: int = _bound(1024 * 1024 * 1024, MIN_BYTES)

    def refusal(
        self,
        user_id: str,
        user: tuple[int, int],
        sender_id: str,
        sender: tuple[int, int],
        total: tuple[int, int],
        count: int,
        size: int,
    ) -> OfflineStoreFull | None:
        """
        Why C{count} more messages of C{size} bytes, for C{user_id} from
        C{sender_id}, do not fit, given what the user, the sender and the
        whole store hold now (each C{(messages, bytes)}); C{None} when they
        fit.  The user's bound is checked first, then the sender's, then
        the store's.
        """
        if user[0] + count > self.max_messages or user[1] + size > self.max_bytes:
            return OfflineStoreFull(user_id, *user, self.max_messages, self.max_bytes)
        if (
            sender[0] + count > self.max_sender_messages
            or sender[1] + size > self.max_sender_bytes
        ):
            return OfflineSenderFull(
                sender_id, *sender, self.max_sender_messages, self.max_sender_bytes
            )
        if total[0] + count > self.max_total_messages or total[1] + size > self.max_total_bytes:
            return OfflineServerFull(*total, self.max_total_messages, self.max_total_bytes)
        return None


@attrs.frozen
class StoredMessage:
    """
    One kept frame: its ID (increasing per user), the device it is for
    (C{None}: any device of the user) and the frame as the sender sent it.
    """

    id: int
    client_type: int | None
    raw: bytes


@implementer(IOfflineStore)
class MemoryOfflineStore:
    """
    An L{IOfflineStore} in memory: nothing survives the process.  For tests
    and development.  With a C{clock} and a C{delay}, every operation
    answers C{delay} seconds after it is called (in call order), like a
    store across a network.

    @param bounds: what it keeps at most (L{OfflineBounds}).
    """

    def __init__(
        self,
        *,
        bounds: OfflineBounds = OfflineBounds(),
        clock: Any = None,
        delay: float = 0.0,
    ):
        self.bounds = bounds
        self.clock = clock
        self.delay = delay
        self.started = False
        #: user ID -> (next ID, {id: (StoredMessage, sender ID)})
        self._users: dict[str, tuple[int, dict[int, tuple[StoredMessage, str]]]] = {}
        self._sizes: dict[str, int] = {}
        #: sender ID -> [messages, bytes] waiting
        self._senders: dict[str, list[int]] = {}
        #: [messages, bytes] in the whole store
        self._total = [0, 0]

    def _answer(self, compute: Any) -> Deferred[Any]:
        if self.clock is None or not self.delay:
            try:
                return succeed(compute())
            except Exception:
                return fail()
        return deferLater(self.clock, self.delay, compute)

    def start(self) -> Deferred[None]:
        self.started = True
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self.started = False
        return succeed(None)

    def store(
        self, user_id: str, client_type: int | None, frames: Sequence[bytes], sender_id: str
    ) -> Deferred[list[int]]:
        frames = list(frames)

        def compute() -> list[int]:
            next_id, messages = self._users.get(user_id, (1, {}))
            size = self._sizes.get(user_id, 0)
            added = sum(len(f) for f in frames)
            sender = self._senders.get(sender_id, [0, 0])
            refused = self.bounds.refusal(
                user_id,
                (len(messages), size),
                sender_id,
                (sender[0], sender[1]),
                (self._total[0], self._total[1]),
                len(frames),
                added,
            )
            if refused is not None:
                raise refused
            if next_id + len(frames) > MAX_ID:
                raise OfflineStoreError(f"{user_id} has used up its message IDs")
            ids = list(range(next_id, next_id + len(frames)))
            for i, raw in zip(ids, frames):
                messages[i] = (StoredMessage(i, client_type, raw), sender_id)
            self._users[user_id] = (next_id + len(frames), messages)
            self._sizes[user_id] = size + added
            self._senders[sender_id] = [sender[0] + len(frames), sender[1] + added]
            self._total[0] += len(frames)
            self._total[1] += added
            return ids

        return self._answer(compute)

    def fetch(
        self,
        user_id: str,
        client_types: Sequence[int | None],
        after: int,
        max_count: int,
        max_bytes: int,
    ) -> Deferred[list[StoredMessage]]:
        kinds = set(client_types)

        def compute() -> list[StoredMessage]:
            out: list[StoredMessage] = []
            size = 0
            messages = self._users.get(user_id, (1, {}))[1]
            for i in sorted(messages):
                entry = messages[i][0]
                if i <= after or entry.client_type not in kinds:
                    continue
                if out and (len(out) >= max_count or size + len(entry.raw) > max_bytes):
                    break
                out.append(entry)
                size += len(entry.raw)
            return out

        return self._answer(compute)

    def delete(self, user_id: str, ids: Sequence[int]) -> Deferred[int]:
        ids = list(ids)

        def compute() -> int:
            messages = self._users.get(user_id, (1, {}))[1]
            gone = 0
            for i in ids:
                found = messages.pop(i, None)
                if found is None:
                    continue
                entry, sender_id = found
                gone += 1
                size = len(entry.raw)
                self._sizes[user_id] -= size
                self._total[0] -= 1
                self._total[1] -= size
                sender = self._senders[sender_id]
                sender[0] -= 1
                sender[1] -= size
                if not sender[0]:
                    del self._senders[sender_id]
            return gone

        return self._answer(compute)

    def counts(self, user_id: str) -> Deferred[tuple[int, int]]:
        return self._answer(
            lambda: (len(self._users.get(user_id, (1, {}))[1]), self._sizes.get(user_id, 0))
        )

    def sender_counts(self, sender_id: str) -> Deferred[tuple[int, int]]:
        return self._answer(lambda: tuple(self._senders.get(sender_id, (0, 0))))

    def total_counts(self) -> Deferred[tuple[int, int]]:
        return self._answer(lambda: (self._total[0], self._total[1]))
