"""
The catalogue of the metrics' series: what each engine counter, cluster
count, refusal cause and transport counter is exported as, and its help
text (docs/operations.md lists the same series for operators).
"""

from __future__ import annotations

from esf.server._counters import Count
from esf.server._session import RELAYED
from esf.wire._frames import DisconnectedType, MessageType

__all__ = [
    "CLUSTER_METRICS",
    "CONNECTION_REFUSALS",
    "COUNTER_METRICS",
    "KICK_ORIGINS",
    "REFUSAL_COUNTERS",
    "REFUSAL_REASONS",
    "RELAY_TYPES",
    "TRAFFIC_COUNTERS",
    "TRANSPORTS",
]

#: The message types the relay forwards (PingByServer once its body is checked).
RELAY_TYPES = sorted(RELAYED | {MessageType.PING_BY_SERVER})

#: What each engine counter is exported as: (metric name without C{esf_}
#: and C{_total}, help).  A counter the engine adds later and that is not
#: listed here is exported as C{esf_<name>_total} all the same.
COUNTER_METRICS = {
    Count.DROPPED: (
        "dropped_messages",
        "One-way messages (MessageID 0) the server could not act on.",
    ),
    Count.TRANSMIT_FAILED: (
        "transmit_failed",
        "Messages addressed to a user with no device online (the offline-store hook fired).",
    ),
    Count.UNHANDLED: (
        "unhandled_messages",
        "Application messages to the server while no customize handler is installed.",
    ),
    Count.HANDLER_ERRORS: (
        "handler_errors",
        "Application handler calls that raised something other than RequestError.",
    ),
    Count.UNEXPECTED_ANSWERS: (
        "unexpected_answers",
        "Answers addressed to the server that no query waited for.",
    ),
    Count.RECEIVER_BEHIND: (
        "receiver_behind",
        "Relayed frames not delivered because their receiver was backed up past the push back "
        "and its queue was full: one-way ones dropped, requests answered Error(RateLimited).",
    ),
    Count.OUTPUT_DROPPED: (
        "output_dropped",
        "Writes to a peer dropped past its hard output bound or the server's memory budget "
        "(a relayed request among them is answered Error(RateLimited)).",
    ),
    Count.SENDERS_PAUSED: (
        "senders_paused",
        "Times a sender was read no further: a receiver it relayed to was backed up (for "
        "--push-back-timeout at most), it kept relaying what was refused, or its frames waited "
        "for the relay policy.",
    ),
    Count.OFFLINE_STORED: (
        "offline_stored",
        "Frames kept in the offline store for users who were offline (a blob's fragments each).",
    ),
    Count.OFFLINE_FULL: (
        "offline_full",
        "Messages to offline users refused because their offline store was full (overflow).",
    ),
    Count.OFFLINE_SENDER_FULL: (
        "offline_sender_full",
        "Messages to offline users refused because their sender had as much waiting as one sender may.",
    ),
    Count.OFFLINE_SERVER_FULL: (
        "offline_server_full",
        "Messages to offline users refused because the whole offline store was full.",
    ),
    Count.OFFLINE_NOT_KEPT: (
        "offline_not_kept",
        "Messages to offline users the offline policy chose not to keep.",
    ),
    Count.OFFLINE_ERRORS: (
        "offline_errors",
        "Messages to offline users the offline store failed to keep (store broken or unreachable).",
    ),
    Count.OFFLINE_DELIVERED: (
        "offline_delivered",
        "Stored frames delivered at logon, acknowledged and forgotten.",
    ),
    Count.OFFLINE_DRAINS_STALLED: (
        "offline_drains_stalled",
        "Deliveries of stored messages stopped because the device did not acknowledge in time.",
    ),
    Count.UNSOLICITED_ANSWERS: (
        "unsolicited_answers",
        "Answers from a user to no request relayed to that user: dropped.",
    ),
    Count.RELAY_REFUSED: (
        "relay_refused",
        "Frames a user addressed to another that the application's relay policy refused (its "
        "answer, an exception, or no decision in time): requests answered with an Error, "
        "one-way frames dropped.",
    ),
    Count.TOO_MANY_UNANSWERED: (
        "too_many_unanswered",
        "Requests refused because their session waited for too many answers already.",
    ),
    Count.WORK_REFUSED: (
        "work_refused",
        "Requests to the server refused because their session had spent its work budget.",
    ),
    Count.WEBSOCKET_FLOODERS_REFUSED: (
        "websocket_flooders_refused",
        "WebSocket connections refused at once: their host kept sending frames before logon.",
    ),
    Count.LOGS_SUPPRESSED: (
        "logs_suppressed",
        "Log events a peer caused, left out by its session's log limit.",
    ),
    # The next three are refusals; they are exported in esf_refusals_total.
    Count.LOGONS_RATE_LIMITED: None,
    Count.TAKEOVERS_REFUSED: None,
    Count.BLOB_ERRORS: None,
}

#: What a cluster's presence counts (C{ClusterPresence.stats}), each
#: exported as C{esf_cluster_<name>_total}: name -> help.  Every count the
#: cluster keeps is here (C{tests/test_metrics.py} reads them from its
#: source): what becomes of a record sent to another node is always in one
#: of them.
CLUSTER_METRICS = {
    "inbox_refused": "Records for another node's devices refused because that node's inbox was full "
    "(requests answered RateLimited, one-way messages counted as dropped).",
    "inbox_gone": "Records for another node's devices refused because that node had left the "
    "cluster (requests answered UserOffline, one-way messages dropped).",
    "inbox_stale": "Records for another node's devices refused because that node's lease had "
    "expired: dead or paused, not yet reaped (requests answered UserOffline, one-way messages "
    "dropped).",
    "inbox_late": "Records for another node's devices refused because Redis ran their append past "
    "its deadline (Redis slow or hung; requests answered UserOffline, one-way messages dropped).",
    "remote_send_dropped": "Records for another node's devices dropped before they reached Redis: "
    "too many were waiting for it (requests answered RateLimited, one-way messages dropped).",
    "remote_send_failed": "Records for another node's devices whose append failed or was not "
    "answered (requests answered UserOffline or Timeout, one-way messages dropped).",
    "inbox_delivered": "Records from other nodes delivered from this node's inbox.",
    "inbox_full": "Entries other nodes could not add to this node's inbox because it was full "
    "(this node fell behind; counted at each upkeep).",
    "inbox_overrun": "Times this node found entries removed from its inbox by something else than "
    "esf (an XTRIM): those it had not read were lost.",
    "inbox_fenced": "Records from other nodes for a session of this node that had ended "
    "(never given to a newer session).",
    "inbox_read_late": "Requests read from this node's inbox past their deadline (their senders "
    "may have been told they failed): answered, not delivered.",
    "inbox_reaped_unread": "Entries read from this node's inbox as the janitor reaped this node: "
    "not delivered (the janitor answered them).",
    "inbox_reaped": "Requests a reaped node never read, answered UserOffline by this node's janitor.",
    "inbox_ended_told": "Requests for a session of this node that had ended, answered UserOffline.",
    "inbox_kept": "One-way messages a reaped node or an ended session never got, kept in the "
    "offline store for their offline addressee.",
    "inbox_dropped": "One-way messages a reaped node or an ended session never got, dropped "
    "(the addressee online elsewhere, no offline store, or not kept).",
    "offline_told": "Nodes told to look at the offline store again: a message was stored for a "
    "user whose device had logged on there, before this node knew.",
    "reclaimed": "Devices of this node that the janitor released while this node held them "
    "(its lease had run out), claimed again.",
    "pushed_out_without_notice": "Sessions of this node replaced by a logon at another node "
    "whose push-out did not come within the grace: ended all the same.",
    "probes_unanswered": "Asks to another node whether its session still holds a device, not "
    "answered in time.",
    "queries_dropped": "The server's queries from another node to this node's sessions, dropped "
    "(this node's engine not attached yet).",
    "queries_forgotten": "The server's queries from other nodes forgotten before their deadline "
    "(too many waiting): their answers are not passed on.",
    "answers_dropped": "Answers from other nodes to this node's queries that no longer waited "
    "(timed out): dropped.",
    "node_id_in_use": "Times this node found its node ID held by another process (two processes "
    "with one --node-id): it stays out of the cluster meanwhile.",
}

#: esf_refusals_total's causes: an engine counter, or a disconnect reason.
REFUSAL_COUNTERS = {
    "logon_rate_limit": Count.LOGONS_RATE_LIMITED,
    "takeover_limit": Count.TAKEOVERS_REFUSED,
    "blob": Count.BLOB_ERRORS,
}
REFUSAL_REASONS = {
    "max_connections": DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED,
    "message_too_large": DisconnectedType.MESSAGE_TOO_LARGE,
    "output_buffer": DisconnectedType.CHANNEL_CACHE_OVERFLOW,
}

KICK_ORIGINS = ("admin_api", "client", "server_api")

#: The transports every per-transport series is reported for (with 0 until
#: used), and the reasons a connection of each is refused for.
TRANSPORTS = ("tcp", "websocket")
CONNECTION_REFUSALS = {
    "tcp": ("max_connections", "shutting_down"),
    "websocket": ("max_connections", "shutting_down", "flooding", "handshake"),
}

#: The per-transport counters: (metric name without C{esf_} and C{_total},
#: the L{Traffic} attribute, help).
TRAFFIC_COUNTERS = (
    ("connections_accepted", "accepted", "Connections accepted, by transport."),
    ("received_bytes", "bytes_received", "Bytes read from connections, by transport "
     "(for WebSocket, its framing and handshake included)."),
    ("sent_bytes", "bytes_sent", "Bytes of ESF frames written to connections, by transport."),
    ("messages_received", "messages_received", "Whole ESF frames received, by transport."),
    ("reads", "reads", "Reads from connections, by transport."),
    ("writes", "writes", "Writes to connections, by transport (each one or more whole frames)."),
)  # fmt: skip
