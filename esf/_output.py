"""
A session's output: what it queues for its peer, and the flow control
between peers.

Output to a peer is gathered while a read is handled and written once
(L{OutputBatch}).  A peer that stops reading: its transport pauses the
session (L{Output.pause_writing}); what is queued from then on counts
against C{max_output_buffer}, past half of it the peer's senders are not
read (push back, L{Output.push_back}) until it drains, and a peer that does
not drain within C{output_drain_timeout} ends with C{ChannelCacheOverflow}.
Frames relayed to a device that is logging on, or whose stored messages are
being delivered, are held (L{Output.hold}) and written after.

L{Output} is the base of L{esf._session.Session}: one object per
connection, split in two modules by concern.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from weakref import WeakSet

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ._config import SessionState
from ._counters import Count
from ._wire import DisconnectedType

if TYPE_CHECKING:
    from ._engine import ServerEngine
    from .interfaces import IChannel

__all__ = ["Output", "OutputBatch"]

log = Logger(namespace="esf.server")

#: A backlog may grow to this many times C{max_output_buffer} while its
#: senders are held back (each may finish the read it is in); beyond it
#: relayed frames are dropped and counted.
_HARD_BOUND_FACTOR = 4

class OutputBatch:
    """
    While one read's frames are handled, output to every session is gathered
    and written once per session afterwards: a read of many small frames
    costs each receiver one transport write, not many.
    """

    __slots__ = ("_sessions",)

    def __init__(self) -> None:
        self._sessions: list[Output] | None = None

    @property
    def gathering(self) -> bool:
        return self._sessions is not None

    def begin(self) -> bool:
        """
        Start gathering; C{False} if a batch is gathering already (a read
        handled inside another one's), which then writes it all.
        """
        if self._sessions is not None:
            return False
        self._sessions = []
        return True

    def add(self, session: Output) -> None:
        self._sessions.append(session)  # type: ignore[union-attr]

    def flush(self) -> None:
        sessions, self._sessions = self._sessions, None
        for session in sessions or ():
            session.flush()


class Output:
    """
    The output side of a session (see the module's docstring).  The
    session provides C{owner}, C{channel}, C{state} and C{end}.
    """

    __slots__ = (
        "_paused",
        "_backlog",
        "_drain_timer",
        "_blocked",
        "_blockers",
        "_out",
        "_held",
        "_held_bytes",
        "_writable_waiters",
    )

    owner: ServerEngine
    channel: IChannel
    state: SessionState

    def _init_output(self) -> None:
        self._paused = False
        self._backlog = 0
        #: Ends the session if its backlog stays over the bound too long.
        self._drain_timer: Any = None
        #: Senders whose reading this session's backlog has paused; weak: a
        #: sender that leaves meanwhile is not kept alive until this
        #: session drains.
        self._blocked: WeakSet[Output] | None = None
        #: How many receivers hold this session's reading paused.
        self._blockers = 0
        #: Output gathered during a read, written by L{flush}.
        self._out: list[bytes] | None = None
        #: Frames relayed to the device while its Logon was being claimed,
        #: or while its stored messages are delivered (L{hold}).
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        #: Who waits for the peer to catch up (L{when_writable}).
        self._writable_waiters: list[Deferred[None]] | None = None

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
        self._release_blocked()
        waiters, self._writable_waiters = self._writable_waiters, None
        for d in waiters or ():
            d.callback(None)

    def when_writable(self) -> Deferred[None]:
        """
        A Deferred that fires once the peer is not behind: at once if it is
        not now, else when it has drained or the session has ended.
        """
        if not self._paused or self.state is SessionState.ENDED:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if self._writable_waiters is None:
            self._writable_waiters = []
        self._writable_waiters.append(d)
        return d

    # -- push back: a receiver that is backed up slows its senders down ------

    def push_back(self, sender: Output) -> None:
        """
        This session's backlog passed half its bound while C{sender} relayed
        to it: stop reading C{sender} until this session drains (or ends).
        Like TCP's own flow control, only slower senders, never the
        receiver, pay for a burst.
        """
        if sender is self or sender.state is SessionState.ENDED:
            return
        blocked = self._blocked
        if blocked is None:
            blocked = self._blocked = WeakSet()
        if sender in blocked:
            return
        blocked.add(sender)
        sender._blockers += 1
        if sender._blockers == 1:
            sender.owner.counters[Count.SENDERS_PAUSED] += 1
            sender.channel.pause_reading()

    def _release_blocked(self) -> None:
        blocked, self._blocked = self._blocked, None
        for sender in list(blocked or ()):
            sender._blockers -= 1
            if sender._blockers == 0 and sender.state is not SessionState.ENDED:
                sender.channel.resume_reading()

    def _not_draining(self) -> None:
        self._drain_timer = None
        limit = self.owner.config.max_output_buffer
        self.end(
            DisconnectedType.CHANNEL_CACHE_OVERFLOW,
            f"more than {limit // 2} bytes waited for longer than "
            f"{self.owner.config.output_drain_timeout:g} s for a peer that does not read",
        )

    # -- output ------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """
        Write a frame to the peer once it is logged on (held until its Logon
        reply while it logs on; dropped once it has ended).

        @return: whether this session is backed up (its backlog is past half
            its bound): the sender should be held back (L{push_back}).
        """
        state = self.state
        if state is SessionState.LOGGED_ON and self._held is None:
            out = self._out
            if out is not None and not self._paused:
                out.append(data)  # the relay's common case: gathered for this read
                return False
            self.queue(data)
            # Backed up: whoever relays to this session should wait.
            return self._paused and self._backlog * 2 > self.owner.config.max_output_buffer
        if state is SessionState.LOGGED_ON or state is SessionState.LOGGING_ON:
            return self._hold(data)
        return False

    def hold(self) -> None:
        """
        Hold what is relayed to this session (L{send}) until
        L{release_held}: its stored messages go first.
        """
        if self._held is None:
            self._held = []

    def _hold(self, data: bytes) -> bool:
        """
        Hold C{data}, within the session's hard output bound and the
        server's budget (past them it is dropped and counted).

        @return: whether the senders should be held back.
        """
        held = self._held
        if held is None:
            held = self._held = []
        size = len(data)
        total = self._held_bytes + size
        if self._dropped(total, size):
            return True
        held.append(data)
        self._held_bytes = total
        self.owner.budget.used += size
        return total * 2 > self.owner.config.max_output_buffer

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
        if self.state is SessionState.ENDED:
            return
        if self._paused:
            # The peer is behind: what is queued now counts.  Past half the
            # bound its senders are held back (L{send}) and the peer has
            # output_drain_timeout seconds to drain before its session ends
            # (a burst is not a crime).  Past the hard bound, or past the
            # server's memory budget, more is dropped and counted.
            size = len(data)
            backlog = self._backlog + size
            if self._dropped(backlog, size):
                return
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
            return
        batch = self.owner.batch
        if batch.gathering:
            self._out = [data]
            batch.add(self)
            return
        self._write(data)

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
            self._release_blocked()  # the senders held back meanwhile

    def flush(self) -> None:
        """
        Write the output gathered for this session during a read.
        """
        out = self._out
        if out is None:
            return
        self._out = None
        self._write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        try:
            self.channel.write(data)
        except Exception:
            # Twisted's transports do not raise on write; a channel that
            # does is treated as a connection that went away, never as an
            # error of whoever was sending.
            log.failure("writing to {session!r} failed", session=self)
            self.end(DisconnectedType.NETWORK_INTERRUPTED, "writing to the connection failed")

