"""
A session's output: what it queues for its peer, and the flow control
between peers.

Output to a peer is gathered while a read is handled and written once
(L{OutputBatch}).  A peer that stops reading: its transport pauses the
session (L{Receiver.pause_writing}); what is queued from then on counts
against C{max_output_buffer}.  Past half of it the peer is I{backed up}:
its senders are read no further (push back, L{Receiver.push_back}), but for
C{push_back_timeout} at most.  A peer that has not drained by then is
I{stalled}: its senders read again, more is queued for it up to the whole
bound, and past that what is relayed to it is refused (L{REFUSED}), so
that it never holds up its senders' traffic to others.  A peer that does
not drain within C{output_drain_timeout} ends with C{ChannelCacheOverflow}.
A sender that keeps relaying what is refused is slowed down
(L{Sender.refused}).  Frames relayed to a device that is logging on, or
whose stored messages are being delivered, are held (L{Output.hold}) and
written after, under the same rules.

L{Output} (with L{Receiver}, the session as a receiver that may fall
behind, and L{Sender}, the session as a sender that may be held back) is
the base of L{esf.server._session.Session}: one object per connection,
split by concern.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from weakref import WeakSet

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from esf.wire._frames import DisconnectedType

from ._config import EngineBasics, SessionPhase
from ._counters import Count
from ._limits import PeerLimits

if TYPE_CHECKING:
    from esf.interfaces import IChannel

    from ._budget import MemoryBudget

__all__ = [
    "Sender",
    "Receiver",
    "Output",
    "OutputOwner",
    "OutputBatch",
    "PUSH_BACK",
    "REFUSED",
    "DROPPED",
]

log = Logger(namespace="esf.server")

#: A backlog may grow to this many times C{max_output_buffer} while its
#: senders are held back (each may finish the read it is in); beyond it
#: relayed frames are dropped and counted.
_HARD_BOUND_FACTOR = 4

#: What L{Output.send} answers besides a false value (queued, nothing to
#: do).  Plain ints, compared with C{==}: the relay's common case tests
#: only for a true value.
#:
#: Queued, and the peer is backed up: hold the sender back
#: (L{Receiver.push_back}).
PUSH_BACK = 1
#: Not queued: the peer is stalled (backed up past its push back) and its
#: queue is full.  Nothing counted yet: the caller counts the frames
#: (C{receiver_behind}) and answers a request.
REFUSED = 2
#: Not queued: past the hard bound or the server's memory budget (counted
#: as C{output_dropped} already).
DROPPED = 3

#: A sender may have this many times C{max_output_buffer} of its frames
#: refused (L{REFUSED}, L{DROPPED}) at once; the allowance refills at
#: C{max_output_buffer} bytes a second.  Past it the sender is read no
#: further until the allowance is back above zero.
_REFUSAL_BURST_FACTOR = 2


class OutputBatch:
    """
    While one read's frames are handled, output to every session is gathered
    and written once per session afterwards: a read of many small frames
    costs each receiver one transport write, not many.
    """

    __slots__ = ("sessions",)

    def __init__(self) -> None:
        #: The sessions with output gathered, in the order it was first
        #: gathered; C{None} while no batch is gathering.  (A plain
        #: attribute, not a method: L{Output.send} appends to it itself,
        #: once per receiver per read.)
        self.sessions: list[Output] | None = None

    @property
    def gathering(self) -> bool:
        return self.sessions is not None

    def begin(self) -> bool:
        """
        Start gathering; C{False} if a batch is gathering already (a read
        handled inside another one's), which then writes it all.
        """
        if self.sessions is not None:
            return False
        self.sessions = []
        return True

    def flush(self) -> None:
        sessions, self.sessions = self.sessions, None
        for session in sessions or ():
            session.flush()


class OutputOwner(EngineBasics, Protocol):
    """
    What a session's output needs of its owner (the engine): the settings,
    the clock, the counters, the server's memory budget and the batch that
    gathers a read's output.
    """

    @property
    def budget(self) -> MemoryBudget: ...

    @property
    def batch(self) -> OutputBatch: ...


class Sender(PeerLimits):
    """
    A session as a sender: held back (its reading paused) while receivers
    it relays to are backed up (L{Receiver.push_back}), or while it has
    spent its allowance of refused relays (L{refused}).  The session
    provides C{owner}, C{channel} and C{state}.
    """

    __slots__ = ("_blockers", "_refusable", "_refusable_at", "_refusal_timer")

    owner: OutputOwner
    channel: IChannel
    state: SessionPhase

    def _init_sender(self) -> None:
        #: How many receivers (and the refusal allowance) hold this
        #: session's reading paused.
        self._blockers = 0
        #: Bytes of its relays that may still be refused before it is
        #: slowed down (L{refused}), as of C{_refusable_at}.
        self._refusable: float = _REFUSAL_BURST_FACTOR * self.owner.config.max_output_buffer
        self._refusable_at = 0.0
        #: Resumes its reading once the allowance is back (L{refused}).
        self._refusal_timer: Any = None

    def hold_back(self) -> None:
        """
        Read this session no further, until every part that holds it back
        lets it go (L{let_go}): each receiver it relays to that is backed
        up, its refusal allowance, the relay policy's decisions it waits
        for (L{esf.server._relay_policy.RelayGate}).
        """
        self._blockers += 1
        if self._blockers == 1:
            self.owner.counters[Count.SENDERS_PAUSED] += 1
            self.channel.pause_reading()

    def let_go(self) -> None:
        """
        One part that held this session back (L{hold_back}) lets it go:
        reading resumes once none does.
        """
        self._blockers -= 1
        if self._blockers == 0 and self.state is not SessionPhase.ENDED:
            self.channel.resume_reading()

    def refused(self, size: int) -> None:
        """
        C{size} bytes this session relayed were refused (L{REFUSED},
        L{DROPPED}).  Reading them costs the server little, and a burst of
        them does not slow the sender; one that keeps relaying what is
        refused spends its allowance (twice C{max_output_buffer}, refilled
        at C{max_output_buffer} a second; a token bucket, as
        L{esf.server._session.Session.charge}) and is then read no further until
        the allowance is back above zero.
        """
        owner = self.owner
        rate = owner.config.max_output_buffer
        now = owner.clock.seconds()
        allowance = self._refusable + (now - self._refusable_at) * rate
        if allowance > _REFUSAL_BURST_FACTOR * rate:
            allowance = _REFUSAL_BURST_FACTOR * rate
        allowance -= size
        self._refusable, self._refusable_at = allowance, now
        if allowance < 0 and self._refusal_timer is None and self.state is not SessionPhase.ENDED:
            self.hold_back()
            self._refusal_timer = owner.clock.callLater(-allowance / rate, self._refilled)

    def _refilled(self) -> None:
        self._refusal_timer = None
        self.let_go()

    def _stop_refusal_timer(self) -> None:
        """
        The session ended: its refusal allowance no longer matters.
        """
        if self._refusal_timer is not None:
            if self._refusal_timer.active():
                self._refusal_timer.cancel()
            self._refusal_timer = None


class Receiver(Sender):
    """
    A session as a receiver that may fall behind: its transport pauses and
    resumes it (L{pause_writing}, L{resume_writing}); while it is backed up
    it holds its senders back (L{push_back}) for a while, then is stalled;
    one that does not drain in time ends.  The session provides C{owner},
    C{channel}, C{state} and C{end}; L{Output} counts its backlog.
    """

    __slots__ = (
        "_paused",
        "_backlog",
        "_drain_timer",
        "_blocked",
        "_writable_waiters",
        "_push_back_timer",
        "_stalled",
    )

    owner: OutputOwner
    channel: IChannel
    state: SessionPhase

    def _init_receiver(self) -> None:
        self._init_sender()
        self._paused = False
        self._backlog = 0
        #: Ends the session if its backlog stays over the bound too long.
        self._drain_timer: Any = None
        #: Senders whose reading this session's backlog has paused; weak: a
        #: sender that leaves meanwhile is not kept alive until this
        #: session drains.
        self._blocked: WeakSet[Sender] | None = None
        #: Who waits for the peer to catch up (L{when_writable}).
        self._writable_waiters: list[Deferred[None]] | None = None
        #: Ends the push back on this session's senders (L{_stall}).
        self._push_back_timer: Any = None
        #: Backed up past its push back: relays are refused once its queue
        #: is full, its senders are not held back.
        self._stalled = False

    def end(self, reason: DisconnectedType, text: str = "") -> None:
        raise NotImplementedError  # the session's

    # -- flow control from the transport -------------------------------------

    def pause_writing(self) -> None:
        """
        The transport's buffer is full: the peer is not reading fast enough.
        """
        self._paused = True

    def resume_writing(self) -> None:
        """
        The transport's buffer has drained: stop the drain timer and let the
        senders this session held back read again.
        """
        self._paused = False
        self._caught_up()

    def _caught_up(self) -> None:
        """
        Nothing waits for the peer any more (it drained, or the session
        ended): release the backlog's bytes, the drain timer, the senders
        held back and whoever waits (L{when_writable}).
        """
        self.owner.budget.used -= self._backlog
        self._backlog = 0
        if self._drain_timer is not None:
            if self._drain_timer.active():
                self._drain_timer.cancel()
            self._drain_timer = None
        self._end_push_back()
        waiters, self._writable_waiters = self._writable_waiters, None
        for d in waiters or ():
            d.callback(None)

    def when_writable(self) -> Deferred[None]:
        """
        A Deferred that fires once the peer is not behind: at once if it is
        not now, else when it has drained or the session has ended.
        """
        if not self._paused or self.state is SessionPhase.ENDED:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if self._writable_waiters is None:
            self._writable_waiters = []
        self._writable_waiters.append(d)
        return d

    # -- push back: a receiver that is backed up slows its senders down ------

    def push_back(self, sender: Sender | None) -> None:
        """
        This session's backlog passed half its bound while C{sender} relayed
        to it: stop reading C{sender} until this session drains (or ends),
        for C{push_back_timeout} at most (L{_stall}).  Like TCP's own flow
        control, only slower senders, never the receiver, pay for a burst;
        but a sender's connection carries its traffic to everyone, so it
        is held back only briefly.  C{None}: the frames came from another
        node of a cluster, with no sender here to hold back; the push
        back's time runs all the same.
        """
        if sender is self or self._stalled:
            return
        if sender is not None and sender.state is SessionPhase.ENDED:
            return
        if self._push_back_timer is None:
            timeout = self.owner.config.push_back_timeout
            if timeout <= 0:
                self._stall()
                return
            self._push_back_timer = self.owner.clock.callLater(timeout, self._stall)
        if sender is None:
            return
        blocked = self._blocked
        if blocked is None:
            blocked = self._blocked = WeakSet()
        if sender in blocked:
            return
        blocked.add(sender)
        sender.hold_back()

    def _stall(self) -> None:
        """
        The push back is over and this session has not drained: let its
        senders read again.  Until it drains, relays to it are queued up to
        its bound and refused past it (L{Output.send}).
        """
        self._push_back_timer = None
        self._stalled = True
        self._release_blocked()

    def _end_push_back(self) -> None:
        """
        This session caught up (or ended): no more push back or stall.
        """
        if self._push_back_timer is not None:
            if self._push_back_timer.active():
                self._push_back_timer.cancel()
            self._push_back_timer = None
        self._stalled = False
        self._release_blocked()

    def _release_blocked(self) -> None:
        blocked, self._blocked = self._blocked, None
        for sender in list(blocked or ()):
            sender.let_go()

    def _not_draining(self) -> None:
        self._drain_timer = None
        limit = self.owner.config.max_output_buffer
        self.end(
            DisconnectedType.CHANNEL_CACHE_OVERFLOW,
            f"more than {limit // 2} bytes waited for longer than "
            f"{self.owner.config.output_drain_timeout:g} s for a peer that does not read",
        )


class Output(Receiver):
    """
    The output side of a session (see the module's docstring).  The
    session provides C{owner}, C{channel}, C{state} and C{end}.
    """

    __slots__ = ("_out", "_held", "_held_bytes")

    def _init_output(self) -> None:
        self._init_receiver()
        #: Output gathered during a read, written by L{flush}.
        self._out: list[bytes] | None = None
        #: Frames relayed to the device while its Logon was being claimed,
        #: or while its stored messages are delivered (L{hold}).
        self._held: list[bytes] | None = None
        self._held_bytes = 0

    # -- output ------------------------------------------------------------------

    def send(self, data: bytes) -> int:
        """
        Write a frame to the peer once it is logged on (held until its Logon
        reply while it logs on; dropped once it has ended).

        @return: 0 when queued; L{PUSH_BACK} when queued and this session is
            backed up (its backlog is past half its bound): the sender
            should be held back (L{push_back}); L{REFUSED} or L{DROPPED}
            when not queued.
        """
        state = self.state
        if state is SessionPhase.LOGGED_ON and self._held is None:
            if not self._paused:
                # The relay's common case: gathered for this read, written
                # at its end (inline: once per receiver per read).
                out = self._out
                if out is not None:
                    out.append(data)
                    return 0
                gathering = self.owner.batch.sessions
                if gathering is not None:
                    self._out = [data]
                    gathering.append(self)
                    return 0
            limit = self.owner.config.max_output_buffer
            if self._stalled and self._backlog + len(data) > limit:
                return REFUSED
            if not self._queue(data):
                return DROPPED
            # Backed up: whoever relays to this session should wait.
            if self._paused and not self._stalled and self._backlog * 2 > limit:
                return PUSH_BACK
            return 0
        if state is SessionPhase.LOGGED_ON or state is SessionPhase.LOGGING_ON:
            return self._hold(data)
        return 0

    def gathered(self) -> list[bytes] | None:
        """
        The list that gathers this read's output for the peer, when what
        L{send} is given now would only be appended to it (logged on, not
        held, not behind, a read being handled); else C{None}.  Until
        something else than a relay runs, the relay may append there
        itself (L{esf.server._session.Session.data_received}).
        """
        if self.state is SessionPhase.LOGGED_ON and self._held is None and not self._paused:
            return self._out
        return None

    def hold(self) -> None:
        """
        Hold what is relayed to this session (L{send}) until
        L{release_held}: its stored messages go first.
        """
        if self._held is None:
            self._held = []

    def _hold(self, data: bytes) -> int:
        """
        Hold C{data}, within the session's bounds and the server's budget
        (as L{send}: past them it is refused, or dropped and counted).
        """
        held = self._held
        if held is None:
            held = self._held = []
        size = len(data)
        total = self._held_bytes + size
        limit = self.owner.config.max_output_buffer
        if self._stalled and total > limit:
            return REFUSED
        if self._dropped(total, size):
            return DROPPED
        held.append(data)
        self._held_bytes = total
        self.owner.budget.used += size
        return PUSH_BACK if not self._stalled and total * 2 > limit else 0

    def _dropped(self, total: int, size: int) -> bool:
        """
        Whether C{size} more bytes for the peer, C{total} waiting with them,
        pass its hard bound or the server's memory budget: then they are
        dropped, and counted.
        """
        owner = self.owner
        if total > owner.config.max_output_buffer * _HARD_BOUND_FACTOR or not owner.budget.fits(
            size
        ):
            owner.counters[Count.OUTPUT_DROPPED] += 1
            return True
        return False

    def queue(self, data: bytes) -> None:
        """
        Queue a frame for the peer, unless the session has ended.  A peer
        that stays behind for C{output_drain_timeout} ends with
        C{ChannelCacheOverflow}.
        """
        self._queue(data)

    def _queue(self, data: bytes) -> bool:
        """
        L{queue}; C{False} when C{data} was dropped (past the hard bound or
        the server's budget).
        """
        if self.state is SessionPhase.ENDED:
            return True
        if self._paused:
            # The peer is behind: what is queued now counts.  Past half the
            # bound its senders are held back (L{send}) and the peer has
            # output_drain_timeout seconds to drain before its session ends
            # (a burst is not a crime).  Past the hard bound, or past the
            # server's memory budget, more is dropped and counted.
            size = len(data)
            backlog = self._backlog + size
            if self._dropped(backlog, size):
                return False
            owner = self.owner
            if backlog * 2 > owner.config.max_output_buffer and self._drain_timer is None:
                self._drain_timer = owner.clock.callLater(
                    owner.config.output_drain_timeout, self._not_draining
                )
            self._backlog = backlog
            owner.budget.used += size
        out = self._out
        if out is not None:
            out.append(data)
            return True
        gathering = self.owner.batch.sessions
        if gathering is not None:
            self._out = [data]
            gathering.append(self)
            return True
        self._write(data)
        return True

    def release_held(self) -> None:
        """
        The Logon reply (and the stored messages) are out: write what was
        relayed meanwhile.
        """
        held, self._held = self._held, None
        self.owner.budget.used -= self._held_bytes
        self._held_bytes = 0
        if held:
            # Written together, as the frames of one read are.
            batch = self.owner.batch
            outermost = batch.begin()
            try:
                for data in held:
                    self.queue(data)
            finally:
                if outermost:
                    batch.flush()
        if not self._paused:
            self._end_push_back()  # the senders held back meanwhile

    def flush(self) -> None:
        """
        Write the output gathered for this session during a read.
        """
        out = self._out
        if out is None:
            return
        self._out = None
        try:  # (L{_write}, inline: once per receiver per read)
            self.channel.write(out[0] if len(out) == 1 else b"".join(out))
        except Exception:
            self._write_failed()

    def _write(self, data: bytes) -> None:
        try:
            self.channel.write(data)
        except Exception:
            self._write_failed()

    def _write_failed(self) -> None:
        """
        The channel raised on a write (handled by the caller's C{except}).
        Twisted's transports do not raise on write; a channel that does is
        treated as a connection that went away, never as an error of
        whoever was sending.
        """
        log.failure("writing to {session!r} failed", session=self)
        self.end(DisconnectedType.NETWORK_INTERRUPTED, "writing to the connection failed")
