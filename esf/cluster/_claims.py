"""
Claims: this node's sessions and their devices in Redis.

L{Claims} claims and releases devices through L{ClaimScripts}: those
asked for during one reactor turn are one call of C{lua/changes.lua},
each one atomic change of the user's hash and the indexes, together one
entry of the presence stream.  While the node is alone (Redis away) it
decides claims locally and remembers what to claim and release once Redis
is back; then L{Claims.confirm} claims again, and a device logged on at
two nodes meanwhile is settled by the relogon mode each logon was claimed
with.

The takeover-flapping guard of a cluster is the script's: it counts
a device's takeovers in Redis (all nodes') and answers L{FLAPPING} with the
cooldown left; the refusal's text is L{esf.server._policy.flapping_cause}.
"""

from __future__ import annotations

import collections
from collections.abc import Container
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, DeferredList, FirstError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.interfaces import IDeviceHandle
from esf.server._config import RelogonMode
from esf.server._policy import TakeoverRefused, flapping_cause
from esf.server._presence import Claim
from esf.wire._frames import DisconnectedType

from ._link import IRedisLink, script
from ._mirror import PresenceMirror
from ._records import Holder, Keys

if TYPE_CHECKING:
    from esf.server._offline import OfflineMessages

__all__ = ["Claims", "CLAIMED", "KEPT", "FLAPPING", "strays"]

log = Logger(namespace="esf.cluster")

_CHANGES = script("changes")

#: The claim script's answers: the device is the claimant's; its holder
#: keeps it; the takeover is refused as flapping (the cooldown left, in ms,
#: comes with it).
CLAIMED, KEPT, FLAPPING = 1, 0, 2

#: The claim script's mode for claiming a device again after an outage, by
#: the relogon mode its logon was claimed with: which of two logons made at
#: two nodes meanwhile wins.
_RECLAIM = {RelogonMode.REPLACE_OLD: "newer", RelogonMode.IGNORE_NEW: "older"}

#: What a claim's answer is made into: won, the old holder's value, the
#: stream ID of the entry that holds the change (C{None}: nothing changed).
_Answer = tuple[bool, "bytes | None", "bytes | None"]


def strays(
    hashes: dict[str, dict[bytes, bytes]], node: str, held: Container[str]
) -> dict[str, tuple[str, int]]:
    """
    Of C{hashes} (user -> device kind -> presence value, as Redis has
    them), the devices held by sessions of C{node}'s that are not among
    those it C{held}: session ID -> (user, kind).  Their release was lost
    (a failover to a replica that missed it, a restart that lost the last
    writes), and the node releases them (fenced by session ID).
    """
    found = {}
    for user_id, devices in hashes.items():
        for kind, value in devices.items():
            holder = Holder.parse(value)
            if holder.node == node and holder.session_id not in held:
                found[holder.session_id] = (user_id, int(kind))
    return found


class ClaimScripts:
    """
    The claims and releases of this node's sessions, asked for during one
    reactor turn, made by one script (C{lua/changes.lua}) at its end, in
    order: each one atomic change of a user's hash and the indexes, all of
    them one entry of the presence stream, whose answers go into the mirror
    ahead of the stream.  A logon storm (or the end of every session at
    shutdown) costs a call, a reply and a stream entry per turn, not per
    device, at this node, at Redis and at every node that mirrors it.  The
    cluster's takeover-flapping guard is the script's (L{FLAPPING}); this
    passes it the engine's limits.

    @ivar takeover_limit: more than this many takeovers of one device within
        C{takeover_window} s refuse it for C{takeover_cooldown} s (the
        engine's C{ServerConfig} sets these through the presence's attach).
    """

    #: The most changes one call makes: a bounded time for Redis to run it.
    MAX_CHANGES = 256

    def __init__(
        self,
        link: IRedisLink,
        keys: Keys,
        mirror: PresenceMirror,
        reactor: IReactorTime,
        *,
        presence_maxlen: int,
    ):
        self.link = link
        self.keys = keys
        self.mirror = mirror
        self.reactor = reactor
        self.presence_maxlen = presence_maxlen
        self.takeover_limit = 5
        self.takeover_window = 60.0
        self.takeover_cooldown = 60.0
        #: When each of this node's sessions logged on (this node's clock,
        #: taken at its claim): stored with the claim, it settles a device
        #: logged on at two nodes during a split (L{_RECLAIM}).
        self.logon_at: dict[str, float] = {}
        #: The changes asked for this turn (flat, as the script takes them)
        #: and who waits for each one's answer.
        self._changes: list[Any] = []
        self._waiting: list[Deferred[tuple[bytes | None, list[Any]]]] = []
        self._flush_call: IDelayedCall | None = None

    def claim(self, handle: IDeviceHandle, mode: str) -> Deferred[_Answer]:
        holder = Holder.of(handle, self.logon_at.get(handle.session_id))
        user_id, kind = handle.user_id, int(handle.client_type)
        d = self._ask(
            ["c", user_id, kind, holder.encode(), mode, holder.session_id, holder.node,
             repr(holder.logon_time)]
        )  # fmt: skip

        def answered(result: tuple[bytes | None, list[Any]]) -> _Answer:
            raw_id, (code, old, more) = result
            if int(code) == FLAPPING:
                raise TakeoverRefused(
                    flapping_cause(
                        user_id,
                        self.takeover_limit,
                        self.takeover_window,
                        round(int(more) / 1000),
                        " across the cluster",
                    )
                )
            won = int(code) == CLAIMED
            place = int(more or 0) if won else 0  # 0: nothing changed
            mirror = self.mirror
            if (
                place
                and raw_id is not None
                and mirror.note_ahead(user_id, kind, raw_id, place)
                # (Not a session that ended meanwhile: its release, made
                # after, has shown the device free already.)
                and handle.session_id in mirror.local
            ):
                mirror.put(user_id, kind, handle)
            return won, old, raw_id if place else None

        return d.addCallback(answered)

    def release(self, user_id: str, kind: int, sid: str) -> Deferred[bool]:
        d = self._ask(["r", user_id, kind, sid])

        def answered(result: tuple[bytes | None, list[Any]]) -> bool:
            raw_id, (removed, last, place) = result
            if int(removed) and raw_id is not None and place:
                self.mirror.note_ahead(user_id, kind, raw_id, int(place))
            return bool(int(removed)) and bool(int(last))

        return d.addCallback(answered)

    def _ask(self, change: list[Any]) -> Deferred[tuple[bytes | None, list[Any]]]:
        """
        Ask for C{change} at the end of this turn (now, past
        L{MAX_CHANGES}): fires with the entry's ID (or C{None}) and the
        change's answer.
        """
        d: Deferred[tuple[bytes | None, list[Any]]] = Deferred()
        self._changes += change
        self._waiting.append(d)
        if len(self._waiting) >= self.MAX_CHANGES:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)
        return d

    def flush(self) -> None:
        """
        Make the changes asked for so far, in one call.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        changes, self._changes = self._changes, []
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        keys = self.keys
        d = self.link.eval(
            _CHANGES,
            [keys.online, keys.stream],
            [
                self.presence_maxlen,
                keys.base,
                self.takeover_limit,
                max(1, int(self.takeover_window * 1000)),
                max(1, int(self.takeover_cooldown * 1000)),
                *changes,
            ],
        )

        def answered(reply: list[Any]) -> None:
            raw_id = reply[0]
            for w, answer in zip(waiting, reply[1:]):
                w.callback((raw_id, answer))

        def failed(failure: Failure) -> None:
            for w in waiting:
                w.errback(failure)

        d.addCallbacks(answered, failed)


class Claims:
    """
    This node's sessions given to claim and not yet released, and their
    claims in Redis.

    @param mirror: the presence mirror (a claim's answer goes into it ahead
        of the stream).
    @param local: this node's sessions by session ID (the mirror's too).
    @param alone: whether the node runs alone now (Redis away): claims are
        decided here then.
    @param reactor: runs the claims and releases of a turn at its end.
    @param clock: the time of a logon.
    @param remote: makes the handle of a device another node holds.
    @param presence_maxlen: about how many changes the presence stream keeps.

    @ivar local: this node's sessions by session ID.
    @ivar scripts: the claims and releases in Redis.
    """

    def __init__(
        self,
        link: IRedisLink,
        keys: Keys,
        mirror: PresenceMirror,
        local: dict[str, IDeviceHandle],
        *,
        alone: Callable[[], bool],
        reactor: IReactorTime,
        clock: IReactorTime,
        remote: Callable[[str, int, Holder], IDeviceHandle],
        presence_maxlen: int,
        stats: collections.Counter[str],
    ):
        self.mirror = mirror
        self.alone = alone
        self.clock = clock
        self.remote = remote
        self.stats = stats
        self.scripts = ClaimScripts(link, keys, mirror, reactor, presence_maxlen=presence_maxlen)
        self.logon_at = self.scripts.logon_at
        #: The engine's offline part (set by the presence's attach), if it has a
        #: store: a session claimed again gets what was stored for it meanwhile.
        self.offline: OfflineMessages | None = None
        self.local = local
        #: Those of them claimed with C{IGNORE_NEW} (the others with
        #: C{REPLACE_OLD}): claimed again after an outage, each settles a
        #: conflict by the mode its logon was claimed with.
        self.ignore_new: set[str] = set()
        #: Local sessions to claim (again) in Redis.
        self.unconfirmed: set[str] = set()
        #: Sessions released while Redis was away or whose claim has an
        #: unknown outcome: session ID -> (user, kind), released later.
        self.stale: dict[str, tuple[str, int]] = {}
        self.inflight: set[Deferred[Any]] = set()

    # -- claiming and releasing --------------------------------------------------

    def claim(self, handle: IDeviceHandle, replace: bool) -> Deferred[Claim]:
        """
        L{esf.interfaces.IPresence.claim}; decided here while alone.
        """
        sid = handle.session_id
        if self.alone():
            return succeed(self._claim_alone(handle, replace))
        self._hold(handle, replace)
        d = self.scripts.claim(handle, "replace" if replace else "keep")
        self._track(d)

        def answered(result: _Answer) -> Claim:
            won, old, _ = result
            previous = None
            if old is not None:
                holder = Holder.parse(old)
                if holder.session_id != sid:
                    # (None for a session of this node's that is released.)
                    kind = int(handle.client_type)
                    previous = self.mirror.handle_for(handle.user_id, kind, holder)
                    if previous is None and not won:
                        previous = self.remote(handle.user_id, kind, holder)
            if not won:
                self._let_go(sid)
            return Claim(won, previous)

        def failed(failure: Failure) -> Failure:
            if failure.check(TakeoverRefused):
                self._let_go(sid)  # refused: nothing was claimed
                return failure
            # The outcome is unknown: release it (fenced) once Redis answers.
            if self._let_go(sid) is not None:
                self.stale[sid] = (handle.user_id, int(handle.client_type))
            return failure

        return d.addCallbacks(answered, failed)

    def _claim_alone(self, handle: IDeviceHandle, replace: bool) -> Claim:
        previous = None
        for h in self.mirror.users.get(handle.user_id, ()):
            if h.client_type == handle.client_type and h.node == self.mirror.node_id:
                previous = h
        if previous is not None and not replace:
            return Claim(False, previous)
        self._hold(handle, replace)
        self.unconfirmed.add(handle.session_id)
        self.mirror.put(handle.user_id, int(handle.client_type), handle)
        return Claim(True, previous)

    def release(self, handle: IDeviceHandle) -> Deferred[bool]:
        """
        L{esf.interfaces.IPresence.release}; released in Redis later while
        alone.
        """
        sid = handle.session_id
        user_id, kind = handle.user_id, int(handle.client_type)
        mirror = self.mirror
        self._let_go(sid)
        # Shown free at once: what this node reads meanwhile (an inbox entry
        # for the ended session, a relay) must not count it online.
        mirror.remove(user_id, kind, sid)
        if self.alone():
            if sid in self.unconfirmed:
                self.unconfirmed.discard(sid)
            else:
                self.stale[sid] = (user_id, kind)
            return succeed(not mirror.devices(user_id, alone=True))
        d = self.scripts.release(user_id, kind, sid)
        self._track(d)

        def failed(failure: Failure) -> bool:
            self.stale[sid] = (user_id, kind)
            return not mirror.devices(user_id, alone=self.alone())

        return d.addErrback(failed)

    def _hold(self, handle: IDeviceHandle, replace: bool) -> None:
        """
        Count C{handle} among this node's sessions, with the relogon mode
        it is claimed with.
        """
        sid = handle.session_id
        self.local[sid] = handle
        # A session gets its UserData only once its claim is won: its logon
        # time is the claim's.
        data = handle.user_data
        self.logon_at[sid] = data.logon_time if data is not None else self.clock.seconds()
        if not replace:
            self.ignore_new.add(sid)

    def _let_go(self, sid: str) -> IDeviceHandle | None:
        """
        Count session C{sid} no more among this node's; the handle, or
        C{None} when it was not.
        """
        self.ignore_new.discard(sid)
        self.logon_at.pop(sid, None)
        return self.local.pop(sid, None)

    def _track(self, d: Deferred[Any]) -> None:
        self.inflight.add(d)

        def done(result: Any) -> Any:
            self.inflight.discard(d)
            return result

        d.addBoth(done)

    def _mode_of(self, sid: str) -> RelogonMode:
        """
        The relogon mode this node's session C{sid} was claimed with.
        """
        return RelogonMode.IGNORE_NEW if sid in self.ignore_new else RelogonMode.REPLACE_OLD

    # -- after an outage ----------------------------------------------------------

    def unconfirm_held(self) -> None:
        """
        Claim again (L{confirm}) every device this node holds.
        """
        self.unconfirmed.update(sid for sid, h in self.local.items() if self.mirror.holds(h))

    def reclaim(self, handle: IDeviceHandle) -> None:
        """
        This node's session C{handle} was released behind its back (the
        janitor found its lease expired while it was alive: a long pause,
        say): show it again, to be claimed again (L{confirm}).
        """
        log.warn(
            "{user_id}/{client_type} was released by the janitor while held here: claiming it again",
            user_id=handle.user_id,
            client_type=handle.client_type,
            esf_event="cluster_reclaim",
        )
        self.stats["reclaimed"] += 1
        self.unconfirmed.add(handle.session_id)
        self.mirror.put(handle.user_id, int(handle.client_type), handle)

    async def release_stale(self) -> None:
        """
        Release in Redis, all at once, what was released while it was away;
        after a failure, all of it again later (fenced by session ID).
        """
        stale, self.stale = self.stale, {}
        try:
            calls = [self.scripts.release(u, k, sid) for sid, (u, k) in stale.items()]
            await DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
            stale.clear()
        except FirstError as e:
            e.subFailure.raiseException()
        finally:
            stale.update(self.stale)
            self.stale = stale

    async def confirm(self) -> None:
        """
        Claim in Redis every device to claim again; a device another node
        claimed meanwhile is settled by the relogon mode each logon was
        claimed with (the later logon wins with C{REPLACE_OLD}, the earlier
        with C{IGNORE_NEW}), the loser ended.
        """
        while self.unconfirmed:
            # Many at once (one connection, pipelined), a bounded number.
            chunk = [self.unconfirmed.pop() for _ in range(min(500, len(self.unconfirmed)))]
            handles = [self.local[sid] for sid in chunk if sid in self.local]
            modes = [_RECLAIM[self._mode_of(h.session_id)] for h in handles]
            try:
                replies = await DeferredList(
                    [self.scripts.claim(h, mode) for h, mode in zip(handles, modes)],
                    fireOnOneErrback=True,
                    consumeErrors=True,
                )
            except Exception:
                self.unconfirmed.update(h.session_id for h in handles)
                raise
            for handle, (_, (won, old, _id)) in zip(handles, replies):
                sid = handle.session_id
                if sid not in self.local:
                    continue  # released meanwhile: stale has it
                mode = self._mode_of(sid)
                if won:
                    if self.offline is not None and getattr(handle, "logged_on", False):
                        # Others may have stored messages for it while the
                        # cluster did not list it.
                        self.offline.look_again(handle)  # type: ignore[arg-type]
                    if old is not None:
                        previous = Holder.parse(old)
                        if previous.session_id != sid:
                            self._settle_remote(handle, previous, mode)
                else:
                    assert old is not None  # lost to the holder it names
                    self._end_conflict(handle, Holder.parse(old).address, mode)

    def _settle_remote(self, winner: IDeviceHandle, loser: Holder, mode: RelogonMode) -> None:
        """
        C{winner} (here) took the device back from C{loser} (a logon made
        elsewhere while this node could not reach Redis), by C{winner}'s
        relogon C{mode}: end C{loser}.
        """
        handle: IDeviceHandle | None
        if loser.node == self.mirror.node_id:
            handle = self.local.get(loser.session_id)
        else:
            handle = self.remote(winner.user_id, winner.client_type, loser)
        if handle is None:
            return
        self._end_conflict(handle, winner.user_data.address if winner.user_data else "?", mode)

    def _end_conflict(self, handle: IDeviceHandle, other_address: str, mode: RelogonMode) -> None:
        if mode is RelogonMode.REPLACE_OLD:
            cause = (
                f"{handle.user_id} logged on with this device from {other_address} too, "
                f"later, while the cluster was split"
            )
            handle.push_out(other_address, cause)  # the holder's node fires the event
        else:
            handle.kick(
                DisconnectedType.NEW_CONNECTION_IGNORED,
                f"{handle.user_id} was already logged on with this device from {other_address} "
                f"while the cluster was split",
            )
        log.info(
            "settled a split logon of {user_id}/{client_type}: ended {session_id}",
            user_id=handle.user_id,
            client_type=handle.client_type,
            session_id=handle.session_id,
            esf_event="cluster_split_settled",
        )

    def end_replaced(self, handle: IDeviceHandle) -> None:
        """
        This node's session C{handle} was replaced by a logon elsewhere
        whose push-out has not arrived: end it anyway (the grace is over).
        """
        if handle.session_id in self.local and not self.mirror.holds(handle):
            self.stats["pushed_out_without_notice"] += 1
            handle.kick(
                DisconnectedType.BEING_PUSHED_OUT,
                f"{handle.user_id} logged on with this device on another node",
            )
