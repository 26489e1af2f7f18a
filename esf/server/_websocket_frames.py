"""
The WebSocket frames of the relay's common case, without I/O: whole
binary messages in, ESF frames as binary messages out.

Browsers (and esf.js) send each ESF frame as one final, masked, binary
WebSocket frame of less than 64 KiB.  L{MessageParser} takes such messages
from the start of each read without autobahn's frame parser (which makes
several Python calls per frame, copies the rest of its buffer after each
one and makes a masker object per frame: about 9.5 µs per message, against
about 1 µs here), and says where autobahn must take over: at the first
frame that is anything else.  L{binary_messages} frames the server's output
the same way in reverse.  Neither knows of a transport or of autobahn; the
adapter (L{esf.server._websocket.WebSocketProtocol}) feeds them.

A message must hold exactly one whole ESF frame; L{refuse_message} says why
one that does not is refused, for this parser and for the messages autobahn
gathers alike.
"""

from __future__ import annotations

import struct
from typing import Callable

import attrs

from esf.wire._decoder import COMPILED
from esf.wire._frames import DisconnectedType

# The easy cases, compiled (esf/wire/_speedups.pyx): whole masked messages
# of one frame each, unmasked in C (MessageParser.feed judges the message
# they stop at), and frames out as messages.
_take_messages: Callable[[bytes, int, int, int, list[bytes]], int] | None = None
_frame_messages: Callable[[bytes, int], bytes | None] | None = None
if COMPILED:
    from esf.wire._speedups import frame_messages as _frame_messages
    from esf.wire._speedups import take_messages as _take_messages

__all__ = ["MessageParser", "Refusal", "binary_messages", "refuse_message"]

#: An ESF frame's body length, at offset 8 of its header.
_BODY_LENGTH = struct.Struct("<i")
_U16_BE = struct.Struct("!H")


@attrs.frozen
class Refusal:
    """
    Why a message is refused: the session ends for C{reason} (C{text} says
    what was wrong) and the connection closes with C{code}.
    """

    reason: DisconnectedType
    text: str
    code: int


def refuse_message(message: bytes, header_length: int, limit: int) -> Refusal:
    """
    Why C{message}, which is not exactly one whole ESF frame, is refused.

    @param header_length: the length of an ESF frame's header.
    @param limit: the session's current maximum message size.
    """
    size = len(message)
    if size < header_length:
        return Refusal(
            DisconnectedType.INVALID_MESSAGE,
            f"a {size}-byte message is shorter than one {header_length}-byte frame header",
            1002,
        )
    body_length = _BODY_LENGTH.unpack_from(message, 8)[0]
    announced = header_length + body_length
    if announced > limit:
        return Refusal(
            DisconnectedType.MESSAGE_TOO_LARGE,
            f"body length {body_length} exceeds the maximum message size {limit}",
            1009,
        )
    if body_length < 0:
        return Refusal(
            DisconnectedType.INVALID_MESSAGE, f"body length {body_length} is negative", 1002
        )
    if announced > size:
        return Refusal(
            DisconnectedType.INVALID_MESSAGE,
            f"a message holds part of a frame ({size} bytes; the header "
            f"announces {announced}): one whole frame per message",
            1002,
        )
    return Refusal(
        DisconnectedType.INVALID_MESSAGE,
        f"a message holds more than one frame ({size} bytes; the first "
        f"is {announced}): one frame per message",
        1002,
    )


class MessageParser:
    """
    Takes the whole binary messages at the start of a WebSocket stream
    that are each one final, masked binary frame of less than 64 KiB,
    within the session's size limit, holding one whole ESF frame.

    Fed a read at a time (L{feed}), when nothing before it is left
    unparsed but what this parser keeps itself; it returns the ESF frames
    it took, and the rest of the read, from the first frame that is
    anything else (a control frame, a fragment, a text message, a longer
    or malformed header), for autobahn to parse as it would have.  It makes
    the checks autobahn would make on the frames it takes: the RSV bits,
    the mask bit and the shortest length encoding.

    Such a message cut off by the end of a read is kept (L{pending}),
    gathered in place, until the read that completes it: at most one
    message of under 64 KiB, so autobahn, which would keep it otherwise,
    does not take every read after it.

    @ivar header_length: the length of an ESF frame's header.
    @ivar pending: the start of a message cut off by the end of a read
        (or of its header), or L{None}.
    """

    __slots__ = ("header_length", "pending", "_needs")

    def __init__(self, header_length: int):
        self.header_length = header_length
        self.pending: bytearray | None = None
        #: How many bytes of C{pending} complete its message (or its header).
        self._needs = 0

    def feed(self, data: bytes, limit: int) -> tuple[list[bytes], Refusal | None, bytes]:
        """
        Take the whole messages at the start of C{data}, the next read.

        @param limit: the session's current maximum message size: a longer
            message is left to autobahn, which refuses it.
        @return: the ESF frames taken, in order; why the message after them
            is refused (a message that is not one whole ESF frame: nothing
            after it is taken), or L{None}; and the rest of C{data}, which
            is autobahn's.  While a message is pending, all three are empty.
        """
        frames: list[bytes] = []
        if self.pending is not None:
            data = self.gather(data)
            if not data:
                return frames, None, data
        size = len(data)
        hlen = self.header_length
        offset = 0 if _take_messages is None else _take_messages(data, 0, limit, hlen, frames)
        refusal = None
        body_length = _BODY_LENGTH.unpack_from
        while size - offset >= 2:
            if data[offset] != 0x82:  # FIN, no RSV bits, binary
                break
            length = data[offset + 1]
            if length < 0xFE:  # masked, a 7-bit length
                if length < 0x80:
                    break  # unmasked: autobahn refuses it
                length &= 0x7F
                start = offset + 2
            elif length == 0xFE:  # masked, a 16-bit length
                if size - offset < 4:
                    return frames, None, self._keep(data, offset, 4)  # its header is cut off
                length = (data[offset + 2] << 8) | data[offset + 3]
                if length < 126:
                    break  # not the shortest encoding: autobahn refuses it
                start = offset + 4
            else:
                break  # a 64-bit length
            if length > limit:
                break
            end = start + 4 + length
            if end > size:
                # Cut off by the end of the read, as most reads under load end.
                return frames, None, self._keep(data, offset, end - offset)
            mask = data[start : start + 4]
            message = (
                int.from_bytes(data[start + 4 : end], "little")
                ^ int.from_bytes((mask * ((length >> 2) + 1))[:length], "little")
            ).to_bytes(length, "little")
            offset = end
            if length >= hlen and hlen + body_length(message, 8)[0] == length:
                frames.append(message)  # one whole frame, as it should be
                continue
            refusal = refuse_message(message, hlen, limit)
            break
        if offset == size - 1 and data[offset] == 0x82:
            return frames, refusal, self._keep(data, offset, 2)  # one byte of the next header
        return frames, refusal, data[offset:] if offset else data

    def gather(self, data: bytes) -> bytes:
        """
        Add C{data}, the next read, to the L{pending} message (gathered in
        place: a message trickled in byte by byte costs no copy per byte):
        the message and C{data} once it is whole (or its header is), else
        C{b""}.  L{feed} calls it; so does a caller that stops parsing (as
        the connection closes) while a message is pending.
        """
        pending = self.pending
        if pending is None:
            return data
        pending += data
        if len(pending) < self._needs:
            return b""
        self.pending = None
        return bytes(pending)

    def _keep(self, data: bytes, offset: int, needs: int) -> bytes:
        """
        Keep C{data} from C{offset} until C{needs} bytes of it have come.
        """
        self.pending = bytearray(data[offset:] if offset else data)
        self._needs = needs
        return b""


def _binary_header(length: int) -> bytes:
    """
    The header of an unmasked, unfragmented binary frame of C{length}
    payload bytes (at most 65535).
    """
    if length < 126:
        return bytes((0x82, length))
    return b"\x82\x7e" + _U16_BE.pack(length)


def binary_messages(data: bytes, header_length: int) -> bytes:
    """
    Whole ESF frames as the server sends them over WebSocket: each one
    unmasked binary message, in one string of bytes.

    @param data: one or more whole ESF frames, at most 65535 bytes in all.
        (No extension is ever negotiated, so the frames are plain.)
    @param header_length: the length of an ESF frame's header.
    """
    if _frame_messages is not None:
        framed = _frame_messages(data, header_length)
        if framed is not None:
            return framed
    size = len(data)
    parts = []
    offset = 0
    while offset < size:
        length = header_length + _BODY_LENGTH.unpack_from(data, offset + 8)[0]
        parts.append(_binary_header(length))
        parts.append(data[offset : offset + length] if length != size else data)
        offset += length
    return b"".join(parts)
