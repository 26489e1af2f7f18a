"""
A session: the engine's side of one connection, from accept to close.

The protocol feeds it bytes (L{Session.data_received}), flow-control
signals (L{Session.pause_writing}, L{Session.resume_writing}) and the end of
the connection (L{Session.connection_lost}).  It decodes frames, relays the
common case itself and hands every other frame to its owner (the engine);
its output side (queueing, flow control) is L{esf.server._output.Output}.  A logged-on
session is an L{IDeviceHandle}: what presence hands the router.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from twisted.logger import Logger
from zope.interface import implementer

from esf.wire import _messages as m
from ._config import SessionPhase, UserData
from ._counters import Count
from ._output import REFUSED, Output, OutputOwner
from ._relay import ALL_QUEUED
from ._router import ANSWERS
from esf.wire._frames import (
    _FIXED_HEADER,
    SERVER_ID,
    DisconnectedType,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    MessageType,
    SendRun,
    encode_frame,
)
from esf.interfaces import IChannel, IDeviceHandle

if TYPE_CHECKING:
    from ._presence import UserManager

__all__ = ["Session", "SessionOwner", "RELAYED", "PRE_LOGON_MAX_MESSAGE_SIZE"]

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

#: The one type the relay's inline fast path takes (as L{SendRun}s): a
#: one-way message, nothing to track.
_SEND = int(MessageType.SEND)

#: Whether a read remembers its destinations' output lists (see
#: L{Session.data_received}).  On CPython that saves a route lookup and a
#: call of C{send} per run (about 10% of a relayed Send's time when a read
#: holds a few frames for each of 50 receivers); PyPy's JIT makes those
#: cheaper than the remembering (5-20% slower with it, in
#: C{benchmarks/relay_profile.py --interleave 50}), so there it is off.
_ROUTE_CACHE = platform.python_implementation() == "CPython"

#: ... and only in a read of at least this many runs and frames: in fewer,
#: a destination seldom comes twice, and remembering costs more than it
#: saves (reads of 20 Sends to 50 receivers, each once: 15% slower with it).
_ROUTE_CACHE_MIN_RUNS = 64

#: The routes of a read that remembers none (never written to).
_NO_ROUTES: dict[str, list[list[bytes]]] = {}

#: A peer may cause at most this many log events at info level or above
#: per this many seconds; the rest are counted and summarised.
LOG_LIMIT = 10
LOG_WINDOW = 60.0

#: Reasons where the peer asked for the close: no DisconnectNotice.
_PEER_INITIATED = frozenset({DisconnectedType.NETWORK_INTERRUPTED, DisconnectedType.LOGGED_OFF})



class _Router(Protocol):
    def resolve(self, dest: str) -> Any: ...


class _Relaying(Protocol):
    def forward(self, sender: Session, targets: Iterable[Any], raw: bytes, frames: int) -> int: ...

    def count(self, message_type: int, frames: int, size: int) -> None: ...


class _Answers(Protocol):
    def accept(self, session: Session, frame: Frame) -> bool: ...


class SessionOwner(OutputOwner, Protocol):
    """
    What a session needs of its owner (the engine), beyond what its
    output needs (L{OutputOwner}): where frames go (the router, the
    relay, the engine's dispatch), the answers it may accept from other
    nodes, the user manager's events, and the calls that tell the owner of
    the session's life.
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
    def answers(self) -> _Answers: ...

    @property
    def user_manager(self) -> UserManager: ...

    def frame_received(self, session: Session, frame: Frame) -> None: ...

    def over_budget(self, session: Session) -> bool: ...

    def connection_closed(self, session: Session) -> None: ...

    def session_ended(
        self, session: Session, reason: DisconnectedType, text: str, was_logged_on: bool
    ) -> None: ...


def _gathered(targets: Any) -> list[list[bytes]] | None:
    """
    The lists that gather this read's output for C{targets}, when every one
    of them is a local session that takes more as gathered output
    (L{Output.gathered}); else C{None}.
    """
    outs = []
    for target in targets:
        out = target.gathered() if isinstance(target, Output) else None
        if out is None:
            return None
        outs.append(out)
    return outs


@implementer(IDeviceHandle)
class Session(Output):
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
        "_tokens",
        "_tokens_at",
        "_refused_since",
        "_log",
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
        #: The work budget (L{charge}): a token bucket, full at the start.
        self._tokens = owner.full_bucket  # one float for all, until spent
        self._tokens_at = self.connected_at
        self._refused_since: float | None = None
        #: The log limiter (L{may_log}): [window start, events logged in
        #: it, events suppressed], made when the peer first causes one.
        self._log: list[Any] | None = None
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
        error = None
        decoder = self.decoder
        try:
            frames = decoder.feed_runs(data, _SEND)
        except FrameError as e:
            frames, error = e.frames, e
        if frames:
            self.active = True
        owner = self.owner
        partial = decoder.buffered
        if partial != self._partial:
            refusal = self._holding(partial)
            if error is None:
                error = refusal
        batch = owner.batch
        outermost = batch.begin()
        try:
            frame_received = owner.frame_received
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
            cache = _ROUTE_CACHE and len(frames) >= _ROUTE_CACHE_MIN_RUNS
            routes: dict[str, list[list[bytes]]] = {} if cache else _NO_ROUTES
            for item in frames:
                state = self.state
                if isinstance(item, SendRun):
                    # The relay's common case, inline: Sends to one user
                    # online, forwarded as they came (one slice, one
                    # write).  Everything else takes frame_received.
                    if state is logged_on and item.user_id == self.user_id:
                        dest = item.dest_user_id
                        outs = routes.get(dest) if cache else None
                        if outs is not None:
                            raw = item.raw
                            for out in outs:
                                out.append(raw)
                            relayed += item.count
                            relayed_bytes += len(raw)
                            continue
                        targets = resolve(dest)
                        if targets:
                            raw = item.raw
                            # The relay rule, the same for every frame.
                            delivered = forward(self, targets, raw, item.count)
                            if delivered:
                                relayed += item.count
                                relayed_bytes += len(raw)
                                if delivered == ALL_QUEUED and cache:
                                    outs = _gathered(targets)
                                    if outs is not None:
                                        routes[dest] = outs
                            continue
                    if routes:
                        routes = {}
                    for frame in item.frames():
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
        finally:
            if outermost:
                batch.flush()

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

    # -- what a peer may make the server log --------------------------------------

    def may_log(self) -> bool:
        """
        Whether an event this peer caused may be logged at info level or
        above: at most L{LOG_LIMIT} per L{LOG_WINDOW} seconds.  The rest are
        counted (C{logs_suppressed}) and summarised in one event when the
        next window opens, and in the session's end event.
        """
        now = self.owner.clock.seconds()
        limiter = self._log
        if limiter is None:
            limiter = self._log = [now, 0, 0]
        elif now - limiter[0] >= LOG_WINDOW:
            self.summarise_logs()
            limiter[0], limiter[1] = now, 0
        if limiter[1] < LOG_LIMIT:
            limiter[1] += 1
            return True
        limiter[2] += 1
        self.owner.counters[Count.LOGS_SUPPRESSED] += 1
        return False

    @property
    def suppressed_logs(self) -> int:
        """
        How many log events of this peer were suppressed and not yet
        summarised.
        """
        return self._log[2] if self._log is not None else 0

    def summarise_logs(self) -> None:
        """
        Log how many events were suppressed, if any, once.
        """
        limiter = self._log
        if limiter is not None and limiter[2]:
            log.info(
                "{count} more log events caused by {session!r} were suppressed",
                esf_event="logs_suppressed",
                count=limiter[2],
                session=self,
                user_id=self.user_id,
                address=self.address,
            )
            limiter[2] = 0

    # -- the work budget ---------------------------------------------------------

    def charge(self, cost: float) -> bool:
        """
        Take C{cost} from the session's work budget (a token bucket on the
        clock, written here because it is four lines and must not allocate
        per request).  A request is refused while the bucket is empty; an
        accepted one may take it below zero (a big answer), which the
        following requests then wait for.

        @return: whether the request may be handled.
        """
        config = self.owner.config
        now = self.owner.clock.seconds()
        tokens = self._tokens + (now - self._tokens_at) * config.work_rate
        if tokens > config.work_burst:
            tokens = config.work_burst
        self._tokens_at = now
        if tokens < 1:
            self._tokens = tokens
            if self._refused_since is None:
                self._refused_since = now
            return False
        self._tokens = tokens - cost
        if tokens * 2 >= config.work_burst:
            # Let the bucket refill halfway: no longer a flood.
            self._refused_since = None
        return True

    def refused_for(self) -> float:
        """
        Seconds since this session's first refused request, if it has not
        let its budget refill halfway since.
        """
        if self._refused_since is None:
            return 0.0
        return self.owner.clock.seconds() - self._refused_since

    # -- output (IDeviceHandle) ------------------------------------------------

    def send_from_node(self, data: bytes) -> None:
        """
        Write a frame relayed to this device by another node of a cluster.
        An answer goes through only if this session asked for it
        (L{esf.server._router.AnswerRouter.accept}): the answering node cannot
        know.
        """
        if _FIXED_HEADER.unpack_from(data)[2] in ANSWERS:
            (frame,) = FrameDecoder(self.owner.config.wire).feed(data)
            if not self.owner.answers.accept(self, frame):
                self.owner.counters[Count.UNSOLICITED_ANSWERS] += 1
                log.debug(
                    "dropped {message_type} #{message_id} from {user_id} (another node): "
                    "it answers no request of {session!r}",
                    message_type=frame.message_type,
                    message_id=frame.message_id,
                    user_id=frame.user_id,
                    session=self,
                )
                return
        if self.send(data) == REFUSED:
            # Backed up: counted; the sender is on another node, which is
            # not told (a request times out there).
            self.owner.counters[Count.RECEIVER_BEHIND] += 1

    def notify(self, message_type: int, body: bytes = b"", client_type: int = 0) -> None:
        """
        Send the peer a server-initiated message (MessageID 0).
        """
        self.queue(
            encode_frame(
                self.owner.config.wire,
                message_type,
                body,
                client_type=client_type,
                user_id=SERVER_ID,
                dest_user_id=self.user_id or "",
            )
        )

    def kick(self, reason: DisconnectedType, text: str) -> None:
        self.end(reason, text)

    def push_out(self, new_address: str, cause: str) -> None:
        """
        The device logged on again from C{new_address}: tell the user
        manager, send C{BeingPushedOutNotify} and end with C{BeingPushedOut}.
        """
        self.owner.user_manager.device_being_pushed_out.fire(self.user_data, new_address)
        self.notify(MessageType.BEING_PUSHED_OUT_NOTIFY, m.BeingPushedOutNotify(cause).encode())
        self.kick(DisconnectedType.BEING_PUSHED_OUT, cause)

    def kick_out(self, operator: str, reason: str, text: str) -> None:
        """
        C{operator} kicks the device: tell the user manager, send
        C{BeingKickedOutNotify} and end with C{BeingKickedOut}.
        """
        self.owner.user_manager.device_kicked_out.fire(self.user_data, operator, reason)
        self.notify(
            MessageType.BEING_KICKED_OUT_NOTIFY,
            m.BeingKickedOutNotify(operator, reason[:1000]).encode(),
        )
        self.kick(DisconnectedType.BEING_KICKED_OUT, text)

    def ask(self, message_id: int, body: bytes, timeout: float) -> None:
        """
        Send the server's query C{message_id} (an Information C{body}) as a
        Request; the answer comes back through the engine's pending table.
        """
        self.send(
            encode_frame(
                self.owner.config.wire,
                MessageType.REQUEST,
                body,
                message_id=message_id,
                user_id=SERVER_ID,
                dest_user_id=self.user_id or "",
            )
        )

    def reply(self, frame: Frame, body: bytes, message_type: int | None = None) -> None:
        """
        Answer C{frame}: same MessageType (unless given) and MessageID, from
        the server to this session's user.
        """
        self.queue(
            encode_frame(
                self.owner.config.wire,
                frame.message_type if message_type is None else message_type,
                body,
                message_id=frame.message_id,
                user_id=SERVER_ID,
                dest_user_id=self.user_id or "",
            )
        )

    def error(self, frame: Frame, code: ErrorCode, text: str) -> None:
        """
        Answer a request with C{Error}; a one-way message (MessageID 0) is
        counted and logged at debug level instead, since nothing waits for
        an answer (and a peer must not be able to fill the log).
        """
        if frame.message_id:
            body = m.Error(frame.message_type, code, text[:1000]).encode()
            self.reply(frame, body, MessageType.ERROR)
            return
        self.owner.counters[Count.DROPPED] += 1
        log.debug(
            "dropped {message_type} from {session!r}: {code.name}: {text}",
            message_type=frame.message_type,
            session=self,
            code=code,
            text=text,
        )

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
