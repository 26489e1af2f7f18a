"""
Blobs to users who are offline, gathered fragment by fragment until their
last, so that a blob is kept whole or not at all (L{OfflineBlobs}, a part of
L{esf.server._offline.OfflineMessages}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from esf.wire import _messages as m
from esf.wire._frames import ErrorCode, Frame

from ._config import EngineBasics
from ._counters import Count

if TYPE_CHECKING:
    from esf.interfaces import IOfflineStore

    from ._budget import MemoryBudget
    from ._session import Session

__all__ = ["OfflineBlobs", "BlobEngine"]


class BlobEngine(EngineBasics, Protocol):
    """
    What gathering blobs to offline users needs of the engine: the
    settings, the clock, the counters and the memory budget (a blob's
    fragments count among its sender's blobs in progress).
    """

    @property
    def budget(self) -> MemoryBudget: ...


class _PendingBlob:
    """
    The fragments of a blob to an offline user, gathered until its last:
    all of them are kept, or none.
    """

    __slots__ = ("frames", "size", "next_index", "information_type", "sender", "touched")

    def __init__(self, information_type: int, sender: str, now: float) -> None:
        self.frames: list[bytes] = []
        self.size = 0
        self.next_index = 0
        self.information_type = information_type
        #: The user sending it: its bytes count among that user's blobs in
        #: progress (L{esf.server._budget.MemoryBudget.blob_bytes}).
        self.sender = sender
        #: When its last fragment came (it is dropped once idle too long).
        self.touched = now


class OfflineBlobs:
    """
    The blobs being sent to users who are offline, by sender session.

    @param may_keep: C{(session, frame, information_type)}: whether the
        offline policy keeps a blob that begins with C{frame}.
    @param keep_frames: C{(session, frame, frames, information_type)}: keep
        a whole blob's C{frames} in the store (and answer the sender).
    """

    def __init__(
        self,
        engine: BlobEngine,
        store: IOfflineStore,
        may_keep: Callable[[Session, Frame, int | None], bool],
        keep_frames: Callable[[Session, Frame, list[bytes], int | None], None],
    ):
        self.engine = engine
        self._store = store
        self._may_keep = may_keep
        self._keep_frames = keep_frames
        #: Blobs to offline users being gathered: (session, dest, blob ID).
        self._blobs: dict[tuple[Session, str, int], _PendingBlob] = {}
        #: Sessions with blobs being gathered -> how many.
        self._blob_counts: dict[Session, int] = {}

    def gathering(self, session: Session, frame: Frame) -> bool:
        """
        Whether C{frame}, a Blob fragment to a user online now, belongs to
        a blob begun while that user was offline (it is kept with it, so
        that the blob arrives whole, and in order, at the next logon).
        """
        if session not in self._blob_counts:
            return False
        try:
            fragment = m.BlobFragment.decode(frame.body)
        except m.BadRequest:
            return False
        return (session, frame.dest_user_id, fragment.blob_id) in self._blobs

    def offer(self, session: Session, frame: Frame) -> bool:
        """
        C{frame}, a Blob fragment from C{session}, is addressed to a user
        who is offline (or continues a blob begun while it was): gather it
        with the blob's other fragments, within the bounds, and keep the
        blob once its last fragment has come.

        @return: whether it was taken (then the sender is answered from
            here); C{False}: not kept.
        """
        engine = self.engine
        try:
            fragment = m.BlobFragment.decode(frame.body)
        except m.BadRequest as e:
            session.error(frame, ErrorCode.BAD_REQUEST, str(e))
            return True
        sid = session
        key = (sid, frame.dest_user_id, fragment.blob_id)
        pending = self._blobs.get(key)
        if fragment.fragment_index == 0:
            if pending is not None:
                self._drop(key)
            if not self._may_keep(session, frame, fragment.information_type):
                return False
            if self._blob_counts.get(sid, 0) >= engine.config.max_concurrent_blobs:
                session.error(
                    frame,
                    ErrorCode.RATE_LIMITED,
                    f"at most {engine.config.max_concurrent_blobs} blobs to offline users "
                    "may be in progress at once",
                )
                return True
            pending = self._blobs[key] = _PendingBlob(
                fragment.information_type, session.user_id or "", engine.clock.seconds()
            )
            self._blob_counts[sid] = self._blob_counts.get(sid, 0) + 1
        elif pending is None:
            return False  # begun while the user was online: cannot be kept whole
        elif (
            fragment.fragment_index != pending.next_index
            or fragment.information_type != pending.information_type
        ):
            self._drop(key)
            session.error(
                frame,
                ErrorCode.BAD_REQUEST,
                f"fragment {fragment.fragment_index} of blob {fragment.blob_id} is out of order",
            )
            return True
        size = len(frame.raw)
        bounds = self._store.bounds
        config, budget = engine.config, engine.budget
        if budget.blob_bytes(pending.sender) + size > config.max_blob_bytes_per_user:
            # Every blob a user has in progress, to users online or not,
            # counts against one bound.
            self._drop(key)
            engine.counters[Count.BLOB_ERRORS] += 1
            session.error(
                frame,
                ErrorCode.TOO_LARGE,
                f"{pending.sender}'s blobs in progress would pass "
                f"{config.max_blob_bytes_per_user} bytes; blob {fragment.blob_id} dropped",
            )
            return True
        if not budget.fits(size):
            self._drop(key)
            engine.counters[Count.BLOB_ERRORS] += 1
            session.error(
                frame,
                ErrorCode.RATE_LIMITED,
                f"the server's memory budget is spent; blob {fragment.blob_id} dropped, try later",
            )
            return True
        count = len(pending.frames) + 1
        if pending.size + size > bounds.max_bytes or count > bounds.max_messages:
            self._drop(key)
            engine.counters[Count.OFFLINE_FULL] += 1
            session.error(
                frame,
                ErrorCode.USER_OFFLINE,
                f"{frame.dest_user_id} is not online and blob {fragment.blob_id} is too large "
                f"to keep (at most {bounds.max_messages} messages and {bounds.max_bytes} bytes "
                "per user)",
            )
            return True
        if pending.size + size > bounds.max_sender_bytes or count > bounds.max_sender_messages:
            self._drop(key)
            engine.counters[Count.OFFLINE_SENDER_FULL] += 1
            session.error(
                frame,
                ErrorCode.USER_OFFLINE,
                f"{frame.dest_user_id} is not online and blob {fragment.blob_id} is too large "
                f"to keep (one sender may have at most {bounds.max_sender_messages} messages "
                f"and {bounds.max_sender_bytes} bytes waiting for users who are offline)",
            )
            return True
        pending.frames.append(frame.raw)
        pending.size += size
        pending.next_index += 1
        pending.touched = engine.clock.seconds()
        budget.add_blob_bytes(pending.sender, size)
        if fragment.is_last:
            self._drop(key)
            self._keep_frames(session, frame, pending.frames, fragment.information_type)
        return True

    def expire(self, now: float) -> None:
        """
        Drop the blobs to offline users whose next fragment has not come
        within C{blob_idle_timeout} (the engine's reaper calls this, as for
        blobs to the server).
        """
        if not self._blobs:
            return
        deadline = now - self.engine.config.blob_idle_timeout
        for key in [k for k, p in self._blobs.items() if p.touched < deadline]:
            self._drop(key)
            self.engine.counters[Count.BLOB_ERRORS] += 1

    def _drop(self, key: tuple[Session, str, int]) -> None:
        pending = self._blobs.pop(key, None)
        if pending is None:
            return
        self.engine.budget.add_blob_bytes(pending.sender, -pending.size)
        sid = key[0]
        left = self._blob_counts.get(sid, 0) - 1
        if left > 0:
            self._blob_counts[sid] = left
        else:
            self._blob_counts.pop(sid, None)

    def session_ended(self, session: Session) -> None:
        """
        C{session} ended: drop the blobs it was sending.
        """
        if session in self._blob_counts:
            for key in [k for k in self._blobs if k[0] == session]:
                self._drop(key)
