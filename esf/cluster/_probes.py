"""
Probes: whether a device another node's session holds is still held there.

With C{ignore-new}, a logon loses to the device's holder.  When that holder
is on another node, the node may have died or be paused without its lease
having expired yet (up to C{--cluster-lease}); refusing the new logon
C{HadLoggedOn}, which clients take as final, would then lock the user out.
So the holder's node is asked first (a L{Probe} record in its inbox, which
a live node reads at once) and has L{PROBE_SECONDS} to answer (a
L{Probed} record in this node's): no answer, and the new logon is refused
C{Busy}, which a client retries; by the time the lease has expired, a retry
takes the device.
"""

from __future__ import annotations

import collections
import itertools

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ._messaging import Post, RemoteHandle
from ._records import Probe

__all__ = ["Probes", "PROBE_SECONDS"]

#: How long the holder's node has to answer a probe.
PROBE_SECONDS = 1.0


class Probes:
    """
    This node's probes of other nodes' sessions, and its answers to theirs.

    @param post: posts a record to another node (L{Outbox.post}).
    @param max_waiting: most probes awaiting their answers; past it a probe
        is answered "no answer" at once (a bound on what logons can make
        this node keep).
    """

    def __init__(
        self,
        clock: IReactorTime,
        node_id: str,
        *,
        post: Post,
        stats: collections.Counter[str],
        seconds: float = PROBE_SECONDS,
        max_waiting: int = 10_000,
    ):
        self.clock = clock
        self.node_id = node_id
        self.post = post
        self.stats = stats
        self.seconds = seconds
        self.max_waiting = max_waiting
        self._tokens = itertools.count(1)
        #: token -> (the Deferred of its asker, its timer).
        self.waiting: dict[int, tuple[Deferred[bool | None], IDelayedCall]] = {}

    def ask(self, holder: RemoteHandle) -> Deferred[bool | None]:
        """
        Whether C{holder}'s node says its session still holds the device:
        C{True} or C{False}, or C{None} if it did not answer in time.
        """
        if len(self.waiting) >= self.max_waiting:
            self.stats["probes_unanswered"] += 1
            return succeed(None)
        token = next(self._tokens)
        d: Deferred[bool | None] = Deferred()
        timer = self.clock.callLater(self.seconds, self._expired, token)
        self.waiting[token] = (d, timer)
        self.post(holder.node, Probe(holder.session_id, token, self.node_id))
        return d

    def answered(self, token: int, held: bool) -> None:
        """
        The answer to the probe C{token} came (a L{Probed} record).
        """
        entry = self.waiting.pop(token, None)
        if entry is None:
            return  # too late: its asker was told "no answer"
        d, timer = entry
        timer.cancel()
        d.callback(held)

    def _expired(self, token: int) -> None:
        entry = self.waiting.pop(token, None)
        if entry is not None:
            self.stats["probes_unanswered"] += 1
            entry[0].callback(None)

    def stop(self) -> None:
        """
        Answer every probe still waiting "no answer".
        """
        waiting, self.waiting = self.waiting, {}
        for d, timer in waiting.values():
            timer.cancel()
            d.callback(None)
