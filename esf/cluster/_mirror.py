"""
The presence mirror: this node's in-memory view of who is online in the
cluster, built from a snapshot of Redis (L{PresenceMirror.load}) and kept
up by applying the presence stream's entries (L{PresenceMirror.apply}).

It is synchronous and pure: no Redis, no reactor.  What an entry does to
one of this node's own sessions (replaced by a logon elsewhere, or
released behind this node's back) it reports, as it applies the entry,
as a L{Replaced} or a L{Released} to the callable it was given; the caller
decides what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Union

import attrs
from sortedcontainers import SortedList  # type: ignore[import-untyped]
from twisted.logger import Logger

from esf.interfaces import IDeviceHandle

from ._records import Holder, stream_id

__all__ = ["PresenceMirror", "Replaced", "Released", "Report"]

log = Logger(namespace="esf.cluster")


@attrs.frozen
class Replaced:
    """
    One of this node's sessions, C{handle}, was replaced by a logon of its
    device at another node.
    """

    handle: IDeviceHandle


@attrs.frozen
class Released:
    """
    One of this node's sessions, C{handle}, was released behind this node's
    back (the janitor found its lease expired: a long pause, say), though
    this node still holds it.
    """

    handle: IDeviceHandle


Report = Union[Replaced, Released]


class PresenceMirror:
    """
    Who is online: user ID -> handles in logon order (this node's sessions,
    and handles for the devices other nodes hold), and the same user IDs
    sorted.

    @param node_id: this node's ID.
    @param local: this node's sessions by session ID (read only here): a
        presence value naming this node shows its session, or nothing once
        that session is gone.
    @param remote: makes the handle of a device another node holds, from
        C{(user_id, client_type, holder)}.
    @param report: told, as soon as an entry is applied, what it did to one
        of this node's sessions (it may change the mirror then: the next
        entry is applied after).

    @ivar position: the presence stream's ID this mirror is up to.
    """

    def __init__(
        self,
        node_id: str,
        local: Mapping[str, IDeviceHandle],
        remote: Callable[[str, int, Holder], IDeviceHandle],
        report: Callable[[Report], None],
    ):
        self.node_id = node_id
        self.local = local
        self.remote = remote
        self.report = report
        self.users: dict[str, tuple[IDeviceHandle, ...]] = {}
        self.sorted: SortedList = SortedList()
        #: The users with a device of this node's among those shown: how
        #: many, and the same user IDs sorted (what the node lists alone:
        #: a read in proportion to its answer, not a walk of its sessions).
        self.mine: dict[str, int] = {}
        self.mine_sorted: SortedList = SortedList()
        #: Devices taken from a script's answer ahead of the stream:
        #: (user, kind) -> the stream ID of that change's entry and its
        #: place there.
        self.ahead: dict[tuple[str, int], tuple[int, int, int]] = {}
        self.position = b"0-0"
        self.at = (0, 0)

    # -- filling --------------------------------------------------------------------

    def load(self, position: bytes, hashes: Mapping[str, Mapping[bytes, bytes]]) -> None:
        """
        Show exactly C{hashes} (user ID -> its hash: device kind -> presence
        value), as of the stream's C{position}.
        """
        users: dict[str, tuple[IDeviceHandle, ...]] = {}
        for user_id, kinds in hashes.items():
            handles = []
            for kind, value in kinds.items():
                holder = Holder.parse(value)
                handle = self.handle_for(user_id, int(kind), holder)
                if handle is not None:
                    handles.append((holder.logon_time, handle))
            if handles:
                handles.sort(key=lambda pair: pair[0])
                users[user_id] = tuple(h for _, h in handles)
        self.users = users
        self.sorted = SortedList(users)
        node = self.node_id
        mine = {}
        for user_id, shown in users.items():
            count = sum(1 for h in shown if h.node == node)
            if count:
                mine[user_id] = count
        self.mine = mine
        self.mine_sorted = SortedList(mine)
        self.ahead.clear()
        self.position, self.at = position, stream_id(position)

    def apply(self, entries: Iterable[Sequence[Any]]) -> None:
        """
        Apply the presence stream's C{entries} (C{(id, flat fields)}, in
        order), each one or more changes (the fields C{u}, C{c}, and C{v}
        or C{d}, per change); those at or before L{position} are skipped, a
        bad change is skipped alone (the entry's others are applied), and
        logged once per entry.
        """
        for raw_id, flat in entries:
            at = stream_id(raw_id)
            if at <= self.at:
                continue
            self.position, self.at = raw_id, at
            told = False
            for place in range(len(flat) // 6):
                try:
                    report = self._apply(at + (place + 1,), flat[place * 6 : place * 6 + 6])
                except Exception:
                    if not told:
                        told = True
                        log.failure("a bad change of presence in entry {id}", id=raw_id)
                    continue
                if report is not None:
                    self.report(report)

    def _apply(self, at: tuple[int, int, int], change: Sequence[Any]) -> Report | None:
        u, user, c, kind_, field, value = change
        if u != b"u" or c != b"c" or field not in (b"v", b"d"):
            raise ValueError(f"not a change of presence: {change!r}")
        user_id = user.decode("utf-8")
        kind = int(kind_)
        key = (user_id, kind)
        ahead = self.ahead.get(key)
        if ahead is not None:
            if at < ahead:
                return None  # the mirror shows a later change already
            del self.ahead[key]
            if at == ahead:
                return None
        if field == b"v":
            handle = self.handle_for(user_id, kind, Holder.parse(value))
            if handle is not None:
                replaced = self.put(user_id, kind, handle)
                if replaced is not None and replaced.session_id in self.local:
                    return Replaced(replaced)
            return None
        sid = value.decode("utf-8")
        if self.remove(user_id, kind, sid):
            mine = self.local.get(sid)
            if mine is not None:
                return Released(mine)
        return None

    def note_ahead(self, user_id: str, kind: int, raw_id: bytes, place: int = 1) -> bool:
        """
        A script's answer carries a change (the C{place}th, from 1, of the
        stream's entry C{raw_id}) that the stream will bring later: note it,
        so that the stream does not undo a later one; C{False} when the
        stream has brought it (and maybe later ones) already.
        """
        at = stream_id(raw_id)
        if at <= self.at:
            return False
        self.ahead[(user_id, kind)] = at + (place,)
        return True

    def put(self, user_id: str, kind: int, handle: IDeviceHandle) -> IDeviceHandle | None:
        """
        Show C{handle} as the holder of C{user_id}'s device C{kind}; the
        handle it replaces, if any.
        """
        devices = self.users.get(user_id, ())
        replaced = None
        for h in devices:
            if h.client_type == kind:
                if h.session_id == handle.session_id:
                    return None
                replaced = h
                break
        if replaced is not None:
            devices = tuple(h for h in devices if h is not replaced)
            if replaced.node == self.node_id:
                self._mine(user_id, -1)
        elif not devices:
            self.sorted.add(user_id)
        self.users[user_id] = devices + (handle,)
        if handle.node == self.node_id:
            self._mine(user_id, 1)
        return replaced

    def remove(self, user_id: str, kind: int, sid: str) -> bool:
        """
        Show C{user_id}'s device C{kind} free, if session C{sid} holds it;
        whether it did.
        """
        devices = self.users.get(user_id, ())
        rest = tuple(h for h in devices if not (h.client_type == kind and h.session_id == sid))
        if len(rest) == len(devices):
            return False
        node = self.node_id
        gone = sum(1 for h in devices if h.node == node) - sum(1 for h in rest if h.node == node)
        if gone:
            self._mine(user_id, -gone)
        if rest:
            self.users[user_id] = rest
        else:
            del self.users[user_id]
            self.sorted.remove(user_id)
        return True

    def _mine(self, user_id: str, change: int) -> None:
        """
        Count C{change} more (or fewer) devices of this node's shown for
        C{user_id}.
        """
        count = self.mine.get(user_id, 0) + change
        if count > 0:
            if user_id not in self.mine:
                self.mine_sorted.add(user_id)
            self.mine[user_id] = count
        elif user_id in self.mine:
            del self.mine[user_id]
            self.mine_sorted.remove(user_id)

    def handle_for(self, user_id: str, kind: int, holder: Holder) -> IDeviceHandle | None:
        """
        The handle the mirror shows for C{holder}: the session itself when
        it is this node's (C{None} for one of this node's that is gone), a
        remote handle otherwise (the mirror's own, when it has one).
        """
        if holder.node == self.node_id:
            return self.local.get(holder.session_id)
        for handle in self.users.get(user_id, ()):
            if handle.session_id == holder.session_id:
                return handle
        return self.remote(user_id, kind, holder)

    # -- reads (alone: only this node's devices) ------------------------------------

    def holds(self, handle: IDeviceHandle) -> bool:
        """
        Whether the mirror shows C{handle} holding its device.
        """
        return any(h is handle for h in self.users.get(handle.user_id, ()))

    def get(self, user_id: str, client_type: int, alone: bool = False) -> IDeviceHandle | None:
        for handle in self.users.get(user_id, ()):
            if handle.client_type == client_type and (not alone or handle.node == self.node_id):
                return handle
        return None

    def devices(self, user_id: str, alone: bool = False) -> Sequence[IDeviceHandle]:
        if not alone:
            return self.users.get(user_id, ())
        node = self.node_id
        return tuple(h for h in self.users.get(user_id, ()) if h.node == node)

    def user_count(self, alone: bool = False) -> int:
        return len(self.mine if alone else self.users)

    def user_ids(
        self, offset: int = 0, limit: int | None = None, alone: bool = False
    ) -> list[str]:
        stop = None if limit is None else offset + limit
        return list((self.mine_sorted if alone else self.sorted).islice(offset, stop))
