"""
The server's settings and the values applications see of a logged-on
device.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import string
from enum import Enum
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IReactorTime

from esf.interfaces import RelogonMode
from esf.wire._frames import DEFAULT_MAX_MESSAGE_SIZE, ClientType, WireConfig

__all__ = [
    "EngineBasics",
    "RelogonMode",
    "ServerConfig",
    "SessionPhase",
    "UserData",
    "default_node_id",
]


def _positive(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


def _not_negative(instance: Any, attribute: Any, value: Any) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value}")


#: User IDs a request may name, or its answer list, per unit of work (on
#: top of 1 per request): measured, 10 IDs cost about what a whole cheap
#: request (a ping) costs the server.
IDS_PER_UNIT = 10


class SessionPhase(Enum):
    """
    Where a server session is in its life (L{esf.server._session.Session.state}).
    (Named apart from the client's C{esf.client.SessionState}, a public name
    for another enum.)
    """

    AWAITING_LOGON = "awaiting logon"
    #: A Logon is being verified and claimed; frames relayed to the device
    #: meanwhile wait for the Logon reply.
    LOGGING_ON = "logging on"
    LOGGED_ON = "logged on"
    ENDED = "ended"


@attrs.frozen
class ServerConfig:
    """
    The server's settings (the C{twistd esf} options).
    """

    wire: WireConfig = attrs.field(factory=WireConfig)
    relogon_mode: RelogonMode = RelogonMode.REPLACE_OLD
    heartbeat_interval: int = attrs.field(default=10, validator=_positive)
    heartbeat_timeout: int = attrs.field(default=30, validator=_positive)
    logon_timeout: float = attrs.field(default=10, validator=_positive)
    system_token: str = ""
    admins: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    max_connections: int | None = attrs.field(default=None, validator=_positive)
    #: Device kinds allowed to log on.
    client_types: frozenset[int] = attrs.field(default=frozenset(ClientType), converter=frozenset)
    #: Bytes that may wait for a peer that does not read, beyond the
    #: transport's own buffer.  Past half of it the peer's senders are
    #: read no further (for C{push_back_timeout} at most) and the drain
    #: timer runs; past it, once the push back is over, what is relayed to
    #: the peer is refused; past four times it any output is dropped.
    max_output_buffer: int = attrs.field(default=2 * DEFAULT_MAX_MESSAGE_SIZE, validator=_positive)
    #: Seconds a peer's backlog may stay over half C{max_output_buffer}
    #: before its session ends with ChannelCacheOverflow.
    output_drain_timeout: float = attrs.field(default=10, validator=_positive)
    #: Seconds at most that a sender is read no further because a peer it
    #: relays to is backed up.  A peer that has not drained by then is
    #: stalled: its senders read again, and what is relayed to it past
    #: C{max_output_buffer} is refused (one-way frames dropped and
    #: counted, requests answered C{RateLimited}).  0: never hold a sender
    #: back.
    push_back_timeout: float = attrs.field(default=0.05, validator=_not_negative)
    #: Seconds a closing connection has to take its last bytes before it
    #: is aborted.
    close_timeout: float = attrs.field(default=5, validator=_positive)
    #: Largest reassembled Blob addressed to the server, in bytes.
    max_blob_size: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    #: Blobs one session may have in progress at once.
    max_concurrent_blobs: int = attrs.field(default=4, validator=_positive)
    #: Bytes of blobs to the server one user may have in progress, over all
    #: their devices.
    max_blob_bytes_per_user: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    #: Bytes the whole server may hold for peers (output waiting for peers
    #: that do not read, partial frames, blobs being reassembled); new work
    #: that would pass it is refused.
    max_buffered_bytes: int = attrs.field(default=512 * 1024 * 1024, validator=_positive)
    #: Seconds an incomplete Blob may wait for its next fragment.
    blob_idle_timeout: float = attrs.field(default=60, validator=_positive)
    #: Seconds L{ServerEngine.query} waits for an answer.
    query_timeout: float = attrs.field(default=30, validator=_positive)
    #: Requests (Request, SendCertainly, PingByServer, Blob with a
    #: MessageID) one session may have relayed to users and not yet had
    #: answered; more are answered C{RateLimited}.
    max_unanswered_requests: int = attrs.field(default=1024, validator=_positive)
    #: Frames of one session that may wait for the application's relay
    #: policy to decide (an L{esf.interfaces.IRelayPolicy} that answers
    #: later); past it the session is read no further until decisions
    #: come.
    relay_policy_pending: int = attrs.field(default=64, validator=_positive)
    #: Seconds a frame may wait for the relay policy's decision; then it
    #: is refused (a request answered C{Error(Timeout)}) and the policy's
    #: Deferred cancelled.
    relay_policy_timeout: float = attrs.field(default=5, validator=_positive)
    #: Most user IDs one QueryOnlines may name; more are answered
    #: C{Error(TooLarge)}.
    max_query_ids: int = attrs.field(default=1000, validator=_positive)
    #: The budget for work the server does itself (everything but relays),
    #: per session, as a token bucket: C{work_rate} units a second, at most
    #: C{work_burst} saved up.  A request costs 1, plus 1 per L{IDS_PER_UNIT} user IDs
    #: it names or its answer lists.  A request that finds the bucket empty
    #: is answered C{Error(RateLimited)}; a session that keeps it spent
    #: (refused, and not letting it refill halfway) for
    #: C{work_refusal_limit} seconds is ended.
    work_rate: float = attrs.field(default=2000, validator=_positive)
    work_burst: float = attrs.field(default=4000, validator=_positive)
    work_refusal_limit: float = attrs.field(default=10, validator=_positive)
    #: Logons one host may attempt per C{logon_rate_window} seconds; more
    #: are answered C{Busy}.
    logon_rate_limit: int = attrs.field(default=200, validator=_positive)
    logon_rate_window: float = attrs.field(default=10, validator=_positive)
    #: WebSocket connections of one host that may be ended per
    #: C{websocket_flood_window} seconds for sending more frames before
    #: logon than a logon needs; after that the host's new WebSocket
    #: connections are refused at once until the first is that old.
    websocket_flood_limit: int = attrs.field(default=3, validator=_positive)
    websocket_flood_window: float = attrs.field(default=60, validator=_positive)
    #: Takeovers (C{REPLACE_OLD}) of one user's device allowed per
    #: C{takeover_window} seconds; one more refuses that device with
    #: C{Busy} for C{takeover_cooldown} seconds.
    takeover_limit: int = attrs.field(default=5, validator=_positive)
    takeover_window: float = attrs.field(default=60, validator=_positive)
    takeover_cooldown: float = attrs.field(default=60, validator=_positive)
    #: Seconds a device has to acknowledge a window of stored messages
    #: delivered at its logon; after that the delivery stops (what is
    #: relayed to it live goes out) and the rest waits for its next logon.
    offline_ack_timeout: float = attrs.field(default=10, validator=_positive)

    @heartbeat_timeout.validator
    def _check_timeout(self, attribute: Any, value: int) -> None:
        if value <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout ({value}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval})"
            )


@attrs.define(eq=False)
class UserData:
    """
    One logged-on device, as applications see it.

    @ivar tag: free for the application; the only field it should change.
    """

    user_id: str
    client_type: int
    address: str
    logon_time: float
    tag: Any = None


def default_node_id() -> str:
    """
    A node ID unique in a cluster: host, pid and a random suffix (a pid can
    be reused by a restarted node; the suffix tells the two apart).
    """
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
    return f"{socket.gethostname()}-{os.getpid()}-{suffix}"


class EngineBasics(Protocol):
    """
    What every part of the server reads of the engine it belongs to: the
    settings, the clock and the counters.  The parts' own Protocols extend
    it with what else each needs.
    """

    @property
    def config(self) -> ServerConfig: ...

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def counters(self) -> collections.Counter[str]: ...
