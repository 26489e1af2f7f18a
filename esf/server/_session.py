"""
A session: the engine's side of one connection, from accept to close.

The protocol feeds it bytes (L{Session.data_received}), flow-control
signals (L{Session.pause_writing}, L{Session.resume_writing}) and the end of
the connection (L{Session.connection_lost}).  It decodes frames, relays the
common case itself (by the relay's rule, L{esf.server._relay.Relay.forward})
and hands every other frame to its owner (the engine, as far as a session
needs it: L{SessionOwner}).  Its other jobs are its bases': the device
presence hands the router (L{esf.server._device.Device}, an
L{IDeviceHandle}), its output (L{esf.server._output.Output}: queueing, flow
control) and what the peer may make the server spend
(L{esf.server._limits.PeerLimits}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger
from zope.interface import implementer

from esf.interfaces import IChannel, IDeviceHandle
from esf.wire import _decoder as wire_decoder
from esf.wire import _messages as m
from esf.wire._decoder import FrameDecoder, held_wants, take_sends, takes_sends
from esf.wire._frames import (
    SERVER_ID,
    DisconnectedType,
    Frame,
    FrameError,
    FrameRun,
    MessageType,
    encode_frame,
)

from ._config import SessionPhase, UserData
from ._device import Device, DeviceOwner
from ._limits import LOG_LIMIT, LOG_WINDOW
from ._output import Output
from ._relay import ALL_QUEUED

if TYPE_CHECKING:
    pass

__all__ = [
    "Session",
    "SessionOwner",
    "RELAYED",
    "PRE_LOGON_MAX_MESSAGE_SIZE",
    "LOG_LIMIT",
    "LOG_WINDOW",
]

log = Logger(namespace="esf.server")

#: Frames a peer may send before it has logged on are at most this big: an
#: unauthenticated peer cannot make the server reserve a full-size body.
PRE_LOGON_MAX_MESSAGE_SIZE = 64 * 1024

#: Message types that a DestUserID naming a user relays to that user, as
#: they are.  (PingByServer is relayed too, once its empty body is checked.)
RELAYED = frozenset(
    {
        MessageType.PING_ACK,
        MessageType.SEND,
        MessageType.REQUEST,
        MessageType.RESPONSE,
        MessageType.SEND_CERTAINLY,
        MessageType.ACK,
        MessageType.ERROR,
        MessageType.BLOB,
    }
)

#: The one type the relay's inline fast path takes (as L{FrameRun}s): a
#: one-way message, nothing to track.
_SEND = int(MessageType.SEND)
#: The other type read in runs: Broadcasts to one group, taken whole by the
#: engine where they can be (L{SessionOwner.broadcast_run}).
_BROADCAST = int(MessageType.BROADCAST)

#: Whether a read remembers its destinations' output lists (see
#: L{Session.data_received}): that saves a route lookup and a call of
#: C{send} per run, about 15% of a relayed Send's time on CPython and on
#: PyPy alike when a read holds a few frames for each of 50 receivers
#: (C{benchmarks/relay_profile.py --interleave 50}).  Tests turn it off to
#: run the path every short read takes.
_ROUTE_CACHE = True

#: ... and only in a read of at least this many runs and frames: in fewer,
#: a destination seldom comes twice, and remembering costs more than it
#: saves (reads of 20 Sends to 50 receivers, each once: 15% slower with it).
_ROUTE_CACHE_MIN_RUNS = 64

#: The routes of a read that remembers none (never written to).
_NO_ROUTES: dict[str, list[list[bytes]]] = {}

#: Reasons where the peer asked for the close: no DisconnectNotice.
_PEER_INITIATED = frozenset({DisconnectedType.NETWORK_INTERRUPTED, DisconnectedType.LOGGED_OFF})


class _Router(Protocol):
    def resolve(self, dest: str) -> Any: ...


class _Relaying(Protocol):
    def forward(self, sender: Session, targets: Sequence[Any], raw: bytes, frames: int) -> int: ...

    def count(self, message_type: int, frames: int, size: int) -> None: ...


class _Gate(Protocol):
    def admit(self, session: Session, run: FrameRun, targets: Any) -> bool: ...


class SessionOwner(DeviceOwner, Protocol):
    """
    What a session needs of its owner (the engine), beyond what its device
    and output sides need (L{DeviceOwner}, which has what its limits need
    too): the node it is on, the work bucket it starts with, where frames
    go (the router, the relay, the engine's dispatch and its Broadcasts),
    whether a relay policy judges them, and the calls that tell the owner
    of the session's life.
    """

    @property
    def node_id(self) -> str: ...

    @property
    def full_bucket(self) -> float: ...

    @property
    def router(self) -> _Router: ...

    @property
    def relay(self) -> _Relaying: ...

    @property
    def relay_gate(self) -> _Gate | None: ...

    def frame_received(self, session: Session, frame: Frame) -> None: ...

    def broadcast_run(self, session: Session, run: FrameRun) -> None: ...

    def connection_closed(self, session: Session) -> None: ...

    def session_ended(
        self, session: Session, reason: DisconnectedType, text: str, was_logged_on: bool
    ) -> None: ...


def _gathered(targets: Sequence[Any]) -> list[list[bytes]] | None:
    """
    The lists that gather this read's output for C{targets}, when every one
    of them is a local session that takes more as gathered output
    (L{Output.gathered}); else C{None}.
    """
    if len(targets) == 1:
        # One device, the common case, without the loop (as Relay.forward:
        # on PyPy a loop of one turn, once per receiver per read, cost
        # interleaved Sends about 6% in process).
        target = targets[0]
        out = target.gathered() if isinstance(target, Output) else None
        return None if out is None else [out]
    outs = []
    for target in targets:
        out = target.gathered() if isinstance(target, Output) else None
        if out is None:
            return None
        outs.append(out)
    return outs


class _FirstRuns:
    """
    The route of L{take_sends} for one read of C{session}'s (its
    L{esf.wire._decoder.RunRoute}): the first run of Sends to each
    receiver, relayed by the relay rule as L{Session._received} relays it
    (C{False} when the receiver is not online: L{Session._received} then
    takes it, and says so); its receiver's output lists answered only when
    C{remember} (a read long enough for a receiver to come again); what
    was delivered counted for the read's one count.
    """

    __slots__ = ("session", "remember", "frames", "size")

    def __init__(self, session: Session, remember: bool):
        self.session, self.remember = session, remember
        self.frames = self.size = 0

    def __call__(self, dest: str, raw: bytes, count: int) -> list[list[bytes]] | bool | None:
        session = self.session
        owner = session.owner
        targets = owner.router.resolve(dest)
        if not targets:
            return False
        delivered = owner.relay.forward(session, targets, raw, count)
        if not delivered:
            return None
        self.frames += count
        self.size += len(raw)
        return _gathered(targets) if delivered == ALL_QUEUED and self.remember else None


def _take_sends(session: Session, data: bytes) -> bytes:
    """
    The relay's common case in one loop, on PyPy (L{take_sends}), for
    C{session}'s read C{data}: what is left of it for L{Session._received}.
    A frame the last read cut off is completed first, by
    L{Session._received}: nearly every read of a busy sender starts with
    one.
    """
    decoder = session.decoder
    if not takes_sends(decoder):
        return data
    start, size = 0, len(data)
    wants = held_wants(decoder)
    while wants:
        if wants > size - start:
            return data[start:] if start else data
        session._received(data[start : start + wants])
        start += wants
        wants = held_wants(decoder)  # (a header in: its body)
    if session.state is not SessionPhase.LOGGED_ON:
        return b"" if session.state is SessionPhase.ENDED else data[start:]
    # (As Session._received remembers routes: in a read of many frames, here
    # of as many bytes as that many small Sends of 100 bytes.)
    remember = _ROUTE_CACHE and size - start >= _ROUTE_CACHE_MIN_RUNS * 100
    routes = _FirstRuns(session, remember)
    taken, relayed, relayed_bytes = take_sends(
        decoder, data, start, session.user_id, _SEND, routes
    )
    if relayed or routes.frames:
        session.owner.relay.count(_SEND, relayed + routes.frames, relayed_bytes + routes.size)
    if taken > start:
        session.active = True
    return data[taken:] if taken < size else b""


@implementer(IDeviceHandle)
class Session(Device):
    """
    One connection to the server.  C{owner} is the engine, as far as a
    session needs it (L{SessionOwner}).
    """

    __slots__ = (
        "owner",
        "channel",
        "address",
        "decoder",
        "state",
        "user_id",
        "client_type",
        "user_data",
        "logon_order",
        "connected_at",
        "active",
        "last_active",
        "logon_timer",
        "blobs",
        "asked",
        "_partial",
        "__weakref__",
    )

    owner: SessionOwner

    def __init__(self, owner: SessionOwner, channel: IChannel):
        self.owner = owner
        self.channel = channel
        self.address: str = channel.address
        config = owner.config
        self.decoder = FrameDecoder(
            config.wire,
            max_message_size=min(PRE_LOGON_MAX_MESSAGE_SIZE, config.wire.max_message_size),
        )
        self.state = SessionPhase.AWAITING_LOGON
        self.user_id: str | None = None
        self.client_type: int | None = None
        self.user_data: UserData | None = None
        self.logon_order = 0
        self.connected_at = owner.clock.seconds()
        #: Whether a complete frame arrived since the reaper last looked.
        self.active = False
        self.last_active = self.connected_at
        self.logon_timer: Any = None
        #: Blobs addressed to the server, being reassembled (made on demand).
        self.blobs: m.BlobAssembler | None = None
        #: Requests this session relayed to users, awaiting their answers
        #: (kept by L{esf.server._router.AnswerRouter}; made on demand).
        self.asked: dict[Any, Any] | None = None
        #: Bytes of a partial frame counted in the engine's memory budget.
        self._partial = 0
        self._init_limits(owner.full_bucket, self.connected_at)
        self._init_output()

    def __repr__(self) -> str:
        who = f"{self.user_id}/{self.client_type}" if self.user_id is not None else "-"
        return f"<Session {who} {self.address} {self.state.value}>"

    @property
    def node(self) -> str:
        """
        The node this session is on: this engine's.
        """
        node: str = self.owner.node_id
        return node

    @property
    def session_id(self) -> str:
        """
        This logon's fencing token (L{IDeviceHandle.session_id}): the node
        and the Logon's order there, unique among the node's logons.  Made
        when asked for (rarely), not kept.
        """
        return f"{self.owner.node_id}/{self.logon_order}"

    @property
    def logged_on(self) -> bool:
        return self.state is SessionPhase.LOGGED_ON

    @property
    def ended(self) -> bool:
        return self.state is SessionPhase.ENDED

    # -- input from the protocol --------------------------------------------

    def data_received(self, data: bytes) -> None:
        """
        Bytes arrived from the peer.
        """
        owner = self.owner
        batch = owner.batch
        outermost = batch.begin()
        try:
            if (
                wire_decoder.TAKE_SENDS  # (PyPy: else no call per read)
                and self.state is SessionPhase.LOGGED_ON
                and owner.relay_gate is None
            ):
                data = _take_sends(self, data)
            if data:
                self._received(data)
        finally:
            if outermost:
                batch.flush()

    def _received(self, data: bytes) -> None:
        """
        Decode and handle C{data}, within the read's output batch.
        """
        error = None
        decoder = self.decoder
        owner = self.owner
        try:
            frames = decoder.feed_runs(data, _SEND, _BROADCAST)
        except FrameError as e:
            frames, error = e.frames, e
        if frames:
            self.active = True
        partial = decoder.buffered
        if partial != self._partial:
            refusal = self._holding(partial)
            if error is None:
                error = refusal
        frame_received = owner.frame_received
        broadcast_run = owner.broadcast_run
        resolve = owner.router.resolve
        relay = owner.relay
        forward = relay.forward
        logged_on = SessionPhase.LOGGED_ON
        relayed = relayed_bytes = 0
        # This read's routes: DestUserID -> the output lists of its
        # devices, for destinations whose every device took a run as
        # gathered output (Output.gathered).  Until another kind of
        # frame is handled nothing else runs, so no device comes, goes,
        # ends or falls behind, and the next runs to that destination
        # are appended where its first went: one lookup per
        # destination per read, in order per sender and receiver.
        # A relay policy judges every run (RelayGate.admit), so no
        # route is remembered past one.
        gate = owner.relay_gate
        cache = _ROUTE_CACHE and len(frames) >= _ROUTE_CACHE_MIN_RUNS and gate is None
        routes: dict[str, list[list[bytes]]] = {} if cache else _NO_ROUTES
        for item in frames:
            state = self.state
            if isinstance(item, tuple):
                # A run (FrameDecoder.feed_runs: its fields).  The
                # relay's common case, inline: Sends to one user
                # online, forwarded as they came (one slice, one
                # write).  A run of Broadcasts goes to the engine whole;
                # everything else takes frame_received.
                run_type, user_id, dest, raw, count, _, _ = item
                if state is logged_on and user_id == self.user_id:
                    if run_type != _SEND:
                        if routes:
                            routes = {}
                        broadcast_run(self, FrameRun(*item))
                        continue
                    outs = routes.get(dest) if cache else None
                    if outs is not None:
                        for out in outs:
                            out.append(raw)
                        relayed += count
                        relayed_bytes += len(raw)
                        continue
                    targets = resolve(dest)
                    if targets:
                        if gate is not None and not gate.admit(self, FrameRun(*item), targets):
                            continue  # not all allowed at once: the gate took them
                        # The relay rule, the same for every frame.
                        delivered = forward(self, targets, raw, count)
                        if delivered:
                            relayed += count
                            relayed_bytes += len(raw)
                            if delivered == ALL_QUEUED and cache:
                                outs = _gathered(targets)
                                if outs is not None:
                                    routes[dest] = outs
                        continue
                if routes:
                    routes = {}
                for frame in FrameRun(*item).frames():
                    if self.state is SessionPhase.ENDED:
                        break
                    frame_received(self, frame)
                continue
            if state is SessionPhase.ENDED:
                break
            if routes:
                routes = {}
            frame_received(self, item)
        if relayed:
            relay.count(_SEND, relayed, relayed_bytes)
        if error is not None and self.state is not SessionPhase.ENDED:
            self.end(error.reason, error.message)

    def channel_holds(self, size: int) -> None:
        """
        After a read, the channel holds C{size} bytes of frames not yet
        whole, before the decoder (a WebSocket message being received, say):
        they count in the server's memory budget as the decoder's own
        partial frame does, and past it the session ends as for a frame too
        large.  (A channel that holds such bytes says so after every read
        it hands on: L{data_received} counts the decoder's alone.)
        """
        partial = self.decoder.buffered + size
        if partial == self._partial:
            return
        error = self._holding(partial)
        if error is not None:
            self.end(error.reason, error.message)

    def _holding(self, partial: int) -> FrameError | None:
        """
        Count C{partial} bytes of unfinished frames in the memory budget (in
        place of what was counted); the error that ends the session when
        the budget is spent and they are more than a small frame.
        """
        if self.state is SessionPhase.ENDED:
            return None
        budget = self.owner.budget
        budget.used += partial - self._partial
        self._partial = partial
        if partial > PRE_LOGON_MAX_MESSAGE_SIZE and budget.used > budget.limit:
            # Refused before the whole frame is held: a frame this big
            # does not fit what the server may buffer now.
            return FrameError(
                DisconnectedType.MESSAGE_TOO_LARGE,
                f"the server's memory budget is spent: no room now for a frame of "
                f"more than {PRE_LOGON_MAX_MESSAGE_SIZE} bytes; try later",
            )
        return None

    def connection_lost(self) -> None:
        """
        The connection is gone; end the session if it has not ended yet.
        """
        self.end(DisconnectedType.NETWORK_INTERRUPTED, "connection lost")
        self.owner.connection_closed(self)

    # -- ending ---------------------------------------------------------------

    def end(self, reason: DisconnectedType, text: str = "") -> None:
        """
        End the session, exactly once: tell the owner (which unbinds it and
        logs one event), and, unless the peer ended it, send a
        C{DisconnectNotice} and close the connection.
        """
        if self.state is SessionPhase.ENDED:
            return
        self.flush()  # what was sent before the end arrives before the notice
        was_logged_on = self.state is SessionPhase.LOGGED_ON
        self.state = SessionPhase.ENDED
        self._held = None
        self.owner.budget.used -= self._partial + self._held_bytes
        self._partial = self._held_bytes = 0
        self._caught_up()
        self._stop_refusal_timer()
        if self.logon_timer is not None and self.logon_timer.active():
            self.logon_timer.cancel()
        self.logon_timer = None
        self.owner.session_ended(self, reason, text, was_logged_on)
        try:
            if reason not in _PEER_INITIATED:
                notice = m.DisconnectNotice(reason, text[:1000]).encode()
                # Written directly: the output bound no longer matters, and
                # the close timeout bounds how long it may take.
                self.channel.write(
                    encode_frame(
                        self.owner.config.wire,
                        MessageType.DISCONNECT_NOTICE,
                        notice,
                        user_id=SERVER_ID,
                        dest_user_id=self.user_id or "",
                    )
                )
            self.channel.close(reason)
        except Exception:
            log.failure("closing {session!r} failed", session=self)
