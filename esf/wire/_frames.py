"""
ESF v1 framing: the fixed header, the enums of the contract, the frame and
the frame encoder (the decoder is in L{esf.wire._decoder}).

Nothing here knows about transports or reactors: L{encode_frame} returns
bytes.
"""

from __future__ import annotations

import re
import struct
from enum import IntEnum
from typing import Any

import attrs

__all__ = [
    "START_TOKEN",
    "SERVER_ID",
    "EVERYONE_ID",
    "DEVICE_MARK",
    "device_address",
    "DEFAULT_MAX_USERID_LENGTH",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "ClientType",
    "MessageType",
    "LogonResult",
    "DisconnectedType",
    "ErrorCode",
    "WireConfig",
    "Frame",
    "FrameRun",
    "RunFields",
    "FrameError",
    "encode_frame",
    "header_length_for",
    "validate_id",
]

START_TOKEN = 0xFF
SERVER_ID = "_0"
EVERYONE_ID = "*"
DEFAULT_MAX_USERID_LENGTH = 11
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


class ClientType(IntEnum):
    """
    The kind of device a client runs on (ESFramework's numbering).
    """

    DOTNET = 0
    SILVERLIGHT = 1
    WINDOWS_PHONE = 2
    WEBSOCKET = 3
    IOS = 4
    ANDROID = 5
    XAMARIN = 6
    WEBSOCKET_SSL = 7
    OTHERS = 8


class MessageType(IntEnum):
    """
    The MessageType header field: framework (100-199), application (200-299)
    and group (600-699) messages.
    """

    GET_MY_IPE = 101
    PING_BY_SERVER = 102
    PING_ACK = 103
    HEARTBEAT = 104
    BEING_PUSHED_OUT_NOTIFY = 105
    DISCONNECT_NOTICE = 106
    LOGOFF = 107
    KICK_OUT = 108
    BEING_KICKED_OUT_NOTIFY = 109
    GET_ALL_ONLINE_USERS = 110
    QUERY_ONLINE = 111
    LOGON = 112
    QUERY_ONLINES = 114
    GET_MY_DEVICES = 116
    MY_DEVICE_ONLINE = 117
    MY_DEVICE_OFFLINE = 118
    ERROR = 120
    SEND = 202
    REQUEST = 203
    RESPONSE = 204
    SEND_CERTAINLY = 205
    ACK = 206
    BLOB = 207
    BROADCAST = 601


class LogonResult(IntEnum):
    """
    The outcome of a logon, sent in the Logon reply.
    """

    SUCCEED = 0
    FAILED = 1
    HAD_LOGGED_ON = 2
    VERSION_MISMATCHED = 3
    CLIENT_TYPE_REJECTED = 4
    BUSY = 5


class DisconnectedType(IntEnum):
    """
    Why a session ended (ESFramework's numbering first).
    """

    NETWORK_INTERRUPTED = 0
    INVALID_MESSAGE = 1
    MESSAGE_WITH_WRONG_USER_ID = 2
    HEARTBEAT_TIMEOUT = 3
    BEING_PUSHED_OUT = 4
    NEW_CONNECTION_IGNORED = 5
    CHANNEL_CACHE_OVERFLOW = 6
    UNAUTHORIZED_CLIENT_TYPE = 7
    MAX_CONNECTION_COUNT_LIMITTED = 8
    BEING_KICKED_OUT = 9
    LOGGED_OFF = 10
    SERVER_SHUTDOWN = 11
    LOGON_TIMEOUT = 12
    LOGON_FAILED = 13
    NOT_LOGGED_ON = 14
    MESSAGE_TOO_LARGE = 15


class ErrorCode(IntEnum):
    """
    The code carried by an Error (120) reply.
    """

    NOT_LOGGED_ON = 1
    USER_OFFLINE = 2
    NOT_AUTHORIZED = 3
    UNKNOWN_MESSAGE_TYPE = 4
    HANDLER_ERROR = 5
    BAD_REQUEST = 6
    TOO_LARGE = 7
    RATE_LIMITED = 8
    TIMEOUT = 9


#: In a relayed message's DestUserID, C{"alice#5"} names device kind 5 of
#: user C{"alice"}; user IDs may therefore not hold it.
DEVICE_MARK = "#"


def device_address(user_id: str, client_type: int | None) -> str:
    """
    The DestUserID that addresses C{user_id}'s device C{client_type}, or
    every device of the user when C{client_type} is C{None}.
    """
    return user_id if client_type is None else f"{user_id}{DEVICE_MARK}{int(client_type)}"


def as_client_type(value: int) -> ClientType | int:
    """
    C{value} as a L{ClientType}, or the plain number for a kind without a
    name.
    """
    try:
        return ClientType(value)
    except ValueError:
        return value


def header_length_for(max_userid_length: int) -> int:
    """
    The header length for a maximum UserID length: C{2n + 14} rounded up to
    a multiple of 4 (36 for the default 11).
    """
    return (2 * max_userid_length + 14 + 3) // 4 * 4


def _check_userid_length(instance: Any, attribute: Any, value: int) -> None:
    if not 1 <= value <= 255:
        raise ValueError(f"max_userid_length must be in 1..255, not {value}")


@attrs.frozen
class WireConfig:
    """
    The two settings both ends of a connection must agree on.

    @ivar max_userid_length: the maximum UserID length C{n} (1..255).
    @ivar max_message_size: the largest frame, header included, in bytes.
    """

    max_userid_length: int = attrs.field(
        default=DEFAULT_MAX_USERID_LENGTH, validator=_check_userid_length
    )
    max_message_size: int = attrs.field(default=DEFAULT_MAX_MESSAGE_SIZE)
    header_length: int = attrs.field(init=False)
    id_slot: int = attrs.field(init=False)
    _struct: struct.Struct = attrs.field(init=False, repr=False, eq=False)
    #: The header as the fixed fields (StartToken, ClientType, MessageType,
    #: MessageID, BodyLength) and both ID fields as one C{bytes} (length
    #: bytes and slots), the key a decoder finds them by.
    keyed_header_struct: struct.Struct = attrs.field(init=False, repr=False, eq=False)

    @max_message_size.validator
    def _check_size(self, attribute: Any, value: int) -> None:
        if not header_length_for(self.max_userid_length) <= value <= 0x7FFFFFFF:
            raise ValueError(
                f"max_message_size must be at least the header length and below 2**31, not {value}"
            )

    def __attrs_post_init__(self) -> None:
        h = header_length_for(self.max_userid_length)
        s = (h - 14) // 2
        object.__setattr__(self, "header_length", h)
        object.__setattr__(self, "id_slot", s)
        object.__setattr__(self, "_struct", struct.Struct(f"<BBHiiB{s}sB{s}s"))
        object.__setattr__(self, "keyed_header_struct", struct.Struct(f"<BBHii{h - 12}s"))

    @property
    def header_struct(self) -> struct.Struct:
        """
        The C{struct} layout of the whole header.
        """
        return self._struct


# Not frozen: a frozen class's __init__ costs twice as much, and a frame is
# made for every message on the relay path.  Treat it as read-only.
@attrs.define
class Frame:
    """
    One decoded frame.  Treat it as read-only: the relay forwards L{raw}.

    @ivar raw: the frame's bytes exactly as received (header and body); the
        relay path writes these on without re-encoding.
    @ivar header_length: where the body starts in C{raw}.
    """

    client_type: int
    message_type: int
    message_id: int
    user_id: str
    dest_user_id: str
    raw: bytes
    header_length: int

    @property
    def body(self) -> memoryview:
        """
        The body, as a view into L{raw} (no copy).
        """
        return memoryview(self.raw)[self.header_length :]

    @property
    def body_length(self) -> int:
        return len(self.raw) - self.header_length


#: The fields before the ID slots: StartToken, ClientType, MessageType,
#: MessageID, BodyLength.
_FIXED_HEADER = struct.Struct("<BBHii")


class FrameRun:
    """
    Consecutive frames of one chunk with the same type and the same two ID
    fields, of a type the reader takes in runs (L{FrameDecoder.feed_runs}:
    the relay's Sends, the Broadcasts to one group): forwarded as one slice
    of the read buffer, with one route lookup and one write per receiver.
    Every frame in it passed every check L{FrameDecoder.feed} makes.  The
    decoder hands a run over as its fields (L{RunFields}), in this order:
    C{FrameRun(*fields)} makes the object.

    @ivar raw: the frames' bytes, back to back, exactly as received.
    @ivar count: how many frames C{raw} holds.
    @ivar uniform: whether the frames' headers are all byte for byte alike
        (the same MessageID and BodyLength), as a stream of equal messages
        has: what one says of them, the others do.
    """

    __slots__ = (
        "message_type",
        "user_id",
        "dest_user_id",
        "raw",
        "count",
        "header_length",
        "uniform",
    )

    def __init__(
        self,
        message_type: int,
        user_id: str,
        dest_user_id: str,
        raw: bytes,
        count: int,
        header_length: int,
        uniform: bool = False,
    ):
        self.message_type = message_type
        self.user_id = user_id
        self.dest_user_id = dest_user_id
        self.raw = raw
        self.count = count
        self.header_length = header_length
        self.uniform = uniform

    def __repr__(self) -> str:
        return (
            f"<FrameRun {self.count} frame(s) of type {self.message_type} "
            f"{self.user_id!r} -> {self.dest_user_id!r}, {len(self.raw)} bytes>"
        )

    def frames(self) -> list[Frame]:
        """
        The run's frames, one L{Frame} each (for whoever cannot take the run
        as a whole).
        """
        raw, hlen = self.raw, self.header_length
        unpack = _FIXED_HEADER.unpack_from
        frames = []
        offset = 0
        while offset < len(raw):
            _, client_type, message_type, message_id, body_length = unpack(raw, offset)
            end = offset + hlen + body_length
            piece = raw if (offset == 0 and end == len(raw)) else raw[offset:end]
            frames.append(
                Frame(
                    client_type,
                    message_type,
                    message_id,
                    self.user_id,
                    self.dest_user_id,
                    piece,
                    hlen,
                )
            )
            offset = end
        return frames


#: A run as L{FrameDecoder.feed_runs} hands it over: a L{FrameRun}'s fields
#: in order (message type, UserID, DestUserID, raw, count, header length,
#: uniform).
RunFields = tuple[int, str, str, bytes, int, int, bool]


class FrameError(Exception):
    """
    The peer sent bytes that are not a valid frame; the connection must be
    closed with L{reason} after telling the peer so.

    @ivar reason: the L{DisconnectedType} to report (C{INVALID_MESSAGE} or
        C{MESSAGE_TOO_LARGE}).
    @ivar frames: the valid frames that preceded the error in the same
        L{FrameDecoder.feed} call, so that nothing before it is lost.
    """

    def __init__(self, reason: DisconnectedType, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
        # Frames (and, from FrameDecoder.feed_runs, runs as RunFields).
        self.frames: list[Any] = []


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _decode_id(slot: bytes, length: int, which: str) -> str:
    """
    Decode one ID slot (zero padded), or raise L{FrameError}.
    """
    if length > len(slot):
        raise FrameError(
            DisconnectedType.INVALID_MESSAGE,
            f"{which} length {length} exceeds the {len(slot)}-byte ID slot",
        )
    if slot.count(0, length) != len(slot) - length:
        raise FrameError(DisconnectedType.INVALID_MESSAGE, f"{which} padding is not zero")
    try:
        text = slot[:length].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(DisconnectedType.INVALID_MESSAGE, f"{which} is not valid UTF-8") from None
    if _CONTROL.search(text):
        raise FrameError(DisconnectedType.INVALID_MESSAGE, f"{which} holds control characters")
    return text


def validate_id(user_id: str, config: WireConfig) -> bytes:
    """
    Encode an ID for a header slot, or raise L{ValueError}.
    """
    encoded = user_id.encode("utf-8")
    if len(encoded) > config.id_slot:
        raise ValueError(
            f"ID {user_id!r} is {len(encoded)} bytes; the slot holds {config.id_slot}"
        )
    if _CONTROL.search(user_id):
        raise ValueError(f"ID {user_id!r} holds control characters")
    return encoded


def encode_frame(
    config: WireConfig,
    message_type: int,
    body: bytes = b"",
    *,
    client_type: int = 0,
    message_id: int = 0,
    user_id: str = "",
    dest_user_id: str = "",
) -> bytes:
    """
    Encode one frame.

    @raise ValueError: an ID does not fit its slot or the frame would exceed
        C{config.max_message_size}.
    """
    uid = validate_id(user_id, config)
    dest = validate_id(dest_user_id, config)
    if config.header_length + len(body) > config.max_message_size:
        raise ValueError(
            f"a {len(body)}-byte body exceeds the maximum message size {config.max_message_size}"
        )
    try:
        header = config.header_struct.pack(
            START_TOKEN,
            client_type,
            message_type,
            message_id,
            len(body),
            len(uid),
            uid,
            len(dest),
            dest,
        )
    except struct.error as e:
        raise ValueError(
            f"header field out of range (client_type {client_type}, message_type "
            f"{message_type}, message_id {message_id}): {e}"
        ) from None
    return header + bytes(body) if body else header
