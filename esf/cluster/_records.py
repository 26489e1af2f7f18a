"""
What the cluster keeps in Redis and how it is written: the key names
(L{Keys}), a presence value (L{Holder}), a presence stream entry's parts,
and the records one node posts to another's inbox (L{Send}, L{Notify},
L{Kick}, L{PushOut}, L{KickOut}, L{Query}, L{Answer}, L{Failed}, ...;
L{Stored} is written by a script).

Redis holds, under a prefix (C{esf} by default)::

    esf:u:<user>       hash: device kind -> a presence value (L{Holder})
    esf:online         set of the users with at least one device
    esf:n:<node>       set of "user TAB kind" a node holds (the janitor's index)
    esf:nodes          set of the nodes that joined
    esf:lease:<node>   the node's lease (SET PX, refreshed every lease/3 s)
    esf:presence       stream of presence changes (bounded, MAXLEN ~)
    esf:inbox:<node>   stream of what other nodes tell this node's devices,
                       bounded in entries and bytes, emptied as it is read
    esf:ib:<node>      hash: the inbox's bytes and bounds (esf.cluster._inbox)
    esf:reaped:<node>:<janitor>:<n>
                       a reaped node's unread inbox, moved there for the
                       janitor to answer, page by page (expires in a minute)
    esf:epoch          a random token: missing or changed = Redis lost its data
    esf:janitor        the janitor's lock (SET NX PX)
    esf:settling       set for a lease after a new epoch: who is online is not
                       known yet, the offline store keeps nothing
    esf:t:<user TAB kind>, esf:tb:<user TAB kind>
                       the takeover-flapping guard's count and cooldown

The Lua scripts (C{esf/cluster/lua/}) compute the per-user and per-node
keys from the prefix themselves: fine on one Redis (or a replicated one);
Redis Cluster is not supported.  A presence stream entry has the fields
C{u} (user), C{c} (device kind) and either C{v} (the new presence value) or
C{d} (the session ID released).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Union

import attrs

from esf.interfaces import IDeviceHandle

__all__ = [
    "Keys",
    "Holder",
    "check_node_id",
    "stream_id",
    "fields",
    "Send",
    "Notify",
    "Kick",
    "PushOut",
    "KickOut",
    "Query",
    "Answer",
    "Failed",
    "REAPED_UNREAD",
    "BACKED_UP",
    "READ_LATE",
    "ENDED",
    "Probe",
    "Probed",
    "Behind",
    "Stored",
    "STORED_RECORD",
    "SendMany",
    "READS_MANY",
    "OneRecord",
    "Record",
    "decode_records",
    "MAX_QUERY_SECONDS",
]


def check_node_id(node_id: str) -> str:
    """
    C{node_id} if it is usable: printable ASCII, no spaces, at most 100
    characters (it goes into Redis keys and session IDs).
    """
    if not node_id or len(node_id) > 100 or not all(33 <= ord(c) < 127 for c in node_id):
        raise ValueError(
            f"a node ID is 1..100 printable ASCII characters without spaces, not {node_id!r}"
        )
    return node_id


class Keys:
    """
    The names of the cluster's Redis keys under the prefix C{base} (with
    its colon, C{"esf:"}).
    """

    def __init__(self, base: str):
        self.base = base
        self.online = f"{base}online"
        self.stream = f"{base}presence"
        self.nodes = f"{base}nodes"
        self.epoch = f"{base}epoch"
        self.janitor = f"{base}janitor"
        self.settling = f"{base}settling"

    def user(self, user_id: str) -> str:
        return f"{self.base}u:{user_id}"

    def index(self, node: str) -> str:
        return f"{self.base}n:{node}"

    def lease(self, node: str) -> str:
        return f"{self.base}lease:{node}"

    def inbox(self, node: str) -> str:
        return f"{self.base}inbox:{node}"

    def ledger(self, node: str) -> str:
        return f"{self.base}ib:{node}"

    def reaped(self, node: str, janitor: str, n: int) -> str:
        return f"{self.base}reaped:{node}:{janitor}:{n}"


def stream_id(raw: bytes) -> tuple[int, int]:
    """
    A stream entry's ID (C{b"MS-SEQ"}) as a pair that sorts like it.
    """
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


def fields(flat: Sequence[Any]) -> dict[bytes, Any]:
    """
    A flat reply (a stream entry's fields, a hash, XINFO) as a dict.
    """
    # (A hash's values are bytes; XINFO's are also numbers and nested replies.)
    return dict(zip(flat[::2], flat[1::2]))


@attrs.frozen
class Holder:
    """
    A presence value: C{"session_id TAB node TAB logon_time TAB address"}.
    Node IDs and session IDs hold no TAB (L{check_node_id}), addresses
    neither.
    """

    session_id: str
    node: str
    logon_time: float
    address: str

    @classmethod
    def parse(cls, value: bytes) -> Holder:
        sid, node, when, address = value.decode("utf-8").split("\t", 3)
        # One string per node, however many devices it holds: every node
        # mirrors every device of the cluster.
        return cls(sid, sys.intern(node), float(when), address)

    @classmethod
    def of(cls, handle: IDeviceHandle, logon_time: float | None = None) -> Holder:
        """
        C{handle} as a holder, logged on at C{logon_time} (by default its
        L{UserData}'s, which a session gets only once its claim is won).
        """
        data = handle.user_data
        if logon_time is None:
            logon_time = data.logon_time if data is not None else 0.0
        address = data.address if data is not None else getattr(handle, "address", "?")
        return cls(handle.session_id, handle.node, logon_time, address)

    def encode(self) -> bytes:
        return f"{self.session_id}\t{self.node}\t{self.logon_time!r}\t{self.address}".encode()


# -- inbox records --------------------------------------------------------------
#
# An inbox record is: kind, session ID length, two numbers, data length;
# then the session ID and the data.  What one node tells another in one
# reactor turn goes as one stream entry of such records (one XADD, one entry
# to read): far cheaper than an entry per frame.  The two numbers and the
# data mean what each record type below says; every record is fenced by the
# session ID of the device it is for (the holder's node acts on it only if
# that session still holds the device).

_RECORD = struct.Struct("<BHIII")
_LENGTH = struct.Struct("<I")
(
    _SEND, _NOTIFY, _KICK, _PUSH_OUT, _KICK_OUT, _QUERY, _ANSWER, _FAILED, _PROBE, _PROBED, _BEHIND,
    _SEND_MANY, _STORED,
) = range(1, 14)  # fmt: skip

#: The kind of a L{Stored} record, for the script that writes them
#: (C{lua/stored.lua}).
STORED_RECORD = _STORED

#: The end of the lease's token of a process that reads L{SendMany}
#: records: a node sends them only to such a process, and an entry holding
#: them only while that process holds the lease (one that does not read
#: them would skip them, as it skips every kind it does not know).
READS_MANY = ":m"

#: The longest a node remembers a query another node asked (a bound).
MAX_QUERY_SECONDS = 3600


def _record(kind: int, session_id: str, first: int, second: int, data: bytes) -> bytes:
    sid = session_id.encode("utf-8")
    return _RECORD.pack(kind, len(sid), first, second, len(data)) + sid + data


def _pack(*texts: str | bytes) -> bytes:
    parts = []
    for text in texts:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        parts.append(_LENGTH.pack(len(raw)) + raw)
    return b"".join(parts)


def _unpack(data: bytes, count: int) -> list[bytes]:
    out, offset = [], 0
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        out.append(data[offset : offset + length])
        offset += length
    return out


class Send(NamedTuple):
    """
    A frame for the session to send as it is (a relayed message).
    """

    session_id: str
    frame: bytes

    def encode(self) -> bytes:
        return _record(_SEND, self.session_id, 0, 0, self.frame)


class SendMany(NamedTuple):
    """
    One frame for each of several sessions to send as it is: the copies of a
    Broadcast for the members on one node, the frame once (only a
    Broadcast's: L{esf.cluster._messaging._Turn} says why).
    """

    session_ids: tuple[str, ...]
    frame: bytes

    def encode(self) -> bytes:
        return _record(
            _SEND_MANY, "", len(self.session_ids), 0, _pack(*self.session_ids, self.frame)
        )


class Notify(NamedTuple):
    """
    A notice for the session (L{IDeviceHandle.notify}).
    """

    session_id: str
    message_type: int
    body: bytes
    client_type: int

    def encode(self) -> bytes:
        return _record(_NOTIFY, self.session_id, self.message_type, self.client_type, self.body)


class Kick(NamedTuple):
    """
    End the session (L{IDeviceHandle.kick}).
    """

    session_id: str
    reason: int
    text: str

    def encode(self) -> bytes:
        return _record(_KICK, self.session_id, self.reason, 0, self.text.encode("utf-8"))


class PushOut(NamedTuple):
    """
    The device logged on again from C{new_address}: the holder's node fires
    C{device_being_pushed_out} and ends the session.
    """

    session_id: str
    new_address: str
    cause: str

    def encode(self) -> bytes:
        return _record(_PUSH_OUT, self.session_id, 0, 0, _pack(self.new_address, self.cause))


class KickOut(NamedTuple):
    """
    C{operator} kicks the device: the holder's node fires
    C{device_kicked_out} and ends the session.
    """

    session_id: str
    operator: str
    reason: str
    text: str

    def encode(self) -> bytes:
        data = _pack(self.operator, self.reason, self.text)
        return _record(_KICK_OUT, self.session_id, 0, 0, data)


class Query(NamedTuple):
    """
    A server query from node C{asker}'s engine (its MessageID
    C{message_id}, an Information C{body}), to ask the session for at most
    C{seconds}.
    """

    session_id: str
    message_id: int
    seconds: int
    asker: str
    body: bytes

    def encode(self) -> bytes:
        data = _pack(self.asker, self.body)
        return _record(_QUERY, self.session_id, self.message_id, self.seconds, data)


class Answer(NamedTuple):
    """
    The answer to a L{Query}, going back to the asking node: C{session_id}
    is the session that was asked, C{message_id} the asker's MessageID,
    C{body} a Response's body or, when C{error}, an Error's.
    """

    session_id: str
    message_id: int
    error: bool
    body: bytes

    def encode(self) -> bytes:
        return _record(_ANSWER, self.session_id, self.message_id, int(self.error), self.body)


#: Why a L{Failed} request was not delivered: its node was reaped before it
#: read it; the one device it went to there is backed up; the node read it
#: too late; the session it went to had ended before its node read it.
REAPED_UNREAD, BACKED_UP, READ_LATE, ENDED = 0, 1, 2, 3


class Failed(NamedTuple):
    """
    A request (C{frame}) sent by the session was not delivered by the node
    it was relayed to, for the reason C{why} (L{REAPED_UNREAD},
    L{BACKED_UP}, L{READ_LATE}, L{ENDED}): the session's node answers it
    C{Error}.
    """

    session_id: str
    frame: bytes
    why: int = REAPED_UNREAD

    def encode(self) -> bytes:
        return _record(_FAILED, self.session_id, self.why, 0, self.frame)


class Probe(NamedTuple):
    """
    Does the session C{session_id} still hold its device on this node?
    Answered at once to the node C{asker} with a L{Probed} carrying
    C{token} (never fenced: a session that is gone is the answer).
    """

    session_id: str
    token: int
    asker: str

    def encode(self) -> bytes:
        return _record(_PROBE, self.session_id, self.token, 0, self.asker.encode("utf-8"))


class Probed(NamedTuple):
    """
    The answer to the L{Probe} C{token}: whether C{session_id} still holds
    its device on the answering node.
    """

    session_id: str
    token: int
    held: bool

    def encode(self) -> bytes:
        return _record(_PROBED, self.session_id, self.token, int(self.held), b"")


class Stored(NamedTuple):
    """
    A message for the session's device (its kind C{client_type}) or user
    (255) was handed to the offline store by a node that did not know the
    session was online: look at the store again (written by
    C{lua/stored.lua}; L{encode} is its equal, for tests).
    """

    session_id: str
    client_type: int

    def encode(self) -> bytes:
        return _record(_STORED, self.session_id, self.client_type, 0, b"")


class Behind(NamedTuple):
    """
    The session C{session_id}, on the node that tells it, is backed up: it
    refused what this node relayed to it.  For C{ms} milliseconds this
    node refuses at once what its sessions relay to it (as its own node
    would), rather than send it (never fenced: it is about a session of
    the telling node).
    """

    session_id: str
    ms: int

    def encode(self) -> bytes:
        return _record(_BEHIND, self.session_id, self.ms, 0, b"")


#: A record for one session (or none), and any record.
OneRecord = Union[
    Send, Notify, Kick, PushOut, KickOut, Query, Answer, Failed, Probe, Probed, Behind, Stored
]
Record = Union[OneRecord, SendMany]


def decode_records(packed: bytes) -> Iterator[Record]:
    """
    The records of one inbox entry, in order (a kind this node does not
    know is skipped).
    """
    view = memoryview(packed)
    offset, end, size = 0, len(packed), _RECORD.size
    while offset < end:
        kind, sid_length, first, second, length = _RECORD.unpack_from(view, offset)
        offset += size
        sid = bytes(view[offset : offset + sid_length]).decode("utf-8")
        offset += sid_length
        data = bytes(view[offset : offset + length])
        offset += length
        if kind == _SEND:
            yield Send(sid, data)
        elif kind == _NOTIFY:
            yield Notify(sid, first, data, second)
        elif kind == _KICK:
            yield Kick(sid, first, data.decode("utf-8"))
        elif kind == _PUSH_OUT:
            new_address, cause = (t.decode("utf-8") for t in _unpack(data, 2))
            yield PushOut(sid, new_address, cause)
        elif kind == _KICK_OUT:
            operator, reason, text = (t.decode("utf-8") for t in _unpack(data, 3))
            yield KickOut(sid, operator, reason, text)
        elif kind == _QUERY:
            asker, body = _unpack(data, 2)
            yield Query(sid, first, second, asker.decode("utf-8"), body)
        elif kind == _ANSWER:
            yield Answer(sid, first, bool(second), data)
        elif kind == _FAILED:
            yield Failed(sid, data, first)
        elif kind == _PROBE:
            yield Probe(sid, first, data.decode("utf-8"))
        elif kind == _PROBED:
            yield Probed(sid, first, bool(second))
        elif kind == _BEHIND:
            yield Behind(sid, first)
        elif kind == _STORED:
            yield Stored(sid, first)
        elif kind == _SEND_MANY:
            *sids, frame = _unpack(data, first + 1)
            yield SendMany(tuple(s.decode("utf-8") for s in sids), frame)
