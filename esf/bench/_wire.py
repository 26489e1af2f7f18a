"""
What C{esf-bench}'s load puts on the wire, for each kind of server: the
dialects (ESF over TCP, ESF over WebSocket, the bare relays' framing), the
answers to their logons, and the checkers of what a receiver gets
(C{--check}).  Each dialect builds its frames once; the load writes them as
they are.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from esf.wire import _messages as m
from esf.wire._decoder import FrameDecoder
from esf.wire._frames import (
    FrameError,
    LogonResult,
    MessageType,
    WireConfig,
    encode_frame,
)

__all__ = ["BenchError", "EsfDialect", "WsDialect", "BareDialect", "INFO_TYPE"]

#: Information type carried by every benchmark message.
INFO_TYPE = 1

_U32 = struct.Struct("<I")


class BenchError(Exception):
    """
    A phase could not run to its end.
    """


class EsfDialect:
    """
    ESF v1 frames, built once with L{esf.wire.encode_frame}.
    """

    kind = "esf"
    mid_offset_in_request = 4
    mid_offset_in_response = 4

    def __init__(self, size: int, password: str, system_token: str):
        self.wire = WireConfig()
        self.payload = bytes(i & 0xFF for i in range(size))
        self.body = m.Information(INFO_TYPE, self.payload).encode()
        self.frame_size = self.wire.header_length + len(self.body)
        self.logon_body = m.Logon(m.PROTOCOL_VERSION, system_token, password).encode()

    def hello(self, name: str, group: str | None = None) -> bytes:
        # The server learns who is in which group from its group manager
        # (esf.bench._groups), not from the logon: C{group} is not sent.
        return encode_frame(
            self.wire, MessageType.LOGON, self.logon_body, message_id=1, user_id=name
        )

    def hello_parser(self):
        return _EsfLogonReply(self.wire)

    def message(self, src: str, dst: str) -> bytes:
        return encode_frame(self.wire, MessageType.SEND, self.body, user_id=src, dest_user_id=dst)

    def broadcast(self, src: str, group: str) -> bytes:
        """
        A one-way Broadcast (601, MessageID 0: no Ack) from C{src} to the
        group C{group}, as long as a Send.
        """
        return encode_frame(
            self.wire, MessageType.BROADCAST, self.body, user_id=src, dest_user_id=group
        )

    def request(self, src: str, dst: str) -> bytearray:
        return bytearray(
            encode_frame(
                self.wire,
                MessageType.REQUEST,
                self.body,
                message_id=1,
                user_id=src,
                dest_user_id=dst,
            )
        )

    def response(self, src: str, dst: str) -> bytearray:
        return bytearray(
            encode_frame(
                self.wire,
                MessageType.RESPONSE,
                self.body,
                message_id=1,
                user_id=src,
                dest_user_id=dst,
            )
        )

    def heartbeat(self, name: str) -> bytes:
        return encode_frame(self.wire, MessageType.HEARTBEAT, user_id=name)

    def is_request(self, frame) -> bool:
        return frame[0] == 0xFF and frame[2] == 203 and frame[3] == 0

    def is_response(self, frame) -> bool:
        return frame[0] == 0xFF and frame[2] == 204 and frame[3] == 0

    def checker(self, src: str, dst: str):
        return _EsfChecker(self.wire, src, dst, self.frame_size)

    def broadcast_checker(self, src: str, group: str):
        """
        The checker of a member of C{group}: every frame a Broadcast from
        C{src} to C{group}.
        """
        return _EsfChecker(self.wire, src, group, self.frame_size, MessageType.BROADCAST)


class _EsfLogonReply:
    def __init__(self, wire: WireConfig):
        self.decoder = FrameDecoder(wire)

    def feed(self, data: bytes):
        """
        C{(None, b"")} while incomplete, C{(True, rest)} on Succeed,
        C{(error text, b"")} otherwise.
        """
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            return f"undecodable answer to Logon: {e.message}", b""
        if not frames:
            return None, b""
        frame = frames[0]
        if frame.message_type != MessageType.LOGON:
            if frame.message_type == MessageType.DISCONNECT_NOTICE:
                notice = m.DisconnectNotice.decode(frame.body)
                return f"disconnected before logon: {notice.reason!r} {notice.text}", b""
            return f"answer to Logon has message type {frame.message_type}", b""
        reply = m.LogonReply.decode(frame.body)
        if reply.result != LogonResult.SUCCEED:
            return f"logon refused: {reply.result!r} {reply.failure_cause}", b""
        if len(frames) > 1 or self.decoder.buffered:
            return "unexpected frames after the Logon reply", b""
        return True, b""


class _EsfChecker:
    """
    Decodes and validates every frame a receiver gets (C{--check}): from
    C{src}, or from any of C{src} when it is a collection of names (the
    interleaved pattern), to C{dst} (a user, or the group of a Broadcast),
    of C{message_type}.
    """

    def __init__(
        self, wire, src: str | Collection[str], dst, frame_size, message_type=MessageType.SEND
    ):
        self.decoder = FrameDecoder(wire)
        self.srcs = {src} if isinstance(src, str) else set(src)
        self.dst, self.frame_size = dst, frame_size
        self.message_type = message_type

    def feed(self, data: bytes) -> int:
        frames = self.decoder.feed(data)
        for frame in frames:
            if (
                frame.message_type != self.message_type
                or frame.user_id not in self.srcs
                or frame.dest_user_id != self.dst
                or len(frame.raw) != self.frame_size
            ):
                raise BenchError(f"unexpected frame at the receiver {self.dst}: {frame!r:.200}")
        return len(frames)


#: The mask of every WebSocket frame the load sends.  RFC 6455 wants a fresh
#: random key per frame (against proxy cache poisoning, not an issue on
#: loopback); a fixed one keeps the load precomputed, and the server
#: unmasks whatever the key.
_WS_MASK = b"\x37\xfa\x21\x3d"


def _ws_header(opcode: int, length: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if length < 126:
        return bytes([0x80 | opcode, bit | length])
    if length < 65536:
        return bytes([0x80 | opcode, bit | 126]) + length.to_bytes(2, "big")
    return bytes([0x80 | opcode, bit | 127]) + length.to_bytes(8, "big")


def _ws_client_frame(payload: bytes) -> bytes:
    """
    One masked binary WebSocket frame, as a client sends it.
    """
    mask = (_WS_MASK * (len(payload) // 4 + 1))[: len(payload)]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(
        len(payload), "big"
    )
    return _ws_header(2, len(payload), True) + _WS_MASK + masked


def _ws_server_frame_length(data: bytes, offset: int = 0):
    """
    C{(header length, payload length)} of the unmasked frame at C{offset},
    or C{None} while its header is incomplete.
    """
    if len(data) - offset < 2:
        return None
    n = data[offset + 1] & 0x7F
    if n < 126:
        return 2, n
    size = 4 if n == 126 else 10
    if len(data) - offset < size:
        return None
    return size, int.from_bytes(data[offset + 2 : offset + size], "big")


class WsDialect:
    """
    ESF frames over WebSocket to C{twistd esf --websocket}: the handshake,
    then each ESF frame as one masked binary message.
    """

    kind = "ws"

    def __init__(self, esf: EsfDialect):
        self.esf = esf
        #: What a receiver gets per message: the server's (unmasked) frame.
        self.frame_size = len(_ws_header(2, esf.frame_size, False)) + esf.frame_size

    def hello(self, name: str, group: str | None = None) -> bytes:
        handshake = (
            b"GET /esf HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: ZXNmLWJlbmNoLWtleS0xMg==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: esf.v1\r\n\r\n"
        )
        return handshake + _ws_client_frame(self.esf.hello(name))

    def hello_parser(self):
        return _WsLogonReply(self.esf.hello_parser())

    def message(self, src: str, dst: str) -> bytes:
        return _ws_client_frame(self.esf.message(src, dst))

    def checker(self, src: str, dst: str):
        return _WsChecker(self.esf.checker(src, dst))


class _WsLogonReply:
    def __init__(self, esf_parser):
        self.esf_parser = esf_parser
        self.buffer = b""
        self.upgraded = False

    def feed(self, data: bytes):
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return None, b""
            if not self.buffer.startswith(b"HTTP/1.1 101"):
                return f"WebSocket handshake refused: {self.buffer[:60]!r}", b""
            self.upgraded = True
            self.buffer = self.buffer[end + 4 :]
        lengths = _ws_server_frame_length(self.buffer)
        if lengths is None or len(self.buffer) < sum(lengths):
            return None, b""
        header, length = lengths
        if self.buffer[0] & 0x0F != 2:
            return f"answer to Logon is WebSocket opcode {self.buffer[0] & 0x0F}", b""
        status, _ = self.esf_parser.feed(self.buffer[header : header + length])
        return status, self.buffer[header + length :]


class _WsChecker:
    """
    C{--check} over WebSocket: every message is one binary frame holding
    one ESF frame the ESF checker accepts.
    """

    def __init__(self, esf_checker):
        self.esf_checker = esf_checker
        self.buffer = b""

    def feed(self, data: bytes) -> int:
        buf = self.buffer + data
        offset = count = 0
        while (lengths := _ws_server_frame_length(buf, offset)) is not None:
            header, length = lengths
            if len(buf) - offset < header + length:
                break
            if buf[offset] != 0x82:
                raise BenchError(
                    f"a receiver got WebSocket frame 0x{buf[offset]:02x}, not one binary message"
                )
            if self.esf_checker.feed(buf[offset + header : offset + header + length]) != 1:
                raise BenchError("a WebSocket message did not hold exactly one frame")
            count += 1
            offset += header + length
        self.buffer = buf[offset:]
        return count


class BareDialect:
    """
    The bare relay's frames, the same size as the esf frames they stand for.
    """

    kind = "bare"

    def __init__(self, frame_size: int):
        self.frame_size = frame_size

    @staticmethod
    def _frame(payload: bytes) -> bytes:
        return _U32.pack(len(payload)) + payload

    def _addressed(self, dst: str, fill_to: int, mid: bool = False) -> bytes:
        dest = dst.encode()
        head = bytes([len(dest)]) + dest + (b"\x01\x00\x00\x00" if mid else b"")
        pad = fill_to - 4 - len(head)
        if pad < 0:
            raise ValueError(f"a {fill_to}-byte frame cannot carry {dst!r}")
        return self._frame(head + bytes(i & 0xFF for i in range(pad)))

    def hello(self, name: str, group: str | None = None) -> bytes:
        """
        The name frame: the peer's name, and, for a member of a group, a
        zero byte and the group's name (the relays' way to learn the group,
        where esf asks its group manager).
        """
        return self._frame(name.encode() + (b"\x00" + group.encode() if group else b""))

    def hello_parser(self):
        return _BareWelcome()

    def message(self, src: str, dst: str) -> bytes:
        return self._addressed(dst, self.frame_size)

    def broadcast(self, src: str, group: str) -> bytes:
        # Addressed to the group: the relays write it to its other members.
        return self._addressed(group, self.frame_size)

    def request(self, src: str, dst: str) -> bytearray:
        self.mid_offset_in_request = 5 + len(dst.encode())
        return bytearray(self._addressed(dst, self.frame_size, mid=True))

    def response(self, src: str, dst: str) -> bytearray:
        self.mid_offset_in_response = 5 + len(dst.encode())
        return bytearray(self._addressed(dst, self.frame_size, mid=True))

    def heartbeat(self, name: str) -> bytes:
        dest = name.encode()
        return self._frame(bytes([len(dest)]) + dest)

    def is_request(self, frame) -> bool:
        return _U32.unpack_from(frame)[0] == self.frame_size - 4

    is_response = is_request

    def checker(self, src: str, dst: str):
        return _BareChecker(self.message(src, dst))

    def broadcast_checker(self, src: str, group: str):
        return _BareChecker(self.broadcast(src, group))


class _BareWelcome:
    def __init__(self):
        self.buffer = b""

    def feed(self, data: bytes):
        self.buffer += data
        if len(self.buffer) < 4:
            return None, b""
        if self.buffer[:4] != b"\x00\x00\x00\x00":
            return "unexpected answer to the name frame", b""
        return True, self.buffer[4:]


class _BareChecker:
    def __init__(self, frame: bytes):
        self.frame = frame
        self.size = len(frame)
        self.buffer = b""

    def feed(self, data: bytes) -> int:
        buf = self.buffer + data
        whole = len(buf) // self.size * self.size
        for offset in range(0, whole, self.size):
            if buf[offset : offset + self.size] != self.frame:
                raise BenchError("unexpected frame at a bare receiver")
        self.buffer = buf[whole:]
        return whole // self.size
