"""
ESF v1 framing: the fixed header, the enums of the contract, a sans-IO frame
decoder and the frame encoder.

Nothing here knows about transports or reactors: L{FrameDecoder.feed} takes
bytes and returns L{Frame}s, L{encode_frame} returns bytes.  The framing is
written by hand rather than on top of L{twisted.protocols.basic} because the
length sits in the middle of a fixed-size header whose size depends on a
setting, the header must be validated field by field before a single body
byte is buffered, and the relay path needs the frame's original bytes.
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
    "SendRun",
    "FrameError",
    "FrameDecoder",
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

    @max_message_size.validator
    def _check_size(self, attribute: Any, value: int) -> None:
        if not header_length_for(self.max_userid_length) <= value <= 0x7FFFFFFF:
            raise ValueError(
                f"max_message_size must be at least the header length and "
                f"below 2**31, not {value}"
            )

    def __attrs_post_init__(self) -> None:
        h = header_length_for(self.max_userid_length)
        s = (h - 14) // 2
        object.__setattr__(self, "header_length", h)
        object.__setattr__(self, "id_slot", s)
        object.__setattr__(self, "_struct", struct.Struct(f"<BBHiiB{s}sB{s}s"))

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


class SendRun:
    """
    Consecutive Send frames of one chunk with the same two ID fields
    (L{FrameDecoder.feed_runs}): the relay forwards them as one slice of the
    read buffer, with one route lookup and one write.  Every frame in it
    passed every check L{FrameDecoder.feed} makes.

    @ivar raw: the frames' bytes, back to back, exactly as received.
    @ivar count: how many frames C{raw} holds.
    """

    __slots__ = ("user_id", "dest_user_id", "raw", "count", "header_length")

    def __init__(
        self, user_id: str, dest_user_id: str, raw: bytes, count: int, header_length: int
    ):
        self.user_id = user_id
        self.dest_user_id = dest_user_id
        self.raw = raw
        self.count = count
        self.header_length = header_length

    def __repr__(self) -> str:
        return (
            f"<SendRun {self.count} frame(s) {self.user_id!r} -> {self.dest_user_id!r}, "
            f"{len(self.raw)} bytes>"
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
        # Frames (and, from FrameDecoder.feed_runs, SendRuns).
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
        raise FrameError(
            DisconnectedType.INVALID_MESSAGE, f"{which} padding is not zero"
        )
    try:
        text = slot[:length].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(
            DisconnectedType.INVALID_MESSAGE, f"{which} is not valid UTF-8"
        ) from None
    if _CONTROL.search(text):
        raise FrameError(
            DisconnectedType.INVALID_MESSAGE, f"{which} holds control characters"
        )
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
            f"a {len(body)}-byte body exceeds the maximum message size "
            f"{config.max_message_size}"
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


#: The fields before the ID slots: StartToken, ClientType, MessageType,
#: MessageID, BodyLength.
_FIXED_HEADER = struct.Struct("<BBHii")

#: How many decoded pairs of ID fields a decoder remembers; the sender's ID
#: and its few correspondents repeat on every frame, so this saves the
#: UTF-8 and padding checks.
_ID_CACHE_SIZE = 256

#: Chunks smaller than this are gathered into one buffer while a frame is
#: incomplete, so that a peer dribbling single bytes costs one byte of
#: memory per byte rather than one object per byte.
_SMALL_CHUNK = 2048


class HeaderCheck:
    """
    The header check of L{FrameDecoder} (its base): every header it takes
    is checked by L{_check_header}, and the pairs of ID fields a
    connection repeats are decoded once.

    @ivar max_message_size: the largest frame accepted; may be changed
        between calls (a server keeps it small until a peer has logged on).
    """

    __slots__ = ("config", "max_message_size", "_first_key", "_first_user", "_first_dest", "_pairs")

    def __init__(self, config: WireConfig | None = None, max_message_size: int | None = None):
        self.config = config = config or WireConfig()
        self.max_message_size = (
            config.max_message_size if max_message_size is None else max_message_size
        )
        # Both ID fields' raw bytes -> (user_id, dest_user_id): a frame's
        # IDs are found with one slice and one comparison or dict lookup.
        # The first pair seen (often the only one: an idle device talks to
        # the server alone) is kept apart; the dict is made for the others.
        self._first_key: bytes | None = None
        self._first_user = self._first_dest = ""
        self._pairs: dict[bytes, tuple[str, str]] | None = None

    @property
    def _expectation(self) -> str:
        """
        What this side expects, for error texts.
        """
        return (
            f" (this server expects {self.config.header_length}-byte headers, max UserID length "
            f"{self.config.max_userid_length})"
        )

    def _check_header(self, data: bytes, offset: int) -> tuple[Any, ...]:
        """
        The header check, the one for every header the decoder takes: the
        header at C{offset} has the start token, a body length within
        bounds, and two valid ID fields; return C{(client_type,
        message_type, message_id, user_id, dest_user_id, body_length)}.

        @raise FrameError: the header is not valid, saying why.
        """
        start, client_type, message_type, message_id, body_length = _FIXED_HEADER.unpack_from(
            data, offset
        )
        hlen = self.config.header_length
        if start != START_TOKEN:
            raise FrameError(
                DisconnectedType.INVALID_MESSAGE,
                f"start token is 0x{start:02X}, not 0xFF{self._expectation}",
            )
        if body_length < 0 or body_length > self.max_message_size - hlen:
            reason = (
                DisconnectedType.INVALID_MESSAGE
                if body_length < 0
                else DisconnectedType.MESSAGE_TOO_LARGE
            )
            raise FrameError(
                reason,
                f"body length {body_length} outside 0..{self.max_message_size - hlen} "
                f"(maximum message size {self.max_message_size}){self._expectation}",
            )
        # The same few pairs of ID fields repeat on every frame of a
        # connection: each pair is decoded and checked once, then found by
        # its bytes.
        key = data[offset + 12 : offset + hlen]
        if key == self._first_key:
            return client_type, message_type, message_id, self._first_user, self._first_dest, body_length
        pairs = self._pairs
        pair = pairs.get(key) if pairs is not None else None
        if pair is None:
            pair = self._remember(key)
        return client_type, message_type, message_id, pair[0], pair[1], body_length

    def _remember(self, key: bytes) -> tuple[str, str]:
        """
        Decode and check both ID fields C{key} (length byte and slot each),
        and remember them.
        """
        slot = self.config.id_slot
        user_id = self._decode_id(key[: slot + 1], "UserID")
        dest_user_id = self._decode_id(key[slot + 1 : 2 * slot + 2], "DestUserID")
        if self._first_key is None:
            self._first_key, self._first_user, self._first_dest = key, user_id, dest_user_id
        else:
            pairs = self._pairs
            if pairs is None:
                pairs = self._pairs = {}
            elif len(pairs) >= _ID_CACHE_SIZE:
                pairs.clear()
            pairs[key] = (user_id, dest_user_id)
        return user_id, dest_user_id

    def _decode_id(self, key: bytes, which: str) -> str:
        """
        Decode one ID field (length byte, then the zero-padded slot).
        """
        try:
            return _decode_id(key[1:], key[0], which)
        except FrameError as e:
            # A peer with another max UserID length fails here most often:
            # say which header this side expects.
            raise FrameError(e.reason, e.message + self._expectation) from None


class FrameDecoder(HeaderCheck):
    """
    Turns a stream of bytes into L{Frame}s.

    Feed it whatever arrives with L{feed}; it returns the frames completed so
    far.  The first invalid header raises L{FrameError}; after that the
    decoder refuses further input.  It never holds more than one header plus
    one maximum-size body, and checks a header (L{HeaderCheck}) before it
    buffers any of the body that follows.
    """

    # A server holds one decoder per connection: slots, and nothing made
    # before it is needed (the partial-frame buffers, the error text).
    __slots__ = ("_parts", "_small", "_have", "_need", "_header", "_error", "decoded")

    def __init__(self, config: WireConfig | None = None, max_message_size: int | None = None):
        super().__init__(config, max_message_size)
        # Partial frame: pieces received so far (made on demand), their
        # total, the number of bytes that complete the current unit (a
        # header, then a frame).
        self._parts: list[bytes] | None = None
        self._small: bytearray | None = None
        self._have = 0
        self._need = self.config.header_length
        self._header: tuple[Any, ...] | None = None
        self._error: FrameError | None = None
        #: Frames decoded so far (each frame of a L{SendRun} counts): added
        #: to once per L{feed}, never once per frame.
        self.decoded = 0

    @property
    def buffered(self) -> int:
        """
        How many bytes of an incomplete frame are held.
        """
        return self._have

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add bytes; return every frame they complete, in order.

        @raise FrameError: the bytes are not a valid frame stream.
        """
        return self._run(data, None)  # type: ignore[return-value]

    def feed_runs(self, data: bytes, message_type: int) -> list[Frame | SendRun]:
        """
        Like L{feed}, but consecutive frames of C{message_type} (a relay's
        Send) in C{data} with the same two ID fields come as one L{SendRun}:
        no object per frame, and one slice of C{data} for all of them.

        @raise FrameError: the bytes are not a valid frame stream.
        """
        return self._run(data, message_type)

    def _run(self, data: bytes, run_type: int | None) -> list[Frame | SendRun]:
        if self._error is not None:
            raise FrameError(self._error.reason, self._error.message)
        if not isinstance(data, bytes):
            data = bytes(data)  # a bytearray or a view: frames keep bytes
        frames: list[Frame | SendRun] = []
        try:
            in_runs = self._feed(data, frames, run_type)
        except FrameError as e:
            self.decoded += sum(f.count if isinstance(f, SendRun) else 1 for f in frames)
            e.frames = frames
            self._error = e
            self._parts = None
            self._small = None
            self._have = 0
            raise
        self.decoded += len(frames) + in_runs
        return frames

    def _feed(self, data: bytes, frames: list[Frame | SendRun], run_type: int | None) -> int:
        """
        Decode C{data} into C{frames}; return how many frames its runs hold
        beyond their first (each run is one item of C{frames}).
        """
        size = len(data)
        offset = 0
        if self._have:
            offset = self._complete_partial(data, frames)
            if offset < 0:
                return 0
        hlen = self.config.header_length
        unpack = _FIXED_HEADER.unpack_from
        max_body = self.max_message_size - hlen
        pairs = self._pairs or {}
        first_key, first_ids = self._first_key, (self._first_user, self._first_dest)
        append = frames.append
        # The open run: its frames' ID fields (None: no run), where it
        # starts, how many frames it has, and their IDs.
        run_key: bytes | None = None
        run_start = run_count = 0
        run_ids: tuple[str, str] = ("", "")
        header: tuple[Any, ...] | None = None  # of a frame cut off at the end
        # The header of the run's last frame, and that frame's size.
        last_header = b""
        last_size = 0
        in_runs = 0  # frames of the runs appended, beyond each run's first
        startswith = data.startswith
        while size - offset >= hlen:
            if last_header and startswith(last_header, offset):
                # The commonest case of all: a header byte for byte the same
                # as the one before it in this run (same type, IDs and
                # length, all checked then), as a stream of equal messages
                # to one receiver has.  Nothing to unpack.
                end = offset + last_size
                if end > size:
                    header = self._check_header(data, offset)
                    break
                run_count += 1
                offset = end
                continue
            start, client_type, message_type, message_id, body_length = unpack(data, offset)
            key = data[offset + 12 : offset + hlen]
            # Headers are judged by _check_header alone.  This one test only
            # takes, without a call, what it would take without a word: the
            # start token, a length within bounds, and ID fields it has
            # checked already (the open run's, or remembered).  A call per
            # header would cost a relay to many receivers 10-15% per frame.
            if start == START_TOKEN and 0 <= body_length <= max_body:
                if key == run_key and message_type == run_type:
                    # One more frame of the open run.
                    end = offset + hlen + body_length
                    if end > size:
                        header = (client_type, message_type, message_id, *run_ids, body_length)
                        break
                    run_count += 1
                    last_header = data[offset : offset + hlen]
                    last_size = end - offset
                    offset = end
                    continue
                ids = first_ids if key == first_key else pairs.get(key)
            else:
                ids = None
            if run_count:
                # (Before a bad header raises: what came before it is kept.)
                append(SendRun(*run_ids, data[run_start:offset], run_count, hlen))
                in_runs += run_count - 1
                run_key, run_count, last_header = None, 0, b""
            if ids is None:
                (
                    client_type,
                    message_type,
                    message_id,
                    user_id,
                    dest_user_id,
                    body_length,
                ) = self._check_header(data, offset)
                # (It remembered the pair: look there from now on.)
                pairs = self._pairs or pairs
                first_key, first_ids = self._first_key, (self._first_user, self._first_dest)
            else:
                user_id, dest_user_id = ids
            end = offset + hlen + body_length
            if end > size:
                header = (client_type, message_type, message_id, user_id, dest_user_id, body_length)
                break
            if message_type == run_type:
                # (Its header is kept for the fast path above once a second
                # frame joins the run: a run of one, as when each frame goes
                # to another receiver, costs no copy and no comparison.)
                run_key, run_start, run_count = key, offset, 1
                run_ids = (user_id, dest_user_id)
            else:
                raw = data[offset:end] if (offset or end != size) else data
                append(
                    Frame(client_type, message_type, message_id, user_id, dest_user_id, raw, hlen)
                )
            offset = end
        if run_count:
            raw = data[run_start:offset] if (run_start or offset != size) else data
            append(SendRun(*run_ids, raw, run_count, hlen))
            in_runs += run_count - 1
        if offset < size:
            # A partial frame, its header checked already when it is whole.
            self._header = header
            self._need = hlen if header is None else hlen + header[5]
            self._stash(data[offset:] if offset else data)
        return in_runs

    def _complete_partial(self, data: bytes, frames: list[Frame | SendRun]) -> int:
        """
        Add to the frame under construction.  Return the offset in C{data}
        where the next frame starts, or -1 when C{data} was used up.
        """
        offset = 0
        size = len(data)
        while True:
            missing = self._need - self._have
            if missing > size - offset:
                self._stash(data[offset:] if offset else data)
                return -1
            self._stash(data[offset : offset + missing])
            offset += missing
            unit = self._take()
            if self._header is None:
                header = self._check_header(unit, 0)
                if header[5] == 0:
                    frames.append(self._frame(header, unit))
                    return offset
                self._header = header
                self._need = self.config.header_length + header[5]
                self._stash(unit)
            else:
                frames.append(self._frame(self._header, unit))
                self._header = None
                self._need = self.config.header_length
                return offset

    def _stash(self, chunk: bytes) -> None:
        # Small pieces (a frame trickling in) are gathered in one bytearray;
        # large ones are kept as they are and joined once.
        parts = self._parts
        if parts is None:
            parts = self._parts = []
        small = self._small
        if len(chunk) < _SMALL_CHUNK:
            if small is None:
                small = self._small = bytearray()
            small += chunk
            if len(small) >= _SMALL_CHUNK:
                parts.append(bytes(small))
                small.clear()
        else:
            if small:
                parts.append(bytes(small))
                small.clear()
            parts.append(chunk)
        self._have += len(chunk)

    def _take(self) -> bytes:
        parts = self._parts or []
        if self._small:
            parts.append(bytes(self._small))
        unit = parts[0] if len(parts) == 1 else b"".join(parts)
        self._parts = self._small = None
        self._have = 0
        return unit

    def _frame(self, header: tuple[Any, ...], raw: bytes) -> Frame:
        return Frame(header[0], header[1], header[2], header[3], header[4], raw, self.config.header_length)
