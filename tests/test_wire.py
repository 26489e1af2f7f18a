"""
Tests for the ESF v1 codec: golden frames, the frame decoder's hard cases,
body decoding, and properties of the whole.

The golden vectors in L{VECTORS} were written byte by byte from the protocol
description; C{docs/protocol.md} shows several of them as annotated hex dumps,
and L{test_docs_hex_examples_match} keeps those dumps honest.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import NamedTuple

import attrs
import pytest
from _real_parts import missing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esf.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EMPTY,
    REPLY_BODIES,
    REQUEST_BODIES,
    Ack,
    BadRequest,
    BeingKickedOutNotify,
    BeingPushedOutNotify,
    BlobFragment,
    ClientType,
    DisconnectedType,
    DisconnectNotice,
    Empty,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameRun,
    GetAllOnlineUsers,
    GetAllOnlineUsersReply,
    GetMyDevicesReply,
    GetMyIPEReply,
    Information,
    KickOut,
    KickOutReply,
    Logon,
    LogonReply,
    LogonResult,
    MessageType,
    QueryOnlineReply,
    QueryOnlines,
    QueryOnlinesReply,
    WireConfig,
    _decoder,
    encode_frame,
    encode_str,
    header_length_for,
    validate_id,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# ---------------------------------------------------------------------------
# Golden vectors
# ---------------------------------------------------------------------------

# Every test here runs with the decoder's compiled loop and with its
# pure-Python reference (compiled_loops, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compiled_loops")


class Vector(NamedTuple):
    """
    One frame, by its fields and by its bytes.

    @ivar sender: C{"client"} or C{"server"}: which table of body classes
        (L{REQUEST_BODIES} or L{REPLY_BODIES}) types its body.
    @ivar hex: the whole frame.  Spaces separate fields; they mean nothing.
    """

    name: str
    sender: str
    message_type: int
    client_type: int
    message_id: int
    user_id: str
    dest_user_id: str
    body: object
    hex: str
    max_userid_length: int = 11


# With the default maximum UserID length 11 the header is 36 bytes:
#   ff | ClientType | MessageType u16 | MessageID i32 | BodyLength i32 |
#   UserIDLength | UserID, 11 bytes zero-padded |
#   DestUserIDLength | DestUserID, 11 bytes zero-padded
# Recurring ID slots: "alice" 05 616c696365 000000000000, "bob" 03 626f62
# 0000000000000000, "_0" 02 5f30 000000000000000000.
VECTORS = [
    # -- Logon (112) ---------------------------------------------------------
    Vector(
        "logon-request",
        "client",
        112,
        ClientType.ANDROID,
        1,
        "alice",
        "_0",
        Logon(1, "demo-token", "s3cret"),
        "ff 05 7000 01000000 16000000 05 616c696365 000000000000 02 5f30 000000000000000000"
        "0100 0a00 64656d6f2d746f6b656e 0600 733363726574",
    ),
    Vector(
        "logon-reply-succeed",
        "server",
        112,
        0,
        1,
        "_0",
        "alice",
        LogonReply(LogonResult.SUCCEED, "", 10, 30, 1048576),
        "ff 00 7000 01000000 0b000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "00 0000 0a00 1e00 00001000",
    ),
    Vector(
        "logon-reply-failed",
        "server",
        112,
        0,
        1,
        "_0",
        "bob",
        LogonReply(LogonResult.FAILED, "bad password", 10, 30, 1048576),
        "ff 00 7000 01000000 17000000 02 5f30 000000000000000000 03 626f62 0000000000000000"
        "01 0c00 6261642070617373776f7264 0a00 1e00 00001000",
    ),
    # -- HeartBeat (104) -----------------------------------------------------
    Vector(
        "heartbeat",
        "client",
        104,
        ClientType.ANDROID,
        0,
        "alice",
        "_0",
        EMPTY,
        "ff 05 6800 00000000 00000000 05 616c696365 000000000000 02 5f30 000000000000000000",
    ),
    Vector(
        "heartbeat-echo",
        "server",
        104,
        0,
        0,
        "_0",
        "alice",
        EMPTY,
        "ff 00 6800 00000000 00000000 02 5f30 000000000000000000 05 616c696365 000000000000",
    ),
    # -- GetMyIPE (101) ------------------------------------------------------
    Vector(
        "get-my-ipe",
        "client",
        101,
        ClientType.DOTNET,
        2,
        "alice",
        "_0",
        EMPTY,
        "ff 00 6500 02000000 00000000 05 616c696365 000000000000 02 5f30 000000000000000000",
    ),
    Vector(
        "get-my-ipe-reply",
        "server",
        101,
        0,
        2,
        "_0",
        "alice",
        GetMyIPEReply("127.0.0.1:50312"),
        "ff 00 6500 02000000 11000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "0f00 3132372e302e302e313a3530333132",
    ),
    # -- PingByServer (102) and PingAck (103) --------------------------------
    Vector(
        "ping-server",
        "client",
        102,
        ClientType.ANDROID,
        3,
        "alice",
        "_0",
        EMPTY,
        "ff 05 6600 03000000 00000000 05 616c696365 000000000000 02 5f30 000000000000000000",
    ),
    Vector(
        "ping-ack-server",
        "server",
        103,
        0,
        3,
        "_0",
        "alice",
        EMPTY,
        "ff 00 6700 03000000 00000000 02 5f30 000000000000000000 05 616c696365 000000000000",
    ),
    Vector(
        "ping-user",
        "client",
        102,
        ClientType.ANDROID,
        4,
        "alice",
        "bob",
        EMPTY,
        "ff 05 6600 04000000 00000000 05 616c696365 000000000000 03 626f62 0000000000000000",
    ),
    Vector(
        "ping-ack-user",
        "client",
        103,
        ClientType.IOS,
        4,
        "bob",
        "alice",
        EMPTY,
        "ff 04 6700 04000000 00000000 03 626f62 0000000000000000 05 616c696365 000000000000",
    ),
    # -- BeingPushedOutNotify (105) ------------------------------------------
    Vector(
        "being-pushed-out",
        "server",
        105,
        0,
        0,
        "_0",
        "alice",
        BeingPushedOutNotify("replaced by a new logon"),
        "ff 00 6900 00000000 19000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "1700 7265706c61636564206279 2061206e6577206c6f676f6e",
    ),
    # -- DisconnectNotice (106) ----------------------------------------------
    Vector(
        "disconnect-heartbeat-timeout",
        "server",
        106,
        0,
        0,
        "_0",
        "alice",
        DisconnectNotice(DisconnectedType.HEARTBEAT_TIMEOUT, "silent for 30 s"),
        "ff 00 6a00 00000000 12000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "03 0f00 73696c656e7420666f722033302073",
    ),
    Vector(
        "disconnect-invalid-message",
        "server",
        106,
        0,
        0,
        "_0",
        "",
        DisconnectNotice(DisconnectedType.INVALID_MESSAGE, "bad start token"),
        "ff 00 6a00 00000000 12000000 02 5f30 000000000000000000 00 0000000000000000000000"
        "01 0f00 62616420737461727420746f6b656e",
    ),
    # -- Logoff (107) ----------------------------------------------------------
    Vector(
        "logoff",
        "client",
        107,
        ClientType.ANDROID,
        0,
        "alice",
        "_0",
        EMPTY,
        "ff 05 6b00 00000000 00000000 05 616c696365 000000000000 02 5f30 000000000000000000",
    ),
    # -- KickOut (108) ---------------------------------------------------------
    Vector(
        "kick-out",
        "client",
        108,
        ClientType.DOTNET,
        5,
        "admin",
        "bob",
        KickOut("spam"),
        "ff 00 6c00 05000000 06000000 05 61646d696e 000000000000 03 626f62 0000000000000000"
        "0400 7370616d",
    ),
    Vector(
        "kick-out-reply-ok",
        "server",
        108,
        0,
        5,
        "_0",
        "admin",
        KickOutReply(True, ""),
        "ff 00 6c00 05000000 03000000 02 5f30 000000000000000000 05 61646d696e 000000000000"
        "01 0000",
    ),
    Vector(
        "kick-out-reply-denied",
        "server",
        108,
        0,
        5,
        "_0",
        "admin",
        KickOutReply(False, "not authorized"),
        "ff 00 6c00 05000000 11000000 02 5f30 000000000000000000 05 61646d696e 000000000000"
        "00 0e00 6e6f7420617574686f72697a6564",
    ),
    # -- BeingKickedOutNotify (109) --------------------------------------------
    Vector(
        "being-kicked-out",
        "server",
        109,
        0,
        0,
        "_0",
        "bob",
        BeingKickedOutNotify("admin", "spam"),
        "ff 00 6d00 00000000 0d000000 02 5f30 000000000000000000 03 626f62 0000000000000000"
        "0500 61646d696e 0400 7370616d",
    ),
    # -- GetAllOnlineUsers (110) -----------------------------------------------
    Vector(
        "get-all-online-users",
        "client",
        110,
        ClientType.DOTNET,
        6,
        "alice",
        "_0",
        GetAllOnlineUsers(0, 0),
        "ff 00 6e00 06000000 08000000 05 616c696365 000000000000 02 5f30 000000000000000000"
        "00000000 00000000",
    ),
    Vector(
        "get-all-online-users-page",
        "client",
        110,
        ClientType.DOTNET,
        7,
        "alice",
        "_0",
        GetAllOnlineUsers(100, 50),
        "ff 00 6e00 07000000 08000000 05 616c696365 000000000000 02 5f30 000000000000000000"
        "64000000 32000000",
    ),
    Vector(
        "get-all-online-users-reply",
        "server",
        110,
        0,
        6,
        "_0",
        "alice",
        GetAllOnlineUsersReply(3, ("alice", "bob", "carol")),
        "ff 00 6e00 06000000 1b000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "03000000 03000000 0500 616c696365 0300 626f62 0500 6361726f6c",
    ),
    # -- QueryOnline (111) -----------------------------------------------------
    Vector(
        "query-online",
        "client",
        111,
        ClientType.DOTNET,
        7,
        "alice",
        "bob",
        EMPTY,
        "ff 00 6f00 07000000 00000000 05 616c696365 000000000000 03 626f62 0000000000000000",
    ),
    Vector(
        "query-online-reply",
        "server",
        111,
        0,
        7,
        "_0",
        "alice",
        QueryOnlineReply(True),
        "ff 00 6f00 07000000 01000000 02 5f30 000000000000000000 05 616c696365 00000000000001",
    ),
    # -- QueryOnlines (114) ----------------------------------------------------
    Vector(
        "query-onlines",
        "client",
        114,
        ClientType.DOTNET,
        8,
        "alice",
        "_0",
        QueryOnlines(("bob", "carol")),
        "ff 00 7200 08000000 10000000 05 616c696365 000000000000 02 5f30 000000000000000000"
        "02000000 0300 626f62 0500 6361726f6c",
    ),
    Vector(
        "query-onlines-reply",
        "server",
        114,
        0,
        8,
        "_0",
        "alice",
        QueryOnlinesReply((True, False)),
        "ff 00 7200 08000000 06000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "02000000 01 00",
    ),
    # -- GetMyDevices (116) ----------------------------------------------------
    Vector(
        "get-my-devices",
        "client",
        116,
        ClientType.ANDROID,
        9,
        "alice",
        "_0",
        EMPTY,
        "ff 05 7400 09000000 00000000 05 616c696365 000000000000 02 5f30 000000000000000000",
    ),
    Vector(
        "get-my-devices-reply",
        "server",
        116,
        0,
        9,
        "_0",
        "alice",
        GetMyDevicesReply((ClientType.DOTNET, ClientType.ANDROID)),
        "ff 00 7400 09000000 03000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "02 00 05",
    ),
    # -- MyDeviceOnline (117) and MyDeviceOffline (118) ------------------------
    Vector(
        "my-device-online",
        "server",
        117,
        ClientType.IOS,
        0,
        "_0",
        "alice",
        EMPTY,
        "ff 04 7500 00000000 00000000 02 5f30 000000000000000000 05 616c696365 000000000000",
    ),
    Vector(
        "my-device-offline",
        "server",
        118,
        ClientType.IOS,
        0,
        "_0",
        "alice",
        EMPTY,
        "ff 04 7600 00000000 00000000 02 5f30 000000000000000000 05 616c696365 000000000000",
    ),
    # -- Error (120) -----------------------------------------------------------
    Vector(
        "error-user-offline",
        "server",
        120,
        0,
        10,
        "_0",
        "alice",
        Error(MessageType.REQUEST, ErrorCode.USER_OFFLINE, "bob is not online"),
        "ff 00 7800 0a000000 17000000 02 5f30 000000000000000000 05 616c696365 000000000000"
        "cb00 0200 1100 626f62206973206e6f74206f6e6c696e65",
    ),
    # -- Send (202) --------------------------------------------------------------
    Vector(
        "send-to-user",
        "client",
        202,
        ClientType.ANDROID,
        0,
        "alice",
        "bob",
        Information(1001, b"hello"),
        "ff 05 ca00 00000000 09000000 05 616c696365 000000000000 03 626f62 0000000000000000"
        "e9030000 68656c6c6f",
    ),
    Vector(
        "send-to-server",
        "client",
        202,
        ClientType.ANDROID,
        0,
        "alice",
        "_0",
        Information(7, b""),
        "ff 05 ca00 00000000 04000000 05 616c696365 000000000000 02 5f30 000000000000000000"
        "07000000",
    ),
    Vector(
        "send-negative-type",
        "client",
        202,
        ClientType.ANDROID,
        0,
        "alice",
        "bob",
        Information(-2, b"\x00\xff"),
        "ff 05 ca00 00000000 06000000 05 616c696365 000000000000 03 626f62 0000000000000000"
        "feffffff 00ff",
    ),
    Vector(
        "send-utf8-sender",
        "client",
        202,
        ClientType.DOTNET,
        0,
        "\u5f20\u4e09",
        "alice",
        Information(1, b""),
        "ff 00 ca00 00000000 04000000 06 e5bca0e4b889 0000000000 05 616c696365 000000000000"
        "01000000",
    ),
    # -- Request (203) and Response (204) ----------------------------------------
    Vector(
        "request",
        "client",
        203,
        ClientType.ANDROID,
        11,
        "alice",
        "bob",
        Information(2001, b"time?"),
        "ff 05 cb00 0b000000 09000000 05 616c696365 000000000000 03 626f62 0000000000000000"
        "d1070000 74696d653f",
    ),
    Vector(
        "response",
        "client",
        204,
        ClientType.IOS,
        11,
        "bob",
        "alice",
        Information(2001, b"12:00"),
        "ff 04 cc00 0b000000 09000000 03 626f62 0000000000000000 05 616c696365 000000000000"
        "d1070000 31323a3030",
    ),
    # -- SendCertainly (205) and Ack (206) ---------------------------------------
    Vector(
        "send-certainly",
        "client",
        205,
        ClientType.ANDROID,
        12,
        "alice",
        "bob",
        Information(1002, b"hi"),
        "ff 05 cd00 0c000000 06000000 05 616c696365 000000000000 03 626f62 0000000000000000"
        "ea030000 6869",
    ),
    Vector(
        "ack",
        "client",
        206,
        ClientType.IOS,
        12,
        "bob",
        "alice",
        Ack(1002),
        "ff 04 ce00 0c000000 04000000 03 626f62 0000000000000000 05 616c696365 000000000000"
        "ea030000",
    ),
    # -- Blob (207) ----------------------------------------------------------------
    Vector(
        "blob-first",
        "client",
        207,
        ClientType.ANDROID,
        0,
        "alice",
        "bob",
        BlobFragment(3001, 42, 0, False, b"abc"),
        "ff 05 cf00 00000000 10000000 05 616c696365 000000000000 03 626f62 0000000000000000"
        "b90b0000 2a000000 00000000 00 616263",
    ),
    Vector(
        "blob-last",
        "client",
        207,
        ClientType.ANDROID,
        0,
        "alice",
        "bob",
        BlobFragment(3001, 42, 1, True, b"de"),
        "ff 05 cf00 00000000 0f000000 05 616c696365 000000000000 03 626f62 0000000000000000"
        "b90b0000 2a000000 01000000 01 6465",
    ),
    # -- Broadcast (601) -------------------------------------------------------------
    Vector(
        "broadcast-group",
        "client",
        601,
        ClientType.ANDROID,
        0,
        "alice",
        "team-7",
        Information(4001, b"hi all"),
        "ff 05 5902 00000000 0a000000 05 616c696365 000000000000 06 7465616d2d37 0000000000"
        "a10f0000 686920616c6c",
    ),
    Vector(
        "broadcast-everyone",
        "client",
        601,
        ClientType.ANDROID,
        0,
        "alice",
        "*",
        Information(4002, b""),
        "ff 05 5902 00000000 04000000 05 616c696365 000000000000 01 2a 00000000000000000000"
        "a20f0000",
    ),
    # -- Other maximum UserID lengths ------------------------------------------------
    # n = 20: 2*20 + 14 = 54, rounded up to H = 56, so S = 21.
    Vector(
        "heartbeat-n20",
        "client",
        104,
        ClientType.ANDROID,
        0,
        "alice",
        "_0",
        EMPTY,
        "ff 05 6800 00000000 00000000"
        "05 616c696365 00000000000000000000000000000000"
        "02 5f30 00000000000000000000000000000000000000",
        max_userid_length=20,
    ),
    # n = 2: 2*2 + 14 = 18, rounded up to H = 20, so S = 3 (one byte more than n).
    Vector(
        "heartbeat-echo-n2",
        "server",
        104,
        0,
        0,
        "_0",
        "ab",
        EMPTY,
        "ff 00 6800 00000000 00000000 02 5f3000 02 616200",
        max_userid_length=2,
    ),
    # n = 1: 2*1 + 14 = 16 = H, S = 1.
    Vector(
        "heartbeat-n1",
        "client",
        104,
        ClientType.OTHERS,
        0,
        "7",
        "",
        EMPTY,
        "ff 08 6800 00000000 00000000 01 37 00 00",
        max_userid_length=1,
    ),
]

VECTORS_BY_NAME = {v.name: v for v in VECTORS}

#: Every (MessageType, sender) pair the protocol defines.
REQUIRED = {
    (101, "client"),
    (101, "server"),
    (102, "client"),
    (103, "client"),
    (103, "server"),
    (104, "client"),
    (104, "server"),
    (105, "server"),
    (106, "server"),
    (107, "client"),
    (108, "client"),
    (108, "server"),
    (109, "server"),
    (110, "client"),
    (110, "server"),
    (111, "client"),
    (111, "server"),
    (112, "client"),
    (112, "server"),
    (114, "client"),
    (114, "server"),
    (116, "client"),
    (116, "server"),
    (117, "server"),
    (118, "server"),
    (120, "server"),
    (202, "client"),
    (203, "client"),
    (204, "client"),
    (205, "client"),
    (206, "client"),
    (207, "client"),
    (601, "client"),
}


def _bodies(sender: str) -> dict:
    return REQUEST_BODIES if sender == "client" else REPLY_BODIES


def _config(vector: Vector) -> WireConfig:
    return WireConfig(max_userid_length=vector.max_userid_length)


def test_vectors_cover_every_message():
    """
    The golden vectors hold at least one frame of every message, and their
    names are unique.
    """
    assert len(VECTORS_BY_NAME) == len(VECTORS)
    covered = {(v.message_type, v.sender) for v in VECTORS}
    assert covered >= REQUIRED, sorted(REQUIRED - covered)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_golden_encode(vector):
    """
    Encoding the vector's fields gives exactly its bytes.
    """
    body = vector.body.encode()
    data = encode_frame(
        _config(vector),
        vector.message_type,
        body,
        client_type=vector.client_type,
        message_id=vector.message_id,
        user_id=vector.user_id,
        dest_user_id=vector.dest_user_id,
    )
    assert data.hex() == bytes.fromhex(vector.hex).hex()


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_golden_decode(vector):
    """
    Decoding the vector's bytes gives exactly its fields, and its body class
    (from the table for its sender) gives its body.
    """
    config = _config(vector)
    data = bytes.fromhex(vector.hex)
    decoder = FrameDecoder(config)
    [frame] = decoder.feed(data)
    assert decoder.buffered == 0
    assert frame == Frame(
        client_type=vector.client_type,
        message_type=vector.message_type,
        message_id=vector.message_id,
        user_id=vector.user_id,
        dest_user_id=vector.dest_user_id,
        raw=data,
        header_length=config.header_length,
    )
    assert frame.body_length == len(data) - config.header_length
    cls = _bodies(vector.sender)[vector.message_type]
    assert type(vector.body) is cls
    assert cls.decode(frame.body) == vector.body


def test_golden_enums_decode_as_enums():
    """
    Known enum values come back as the enum members.
    """
    reply = LogonReply.decode(bytes.fromhex("00 0000 0a00 1e00 00001000"))
    assert reply.result is LogonResult.SUCCEED
    notice = DisconnectNotice.decode(bytes.fromhex("0f 0000"))
    assert notice.reason is DisconnectedType.MESSAGE_TOO_LARGE
    error = Error.decode(bytes.fromhex("cb00 0900 0000"))
    assert error.code is ErrorCode.TIMEOUT


def test_unknown_enum_values_are_kept():
    """
    An enum value from a newer peer is kept as its number, and encodes back
    to the same bytes.
    """
    for cls, data, attr in [
        (LogonReply, "63 0000 0a00 1e00 00001000", "result"),
        (DisconnectNotice, "c8 0000", "reason"),
        (Error, "cb00 6400 0000", "code"),
    ]:
        body = cls.decode(bytes.fromhex(data))
        value = getattr(body, attr)
        assert type(value) is int
        assert body.encode() == bytes.fromhex(data)


def test_u8_booleans():
    """
    A u8 boolean is true for any non-zero byte; it is written as 1.
    """
    assert QueryOnlineReply.decode(b"\x00").online is False
    for byte in (1, 2, 0x80, 0xFF):
        assert QueryOnlineReply.decode(bytes([byte])).online is True
    assert QueryOnlineReply(True).encode() == b"\x01"
    assert QueryOnlinesReply.decode(bytes.fromhex("03000000 00 07 01")).online == (
        False,
        True,
        True,
    )
    assert QueryOnlinesReply((True, False, True)).encode() == bytes.fromhex("03000000 01 00 01")
    fragment = BlobFragment.decode(bytes.fromhex("01000000 02000000 03000000 fe"))
    assert fragment.is_last is True
    assert fragment.encode().endswith(b"\x01")


# ---------------------------------------------------------------------------
# The frame decoder's hard cases
# ---------------------------------------------------------------------------

LOGON = VECTORS_BY_NAME["logon-request"]
LOGON_BYTES = bytes.fromhex(LOGON.hex)
SEVERAL = b"".join(bytes.fromhex(v.hex) for v in VECTORS if v.max_userid_length == 11)
SEVERAL_COUNT = sum(1 for v in VECTORS if v.max_userid_length == 11)


def _frames_of(data: bytes, config: WireConfig | None = None) -> list[Frame]:
    decoder = FrameDecoder(config)
    frames = decoder.feed(data)
    assert decoder.buffered == 0
    return frames


def test_single_bytes():
    """
    A frame fed one byte at a time comes out once, complete, on its last
    byte.
    """
    decoder = FrameDecoder()
    for i, byte in enumerate(LOGON_BYTES):
        frames = decoder.feed(bytes([byte]))
        if i < len(LOGON_BYTES) - 1:
            assert frames == []
            assert decoder.buffered == i + 1
    assert frames == _frames_of(LOGON_BYTES)
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk():
    """
    Every frame in one chunk comes out, in order.
    """
    frames = _frames_of(SEVERAL)
    assert len(frames) == SEVERAL_COUNT
    expected = [v for v in VECTORS if v.max_userid_length == 11]
    assert [f.raw.hex() for f in frames] == [bytes.fromhex(v.hex).hex() for v in expected]
    assert [f.message_type for f in frames] == [v.message_type for v in expected]


def test_many_frames_single_bytes():
    decoder = FrameDecoder()
    frames = []
    for byte in SEVERAL:
        frames += decoder.feed(bytes([byte]))
    assert frames == _frames_of(SEVERAL)


@pytest.mark.parametrize("name", ["logon-request", "heartbeat", "get-all-online-users-reply"])
def test_every_two_way_split(name):
    """
    Splitting two frames in a row at any point changes nothing.
    """
    frame = bytes.fromhex(VECTORS_BY_NAME[name].hex)
    data = frame + LOGON_BYTES
    expected = _frames_of(data)
    assert len(expected) == 2
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == expected, cut
        assert decoder.buffered == 0


def test_zero_length_bodies():
    """
    Frames with empty bodies, alone, in a row and split, come out with an
    empty body.
    """
    heartbeat = bytes.fromhex(VECTORS_BY_NAME["heartbeat"].hex)
    [frame] = _frames_of(heartbeat)
    assert frame.body_length == 0
    assert bytes(frame.body) == b""
    assert len(_frames_of(heartbeat * 5)) == 5
    decoder = FrameDecoder()
    assert decoder.feed(heartbeat[:36]) == [frame]
    assert decoder.feed(heartbeat[:20]) == []
    assert decoder.feed(heartbeat[20:] + heartbeat[:1]) == [frame]
    assert decoder.buffered == 1


def test_empty_feed():
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_body_is_a_view_of_raw():
    [frame] = _frames_of(LOGON_BYTES)
    assert bytes(frame.body) == LOGON.body.encode()
    assert frame.raw == LOGON_BYTES
    assert frame.header_length == 36


def _expect_error(data: bytes, reason: DisconnectedType, config=None, **kwargs) -> FrameError:
    decoder = FrameDecoder(config, **kwargs)
    with pytest.raises(FrameError) as info:
        decoder.feed(data)
    assert info.value.reason == reason
    assert decoder.buffered == 0
    return info.value


def test_invalid_start_token():
    """
    A frame not starting with 0xFF is invalid; the message names the header
    length this side expects.
    """
    data = bytearray(LOGON_BYTES)
    data[0] = 0xFE
    error = _expect_error(bytes(data), DisconnectedType.INVALID_MESSAGE)
    assert "36" in str(error)
    assert "36" in error.message


def test_invalid_start_token_names_other_header_lengths():
    config = WireConfig(max_userid_length=20)
    error = _expect_error(b"\x00" * 56, DisconnectedType.INVALID_MESSAGE, config)
    assert "56" in str(error)


def test_negative_body_length():
    data = bytearray(LOGON_BYTES)
    data[8:12] = struct.pack("<i", -1)
    _expect_error(bytes(data), DisconnectedType.INVALID_MESSAGE)
    data[8:12] = struct.pack("<i", -(2**31))
    _expect_error(bytes(data), DisconnectedType.INVALID_MESSAGE)


@pytest.mark.parametrize("split", [False, True])
def test_body_too_large_before_body(split):
    """
    A BodyLength over the maximum is refused as soon as the header is
    complete, before a byte of the body is buffered.
    """
    header = bytearray(LOGON_BYTES[:36])
    header[8:12] = struct.pack("<i", DEFAULT_MAX_MESSAGE_SIZE - 36 + 1)
    decoder = FrameDecoder()
    if split:
        assert decoder.feed(bytes(header[:30])) == []
        assert decoder.buffered == 30
        header = header[30:]
    with pytest.raises(FrameError) as info:
        decoder.feed(bytes(header))
    assert info.value.reason == DisconnectedType.MESSAGE_TOO_LARGE
    assert decoder.buffered == 0


def test_body_too_large_with_body_bytes():
    """
    The body bytes that follow an oversized header in the same chunk are not
    kept either.
    """
    data = bytearray(LOGON_BYTES)
    data[8:12] = struct.pack("<i", 0x7FFFFFFF)
    _expect_error(bytes(data) + b"\x00" * 5000, DisconnectedType.MESSAGE_TOO_LARGE)


def test_largest_body_accepted():
    config = WireConfig(max_message_size=1000)
    body = b"x" * (1000 - 36)
    data = encode_frame(config, MessageType.SEND, body)
    [frame] = _frames_of(data, config)
    assert bytes(frame.body) == body
    with pytest.raises(ValueError):
        encode_frame(config, MessageType.SEND, body + b"x")
    header = bytearray(data[:36])
    header[8:12] = struct.pack("<i", len(body) + 1)
    _expect_error(bytes(header), DisconnectedType.MESSAGE_TOO_LARGE, config)


def test_valid_frames_before_an_error_are_kept():
    """
    The frames that precede an invalid one in the same chunk travel on the
    error.
    """
    data = LOGON_BYTES * 2 + b"\x00" * 36
    error = _expect_error(data, DisconnectedType.INVALID_MESSAGE)
    assert len(error.frames) == 2
    assert error.frames[0].raw == LOGON_BYTES


def _with(data: bytes, offset: int, replacement: bytes) -> bytes:
    out = bytearray(data)
    out[offset : offset + len(replacement)] = replacement
    return bytes(out)


@pytest.mark.parametrize(
    "length_at, slot_at, what",
    [(12, 13, "UserID"), (24, 25, "DestUserID")],
)
def test_invalid_ids(length_at, slot_at, what):
    """
    ID lengths past the slot, non-zero padding, bad UTF-8 and control
    characters are all invalid frames.
    """
    invalid = DisconnectedType.INVALID_MESSAGE
    base = LOGON_BYTES
    # Length past the 11-byte slot.
    for length in (12, 200, 255):
        error = _expect_error(_with(base, length_at, bytes([length])), invalid)
        assert what in str(error)
        assert "36-byte headers" in str(error)
    # Non-zero padding after the ID (each padding byte in turn).
    length = base[length_at]
    for pad in range(slot_at + length, slot_at + 11):
        error = _expect_error(_with(base, pad, b"A"), invalid)
        assert what in str(error)
    # A shorter length leaves the ID's last byte as non-zero "padding".
    _expect_error(_with(base, length_at, bytes([length - 1])), invalid)
    # Invalid UTF-8: a lone continuation byte, a truncated sequence, a
    # surrogate, an overlong encoding.
    for bad in (b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"a\xff"):
        slot = bad.ljust(11, b"\x00")
        data = _with(_with(base, length_at, bytes([len(bad)])), slot_at, slot)
        error = _expect_error(data, invalid)
        assert what in str(error)
    # Control characters: NUL inside the ID, C0, DEL, C1.
    for bad in (b"a\x00b", b"a\x01b", b"\x1f", b"x\x7f", "\u0085".encode(), "a\u009fz".encode()):
        slot = bad.ljust(11, b"\x00")
        data = _with(_with(base, length_at, bytes([len(bad)])), slot_at, slot)
        error = _expect_error(data, invalid)
        assert what in str(error)


def test_full_slot_ids():
    """
    IDs filling their slot exactly (no padding) are valid.
    """
    data = encode_frame(WireConfig(), 104, user_id="a" * 11, dest_user_id="\u00e9" * 5 + "z")
    [frame] = _frames_of(data)
    assert frame.user_id == "a" * 11
    assert frame.dest_user_id == "\u00e9" * 5 + "z"


def test_error_is_sticky():
    """
    After an error the decoder refuses everything, even valid frames.
    """
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"\x00" * 36)
    for data in (LOGON_BYTES, b"", b"\xff"):
        with pytest.raises(FrameError) as info:
            decoder.feed(data)
        assert info.value.reason == DisconnectedType.INVALID_MESSAGE
        assert decoder.buffered == 0


def test_error_is_sticky_too_large():
    decoder = FrameDecoder(max_message_size=100)
    with pytest.raises(FrameError):
        decoder.feed(encode_frame(WireConfig(), 202, b"x" * 65))
    with pytest.raises(FrameError) as info:
        decoder.feed(LOGON_BYTES)
    assert info.value.reason == DisconnectedType.MESSAGE_TOO_LARGE


def test_max_message_size_can_change():
    """
    The decoder's max_message_size may be changed between calls (as a server
    does after logon), in both directions.
    """
    config = WireConfig()
    small = encode_frame(config, 202, b"x" * 64)  # 100 bytes
    big = encode_frame(config, 202, b"x" * 65)  # 101 bytes
    decoder = FrameDecoder(config, max_message_size=100)
    assert decoder.max_message_size == 100
    assert len(decoder.feed(small)) == 1
    decoder.max_message_size = 101
    assert len(decoder.feed(big)) == 1
    decoder.max_message_size = 100
    with pytest.raises(FrameError) as info:
        decoder.feed(big)
    assert info.value.reason == DisconnectedType.MESSAGE_TOO_LARGE

    decoder = FrameDecoder(config, max_message_size=64 * 1024)
    large = encode_frame(config, 202, b"y" * (64 * 1024))
    decoder.max_message_size = config.max_message_size
    assert len(decoder.feed(large)) == 1


def test_default_max_message_size():
    assert FrameDecoder().max_message_size == DEFAULT_MAX_MESSAGE_SIZE == 1048576
    assert FrameDecoder(WireConfig(max_message_size=5000)).max_message_size == 5000


@pytest.mark.parametrize("dest", ["_0", "bob"])
def test_mismatched_max_userid_length(dest):
    """
    A client using n = 20 against a server using n = 11 (and the reverse)
    gets an invalid frame, not a garbled one.
    """
    client = WireConfig(max_userid_length=20)
    server = WireConfig(max_userid_length=11)
    body = Logon(1, "demo-token", "s3cret").encode()
    data = encode_frame(
        client,
        MessageType.LOGON,
        body,
        client_type=5,
        message_id=1,
        user_id="alice",
        dest_user_id=dest,
    )
    assert len(data) == 56 + len(body)
    with pytest.raises(FrameError) as info:
        FrameDecoder(server).feed(data)
    assert info.value.reason == DisconnectedType.INVALID_MESSAGE
    # The message (which the server logs) names the header it expects.
    assert "expects 36-byte headers" in str(info.value)
    data = encode_frame(
        server,
        MessageType.LOGON,
        body,
        client_type=5,
        message_id=1,
        user_id="alice",
        dest_user_id=dest,
    )
    with pytest.raises(FrameError) as info:
        FrameDecoder(client).feed(data)
    assert "expects 56-byte headers" in str(info.value)


def test_header_length_formula():
    """
    H = 2n + 14 rounded up to a multiple of 4; S = (H - 14) / 2.
    """
    assert header_length_for(11) == 36
    for n in range(1, 256):
        h = header_length_for(n)
        assert h % 4 == 0
        assert 2 * n + 14 <= h < 2 * n + 18
        config = WireConfig(max_userid_length=n)
        assert config.header_length == h
        assert config.id_slot == (h - 14) // 2 >= n
        assert config.header_struct.size == h
    for bad in (0, 256, -1):
        with pytest.raises(ValueError):
            WireConfig(max_userid_length=bad)
    with pytest.raises(ValueError):
        WireConfig(max_message_size=35)
    with pytest.raises(ValueError):
        WireConfig(max_message_size=2**31)


def test_encode_rejects_bad_ids():
    config = WireConfig()
    for bad in ("a" * 12, "\u00e9" * 6, "a\x00", "\x1b[0m", "x\u0085"):
        with pytest.raises(ValueError):
            encode_frame(config, 104, user_id=bad)
        with pytest.raises(ValueError):
            encode_frame(config, 104, dest_user_id=bad)
        with pytest.raises(ValueError):
            validate_id(bad, config)
    assert validate_id("alice", config) == b"alice"


def test_one_mebibyte_body_in_single_bytes():
    """
    A 1 MiB body dribbled one byte at a time is reassembled (and in
    reasonable time: the decoder does not copy its buffer per byte).
    """
    config = WireConfig()
    body = bytes(range(256)) * 4096
    body = body[: config.max_message_size - config.header_length]
    data = encode_frame(config, MessageType.SEND, body, user_id="alice", dest_user_id="bob")
    assert len(data) == 1024 * 1024
    decoder = FrameDecoder(config)
    feed = decoder.feed
    frames = []
    for i in range(len(data)):
        frames += feed(data[i : i + 1])
    assert len(frames) == 1
    assert frames[0].body == body
    assert frames[0].user_id == "alice"
    assert decoder.buffered == 0


# ---------------------------------------------------------------------------
# Body decoding
# ---------------------------------------------------------------------------

#: One instance of every body class, and the names of its str fields.
SAMPLES = [
    (EMPTY, []),
    (Logon(1, "demo-token", "s3cret"), ["system_token", "password"]),
    (LogonReply(LogonResult.FAILED, "no", 10, 30, 65536), ["failure_cause"]),
    (GetMyIPEReply("127.0.0.1:50312"), ["address"]),
    (BeingPushedOutNotify("replaced"), ["cause"]),
    (DisconnectNotice(DisconnectedType.SERVER_SHUTDOWN, "bye"), ["text"]),
    (KickOut("spam"), ["reason"]),
    (KickOutReply(False, "denied"), ["cause"]),
    (BeingKickedOutNotify("_0", "spam"), ["operator", "reason"]),
    (GetAllOnlineUsers(5, 10), []),
    (GetAllOnlineUsersReply(7, ("alice", "bob")), ["user_ids"]),
    (QueryOnlineReply(True), []),
    (QueryOnlines(("alice", "bob", "carol")), ["user_ids"]),
    (QueryOnlinesReply((True, False, True)), []),
    (GetMyDevicesReply((0, 5, 4)), []),
    (Error(203, ErrorCode.HANDLER_ERROR, "boom"), ["text"]),
    (Information(1001, b"payload"), []),
    (Ack(1002), []),
    (BlobFragment(3001, 42, 7, True, b"frag"), []),
]

#: Classes whose last field is "the rest of the body".
OPEN_ENDED = {Information: 4, BlobFragment: 13}

BODY_CLASSES = sorted({type(s) for s, _ in SAMPLES}, key=lambda c: c.__name__)


def test_samples_cover_every_body_class():
    assert set(BODY_CLASSES) == set(REQUEST_BODIES.values()) | set(REPLY_BODIES.values())


def _decode_fails(cls, data: bytes) -> None:
    with pytest.raises(BadRequest):
        cls.decode(data)
    with pytest.raises(BadRequest):
        cls.decode(memoryview(data))


@pytest.mark.parametrize("sample, strs", SAMPLES, ids=lambda s: type(s).__name__)
def test_body_roundtrip_and_views(sample, strs):
    cls = type(sample)
    data = sample.encode()
    assert cls.decode(data) == sample
    assert cls.decode(memoryview(b"\xee" + data)[1:]) == sample
    assert cls.decode(bytearray(data)) == sample


@pytest.mark.parametrize("sample, strs", SAMPLES, ids=lambda s: type(s).__name__)
def test_body_too_short(sample, strs):
    """
    Every strict prefix of a self-delimiting body is a BadRequest; a body
    ending in "the rest" needs at least its fixed fields.
    """
    cls = type(sample)
    data = sample.encode()
    end = OPEN_ENDED.get(cls, len(data))
    for cut in range(end):
        _decode_fails(cls, data[:cut])


@pytest.mark.parametrize("sample, strs", SAMPLES, ids=lambda s: type(s).__name__)
def test_body_trailing_bytes(sample, strs):
    cls = type(sample)
    if cls in OPEN_ENDED:
        return
    data = sample.encode()
    for extra in (b"\x00", b"\x01", b"\x00" * 100):
        _decode_fails(cls, data + extra)


@pytest.mark.parametrize(
    "sample, strs", [s for s in SAMPLES if s[1]], ids=lambda s: type(s).__name__
)
def test_body_invalid_utf8(sample, strs):
    """
    A str field that is not UTF-8 is a BadRequest, whichever field it is.
    """
    cls = type(sample)
    for name in strs:
        marker = "@#"
        value = getattr(sample, name)
        if isinstance(value, tuple):
            replaced = attrs.evolve(sample, **{name: value[:-1] + (marker,)})
        else:
            replaced = attrs.evolve(sample, **{name: marker})
        data = replaced.encode()
        assert data.count(b"@#") == 1
        for bad in (b"\xff\xfe", b"\xc3(", b"\xed\xa0"):
            _decode_fails(cls, data.replace(b"@#", bad))


@pytest.mark.parametrize(
    "sample, strs", [s for s in SAMPLES if s[1]], ids=lambda s: type(s).__name__
)
def test_body_str_length_lies(sample, strs):
    """
    A str whose u16 length runs past the body is a BadRequest.
    """
    cls = type(sample)
    data = sample.encode()
    # Claim one byte more, or the most a u16 can say: the str then runs past
    # the body, or swallows the start of the next field so that what follows
    # no longer parses.
    for name in strs:
        value = getattr(sample, name)
        text = value[-1] if isinstance(value, tuple) else value
        encoded = encode_str(text)
        at = data.rindex(encoded)
        for length in (len(text) + 1, 0xFFFF):
            bad = data[:at] + struct.pack("<H", length) + data[at + 2 :]
            _decode_fails(cls, bad)


@pytest.mark.parametrize(
    "cls, data",
    [
        # GetAllOnlineUsersReply: total 2, count 3 but two strs.
        (GetAllOnlineUsersReply, "02000000 03000000 0100 61 0100 62"),
        (GetAllOnlineUsersReply, "02000000 ffffffff 0100 61 0100 62"),
        (GetAllOnlineUsersReply, "02000000 01000000 0100 61 0100 62"),
        (GetAllOnlineUsersReply, "00000000 00000080"),
        (QueryOnlines, "03000000 0100 61 0100 62"),
        (QueryOnlines, "ffffffff"),
        (QueryOnlines, "ffffffff 0000"),
        (QueryOnlines, "01000000 0100 61 0100 62"),
        (QueryOnlinesReply, "03000000 01 00"),
        (QueryOnlinesReply, "ffffffff 01"),
        (QueryOnlinesReply, "01000000 01 00"),
        (GetMyDevicesReply, "03 00 05"),
        (GetMyDevicesReply, "ff 00"),
        (GetMyDevicesReply, "01 00 05"),
    ],
)
def test_body_counts_that_lie(cls, data):
    _decode_fails(cls, bytes.fromhex(data))


def test_body_encode_rejects_bad_values():
    """
    A str over 65,535 bytes, an integer out of range or too many list items
    is a ValueError at encode time.
    """
    long = "x" * 65536
    with pytest.raises(ValueError):
        encode_str(long)
    assert len(encode_str("x" * 65535)) == 65537
    assert len(encode_str("\u00e9" * 32767)) == 65536
    with pytest.raises(ValueError):
        encode_str("\u00e9" * 32768)
    for bad in (
        Logon(1, long, ""),
        Logon(1, "", long),
        Logon(65536, "", ""),
        Logon(-1, "", ""),
        LogonReply(0, long),
        LogonReply(256),
        LogonReply(0, "", 10, 30, 2**32),
        GetMyIPEReply(long),
        BeingPushedOutNotify(long),
        DisconnectNotice(1, long),
        DisconnectNotice(256, ""),
        KickOut(long),
        KickOutReply(True, long),
        BeingKickedOutNotify(long, ""),
        BeingKickedOutNotify("", long),
        GetAllOnlineUsers(-1, 0),
        GetAllOnlineUsersReply(0, ("a", long)),
        QueryOnlines((long,)),
        GetMyDevicesReply(tuple([0] * 256)),
        GetMyDevicesReply((256,)),
        Error(0x10000, 1, ""),
        Error(203, 1, long),
        Information(2**31, b""),
        Information(-(2**31) - 1, b""),
        Ack(2**31),
        BlobFragment(0, 2**32, 0, False, b""),
        BlobFragment(0, 0, -1, False, b""),
    ):
        with pytest.raises(ValueError):
            bad.encode()


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

_no_surrogates = st.characters(blacklist_categories=("Cs",))
texts = st.text(_no_surrogates, max_size=40)
id_chars = st.characters(blacklist_categories=("Cc", "Cs"))
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-(2**31), 2**31 - 1)
payloads = st.binary(max_size=200)

BODY_STRATEGIES = {
    Empty: st.just(EMPTY),
    Logon: st.builds(Logon, u16, texts, texts),
    LogonReply: st.builds(LogonReply, u8, texts, u16, u16, u32),
    GetMyIPEReply: st.builds(GetMyIPEReply, texts),
    BeingPushedOutNotify: st.builds(BeingPushedOutNotify, texts),
    DisconnectNotice: st.builds(DisconnectNotice, u8, texts),
    KickOut: st.builds(KickOut, texts),
    KickOutReply: st.builds(KickOutReply, st.booleans(), texts),
    BeingKickedOutNotify: st.builds(BeingKickedOutNotify, texts, texts),
    GetAllOnlineUsers: st.builds(GetAllOnlineUsers, u32, u32),
    GetAllOnlineUsersReply: st.builds(
        GetAllOnlineUsersReply, u32, st.lists(texts, max_size=20).map(tuple)
    ),
    QueryOnlineReply: st.builds(QueryOnlineReply, st.booleans()),
    QueryOnlines: st.builds(QueryOnlines, st.lists(texts, max_size=20).map(tuple)),
    QueryOnlinesReply: st.builds(
        QueryOnlinesReply, st.lists(st.booleans(), max_size=50).map(tuple)
    ),
    GetMyDevicesReply: st.builds(GetMyDevicesReply, st.lists(u8, max_size=255).map(tuple)),
    Error: st.builds(Error, u16, u16, texts),
    Information: st.builds(Information, i32, payloads),
    Ack: st.builds(Ack, i32),
    BlobFragment: st.builds(BlobFragment, i32, u32, u32, st.booleans(), payloads),
}

bodies = st.sampled_from(BODY_CLASSES).flatmap(lambda cls: BODY_STRATEGIES[cls])


def test_strategies_cover_every_body_class():
    assert set(BODY_STRATEGIES) == set(BODY_CLASSES)


@given(bodies)
def test_property_body_roundtrip(body):
    data = body.encode()
    assert type(body).decode(data) == body
    assert type(body).decode(data).encode() == data


def _fit(text: str, slot: int) -> str:
    """
    The longest prefix of C{text} whose UTF-8 fits C{slot} bytes.
    """
    while len(text.encode("utf-8")) > slot:
        text = text[:-1]
    return text


def ids_for(slot: int):
    """
    IDs without control characters whose UTF-8 fits C{slot} bytes (cut to
    fit rather than filtered, so that small slots do not reject most draws).
    """
    return st.text(id_chars, max_size=slot).map(lambda t: _fit(t, slot))


@st.composite
def frames_for(draw, config: WireConfig, body_max: int | None = None):
    """
    The arguments of one frame that fits C{config}.
    """
    message_type = draw(st.one_of(st.sampled_from(sorted(REQUEST_BODIES)), u16))
    if message_type in REQUEST_BODIES:
        body = draw(BODY_STRATEGIES[REQUEST_BODIES[message_type]]).encode()
    else:
        body = draw(payloads)
    if body_max is not None:
        body = body[:body_max]
    return {
        "message_type": message_type,
        "body": body,
        "client_type": draw(u8),
        "message_id": draw(i32),
        "user_id": draw(ids_for(config.id_slot)),
        "dest_user_id": draw(ids_for(config.id_slot)),
    }


def _encode(config: WireConfig, fields: dict) -> bytes:
    fields = dict(fields)
    return encode_frame(config, fields.pop("message_type"), fields.pop("body"), **fields)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(1, 255))
def test_property_frame_roundtrip(data, n):
    """
    Any frame with any legal maximum UserID length and IDs that fit decodes
    to what was encoded, with the body class's value intact.
    """
    config = WireConfig(max_userid_length=n)
    cls = data.draw(st.sampled_from(BODY_CLASSES))
    body = data.draw(BODY_STRATEGIES[cls])
    fields = data.draw(frames_for(config))
    fields["body"] = body.encode()
    encoded = _encode(config, fields)
    assert len(encoded) == config.header_length + len(fields["body"])
    [frame] = _frames_of(encoded, config)
    assert frame.message_type == fields["message_type"]
    assert frame.client_type == fields["client_type"]
    assert frame.message_id == fields["message_id"]
    assert frame.user_id == fields["user_id"]
    assert frame.dest_user_id == fields["dest_user_id"]
    assert frame.header_length == config.header_length
    assert frame.raw == encoded
    assert cls.decode(frame.body) == body


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([1, 2, 11, 20, 255]))
def test_property_any_chunking(data, n):
    """
    However a stream of several frames is cut, the same frames come out.
    """
    config = WireConfig(max_userid_length=n)
    frames = data.draw(st.lists(frames_for(config), min_size=1, max_size=6))
    stream = b"".join(_encode(config, f) for f in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    decoder = FrameDecoder(config)
    got = []
    for chunk in _chunks(stream, cuts):
        got += decoder.feed(chunk)
    assert decoder.buffered == 0
    assert got == _frames_of(stream, config)
    assert [f.message_type for f in got] == [f["message_type"] for f in frames]
    assert [bytes(f.body) for f in got] == [f["body"] for f in frames]


SMALL_MAX = 4096


def _feed_garbage(decoder: FrameDecoder, chunks: list[bytes]) -> None:
    # One header plus the largest body allowed: max_message_size.
    limit = decoder.max_message_size
    assert limit == SMALL_MAX
    failed = False
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except FrameError as e:
            assert e.reason in (
                DisconnectedType.INVALID_MESSAGE,
                DisconnectedType.MESSAGE_TOO_LARGE,
            )
            failed = True
        else:
            assert not failed, "feed() accepted input after an error"
        assert decoder.buffered <= limit


@settings(deadline=None)
@given(st.binary(max_size=10000), st.lists(st.integers(0, 10000), max_size=40))
def test_property_arbitrary_bytes(data, cuts):
    """
    Arbitrary bytes raise nothing but FrameError, and the decoder never holds
    more than one maximum-size frame.
    """
    decoder = FrameDecoder(WireConfig(max_message_size=SMALL_MAX))
    _feed_garbage(decoder, _chunks(data, cuts))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_near_valid_bytes(data):
    """
    Valid frames with random bytes changed, removed or inserted raise nothing
    but FrameError, and the buffer stays bounded.
    """
    config = WireConfig(max_message_size=SMALL_MAX)
    frames = data.draw(
        st.lists(frames_for(config, body_max=SMALL_MAX - 36), min_size=1, max_size=5)
    )
    stream = bytearray(b"".join(_encode(config, f) for f in frames))
    # Some frames claim bodies up to the limit, or past it.
    big = data.draw(st.sampled_from([None, SMALL_MAX - 36, SMALL_MAX - 35, 2**31 - 1]))
    if big is not None:
        stream[8:12] = struct.pack("<i", big)
    for _ in range(data.draw(st.integers(0, 8))):
        if not stream:
            break
        at = data.draw(st.integers(0, len(stream) - 1))
        action = data.draw(st.sampled_from(["set", "delete", "insert"]))
        if action == "set":
            stream[at] = data.draw(u8)
        elif action == "delete":
            del stream[at]
        else:
            stream.insert(at, data.draw(u8))
    stream = bytes(stream[: data.draw(st.integers(0, len(stream)))])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    decoder = FrameDecoder(config)
    _feed_garbage(decoder, _chunks(stream, cuts))


@given(st.sampled_from(BODY_CLASSES), st.binary(max_size=300))
def test_property_body_decode_arbitrary(cls, data):
    """
    Any bytes into any body class: a value or BadRequest, nothing else; a
    value re-encodes to an equivalent body.
    """
    try:
        body = cls.decode(data)
    except BadRequest:
        return
    assert cls.decode(body.encode()) == body


@given(st.sampled_from(BODY_CLASSES), st.data())
def test_property_body_decode_near_valid(cls, data):
    """
    Valid bodies with bytes changed or cut: a value or BadRequest.
    """
    encoded = bytearray(data.draw(BODY_STRATEGIES[cls]).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        if encoded and data.draw(st.booleans()):
            encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(u8)
        else:
            del encoded[data.draw(st.integers(0, len(encoded))) :]
    try:
        cls.decode(bytes(encoded))
    except BadRequest:
        pass


# ---------------------------------------------------------------------------
# The documentation's hex examples
# ---------------------------------------------------------------------------

_HEX_BLOCK = re.compile(r"^```hex\n(.*?)^```", re.S | re.M)
_VECTOR_TAG = re.compile(r"^#\s*vector:\s*(\S+)", re.M)


def _parse_dump(block: str) -> bytes:
    """
    The bytes of an annotated dump: lines C{OFFSET  BYTES... | note}, where
    OFFSET is hex and must equal the number of bytes before it; C{#} lines
    are comments.
    """
    out = bytearray()
    for raw in block.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        left = line.split("|", 1)[0].split()
        offset, tokens = int(left[0], 16), left[1:]
        assert offset == len(out), f"offset {left[0]} in {line!r} should be {len(out):04x}"
        for token in tokens:
            assert re.fullmatch(r"[0-9a-f]{2}", token), f"{token!r} in {line!r}"
            out.append(int(token, 16))
    return bytes(out)


def test_docs_hex_examples_match():
    """
    Every ```hex block in docs/protocol.md is one valid frame whose body its
    body class accepts, and is byte for byte the golden vector it names.
    """
    text = DOCS.read_text(encoding="utf-8")
    blocks = _HEX_BLOCK.findall(text)
    assert blocks, "no ```hex blocks in docs/protocol.md"
    shown = set()
    for block in blocks:
        data = _parse_dump(block)
        tag = _VECTOR_TAG.search(block)
        assert tag, f"hex block without a '# vector: NAME' line:\n{block}"
        vector = VECTORS_BY_NAME[tag.group(1)]
        assert data.hex() == bytes.fromhex(vector.hex).hex(), vector.name
        config = _config(vector)
        [frame] = _frames_of(data, config)
        cls = _bodies(vector.sender)[frame.message_type]
        assert cls.decode(frame.body) == vector.body
        shown.add(vector.name)
    assert {
        "logon-request",
        "logon-reply-succeed",
        "heartbeat",
        "disconnect-invalid-message",
        "send-to-user",
        "error-user-offline",
    } <= shown


_VECTORS_BLOCK = re.compile(r"^```vectors\n(.*?)^```", re.S | re.M)


def test_docs_vector_appendix_matches():
    """
    The appendix of docs/protocol.md lists every golden vector, with its
    maximum UserID length and bytes.
    """
    text = DOCS.read_text(encoding="utf-8")
    [block] = _VECTORS_BLOCK.findall(text)
    listed = {}
    for line in block.splitlines():
        if line.strip():
            name, n, data = line.split()
            listed[name] = (int(n), data)
    assert listed == {v.name: (v.max_userid_length, bytes.fromhex(v.hex).hex()) for v in VECTORS}


# -- feed_runs: Sends and Broadcasts gathered into runs for the relay -------------

SEND = MessageType.SEND
BROADCAST = MessageType.BROADCAST


def _runs(items) -> list:
    """
    What L{FrameDecoder.feed_runs} returned, each run (its fields) made a
    L{FrameRun}.
    """
    return [FrameRun(*item) if isinstance(item, tuple) else item for item in items]


def _expand(items) -> list[Frame]:
    """
    What L{FrameDecoder.feed_runs} returned, one L{Frame} per frame.
    """
    out = []
    for item in _runs(items):
        out += item.frames() if isinstance(item, FrameRun) else [item]
    return out


def _feed_both(config: WireConfig, chunks: list[bytes]):
    """
    Feed C{chunks} to a decoder's C{feed} and to another's C{feed_runs};
    return each one's frames and error reason (C{None} if none).
    """
    results = []
    for runs in (False, True):
        decoder = FrameDecoder(config)
        got, error = [], None
        for chunk in chunks:
            try:
                got += decoder.feed_runs(chunk, SEND, BROADCAST) if runs else decoder.feed(chunk)
            except FrameError as e:
                got += e.frames
                error = (e.reason, e.message)
                break
        results.append((_expand(got) if runs else got, error, decoder.buffered))
        for item in _runs(got):
            if isinstance(item, FrameRun):
                # A run is uniform exactly when its headers are all alike.
                headers = {f.raw[: config.header_length] for f in item.frames()}
                assert item.uniform is (len(headers) == 1), item
    return results


def _send(config, user_id="alice", dest="bob", body=b"\0\0\0\1hello", message_type=SEND):
    return encode_frame(config, message_type, body, user_id=user_id, dest_user_id=dest)


def test_runs_gather_consecutive_sends_for_one_pair():
    """
    Consecutive Sends with the same IDs come as one run holding their bytes
    as one slice; another pair or another type starts a new item.
    """
    config = WireConfig()
    a = _send(config)
    b = _send(config, dest="carol")
    request = _send(config, message_type=MessageType.REQUEST)
    stream = a * 3 + b + a * 2 + request + a
    items = _runs(FrameDecoder(config).feed_runs(stream, SEND))
    assert [type(i).__name__ for i in items] == [
        "FrameRun",
        "FrameRun",
        "FrameRun",
        "Frame",
        "FrameRun",
    ]
    assert [getattr(i, "count", 1) for i in items] == [3, 1, 2, 1, 1]
    assert items[0].raw == a * 3
    assert (items[0].user_id, items[0].dest_user_id) == ("alice", "bob")
    assert items[1].dest_user_id == "carol"
    assert b"".join(i.raw for i in items) == stream
    assert _expand(items) == FrameDecoder(config).feed(stream)


def test_runs_of_two_types_never_mix():
    """
    With two run types, consecutive frames of one type and pair are a run,
    and a frame of the other type with the same IDs starts another: each
    run says its type.
    """
    config = WireConfig()
    send = _send(config, dest="team")
    broadcast = _send(config, dest="team", message_type=BROADCAST)
    stream = send * 2 + broadcast * 3 + send + broadcast
    items = _runs(FrameDecoder(config).feed_runs(stream, SEND, BROADCAST))
    assert [(i.message_type, i.count) for i in items] == [
        (SEND, 2),
        (BROADCAST, 3),
        (SEND, 1),
        (BROADCAST, 1),
    ]
    assert items[1].raw == broadcast * 3
    assert _expand(items) == FrameDecoder(config).feed(stream)


def test_runs_among_many_pairs_in_turn():
    """
    A sender writing to its receivers in turn, each frame a run of its own,
    then in runs, then in another order, past the number of pairs a decoder
    remembers: the runs are the frames, each with its own IDs, whether the
    pair that comes next is the one that came next before or not.
    """
    config = WireConfig()
    each = [_send(config, dest=f"r{i}") for i in range(300)]
    order = list(range(300)) * 2 + [5, 5, 5, 6, 6, 5, 7] + list(range(299, -1, -7)) * 2
    stream = b"".join(each[i] for i in order)
    [(plain, _, _), (runs, _, _)] = _feed_both(config, [stream[:9000], stream[9000:]])
    assert runs == plain and [f.dest_user_id for f in plain] == [f"r{i}" for i in order]
    items = _runs(FrameDecoder(config).feed_runs(stream, SEND))
    assert [i.count for i in items[600:605]] == [3, 2, 1, 1, 1]


def test_runs_whole_chunk_is_not_copied():
    """
    A chunk that is one run is forwarded as the very bytes object read.
    """
    config = WireConfig()
    chunk = _send(config) * 50
    [run] = _runs(FrameDecoder(config).feed_runs(chunk, SEND))
    assert run.raw is chunk
    assert run.count == 50


def test_runs_partial_frame_at_the_end():
    """
    A run stops before a frame cut off at the end of the chunk; that frame
    comes out (alone) when its last byte arrives.
    """
    config = WireConfig()
    a = _send(config)
    decoder = FrameDecoder(config)
    stream = a * 4
    [run] = _runs(decoder.feed_runs(stream[:-5], SEND))
    assert run.count == 3
    assert decoder.buffered == len(a) - 5
    [frame] = decoder.feed_runs(stream[-5:], SEND)
    assert isinstance(frame, Frame) and frame.raw == a
    assert decoder.buffered == 0


def test_runs_single_bytes():
    """
    A stream fed one byte at a time gives every frame once, in order.
    """
    config = WireConfig()
    stream = _send(config) * 3 + _send(config, dest="carol")
    [(plain, _, _), (runs, _, buffered)] = _feed_both(
        config, [stream[i : i + 1] for i in range(len(stream))]
    )
    assert runs == plain == FrameDecoder(config).feed(stream)
    assert buffered == 0


def test_runs_error_keeps_what_came_before():
    """
    A bad header after a run: the run is returned with the error, and the
    error is the one L{FrameDecoder.feed} raises.
    """
    config = WireConfig()
    stream = _send(config) * 3 + b"\x00" * 36
    [(plain, plain_error, _), (runs, runs_error, _)] = _feed_both(config, [stream])
    assert runs == plain and len(runs) == 3
    assert runs_error == plain_error and runs_error[0] == DisconnectedType.INVALID_MESSAGE


def test_runs_check_every_frame():
    """
    A run is not a licence to skip checks: a frame inside it with a bad start
    token or a length over the bound fails as with L{FrameDecoder.feed}.
    """
    config = WireConfig(max_message_size=1000)
    good = _send(config)
    bad_start = b"\x00" + good[1:]
    too_long = bytearray(good)
    too_long[8:12] = struct.pack("<i", 2000)
    for bad in (bad_start, bytes(too_long)):
        [(plain, plain_error, _), (runs, runs_error, _)] = _feed_both(config, [good * 2 + bad])
        assert runs == plain and len(runs) == 2
        assert runs_error == plain_error is not None


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([1, 11, 20]))
def test_property_runs_are_the_frames(data, n):
    """
    However a stream of Sends, Broadcasts and other frames among a few ID
    pairs is cut,
    with or without damage, C{feed_runs} yields the same frames, the same
    error and the same buffered bytes as C{feed}.
    """
    config = WireConfig(max_userid_length=n, max_message_size=SMALL_MAX)
    _, stream = _among_pairs(data, config, pairs=3, count=12, body_max=200, sends=2, damage=3)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    plain, runs = _feed_both(config, _chunks(stream, cuts))
    assert runs == plain


def _among_pairs(data, config, *, pairs, count, body_max, sends, damage, repeats=1):
    """
    Draw up to C{count} frames among up to C{pairs} IDs, each Send
    C{sends} times as likely as its own type or a Broadcast, each repeated
    up to C{repeats} times, and up to C{damage} bytes overwritten: the
    frames' fields and the stream.
    """
    ids = data.draw(st.lists(ids_for(config.id_slot), min_size=1, max_size=pairs))
    frames = []
    for _ in range(data.draw(st.integers(1, count))):
        fields = data.draw(frames_for(config, body_max=body_max))
        fields["user_id"] = data.draw(st.sampled_from(ids))
        fields["dest_user_id"] = data.draw(st.sampled_from(ids))
        fields["message_type"] = data.draw(
            st.sampled_from([fields["message_type"], *[SEND] * sends, BROADCAST])
        )
        frames.append(fields)
    stream = bytearray(
        b"".join(_encode(config, f) * data.draw(st.integers(1, repeats)) for f in frames)
    )
    for _ in range(data.draw(st.integers(0, damage))):
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] = data.draw(u8)
    return frames, bytes(stream)


class _Compiled(FrameDecoder):
    """
    A decoder that runs the compiled loop (where it was built) whatever
    loop the module runs.
    """

    __slots__ = ()
    if _decoder.COMPILED:
        _feed = _decoder._compiled_feed
        _make_pair = _decoder._CompiledPair


class _PythonLoop(FrameDecoder):
    """
    A decoder that runs the pure-Python loop whatever loop the module runs.
    """

    __slots__ = ()
    _feed = FrameDecoder._feed_python
    _make_pair = _decoder._Pair


def _feed_raw(decoder, chunks, run_types):
    """
    What C{decoder} returns for C{chunks}, as it returns it (frames and
    runs' fields), its error, its count and what it holds.
    """
    got, error = [], None
    for chunk in chunks:
        try:
            got.append(decoder._run(chunk, run_types))
        except FrameError as e:
            got.append(e.frames)
            error = (e.reason, e.message)
            break
    return got, error, decoder.decoded, decoder.buffered


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([1, 11, 20]))
def test_property_both_loops_agree(data, n):
    """
    The compiled loop and the pure-Python one return the same thing for
    every stream (many pairs of IDs in turn, runs, damage, any cuts): the
    same frames and run fields per call, the same error text, the same
    count and buffered bytes.
    """
    if not _decoder.COMPILED:
        missing("the frame decoder's compiled loop is not built (see tests/conftest.py)")
    config = WireConfig(max_userid_length=n, max_message_size=SMALL_MAX)
    frames, stream = _among_pairs(
        data, config, pairs=6, count=30, body_max=100, sends=3, damage=2, repeats=3
    )
    chunks = _chunks(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    other = frames[0]["message_type"]
    run_types = data.draw(
        st.sampled_from([(), (SEND,), (SEND, BROADCAST), (BROADCAST, other, SEND)])
    )
    compiled = _feed_raw(_Compiled(config), chunks, run_types)
    assert compiled == _feed_raw(_PythonLoop(config), chunks, run_types)


def test_the_pair_cache_overflowing_changes_nothing():
    """
    A sender writing to more receivers than the decoder remembers pairs of
    IDs (256): both loops decode each frame to its own IDs, in runs.
    """
    config = WireConfig()
    stream = b"".join(_send(config, dest=f"u{i}") * 2 for i in range(600)) * 2
    for cls in (_Compiled, _PythonLoop) if _decoder.COMPILED else (_PythonLoop,):
        decoder = cls(config)
        items = decoder.feed_runs(stream[:50_000], SEND) + decoder.feed_runs(stream[50_000:], SEND)
        dests = [f.dest_user_id for f in _expand(items)]
        assert dests == [f"u{i}" for i in range(600) for _ in (0, 1)] * 2
        assert sum(isinstance(item, tuple) and item[4] == 2 for item in items) >= 1190


def _bad_headers(config):
    """
    Headers that fail each check, after a frame of the same pair of IDs
    (so that the IDs are remembered): a bad start token, a negative
    length, a length over the bound, and ID fields of each kind of fault.
    """
    good = _send(config)
    slot = config.id_slot
    bad_start = b"\x00" + good[1:]
    negative = bytearray(good)
    negative[8:12] = struct.pack("<i", -1)
    too_long = bytearray(good)
    too_long[8:12] = struct.pack("<i", config.max_message_size)
    padding = bytearray(good)
    padding[13 + slot - 1] = 1  # in UserID's padding
    long_dest = bytearray(good)
    long_dest[13 + slot] = slot + 1
    return good, [bad_start, bytes(negative), bytes(too_long), bytes(padding), bytes(long_dest)]


def test_one_header_check_on_every_path():
    """
    A bad header fails with the same reason and text however it arrives:
    whole after frames of its pair (the decoder's inline test), after a
    run of Sends, alone, or a byte at a time (a header completed across
    reads): one check judges them all.
    """
    config = WireConfig(max_message_size=1000)
    good, bad = _bad_headers(config)
    for header in bad:
        errors = set()
        for chunks in (
            [good * 2 + header],
            [good, header],
            [header],
            [good] + [header[i : i + 1] for i in range(len(header))],
        ):
            for _, error, _ in _feed_both(config, chunks):
                assert error is not None, (header, chunks)
                errors.add(error)
        assert len(errors) == 1, errors


# -- take_sends: the relay's common case in one loop (where the loop is Python) --


class _Routes:
    """
    A L{take_sends} route: what it was asked, answering each receiver's
    first run with a list of its own (or C{answers[dest]}).
    """

    def __init__(self, **answers):
        self.answers, self.asked, self.lists = answers, [], {}

    def __call__(self, dest, raw, count):
        self.asked.append((dest, raw, count))
        answer = self.answers.get(dest)
        if answer is not None:
            return answer
        out = self.lists.setdefault(dest, [raw])
        return [out]


def _taught(config, *dests, sender="alice"):
    """A decoder that has checked C{sender}'s IDs to each of C{dests}."""
    decoder = FrameDecoder(config)
    decoder.feed(b"".join(_send(config, sender, dest) for dest in dests))
    return decoder


def test_take_sends_takes_runs_to_known_receivers_in_one_loop(compiled_loops):
    """
    Interleaved Sends and runs to receivers whose IDs the decoder knows: the
    first run to each goes to the route, the later ones are appended to the
    list it answered, consecutive frames to one receiver as one slice; the
    decoder counts every frame.
    """
    config = WireConfig()
    decoder = _taught(config, "bob", "carol")
    a, b = _send(config, dest="bob"), _send(config, dest="carol", body=b"\0\0\0\2hi")
    a2 = _send(config, dest="bob", body=b"\0\0\0\3longer body")
    stream = a + b + a + a2 + a + b
    routes = _Routes()
    before = decoder.decoded
    taken = _decoder.take_sends(decoder, stream, 0, "alice", SEND, routes)
    if compiled_loops != "pypy":
        # The compiled loop, or CPython's runs and the session's own loop,
        # are faster there.
        assert taken == (0, 0, 0) and routes.asked == []
        return
    assert taken == (len(stream), 4, len(stream) - len(a) - len(b))
    assert routes.asked == [("bob", a, 1), ("carol", b, 1)]
    assert routes.lists == {"bob": [a, a + a2 + a], "carol": [b, b]}
    assert decoder.decoded == before + 6
    assert decoder.feed(b"") == []  # nothing held back


@pytest.mark.parametrize(
    "rest, why",
    [
        (lambda c: _send(c, dest="bob")[:-1], "a frame cut off"),
        (lambda c: _send(c, message_type=MessageType.REQUEST), "another type"),
        (lambda c: _send(c, dest="dave"), "IDs not met before"),
        (lambda c: _send(c, user_id="mallory", dest="bob"), "another sender"),
        (lambda c: b"\x00" * c.header_length, "a header not valid"),
        (lambda c: _send(c, dest="erin"), "a run the route does not take"),
    ],
)
def test_take_sends_stops_before_what_it_does_not_take(compiled_loops, rest, why):
    """
    take_sends stops before anything but a Send from the sender to a known
    receiver the route takes: what it took is handled, and the decoder's
    own loop takes the rest, from that frame on, as it would have.
    """
    config = WireConfig()
    decoder = _taught(config, "bob", "carol", "erin")
    decoder.feed(_send(config, "mallory", "bob"))
    head = _send(config, dest="bob") + _send(config, dest="carol")
    # (A frame cut off is the read's last: what follows it completes it.)
    tail = rest(config) + (b"" if why == "a frame cut off" else _send(config, dest="carol"))
    routes = _Routes(erin=False)
    taken, _, _ = _decoder.take_sends(decoder, head + tail, 0, "alice", SEND, routes)
    if compiled_loops != "pypy":  # (the decoder's loop takes it all there)
        assert taken == 0 and routes.asked == []
        head = b""
    assert taken == len(head), why
    if head:
        assert [dest for dest, _, _ in routes.asked] == ["bob", "carol"] + (
            ["erin"] if why == "a run the route does not take" else []
        )
    reference = FrameDecoder(config)
    reference.feed(b"".join(_send(config, "alice", d) for d in ("bob", "carol", "erin")))
    reference.feed(_send(config, "mallory", "bob"))
    try:
        expected = _expand(_runs(reference.feed_runs(tail, SEND)))
    except FrameError as e:
        expected = ("error", e.reason)
    try:
        got = _expand(_runs(decoder.feed_runs(tail, SEND)))
    except FrameError as e:
        got = ("error", e.reason)
    assert got == expected


def test_take_sends_takes_nothing_while_a_frame_is_partly_held(compiled_loops):
    """
    While the decoder holds part of a frame, take_sends takes nothing:
    held_wants says how many bytes complete it (its header, then the rest),
    for the decoder's own loop to take first.
    """
    config = WireConfig()
    hlen = config.header_length
    decoder = _taught(config, "bob")
    frame = _send(config, dest="bob")
    assert _decoder.held_wants(decoder) == 0
    decoder.feed(frame[:5])
    assert _decoder.held_wants(decoder) == hlen - 5  # its header first
    decoder.feed(frame[5:hlen])
    assert _decoder.held_wants(decoder) == len(frame) - hlen  # then the rest
    stream = frame[hlen:] + frame
    assert _decoder.take_sends(decoder, stream, 0, "alice", SEND, _Routes()) == (0, 0, 0)
    assert len(decoder.feed(frame[hlen:])) == 1 and _decoder.held_wants(decoder) == 0
    taken, _, _ = _decoder.take_sends(decoder, frame + frame, len(frame), "alice", SEND, _Routes())
    assert taken == (2 * len(frame) if compiled_loops == "pypy" else len(frame))
    fresh = FrameDecoder(config)  # no IDs met yet: nothing to take either
    assert _decoder.take_sends(fresh, frame, 0, "alice", SEND, _Routes()) == (0, 0, 0)
