"""
Typed bodies of the ESF v1 messages, with their encoders and decoders.

Each body is a frozen attrs class whose fields carry their wire encoding in
their metadata; L{encode} and L{decode} walk that layout.  Integers are
little-endian, C{str} is a u16 byte count and UTF-8, C{rest} is the rest of
the body.  A body that does not parse is a L{BadRequest}, never an
C{IndexError} or C{struct.error}.
"""

from __future__ import annotations

import builtins
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import attrs

from ._compat import dataclass_transform
from ._frames import DisconnectedType, ErrorCode, LogonResult, MessageType

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "PROTOCOL_VERSION",
    "BadRequest",
    "EMPTY",
    "Empty",
    "Logon",
    "LogonReply",
    "GetMyIPEReply",
    "BeingPushedOutNotify",
    "DisconnectNotice",
    "KickOut",
    "KickOutReply",
    "BeingKickedOutNotify",
    "GetAllOnlineUsers",
    "GetAllOnlineUsersReply",
    "QueryOnlineReply",
    "QueryOnlines",
    "QueryOnlinesReply",
    "GetMyDevicesReply",
    "Error",
    "Information",
    "Ack",
    "BlobFragment",
    "REQUEST_BODIES",
    "REPLY_BODIES",
    "encode_str",
    "BlobError",
    "RequestError",
    "BlobAssembler",
    "fragment_blob",
]

PROTOCOL_VERSION = 1


class BadRequest(Exception):
    """
    A body is too short, too long or malformed for its message type.
    """

    code = ErrorCode.BAD_REQUEST


_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_INTS = {"u8": _U8, "u16": _U16, "u32": _U32, "i32": _I32}


def encode_str(text: str) -> bytes:
    """
    Encode a C{str} field: u16 byte count, then UTF-8.

    @raise ValueError: the text is longer than 65,535 bytes.
    """
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"a str field holds at most 65535 bytes, not {len(data)}")
    return _U16.pack(len(data)) + data


class _Reader:
    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self._buf = buf
        self._pos = 0

    def int(self, kind: str) -> int:
        s = _INTS[kind]
        pos = self._pos
        if pos + s.size > len(self._buf):
            raise BadRequest(f"body ends inside a {kind} at byte {pos}")
        self._pos = pos + s.size
        value: int = s.unpack_from(self._buf, pos)[0]
        return value

    def str(self) -> str:
        n = self.int("u16")
        pos = self._pos
        if pos + n > len(self._buf):
            raise BadRequest(f"str of {n} bytes at byte {pos} runs past the body")
        self._pos = pos + n
        try:
            return str(self._buf[pos : pos + n], "utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"str at byte {pos} is not valid UTF-8") from None

    def strs(self) -> tuple[builtins.str, ...]:
        """
        A u32 count, then that many str fields: one loop, no call per
        string (a QueryOnlines names up to a thousand).
        """
        n = self.count("u32", 2)
        buf, pos = self._buf, self._pos
        if isinstance(buf, memoryview):
            buf = buf.tobytes()  # slicing bytes is cheaper than slicing a view
        size = len(buf)
        unpack = _U16.unpack_from
        out = []
        for _ in range(n):
            if pos + 2 > size:
                raise BadRequest(f"body ends inside a u16 at byte {pos}")
            end = pos + 2 + unpack(buf, pos)[0]
            if end > size:
                raise BadRequest(
                    f"str of {end - pos - 2} bytes at byte {pos + 2} runs past the body"
                )
            try:
                out.append(buf[pos + 2 : end].decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest(f"str at byte {pos + 2} is not valid UTF-8") from None
            pos = end
        self._pos = pos
        return tuple(out)

    def u8s(self, count_kind: builtins.str) -> tuple[builtins.int, ...]:
        """
        A count (C{count_kind}), then that many u8 values.
        """
        n = self.count(count_kind, 1)
        pos = self._pos
        self._pos = pos + n
        return tuple(self._buf[pos : pos + n])

    def rest(self) -> bytes:
        data = bytes(self._buf[self._pos :])
        self._pos = len(self._buf)
        return data

    def count(self, kind: builtins.str, item_size: builtins.int) -> builtins.int:
        n = self.int(kind)
        if n * item_size > len(self._buf) - self._pos:
            raise BadRequest(f"count {n} cannot fit in the rest of the body")
        return n

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise BadRequest(f"{len(self._buf) - self._pos} unexpected bytes after the body")


def _read(reader: _Reader, kind: str) -> Any:
    if kind in _INTS:
        return reader.int(kind)
    if kind == "str":
        return reader.str()
    if kind == "rest":
        return reader.rest()
    if kind == "strs":  # u32 count, count x str
        return reader.strs()
    if kind == "u8s32":  # u32 count, count x u8
        return reader.u8s("u32")
    if kind == "u8s8":  # u8 count, count x u8
        return reader.u8s("u8")
    raise AssertionError(kind)


def _write(kind: str, value: Any) -> bytes:
    if kind in _INTS:
        return _INTS[kind].pack(value)
    if kind == "str":
        return encode_str(value)
    if kind == "rest":
        return bytes(value)
    if kind == "strs":
        return _U32.pack(len(value)) + b"".join(encode_str(v) for v in value)
    if kind == "u8s32":
        return _U32.pack(len(value)) + bytes(value)
    if kind == "u8s8":
        return _U8.pack(len(value)) + bytes(value)
    raise AssertionError(kind)


def _field(kind: str, as_type: Any = None, **kwargs: Any) -> Any:
    return attrs.field(metadata={"wire": kind, "as": as_type}, **kwargs)


def _as(as_type: Any, value: Any) -> Any:
    if as_type is None:
        return value
    if isinstance(value, tuple):
        return tuple(_as(as_type, v) for v in value)
    if as_type is bool:
        return bool(value)
    try:
        return as_type(value)
    except ValueError:
        # A value this side does not know (a newer peer): keep the number.
        return value


_B = TypeVar("_B", bound="_Body")


# dataclass_transform tells type checkers that _body makes an attrs class, so
# they see each body's generated __init__.  They do not follow converters:
# the fields converted to a tuple are typed Sequence, so that __init__ takes
# a list as well (the value held is always a tuple).
@dataclass_transform(frozen_default=True, field_specifiers=(attrs.field, _field))
def _body(cls: type[_B]) -> type[_B]:
    """
    Make C{cls} a frozen attrs class and record its wire layout.
    """
    cls = attrs.frozen(cls)
    cls._layout = tuple(
        (f.name, f.metadata["wire"], f.metadata["as"]) for f in attrs.fields(cast(Any, cls))
    )
    return cls


class _Body:
    _layout: ClassVar[tuple[tuple[str, str, Any], ...]] = ()

    def encode(self) -> bytes:
        """
        The body's bytes.

        @raise ValueError: a value does not fit its field.
        """
        try:
            return b"".join(_write(kind, getattr(self, name)) for name, kind, _ in self._layout)
        except (struct.error, OverflowError, TypeError) as e:
            raise ValueError(f"cannot encode {self!r}: {e}") from None

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Self:
        """
        Parse a body (bytes or memoryview).

        @raise BadRequest: it does not parse.
        """
        reader = _Reader(body)
        values = [_as(as_type, _read(reader, kind)) for _, kind, as_type in cls._layout]
        reader.end()
        return cls(*values)


@_body
class Empty(_Body):
    """
    The body of HeartBeat, GetMyIPE, PingByServer, PingAck, Logoff,
    QueryOnline, GetMyDevices, MyDeviceOnline and MyDeviceOffline.
    """


EMPTY = Empty()


@_body
class Logon(_Body):
    """
    112 request: who logs on is in the header (UserID, ClientType).
    """

    protocol_version: int = _field("u16", default=PROTOCOL_VERSION)
    system_token: str = _field("str", default="")
    password: str = _field("str", default="")


@_body
class LogonReply(_Body):
    """
    112 reply.
    """

    result: LogonResult = _field("u8", LogonResult)
    failure_cause: str = _field("str", default="")
    heartbeat_interval: int = _field("u16", default=10)
    heartbeat_timeout: int = _field("u16", default=30)
    max_message_size: int = _field("u32", default=1024 * 1024)


@_body
class GetMyIPEReply(_Body):
    """
    101 reply: the client's address as the server sees it, C{"host:port"}.
    """

    address: str = _field("str")


@_body
class BeingPushedOutNotify(_Body):
    """
    105: this connection was replaced by a newer logon of the same device.
    """

    cause: str = _field("str", default="")


@_body
class DisconnectNotice(_Body):
    """
    106: the server is about to close this connection, and why.
    """

    reason: DisconnectedType = _field("u8", DisconnectedType)
    text: str = _field("str", default="")


@_body
class KickOut(_Body):
    """
    108 request: kick the user named in DestUserID.
    """

    reason: str = _field("str", default="")


@_body
class KickOutReply(_Body):
    """
    108 reply.
    """

    ok: bool = _field("u8", bool)
    cause: str = _field("str", default="")


@_body
class BeingKickedOutNotify(_Body):
    """
    109: this connection is being kicked by C{operator} (C{"_0"}: the server).
    """

    operator: str = _field("str")
    reason: str = _field("str", default="")


@_body
class GetAllOnlineUsers(_Body):
    """
    110 request: one page of the online user list (C{limit} 0: as many as fit).
    """

    offset: int = _field("u32", default=0)
    limit: int = _field("u32", default=0)


@_body
class GetAllOnlineUsersReply(_Body):
    """
    110 reply.
    """

    total: int = _field("u32")
    user_ids: Sequence[str] = _field("strs", converter=tuple)


@_body
class QueryOnlineReply(_Body):
    """
    111 reply.
    """

    online: bool = _field("u8", bool)


@_body
class QueryOnlines(_Body):
    """
    114 request.
    """

    user_ids: Sequence[str] = _field("strs", converter=tuple)


@_body
class QueryOnlinesReply(_Body):
    """
    114 reply: one flag per requested user, in order.
    """

    online: Sequence[bool] = _field("u8s32", bool, converter=tuple)


@_body
class GetMyDevicesReply(_Body):
    """
    116 reply: the ClientTypes of the user's devices online now.
    """

    client_types: Sequence[int] = _field("u8s8", converter=tuple)


@_body
class Error(_Body):
    """
    120: a request failed.
    """

    request_message_type: int = _field("u16")
    code: ErrorCode = _field("u16", ErrorCode)
    text: str = _field("str", default="")


@_body
class Information(_Body):
    """
    The body of Send, Request, Response, SendCertainly and Broadcast.
    """

    information_type: int = _field("i32")
    payload: bytes = _field("rest", default=b"")


@_body
class Ack(_Body):
    """
    206: the body of an Ack names the acknowledged message's information type.
    """

    information_type: int = _field("i32")


@_body
class BlobFragment(_Body):
    """
    207: one fragment of a payload larger than one frame.
    """

    information_type: int = _field("i32")
    blob_id: int = _field("u32")
    fragment_index: int = _field("u32")
    is_last: bool = _field("u8", bool)
    payload: bytes = _field("rest", default=b"")


#: The body class of every message a client may send, by MessageType.
REQUEST_BODIES: dict[int, type] = {
    MessageType.LOGON: Logon,
    MessageType.HEARTBEAT: Empty,
    MessageType.GET_MY_IPE: Empty,
    MessageType.PING_BY_SERVER: Empty,
    MessageType.PING_ACK: Empty,
    MessageType.LOGOFF: Empty,
    MessageType.KICK_OUT: KickOut,
    MessageType.GET_ALL_ONLINE_USERS: GetAllOnlineUsers,
    MessageType.QUERY_ONLINE: Empty,
    MessageType.QUERY_ONLINES: QueryOnlines,
    MessageType.GET_MY_DEVICES: Empty,
    MessageType.SEND: Information,
    MessageType.REQUEST: Information,
    MessageType.RESPONSE: Information,
    MessageType.SEND_CERTAINLY: Information,
    MessageType.ACK: Ack,
    MessageType.BLOB: BlobFragment,
    MessageType.BROADCAST: Information,
}

#: The body class of every message a server may send, by MessageType.
REPLY_BODIES: dict[int, type] = {
    MessageType.LOGON: LogonReply,
    MessageType.HEARTBEAT: Empty,
    MessageType.GET_MY_IPE: GetMyIPEReply,
    MessageType.PING_BY_SERVER: Empty,
    MessageType.PING_ACK: Empty,
    MessageType.BEING_PUSHED_OUT_NOTIFY: BeingPushedOutNotify,
    MessageType.DISCONNECT_NOTICE: DisconnectNotice,
    MessageType.KICK_OUT: KickOutReply,
    MessageType.BEING_KICKED_OUT_NOTIFY: BeingKickedOutNotify,
    MessageType.GET_ALL_ONLINE_USERS: GetAllOnlineUsersReply,
    MessageType.QUERY_ONLINE: QueryOnlineReply,
    MessageType.QUERY_ONLINES: QueryOnlinesReply,
    MessageType.GET_MY_DEVICES: GetMyDevicesReply,
    MessageType.MY_DEVICE_ONLINE: Empty,
    MessageType.MY_DEVICE_OFFLINE: Empty,
    MessageType.ERROR: Error,
    MessageType.SEND: Information,
    MessageType.REQUEST: Information,
    MessageType.RESPONSE: Information,
    MessageType.SEND_CERTAINLY: Information,
    MessageType.ACK: Ack,
    MessageType.BLOB: BlobFragment,
    MessageType.BROADCAST: Information,
}


class RequestError(Exception):
    """
    A request failed: the peer answered with C{Error}, or no answer came.

    @ivar code: the L{ErrorCode}.
    @ivar text: what went wrong, in words.
    """

    def __init__(self, code: ErrorCode, text: str = ""):
        super().__init__(f"{_code_name(code)}: {text}")
        self.code = code
        self.text = text


def _code_name(code: ErrorCode | int) -> str:
    return code.name if isinstance(code, ErrorCode) else str(code)


class BlobError(Exception):
    """
    A blob fragment broke a bound or arrived out of order.

    @ivar code: the L{ErrorCode} to answer with.
    """

    def __init__(self, code: ErrorCode, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


@attrs.define
class _PartialBlob:
    information_type: int
    #: The payload so far, gathered in one buffer: a list of the fragments
    #: would cost an object and a pointer per fragment (some 50 bytes),
    #: which a sender of 2-byte fragments turns into 28 times what every
    #: bound counted in payload bytes allows.
    data: bytearray
    next_index: int
    last_seen: float

    @property
    def size(self) -> int:
        return len(self.data)


class BlobAssembler:
    """
    Reassembles L{BlobFragment}s from one peer, within bounds on the size of
    a blob, the number of blobs in progress and their idle time.

    Sans-IO: the caller passes the current time and calls L{expire} now and
    then; there are no timers.
    """

    def __init__(
        self,
        max_blob_size: int = 64 * 1024 * 1024,
        max_concurrent: int = 4,
        idle_timeout: float = 60.0,
    ):
        self.max_blob_size = max_blob_size
        self.max_concurrent = max_concurrent
        self.idle_timeout = idle_timeout
        self._blobs: dict[int, _PartialBlob] = {}

    @property
    def pending(self) -> int:
        """
        How many blobs are in progress.
        """
        return len(self._blobs)

    @property
    def buffered(self) -> int:
        """
        How many payload bytes wait for the rest of their blob.
        """
        return sum(b.size for b in self._blobs.values())

    def add(self, fragment: BlobFragment, now: float, key: Any = None) -> bytes | None:
        """
        Add a fragment; return the whole payload when it was the last one.

        @param key: what identifies the blob (by default its C{blob_id}; a
            receiver with several senders passes C{(sender, blob_id)}).

        @raise BlobError: the fragment is out of order, changes its blob's
            information type, or passes a bound; the blob is dropped.
        """
        if key is None:
            key = fragment.blob_id
        blob = self._blobs.get(key)
        if blob is None:
            if fragment.fragment_index != 0:
                raise BlobError(
                    ErrorCode.BAD_REQUEST,
                    f"blob {fragment.blob_id}: fragment {fragment.fragment_index} "
                    f"of a blob that has not started",
                )
            if fragment.is_last:
                if len(fragment.payload) > self.max_blob_size:
                    raise BlobError(
                        ErrorCode.TOO_LARGE,
                        f"blob {fragment.blob_id} exceeds {self.max_blob_size} bytes",
                    )
                return fragment.payload
            if len(self._blobs) >= self.max_concurrent:
                raise BlobError(
                    ErrorCode.RATE_LIMITED,
                    f"at most {self.max_concurrent} blobs may be in progress at once",
                )
            blob = _PartialBlob(fragment.information_type, bytearray(), 0, now)
            self._blobs[key] = blob
        if (
            fragment.fragment_index != blob.next_index
            or fragment.information_type != blob.information_type
        ):
            del self._blobs[key]
            raise BlobError(
                ErrorCode.BAD_REQUEST,
                f"blob {fragment.blob_id}: expected fragment {blob.next_index} of "
                f"information type {blob.information_type}, got fragment "
                f"{fragment.fragment_index} of type {fragment.information_type}",
            )
        if blob.size + len(fragment.payload) > self.max_blob_size:
            del self._blobs[key]
            raise BlobError(
                ErrorCode.TOO_LARGE,
                f"blob {fragment.blob_id} exceeds {self.max_blob_size} bytes",
            )
        blob.data += fragment.payload
        blob.next_index += 1
        blob.last_seen = now
        if fragment.is_last:
            del self._blobs[key]
            return bytes(blob.data)
        return None

    def expire(self, now: float) -> list[Any]:
        """
        Drop blobs idle for longer than the idle timeout; return their keys.
        """
        deadline = now - self.idle_timeout
        stale = [i for i, b in self._blobs.items() if b.last_seen < deadline]
        for blob_id in stale:
            del self._blobs[blob_id]
        return stale

    def discard(self, key: Any) -> None:
        """
        Drop the blob C{key} if it is in progress.
        """
        self._blobs.pop(key, None)

    def clear(self) -> None:
        self._blobs.clear()


def fragment_blob(
    information_type: int, blob_id: int, payload: bytes, fragment_size: int
) -> list[BlobFragment]:
    """
    Cut C{payload} into fragments of at most C{fragment_size} bytes.
    """
    if fragment_size <= 0:
        raise ValueError("fragment_size must be positive")
    view = memoryview(payload)
    count = max(1, -(-len(payload) // fragment_size))
    return [
        BlobFragment(
            information_type,
            blob_id,
            i,
            i == count - 1,
            bytes(view[i * fragment_size : (i + 1) * fragment_size]),
        )
        for i in range(count)
    ]
