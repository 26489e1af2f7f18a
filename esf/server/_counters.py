"""
The names of the counters, in one place: the server's and the client's.

C{engine.counters} is a L{collections.Counter} keyed by these names (each
is a L{str}, so C{engine.counters["transmit_failed"]} reads the same
count).  They count what did not go as asked; metrics read them.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from esf.wire._compat import StrEnum
from esf.wire._frames import MessageType

if TYPE_CHECKING:
    from ._session import Session

__all__ = [
    "Count",
    "RELAYED_MESSAGES",
    "RELAYED_BYTES",
    "FANOUT_BUCKETS",
    "count_fanout",
    "Traffic",
    "TrafficByTransport",
]


class Count(StrEnum):
    #: A one-way message (MessageID 0) the server could not act on.
    DROPPED = "dropped"
    #: A logon answered Busy by the per-host logon rate limit.
    LOGONS_RATE_LIMITED = "logons_rate_limited"
    #: A takeover refused by the flapping guard.
    TAKEOVERS_REFUSED = "takeovers_refused"
    #: A message to a user with no online device.
    TRANSMIT_FAILED = "transmit_failed"
    #: An application message to a server with no customize handler.
    UNHANDLED = "unhandled"
    #: An application handler that raised something else than RequestError.
    HANDLER_ERRORS = "handler_errors"
    #: A Blob fragment refused (too big, too many at once, out of order).
    BLOB_ERRORS = "blob_errors"
    #: An answer (Response, Error) addressed to the server that nobody waits for.
    UNEXPECTED_ANSWERS = "unexpected_answers"
    #: An answer (Response, Ack, PingAck, Error) from a user that answers no
    #: request relayed to that user: dropped.
    UNSOLICITED_ANSWERS = "unsolicited_answers"
    #: A frame a user addressed to another user that the application's
    #: relay policy refused (its answer, an exception, or no decision in
    #: time): a request was answered with an Error, a one-way frame dropped.
    RELAY_REFUSED = "relay_refused"
    #: A request refused because its session waits for too many answers.
    TOO_MANY_UNANSWERED = "too_many_unanswered"
    #: A sender whose reading was paused because a receiver is backed up.
    SENDERS_PAUSED = "senders_paused"
    #: A frame not queued for a receiver past its hard output bound.
    OUTPUT_DROPPED = "output_dropped"
    #: A relayed frame not queued because its receiver is backed up past
    #: its push back and its queue is full (a one-way frame is dropped; a
    #: request is answered Error(RateLimited)).
    RECEIVER_BEHIND = "receiver_behind"
    #: A request the server would have handled itself, refused because its
    #: session spent its work budget.
    WORK_REFUSED = "work_refused"
    #: A WebSocket connection refused at once: its host's connections kept
    #: sending more frames before logon than a logon needs.
    WEBSOCKET_FLOODERS_REFUSED = "websocket_flooders_refused"
    #: A log event a peer caused, suppressed by its session's log limit.
    LOGS_SUPPRESSED = "logs_suppressed"
    #: A frame kept in the offline store for a user who was offline (each
    #: fragment of a Blob counts).
    OFFLINE_STORED = "offline_stored"
    #: A message the offline store refused because the user's bound (count
    #: or bytes) was reached: the sender was told (Error UserOffline).
    OFFLINE_FULL = "offline_full"
    #: A message the offline store refused because its sender already had
    #: as much waiting (for all receivers together) as one sender may.
    OFFLINE_SENDER_FULL = "offline_sender_full"
    #: A message the offline store refused because the whole store was
    #: full (its server-wide bound, count or bytes).
    OFFLINE_SERVER_FULL = "offline_server_full"
    #: A message to an offline user the offline policy chose not to keep.
    OFFLINE_NOT_KEPT = "offline_not_kept"
    #: A message the offline store failed to keep (the store is broken or
    #: unreachable): the sender was told.
    OFFLINE_ERRORS = "offline_errors"
    #: A stored frame delivered and acknowledged, then forgotten.
    OFFLINE_DELIVERED = "offline_delivered"
    #: A drain of stored messages that stopped because the device did not
    #: acknowledge in time (the rest waits for its next logon).
    OFFLINE_DRAINS_STALLED = "offline_drains_stalled"


def _relay_keys(prefix: str) -> dict[int, str]:
    return {int(t): f"{prefix}.{t.name.lower()}" for t in MessageType}


#: C{engine.counters} keys of the frames the relay forwarded from one user's
#: device to another, by message type: C{RELAYED_MESSAGES[frame.message_type]}
#: counts frames (once per frame, however many devices it went to), and
#: C{RELAYED_BYTES[frame.message_type]} their size, header included.  The
#: engine adds to them once per read, not once per frame (see
#: docs/operations.md); C{esf_messages_relayed_total} and
#: C{esf_relayed_bytes_total} read them.
RELAYED_MESSAGES: dict[int, str] = _relay_keys("relayed_messages")
RELAYED_BYTES: dict[int, str] = _relay_keys("relayed_bytes")

#: The upper bounds of C{esf_broadcast_fanout}'s buckets: devices one
#: Broadcast was sent to.
FANOUT_BUCKETS = (0, 1, 10, 100, 1000, 10_000, 100_000)
#: C{engine.counters} keys of the fan-out: one per bucket (not cumulative;
#: the last one for more than the largest bound), the number of broadcasts
#: and the devices they went to in all.
FANOUT_BUCKET_KEYS = tuple(f"broadcast_fanout.le_{bound}" for bound in FANOUT_BUCKETS) + (
    "broadcast_fanout.le_inf",
)
BROADCASTS = "broadcasts"
BROADCAST_DELIVERIES = "broadcast_deliveries"


def count_fanout(counters: collections.Counter[str], devices: int, broadcasts: int = 1) -> None:
    """
    Count C{broadcasts} Broadcasts (a run of them), each sent to C{devices}
    devices.
    """
    counters[BROADCASTS] += broadcasts
    counters[BROADCAST_DELIVERIES] += devices * broadcasts
    for bound, key in zip(FANOUT_BUCKETS, FANOUT_BUCKET_KEYS):
        if devices <= bound:
            counters[key] += broadcasts
            return
    counters[FANOUT_BUCKET_KEYS[-1]] += broadcasts


class Traffic:
    """
    What the connections of one kind of transport carried, kept by the
    protocols (L{esf.ServerProtocol}, L{esf.WebSocketProtocol}) as they
    read and write: one attribute increment per read and per write, none
    per frame.  (Plain slots rather than C{engine.counters} keys: these are
    the hottest counts of all.)  The frames received are counted by each
    session's frame decoder, and read here (L{messages_received}): nothing
    is added to a read for them.

    @ivar accepted: connections that became sessions.
    @ivar refused: connections closed as they were made, by reason.
    @ivar bytes_received: bytes read from the connections (for WebSocket,
        its framing and handshake included).
    @ivar bytes_sent: bytes of ESF frames written to the connections.
    @ivar reads: reads handed to the protocols.
    @ivar writes: writes the sessions made (each one or more whole frames).
    """

    __slots__ = (
        "accepted",
        "refused",
        "bytes_received",
        "bytes_sent",
        "reads",
        "writes",
        "_open",
        "_decoded_before",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.reads = 0
        self.writes = 0
        #: The sessions of the connections open, whose decoders count on.
        self._open: set[Session] = set()
        #: The frames the sessions of closed connections decoded.
        self._decoded_before = 0

    @property
    def messages_received(self) -> int:
        """
        The ESF frames received whole on these connections, open or closed.
        """
        return self._decoded_before + sum(s.decoder.decoded for s in self._open)

    def connected(self, session: Session, stopping: bool) -> None:
        """
        Count a connection the engine was given (C{engine.connection_made}):
        accepted, or, when the engine ended its session at once, refused
        because the server is full or, when C{stopping}, shutting down.
        """
        self._open.add(session)
        if not session.ended:
            self.accepted += 1
        elif stopping:
            self.refused["shutting_down"] += 1
        else:
            self.refused["max_connections"] += 1

    def disconnected(self, session: Session) -> None:
        """
        C{session}'s connection is closed: keep what its decoder counted
        (in the same step as it leaves, so that the total never goes back).
        """
        if session in self._open:
            self._open.discard(session)
            self._decoded_before += session.decoder.decoded


class TrafficByTransport(dict[str, Traffic]):
    """
    C{engine.traffic}: a L{Traffic} per transport label (C{"tcp"},
    C{"websocket"}), made when a protocol first asks.
    """

    def __missing__(self, transport: str) -> Traffic:
        traffic = self[transport] = Traffic()
        return traffic
