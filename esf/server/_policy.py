"""
The logon policy: who may log on, and what a logon of a device that is
already held does, as pure decisions.

L{LogonPolicy.admit} looks at a Logon before the application verifies it
(protocol version, system token, reserved IDs, device kinds, the per-host
rate limit, a device refused for flapping); L{LogonPolicy.settle} decides,
once it is verified, against the device's current holder (the relogon
mode the pipeline found for the device, the order Logons arrived in, the
takeover-flapping guard).  Each returns a value (L{Accept}, L{Refuse},
L{Replace}, L{Ignore}); the engine acts on it.
The rate windows are the policy's only state, read and written at the
time the caller passes in.
"""

from __future__ import annotations

import collections
from typing import Any, Union

import attrs

from esf.wire import _messages as m
from esf.wire._frames import DEVICE_MARK, EVERYONE_ID, SERVER_ID, DisconnectedType, LogonResult

from ._config import RelogonMode, ServerConfig
from ._counters import Count

__all__ = [
    "LogonRefused",
    "SlidingWindow",
    "TakeoverRefused",
    "HolderUnconfirmed",
    "PresenceUnavailable",
    "flapping_cause",
    "Accept",
    "Refuse",
    "Replace",
    "Ignore",
    "LogonPolicy",
    "RESERVED_IDS",
]

#: IDs no user may log on with (nor any holding DEVICE_MARK).
RESERVED_IDS = frozenset({SERVER_ID, EVERYONE_ID, ""})

#: Most keys (hosts, devices) a rate limiter tracks; past it, the oldest go.
MAX_TRACKED_KEYS = 100_000


class LogonRefused(Exception):
    """
    Raised by L{IBasicHandler.verify_user} to refuse a logon with a cause
    that the client sees.
    """

    def __init__(self, cause: str = "logon refused"):
        super().__init__(cause)
        self.cause = cause


class TakeoverRefused(Exception):
    """
    A presence that counts takeovers itself (a cluster's, counting them
    across nodes) refused one: the device flaps between connections.  The
    logon pipeline answers it like its own guard: C{Busy}, counted as
    C{takeovers_refused}.
    """


class HolderUnconfirmed(Exception):
    """
    A presence shared by nodes found the device held by a session of
    another node that did not confirm it in time (that node may be dead or
    paused, its lease not yet expired).  The logon pipeline answers
    C{Busy}, which clients retry, rather than C{HadLoggedOn}, which they
    take as final.
    """


class PresenceUnavailable(Exception):
    """
    A presence shared by nodes cannot register a logon now: the store it
    shares (a cluster's Redis) is unreachable, or did not answer in time.
    An expected state of a cluster, not a fault of the code: the logon
    pipeline answers C{Busy}, which clients retry, and logs no traceback
    (the session's end says why, once).
    """


def flapping_cause(user_id: str, limit: int, window: float, wait: float, where: str = "") -> str:
    """
    What a logon refused by the takeover-flapping guard is told: C{user_id}
    took its device over more than C{limit} times within C{window} seconds
    (C{where}: C{" across the cluster"} for a cluster's guard), and may try
    again in C{wait} seconds.
    """
    return (
        f"{user_id} took this device over more than {limit} times within {window:g} s{where}; "
        f"try again in {wait:g} s"
    )


class SlidingWindow:
    """
    Counts events per key over the last C{window} seconds, up to C{limit} + 1
    (more need not be told apart), for at most C{max_keys} keys (the least
    recently seen are forgotten first).
    """

    def __init__(self, window: float, limit: int, max_keys: int = MAX_TRACKED_KEYS):
        self.window = window
        self.limit = limit
        self.max_keys = max_keys
        # Ordered from the least recently seen: an OrderedDict forgets the
        # oldest in constant time (a dict's first key is found by skipping
        # the slots of keys deleted before it: 18 µs per new key at 100,000).
        self._hits: collections.OrderedDict[Any, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._hits)

    def tracked(self, key: Any) -> int:
        """
        How many events of C{key} are remembered (at most C{limit} + 1).
        """
        return len(self._hits.get(key, ()))

    def count(self, key: Any, now: float) -> int:
        """
        How many events of C{key} fell in the window (at most C{limit} + 1),
        without recording one.
        """
        hits = self._hits.get(key)
        if not hits:
            return 0
        deadline = now - self.window
        while hits and hits[0] <= deadline:
            hits.popleft()
        return len(hits)

    def hit(self, key: Any, now: float) -> int:
        """
        Record an event; return how many fell in the window, this one
        included.
        """
        seen = self._hits
        hits = seen.get(key)
        if hits is None:
            if len(seen) >= self.max_keys:
                seen.popitem(last=False)
            hits = seen[key] = collections.deque()
        else:
            seen.move_to_end(key)  # now the most recently seen
        deadline = now - self.window
        while hits and hits[0] <= deadline:
            hits.popleft()
        if len(hits) <= self.limit:
            hits.append(now)
        return len(hits)


@attrs.frozen
class Accept:
    """
    Go on: verify the logon (from L{LogonPolicy.admit}), or bind it (from
    L{LogonPolicy.settle}, no device to replace).
    """


ACCEPT = Accept()


@attrs.frozen
class Refuse:
    """
    Refuse the logon: answer C{result} with C{cause}, end the connection
    with C{reason}; C{counter} names the count it adds to, if any.
    """

    result: LogonResult
    cause: str
    reason: DisconnectedType = DisconnectedType.LOGON_FAILED
    counter: Count | None = None


@attrs.frozen
class Replace:
    """
    Bind the new logon and push C{old}, the device's holder, out.
    """

    old: Any


@attrs.frozen
class Ignore:
    """
    Keep C{holder} and refuse the new logon with C{HadLoggedOn}
    (C{IGNORE_NEW}).
    """

    holder: Any


Admission = Union[Accept, Refuse]
Settlement = Union[Accept, Refuse, Replace, Ignore]


class LogonPolicy:
    """
    The decisions of the logon pipeline, for one server's C{config}.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.logon_rate = SlidingWindow(config.logon_rate_window, config.logon_rate_limit)
        self.takeovers = SlidingWindow(config.takeover_window, config.takeover_limit)
        # Devices refused for flapping, and until when: ordered by when they
        # were blocked, which is the order they come free in (one cooldown
        # for all), so the expired are dropped from the front.
        self._blocked: collections.OrderedDict[tuple[str, int], float] = collections.OrderedDict()

    def _block(self, key: tuple[str, int], now: float) -> None:
        """
        Refuse device C{key} for the takeover cooldown from C{now}: forget
        the blocks that have run out, and past L{MAX_TRACKED_KEYS} the
        oldest (a constant cost per block, however many there are).
        """
        blocked = self._blocked
        blocked[key] = now + self.config.takeover_cooldown
        blocked.move_to_end(key)
        while blocked and (len(blocked) > MAX_TRACKED_KEYS or next(iter(blocked.values())) <= now):
            blocked.popitem(last=False)

    def admit(
        self, user_id: str, client_type: int, logon: m.Logon, host: str, now: float
    ) -> Admission:
        """
        Whether a Logon may go on to the application's verification.
        """
        config = self.config
        if logon.protocol_version != m.PROTOCOL_VERSION:
            return Refuse(
                LogonResult.VERSION_MISMATCHED,
                f"this server speaks protocol version {m.PROTOCOL_VERSION}, "
                f"not {logon.protocol_version}",
            )
        if config.system_token and logon.system_token != config.system_token:
            return Refuse(LogonResult.VERSION_MISMATCHED, "wrong system token")
        if user_id in RESERVED_IDS or DEVICE_MARK in user_id:
            return Refuse(
                LogonResult.FAILED,
                f"user ID {user_id!r} is reserved (as are IDs holding {DEVICE_MARK!r})",
            )
        if client_type not in config.client_types:
            return Refuse(
                LogonResult.CLIENT_TYPE_REJECTED,
                f"device kind {client_type} is not allowed here",
                DisconnectedType.UNAUTHORIZED_CLIENT_TYPE,
            )
        if self.logon_rate.hit(host, now) > config.logon_rate_limit:
            return Refuse(
                LogonResult.BUSY,
                f"more than {config.logon_rate_limit} logons from {host} within "
                f"{config.logon_rate_window:g} s; try later",
                counter=Count.LOGONS_RATE_LIMITED,
            )
        blocked_until = self._blocked.get((user_id, client_type), 0)
        if blocked_until > now:
            return Refuse(
                LogonResult.BUSY,
                f"{user_id} took this device over too often; try again in "
                f"{blocked_until - now:.0f} s",
            )
        return ACCEPT

    def settle(
        self,
        user_id: str,
        client_type: int,
        logon_order: int,
        holder: Any,
        now: float,
        mode: RelogonMode,
    ) -> Settlement:
        """
        What a verified logon does to the device's current C{holder} (an
        L{esf.interfaces.IDeviceHandle}, or C{None}) under relogon C{mode}
        (the server's, or the application's for this user and device).
        """
        if holder is None:
            return ACCEPT
        config = self.config
        if mode is RelogonMode.IGNORE_NEW:
            return Ignore(holder)
        if holder.logon_order > logon_order:
            # A Logon that arrived later was verified first: it stands.
            return Refuse(
                LogonResult.FAILED,
                f"superseded by a newer logon of this device from {holder.user_data.address}",
            )
        key = (user_id, client_type)
        if self.takeovers.hit(key, now) > config.takeover_limit:
            self._block(key, now)
            return Refuse(
                LogonResult.BUSY,
                flapping_cause(
                    user_id,
                    config.takeover_limit,
                    config.takeover_window,
                    config.takeover_cooldown,
                ),
                counter=Count.TAKEOVERS_REFUSED,
            )
        return Replace(holder)
