"""
Offline messages: what is relayed to a user who is offline is kept in an
L{IOfflineStore} and delivered at that user's next logon::

    OfflineMessages   the engine's part: keeps (C{offer}), drains at
                      logon (C{logged_on}), takes the device's
                      acknowledgements (C{ack})
    OfflineBlobs      blobs to offline users, gathered until whole
                      (esf.server._offline_blobs)

What a store is, and one in memory, are in L{esf.offline._store}; the
stores on disk and in Redis in L{esf.offline._sqlite} and
L{esf.offline._redis}.  docs/messages.md (section 5) and docs/protocol.md
(section 8.7) describe the behaviour and the wire rules.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.interfaces import IOfflinePolicy, IOfflineStore, IPresence
from esf.offline._store import (
    KEPT_TYPES,
    KeepAll,
    OfflineSenderFull,
    OfflineServerFull,
    OfflineStoreFull,
)
from esf.wire import _messages as m
from esf.wire._frames import DEVICE_MARK, SERVER_ID, ErrorCode, Frame, MessageType

from ._counters import Count
from ._offline_blobs import BlobEngine, OfflineBlobs
from ._router import user_part

if TYPE_CHECKING:
    from ._output import OutputBatch
    from ._session import Session

__all__ = [
    "OfflineMessages",
    "OfflineEngine",
    "delivery_frame",
    "split_dest",
]

log = Logger(namespace="esf.offline")

_MESSAGE_ID = struct.Struct("<i")
_I32 = struct.Struct("<i")


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


def _refused(error: BaseException | None) -> Count:
    """
    What counts a store's refusal (or failure) C{error} to keep a message.
    """
    if isinstance(error, OfflineServerFull):
        return Count.OFFLINE_SERVER_FULL
    if isinstance(error, OfflineSenderFull):
        return Count.OFFLINE_SENDER_FULL
    if isinstance(error, OfflineStoreFull):
        return Count.OFFLINE_FULL
    return Count.OFFLINE_ERRORS


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
        self._waiting: Deferred[bool] | None = None
        self._target = 0
        self._timer: Any = None
        self.done = False
        #: Something was stored for the device since the last fetch was
        #: sent (L{OfflineMessages.look_again}): fetch once more before
        #: finishing.
        self.again = False
        #: What the window holds: messages and bytes written since the
        #: last acknowledgement waited for.
        self._count = 0
        self._size = 0
        #: The ack timeout passed while no wait was under way (L{_fail}).
        self._expired = False

    async def run(self) -> None:
        offline = self.offline
        engine = offline.engine
        session = self.session
        wire = engine.config.wire
        after = 0
        try:
            while True:
                self.again = False
                batch = await offline.store.fetch(
                    self.user_id,
                    self.client_types,
                    after,
                    offline.window - self._count,
                    offline.window_bytes - self._size,
                )
                if self.done:
                    return
                if batch:
                    outermost = engine.batch.begin()
                    try:
                        for entry in batch:
                            session.queue(delivery_frame(entry.raw, entry.id, wire))
                            self.sent.append(entry.id)
                            self._size += len(entry.raw)
                            after = entry.id
                    finally:
                        if outermost:
                            engine.batch.flush()
                    self._count += len(batch)
                    if _continues(batch[-1].raw, wire):
                        # The rest of a blob: its acknowledgement comes at
                        # its last fragment.
                        await self._writable()
                        self._count = self._size = 0
                        continue
                if self.again and self._room():
                    continue  # more was stored meanwhile, and the window has room
                if not self.sent:
                    break
                if not await self._until_acked(after):
                    continue  # woken by what was stored meanwhile (look_again)
                await self._forget()
                self._count = self._size = 0
                if self.done:
                    return
        except _Gone:
            return
        except _Stalled:
            # What the device did acknowledge is forgotten all the same.
            self._forget().addErrback(
                lambda f: log.failure("forgetting delivered messages failed", f)
            )
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

    def _room(self) -> bool:
        offline = self.offline
        return self._count < offline.window and self._size < offline.window_bytes

    def look_again(self) -> None:
        """
        Something was stored for the device since the last fetch was sent:
        fetch once more before finishing, and at once if the window has
        room (rather than after the device's acknowledgement).
        """
        self.again = True
        if self._waiting is not None and self._room():
            # (The ack timeout runs on: a device that does not acknowledge
            # is not given longer by what others store for it.)
            d, self._waiting = self._waiting, None
            d.callback(False)

    def _until_acked(self, target: int) -> Deferred[bool]:
        """
        Fires with C{True} once the device acknowledged up to C{target};
        C{False} if woken first (L{look_again}); fails with L{_Stalled}
        after the ack timeout.
        """
        if self.acked >= target:
            return succeed(True)
        if self._expired:
            return fail(_Stalled())
        self._target = target
        d: Deferred[bool] = Deferred()
        self._waiting = d
        if self._timer is None:
            clock = self.offline.engine.clock
            self._timer = clock.callLater(
                self.offline.engine.config.offline_ack_timeout, self._fail, _Stalled()
            )
        return d

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fail(self, error: Exception) -> None:
        self._timer = None
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(error)
        elif isinstance(error, _Stalled):
            # The ack timeout passed between two waits (a fetch made after
            # look_again): the next wait fails at once, not a timeout later.
            self._expired = True

    async def _writable(self) -> None:
        session = self.session
        await session.when_writable()
        if not session.logged_on:
            raise _Gone()

    def ack(self, message_id: int) -> bool:
        """
        The device acknowledged every delivery up to C{message_id}.
        """
        if not self.sent or message_id < self.sent[0] or message_id <= self.acked:
            return False
        # Only what was sent can be acknowledged: an ID past it does not
        # forget messages the device has not had.
        self.acked = min(message_id, self.sent[-1])
        if self._waiting is not None and message_id >= self._target:
            self._stop_timer()
            d, self._waiting = self._waiting, None
            d.callback(True)
        return True

    def _forget(self) -> Deferred[int]:
        acked = [i for i in self.sent if i <= self.acked]
        if not acked:
            return succeed(0)
        self.sent = [i for i in self.sent if i > self.acked]
        self.offline.engine.counters[Count.OFFLINE_DELIVERED] += len(acked)
        try:
            return self.offline.store.delete(self.user_id, acked)
        except Exception:
            return fail()  # a store that raises at once fails like one that answers later

    def session_ended(self) -> None:
        """
        The device went away: forget what it acknowledged; the rest is
        delivered again at the next logon.
        """
        if self.done:
            return
        d = self._forget()
        d.addErrback(lambda f: log.failure("forgetting delivered messages failed", f))
        self._fail(_Gone())
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._stop_timer()
        offline = self.offline
        offline._sessions.pop(self.session, None)
        if offline._users.get(self.user_id) is self:
            del offline._users[self.user_id]
        if self.session.logged_on:
            self.session.release_held()


class OfflineEngine(BlobEngine, Protocol):
    """
    What the offline part needs of the engine: what gathering blobs needs
    (L{BlobEngine}), the batch that gathers output (stored messages are
    written a window at a time), and the presence, told what is stored
    (L{IPresence.kept_offline}).
    """

    @property
    def batch(self) -> OutputBatch: ...

    @property
    def presence(self) -> IPresence: ...


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
        engine: OfflineEngine,
        store: IOfflineStore,
        policy: IOfflinePolicy | None = None,
        window: int = 100,
    ):
        self.engine = engine
        self.store = store
        self.policy: IOfflinePolicy = policy if policy is not None else KeepAll()
        self.window = window
        self.window_bytes = max(engine.config.max_output_buffer // 2, 1)
        #: Blobs to offline users, being gathered until their last fragment.
        self.blobs = OfflineBlobs(engine, store, self._keep, self._store)
        self._sessions: dict[Any, _Drain] = {}
        #: Users whose whole-user messages a device of this node drains.
        self._users: dict[str, _Drain] = {}
        #: Bytes each sending session handed the store that it has not
        #: answered yet (L{_store}).
        self._waiting: dict[Session, int] = {}

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
        kind = split_dest(frame.dest_user_id)[1]
        if kind is not None and kind not in self.engine.config.client_types:
            return False  # no such device can log on here: nothing to keep it for
        if message_type == MessageType.BLOB:
            return self.blobs.offer(session, frame)
        info_type = information_type(frame.body)
        if not self._keep(session, frame, info_type):
            return False
        self._store(session, frame, [frame.raw], info_type)
        return True

    def gathering(self, session: Session, frame: Frame) -> bool:
        """
        Whether C{frame}, a Blob fragment to a user online now, belongs to
        a blob begun while that user was offline (L{OfflineBlobs.gathering}).
        """
        return self.blobs.gathering(session, frame)

    def expire_blobs(self, now: float) -> None:
        """
        Drop the blobs to offline users idle too long (L{OfflineBlobs.expire}).
        """
        self.blobs.expire(now)

    def keep_unsent(self, frame: Frame) -> Deferred[None] | None:
        """
        C{frame}, a one-way message from a user of another node, was relayed
        to a device whose node never delivered it (the node left the
        cluster, or the device logged off first), and its addressee is
        offline now: keep it as if it had been sent now, if of a kept type
        and the policy agrees.  No one is answered: its sender asked for no
        answer; a store that refuses it is counted in the metrics.

        @return: when it was handed to the store, what fires once the store
            is done with it (kept or refused, never failing); else C{None}.
        """
        if frame.message_type not in KEPT_TYPES or frame.message_type == MessageType.BLOB:
            return None  # a blob is kept whole, from its sender's session only
        info_type = information_type(frame.body)
        if not self._allowed(frame.user_id, frame, info_type):
            return None
        user_id, client_type = split_dest(frame.dest_user_id)
        d = self._hand(user_id, client_type, [frame.raw], frame.user_id)
        return d.addCallbacks(self._unsent_kept, self._unsent_refused)

    def _unsent_kept(self, ids: object) -> None:
        self.engine.counters[Count.OFFLINE_STORED] += 1

    def _unsent_refused(self, failure: Failure) -> None:
        self.engine.counters[_refused(failure.value)] += 1

    def _keep(self, session: Session, frame: Frame, info_type: int | None) -> bool:
        return self._allowed(session.user_id or "", frame, info_type)

    def _allowed(self, sender: str, frame: Frame, info_type: int | None) -> bool:
        try:
            keep = bool(
                self.policy.keep_offline(sender, frame.dest_user_id, frame.message_type, info_type)
            )
        except Exception:
            log.failure("the offline policy raised; the message is not kept")
            keep = False
        if not keep:
            self.engine.counters[Count.OFFLINE_NOT_KEPT] += 1
        return keep

    def _store(
        self, session: Session, frame: Frame, frames: list[bytes], info_type: int | None
    ) -> None:
        user_id, client_type = split_dest(frame.dest_user_id)
        size = sum(len(f) for f in frames)
        self._wait(session, size)
        d = self._hand(user_id, client_type, frames, session.user_id or "")
        d.addBoth(self._answered, session, size)
        d.addCallbacks(
            self._stored,
            self._not_stored,
            callbackArgs=(session, frame, len(frames), info_type),
            errbackArgs=(session, frame),
        )

    def _hand(
        self, user_id: str, client_type: int | None, frames: list[bytes], sender: str
    ) -> Deferred[Any]:
        """
        Hand C{frames} for C{user_id}'s device C{client_type} (C{None}: for
        the user) to the store, and tell the presence (a device may have
        logged on elsewhere meanwhile: L{IPresence.kept_offline}).
        """
        try:
            d = self.store.store(user_id, client_type, frames, sender)
        except Exception:
            return fail()  # a store that raises at once fails like one that answers later
        self.engine.presence.kept_offline(user_id, client_type)
        return d

    def _wait(self, session: Session, size: int) -> None:
        """
        C{session} hands the store C{size} bytes: they count in the memory
        budget until the store answers, and past C{max_output_buffer} of
        them the session is read no further (a store that takes its time
        must not let one sender pile up messages it may well refuse).
        """
        waiting = self._waiting.get(session, 0)
        self._waiting[session] = waiting + size
        self.engine.budget.used += size
        if waiting <= self.engine.config.max_output_buffer < waiting + size:
            session.hold_back()

    def _answered(self, result: Any, session: Session, size: int) -> Any:
        """
        The store answered about C{size} bytes of C{session}'s (L{_wait}).
        """
        left = self._waiting.pop(session) - size
        if left:
            self._waiting[session] = left
        self.engine.budget.used -= size
        if left <= self.engine.config.max_output_buffer < left + size:
            session.let_go()
        return result

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
        engine.counters[_refused(error)] += 1
        if isinstance(error, OfflineServerFull):
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
            text = f"{dest} is not online and cannot be sent more: {error}"
        else:
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

    def look_again(self, session: Session) -> None:
        """
        Messages may have been stored for C{session}'s device, or its
        user, since its stored messages were last looked at: another node
        that did not know it was online stored them (L{IPresence.kept_offline}),
        or its device was claimed again after the cluster had let it go (its
        node was reaped while paused, or Redis lost its data).  Deliver them
        now, as at a logon (ahead of what is relayed to it from now on); a
        delivery in progress for the device or the user looks once more
        before it ends.  (A session still logging on looks at its logon.)
        """
        if not session.logged_on:
            return
        drain = self._sessions.get(session)
        whole = self._users.get(session.user_id or "")
        if whole is not None and whole is not drain:
            whole.look_again()  # (the user's messages, taken by another device)
        if drain is None:
            self.logged_on(session)
        else:
            drain.look_again()

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
        self.blobs.session_ended(session)
        drain = self._sessions.get(session)
        if drain is not None:
            drain.session_ended()

    @property
    def deliveries(self) -> int:
        """
        How many devices are being delivered their stored messages now.
        """
        return len(self._sessions)
