"""
Offline messages: what is relayed to a user who is offline is kept in an
L{IOfflineStore} and delivered at that user's next logon.

    OfflineMessages   the engine's part: keeps (C{offer}), drains at
                      logon (C{logged_on}), takes the device's
                      acknowledgements (C{ack})
    MemoryOfflineStore  an L{IOfflineStore} in memory (tests, development)

The stores on disk and in Redis are in L{esf._offline_sqlite} and
L{esf._offline_redis}.  docs/messages.md (section 5) and docs/protocol.md
(section 8.7) describe the behaviour and the wire rules.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _messages as m
from ._counters import Count
from ._router import user_part
from ._wire import DEVICE_MARK, SERVER_ID, ErrorCode, Frame, MessageType
from .interfaces import IOfflinePolicy, IOfflineStore

if TYPE_CHECKING:
    from ._engine import ServerEngine
    from ._session import Session

__all__ = [
    "OfflineBounds",
    "OfflineMessages",
    "OfflineStoreError",
    "OfflineStoreFull",
    "OfflineSenderFull",
    "OfflineServerFull",
    "StoredMessage",
    "KeepAll",
    "MemoryOfflineStore",
    "KEPT_TYPES",
    "MAX_ID",
    "delivery_frame",
    "split_dest",
]

log = Logger(namespace="esf.offline")

#: The message types an offline store may keep: one-way messages and
#: SendCertainly.  A Request (or an answer) needs its asker online.
KEPT_TYPES = frozenset({MessageType.SEND, MessageType.SEND_CERTAINLY, MessageType.BLOB})

#: The largest ID a stored message may have: it travels as a MessageID.
MAX_ID = 0x7FFFFFFF

_MESSAGE_ID = struct.Struct("<i")
_I32 = struct.Struct("<i")


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
    """

    def __init__(self, user_id: str, count: int, size: int, max_messages: int, max_bytes: int):
        self.user_id = user_id
        self.count = count
        self.size = size
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        super().__init__(
            f"{user_id} has {count} messages ({size} bytes) waiting, at most "
            f"{max_messages} ({max_bytes} bytes) are kept: no room for more"
        )


class OfflineSenderFull(OfflineStoreFull):
    """
    Keeping more from C{sender_id} would pass the bound on what one sender
    may have waiting in the store, for all receivers together.
    """

    def __init__(
        self, sender_id: str, count: int, size: int, max_messages: int, max_bytes: int
    ):
        self.sender_id = sender_id
        OfflineStoreError.__init__(
            self,
            f"{sender_id} has {count} messages ({size} bytes) waiting for users who are "
            f"offline, at most {max_messages} ({max_bytes} bytes) per sender: no room for more",
        )
        self.user_id = sender_id
        self.count = count
        self.size = size
        self.max_messages = max_messages
        self.max_bytes = max_bytes


class OfflineServerFull(OfflineStoreFull):
    """
    Keeping more would pass the bound on what the whole store holds, for
    all users together.
    """

    def __init__(self, count: int, size: int, max_messages: int, max_bytes: int):
        OfflineStoreError.__init__(
            self,
            f"the offline store holds {count} messages ({size} bytes), at most "
            f"{max_messages} ({max_bytes} bytes) in all: no room for more",
        )
        self.user_id = ""
        self.count = count
        self.size = size
        self.max_messages = max_messages
        self.max_bytes = max_bytes


def _bound(default: int, low: int) -> Any:
    return attrs.field(
        default=default,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(low)],
    )


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
        if (
            total[0] + count > self.max_total_messages
            or total[1] + size > self.max_total_bytes
        ):
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


@implementer(IOfflinePolicy)
class KeepAll:
    """
    The default policy: keep every Send, SendCertainly and Blob.
    """

    def keep_offline(
        self, sender_id: str, dest_user_id: str, message_type: int, information_type: int | None
    ) -> bool:
        return True


def split_dest(dest: str) -> tuple[str, int | None]:
    """
    C{("bob", None)} for C{"bob"}, C{("bob", 5)} for C{"bob#5"}.
    """
    user_id = user_part(dest)
    if user_id == dest:
        return dest, None
    return user_id, int(dest.rpartition(DEVICE_MARK)[2])


def information_type(body: bytes | memoryview) -> int | None:
    """
    The C{i32 information_type} an application body starts with, if any.
    """
    return int(_I32.unpack_from(body)[0]) if len(body) >= 4 else None


def delivery_frame(raw: bytes, message_id: int, wire: Any) -> bytes:
    """
    A kept frame as it is delivered: the same bytes but for MessageID,
    which is the stored message's ID, and DestUserID, which is C{_0} (no
    relayed frame ever has it: it marks a delivery from the store).
    """
    slot = wire.id_slot
    frame = bytearray(raw)
    _MESSAGE_ID.pack_into(frame, 4, message_id)
    dest = 13 + slot
    frame[dest] = len(SERVER_ID)
    frame[dest + 1 : dest + 1 + slot] = SERVER_ID.encode().ljust(slot, b"\0")
    return bytes(frame)


def _continues(raw: bytes, wire: Any) -> bool:
    """
    Whether C{raw} is a Blob fragment that is not its blob's last.
    """
    if struct.unpack_from("<H", raw, 2)[0] != MessageType.BLOB:
        return False
    is_last = wire.header_length + 12
    return bool(len(raw) > is_last and raw[is_last] == 0)


class _PendingBlob:
    """
    The fragments of a blob to an offline user, gathered until its last:
    all of them are kept, or none.
    """

    __slots__ = ("frames", "size", "next_index", "information_type")

    def __init__(self, information_type: int) -> None:
        self.frames: list[bytes] = []
        self.size = 0
        self.next_index = 0
        self.information_type = information_type


class _Stalled(Exception):
    pass


class _Gone(Exception):
    pass


class _Drain:
    """
    Delivers one device's stored messages, in order, a window at a time:
    a window is sent, then the device's cumulative acknowledgement is
    waited for, then the window is forgotten in the store.
    """

    def __init__(self, offline: OfflineMessages, session: Session, whole_user: bool):
        self.offline = offline
        self.session = session
        self.user_id: str = session.user_id or ""
        kinds: tuple[int | None, ...] = (session.client_type,)
        self.client_types = (None, *kinds) if whole_user else kinds
        self.whole_user = whole_user
        #: IDs written to the device and not yet forgotten, in order.
        self.sent: list[int] = []
        #: The highest ID the device acknowledged (cumulative).
        self.acked = 0
        self.delivered = 0
        self._waiting: Deferred[None] | None = None
        self._target = 0
        self._timer: Any = None
        self.done = False

    async def run(self) -> None:
        offline = self.offline
        engine = offline.engine
        session = self.session
        wire = engine.config.wire
        after = 0
        try:
            while True:
                batch = await offline.store.fetch(
                    self.user_id, self.client_types, after, offline.window, offline.window_bytes
                )
                if self.done:
                    return
                if not batch:
                    break
                outermost = engine.batch.begin()
                try:
                    for entry in batch:
                        session.queue(delivery_frame(entry.raw, entry.id, wire))
                        self.sent.append(entry.id)
                        after = entry.id
                finally:
                    if outermost:
                        engine.batch.flush()
                if _continues(batch[-1].raw, wire):
                    # The rest of a blob: its acknowledgement comes at its
                    # last fragment.
                    await self._writable()
                    continue
                await self._until_acked(after)
                await self._forget()
        except _Gone:
            return
        except _Stalled:
            engine.counters[Count.OFFLINE_DRAINS_STALLED] += 1
            log.info(
                "{session!r} did not acknowledge stored messages within {timeout:g} s: "
                "the rest waits for its next logon",
                esf_event="offline_drain_stalled",
                session=session,
                user_id=self.user_id,
                timeout=engine.config.offline_ack_timeout,
            )
        except Exception:
            log.failure(
                "delivering stored messages to {session!r} failed",
                session=session,
                esf_event="offline_drain_failed",
            )
        finally:
            self.finish()

    def _until_acked(self, target: int) -> Deferred[None]:
        if self.acked >= target:
            return succeed(None)
        self._target = target
        d: Deferred[None] = Deferred()
        self._waiting = d
        clock = self.offline.engine.clock
        self._timer = clock.callLater(
            self.offline.engine.config.offline_ack_timeout, self._fail, _Stalled()
        )
        return d

    def _fail(self, error: Exception) -> None:
        self._timer = None
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(error)

    async def _writable(self) -> None:
        session = self.session
        clock = self.offline.engine.clock
        while session._paused and session.logged_on:
            await deferLater(clock, 0.05, lambda: None)
        if not session.logged_on:
            raise _Gone()

    def ack(self, message_id: int) -> bool:
        """
        The device acknowledged every delivery up to C{message_id}.
        """
        if not self.sent or message_id < self.sent[0] or message_id <= self.acked:
            return False
        self.acked = message_id
        if self._waiting is not None and message_id >= self._target:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            d, self._waiting = self._waiting, None
            d.callback(None)
        return True

    def _forget(self) -> Deferred[int]:
        acked = [i for i in self.sent if i <= self.acked]
        if not acked:
            return succeed(0)
        self.sent = [i for i in self.sent if i > self.acked]
        self.offline.engine.counters[Count.OFFLINE_DELIVERED] += len(acked)
        return self.offline.store.delete(self.user_id, acked)

    def session_ended(self) -> None:
        """
        The device went away: forget what it acknowledged; the rest is
        delivered again at the next logon.
        """
        if self.done:
            return
        d = self._forget()
        d.addErrback(
            lambda f: log.failure("forgetting delivered messages failed", f)
        )
        self._fail(_Gone())
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        offline = self.offline
        offline._sessions.pop(self.session, None)
        if offline._users.get(self.user_id) is self:
            del offline._users[self.user_id]
        if self.session.logged_on:
            self.session.release_held()


class OfflineMessages:
    """
    The engine's offline part: keeps what the engine could not relay
    (C{offer}), delivers it at logon (C{logged_on}) and forgets it once
    acknowledged (C{ack}).

    @ivar window: most stored messages written to a device before its
        acknowledgement is waited for.
    @ivar window_bytes: most bytes of them (a blob's fragments go out
        whole, as fast as the device reads).
    """

    def __init__(
        self,
        engine: ServerEngine,
        store: IOfflineStore,
        policy: IOfflinePolicy | None = None,
        window: int = 100,
    ):
        self.engine = engine
        self.store = store
        self.policy: IOfflinePolicy = policy if policy is not None else KeepAll()
        self.window = window
        self.window_bytes = max(engine.config.max_output_buffer // 2, 1)
        #: Blobs to offline users being gathered: (session ID, dest, blob ID).
        self._blobs: dict[tuple[str, str, int], _PendingBlob] = {}
        #: Sessions with blobs being gathered -> how many.
        self._blob_counts: dict[str, int] = {}
        self._sessions: dict[Any, _Drain] = {}
        #: Users whose whole-user messages a device of this node drains.
        self._users: dict[str, _Drain] = {}

    # -- keeping -------------------------------------------------------------------

    def offer(self, session: Session, frame: Frame) -> bool:
        """
        C{frame}, from C{session}, is addressed to a user (or device) who is
        offline: keep it if it is of a kept type and the policy agrees.

        @return: whether it was taken (then the sender is answered from
            here: Ack once stored, or an Error); C{False}: not kept.
        """
        message_type = frame.message_type
        if message_type not in KEPT_TYPES:
            return False
        if message_type == MessageType.BLOB:
            return self._offer_fragment(session, frame)
        if not self._keep(session, frame, information_type(frame.body)):
            return False
        self._store(session, frame, [frame.raw], information_type(frame.body))
        return True

    def gathering(self, session: Session, frame: Frame) -> bool:
        """
        Whether C{frame}, a Blob fragment to a user online now, belongs to
        a blob begun while that user was offline (it is kept with it, so
        that the blob arrives whole, and in order, at the next logon).
        """
        if session.session_id not in self._blob_counts:
            return False
        try:
            fragment = m.BlobFragment.decode(frame.body)
        except m.BadRequest:
            return False
        return (session.session_id, frame.dest_user_id, fragment.blob_id) in self._blobs

    def _keep(self, session: Session, frame: Frame, info_type: int | None) -> bool:
        try:
            keep = bool(
                self.policy.keep_offline(
                    session.user_id or "", frame.dest_user_id, frame.message_type, info_type
                )
            )
        except Exception:
            log.failure("the offline policy raised; the message is not kept")
            keep = False
        if not keep:
            self.engine.counters[Count.OFFLINE_NOT_KEPT] += 1
        return keep

    def _offer_fragment(self, session: Session, frame: Frame) -> bool:
        engine = self.engine
        try:
            fragment = m.BlobFragment.decode(frame.body)
        except m.BadRequest as e:
            session.error(frame, ErrorCode.BAD_REQUEST, str(e))
            return True
        sid = session.session_id
        key = (sid, frame.dest_user_id, fragment.blob_id)
        pending = self._blobs.get(key)
        if fragment.fragment_index == 0:
            if pending is not None:
                self._drop_blob(key)
            if not self._keep(session, frame, fragment.information_type):
                return False
            if self._blob_counts.get(sid, 0) >= engine.config.max_concurrent_blobs:
                session.error(
                    frame,
                    ErrorCode.RATE_LIMITED,
                    f"at most {engine.config.max_concurrent_blobs} blobs to offline users "
                    "may be in progress at once",
                )
                return True
            pending = self._blobs[key] = _PendingBlob(fragment.information_type)
            self._blob_counts[sid] = self._blob_counts.get(sid, 0) + 1
        elif pending is None:
            return False  # begun while the user was online: cannot be kept whole
        elif (
            fragment.fragment_index != pending.next_index
            or fragment.information_type != pending.information_type
        ):
            self._drop_blob(key)
            session.error(
                frame,
                ErrorCode.BAD_REQUEST,
                f"fragment {fragment.fragment_index} of blob {fragment.blob_id} is out of order",
            )
            return True
        size = len(frame.raw)
        bounds = self.store.bounds
        if pending.size + size > bounds.max_bytes or not engine.budget.fits(size):
            self._drop_blob(key)
            engine.counters[Count.OFFLINE_FULL] += 1
            session.error(
                frame,
                ErrorCode.USER_OFFLINE,
                f"{frame.dest_user_id} is not online and blob {fragment.blob_id} is too large "
                f"to keep (at most {bounds.max_bytes} bytes per user)",
            )
            return True
        if pending.size + size > bounds.max_sender_bytes:
            self._drop_blob(key)
            engine.counters[Count.OFFLINE_SENDER_FULL] += 1
            session.error(
                frame,
                ErrorCode.USER_OFFLINE,
                f"{frame.dest_user_id} is not online and blob {fragment.blob_id} is too large "
                f"to keep (one sender may have at most {bounds.max_sender_bytes} bytes waiting "
                "for users who are offline)",
            )
            return True
        pending.frames.append(frame.raw)
        pending.size += size
        pending.next_index += 1
        engine.budget.used += size
        if fragment.is_last:
            self._drop_blob(key)
            self._store(session, frame, pending.frames, fragment.information_type)
        return True

    def _drop_blob(self, key: tuple[str, str, int]) -> None:
        pending = self._blobs.pop(key, None)
        if pending is None:
            return
        self.engine.budget.used -= pending.size
        sid = key[0]
        left = self._blob_counts.get(sid, 0) - 1
        if left > 0:
            self._blob_counts[sid] = left
        else:
            self._blob_counts.pop(sid, None)

    def _store(
        self, session: Session, frame: Frame, frames: list[bytes], info_type: int | None
    ) -> None:
        user_id, client_type = split_dest(frame.dest_user_id)
        try:
            d = self.store.store(user_id, client_type, frames, session.user_id or "")
        except Exception:
            d = fail()
        d.addCallbacks(
            self._stored,
            self._not_stored,
            callbackArgs=(session, frame, len(frames), info_type),
            errbackArgs=(session, frame),
        )

    def _stored(
        self, ids: Any, session: Session, frame: Frame, count: int, info_type: int | None
    ) -> None:
        self.engine.counters[Count.OFFLINE_STORED] += count
        if frame.message_id:
            # From the server, not the receiver: stored, not yet delivered.
            session.reply(frame, m.Ack(info_type or 0).encode(), MessageType.ACK)

    def _not_stored(self, failure: Failure, session: Session, frame: Frame) -> None:
        engine = self.engine
        dest = frame.dest_user_id
        error = failure.value
        if isinstance(error, OfflineServerFull):
            engine.counters[Count.OFFLINE_SERVER_FULL] += 1
            if session.may_log():
                log.warn(
                    "the offline store is full: a message from {session!r} for {dest} is "
                    "refused ({why})",
                    session=session,
                    dest=dest,
                    why=str(error),
                    esf_event="offline_server_full",
                )
            text = f"{dest} is not online and the server's offline store is full: try later"
        elif isinstance(error, OfflineSenderFull):
            engine.counters[Count.OFFLINE_SENDER_FULL] += 1
            if session.may_log():
                log.info(
                    "{session!r} has as much waiting in the offline store as one sender may: "
                    "a message for {dest} is refused ({why})",
                    session=session,
                    dest=dest,
                    why=str(error),
                    esf_event="offline_sender_full",
                )
            text = (
                f"{dest} is not online and you cannot leave more for users who are offline: "
                f"you have {error.count} messages ({error.size} bytes) waiting, at most "
                f"{error.max_messages} ({error.max_bytes} bytes) per sender"
            )
        elif isinstance(error, OfflineStoreFull):
            engine.counters[Count.OFFLINE_FULL] += 1
            text = f"{dest} is not online and cannot be sent more: {error}"
        else:
            engine.counters[Count.OFFLINE_ERRORS] += 1
            if session.may_log():
                log.failure(
                    "keeping a message from {session!r} for {dest} failed",
                    failure,
                    session=session,
                    dest=dest,
                    esf_event="offline_store_failed",
                )
            text = f"{dest} is not online and the offline store cannot keep it now"
        session.error(frame, ErrorCode.USER_OFFLINE, text)

    # -- delivering ----------------------------------------------------------------

    def logged_on(self, session: Session) -> None:
        """
        C{session} has just logged on (its Logon reply is queued): deliver
        what is kept for its device, and for its user unless another
        device of this node is doing so, before anything relayed to it
        since (which it holds meanwhile).
        """
        user_id = session.user_id or ""
        whole_user = user_id not in self._users
        drain = _Drain(self, session, whole_user)
        self._sessions[session] = drain
        if whole_user:
            self._users[user_id] = drain
        session.hold()
        Deferred.fromCoroutine(drain.run())

    def ack(self, session: Session, frame: Frame) -> bool:
        """
        An Ack (206) to C{_0}: whether it acknowledged stored messages.
        """
        drain = self._sessions.get(session)
        return drain is not None and drain.ack(frame.message_id)

    def session_ended(self, session: Session) -> None:
        """
        C{session} ended: drop the blobs it was sending to offline users,
        and end its drain.
        """
        sid = session.session_id
        if sid in self._blob_counts:
            for key in [k for k in self._blobs if k[0] == sid]:
                self._drop_blob(key)
        drain = self._sessions.get(session)
        if drain is not None:
            drain.session_ended()

    @property
    def deliveries(self) -> int:
        """
        How many devices are being delivered their stored messages now.
        """
        return len(self._sessions)


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
