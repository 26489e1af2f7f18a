"""
L{esf.server._websocket_frames} alone, with no transport and no autobahn: the
parser of whole binary messages fed byte by byte and in random chunks,
what it leaves to autobahn, why a message is refused, and the server's
binary messages out.

The glue is modelled here as the adapter runs it: the parser gets a read
only between frames; from the first frame it leaves, a small RFC 6455
parser (standing in for autobahn) takes the stream until it is between
frames again.
"""

from __future__ import annotations

import struct

import pytest
from _real_parts import missing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsclient import client_frame

from esf.server import _websocket_frames
from esf.server._websocket_frames import MessageParser, Refusal, binary_messages, refuse_message
from esf.wire import COMPILED, DisconnectedType, Information, MessageType, WireConfig, encode_frame

# Every test here runs with the compiled message taker and without it
# (compiled_loops, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compiled_loops")

WIRE = WireConfig()
HLEN = WIRE.header_length
MAX = 4096
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 1, 2, 8, 9, 10, 0


def esf_frame(n: int, size: int) -> bytes:
    body = Information(n, bytes([n % 256]) * size).encode()
    return encode_frame(WIRE, MessageType.SEND, body, user_id="alice", dest_user_id="bob")


def _next_frame(buffer: bytes):
    """
    The first whole client frame of C{buffer}: C{(fin, opcode, payload, rest)},
    or None while it is cut off.
    """
    if len(buffer) < 2:
        return None
    n, offset = buffer[1] & 0x7F, 2
    if n == 126:
        if len(buffer) < 4:
            return None
        n, offset = struct.unpack("!H", buffer[2:4])[0], 4
    elif n == 127:
        if len(buffer) < 10:
            return None
        n, offset = struct.unpack("!Q", buffer[2:10])[0], 10
    end = offset + 4 + n
    if len(buffer) < end:
        return None
    mask = buffer[offset : offset + 4]
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buffer[offset + 4 : end]))
    return bool(buffer[0] & 0x80), buffer[0] & 0x0F, payload, buffer[end:]


def relay(chunks, limit=MAX):
    """
    Feed C{chunks}, one read each, as the adapter does: the messages that
    came out in order (C{("binary", payload)}, C{("ping", payload)}), how
    many the parser took, and the most it held pending.
    """
    parser = MessageParser(HLEN)
    events, taken, most_pending = [], 0, 0
    held = b""  # the model autobahn's buffer
    fragments = None  # the message it is gathering
    for chunk in chunks:
        if not held and fragments is None:
            frames, refusal, rest = parser.feed(chunk, limit)
            assert refusal is None
            events += [("binary", f) for f in frames]
            taken += len(frames)
            held = rest
        else:
            held += chunk
        if parser.pending is not None:
            most_pending = max(most_pending, len(parser.pending))
        while (parsed := _next_frame(held)) is not None:
            fin, opcode, payload, held = parsed
            if opcode == PING:
                events.append(("ping", payload))
                continue
            fragments = (fragments or b"") + payload
            if fin:
                events.append(("binary", fragments))
                fragments = None
    assert held == b"" and fragments is None and parser.pending is None
    return events, taken, most_pending


def test_whole_messages_byte_by_byte():
    """
    Messages of 7- and 16-bit lengths, each with its own mask, fed a byte
    per read: every one is the parser's, none autobahn's, and it never
    holds more than the message it is gathering.
    """
    frames = [esf_frame(n, 10 * n) for n in range(12)] + [esf_frame(99, 300)]
    stream = b"".join(
        client_frame(BINARY, f, mask=bytes([n, 1, 2, 3])) for n, f in enumerate(frames)
    )
    events, taken, most_pending = relay(stream[i : i + 1] for i in range(len(stream)))
    assert events == [("binary", f) for f in frames]
    assert taken == len(frames)
    assert most_pending <= max(len(client_frame(BINARY, f)) for f in frames)


def test_one_read_of_many_messages():
    frames = [esf_frame(n, n) for n in range(50)]
    stream = b"".join(client_frame(BINARY, f) for f in frames)
    parser = MessageParser(HLEN)
    assert parser.feed(stream, MAX) == (frames, None, b"")
    assert parser.pending is None


def test_a_message_trickled_in_is_gathered_in_one_buffer():
    message = client_frame(BINARY, esf_frame(1, MAX - 200))
    parser = MessageParser(HLEN)
    buffers = []
    for i in range(len(message) - 1):
        assert parser.feed(message[i : i + 1], MAX) == ([], None, b"")
        if not any(parser.pending is b for b in buffers):
            buffers.append(parser.pending)
    assert parser.feed(message[-1:], MAX) == ([esf_frame(1, MAX - 200)], None, b"")
    # One for the first byte, one for the 16-bit length, one for the rest.
    assert len(buffers) == 3


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x82, HLEN]) + esf_frame(0, 0)[:HLEN],  # unmasked
        client_frame(PING, b"hi"),
        client_frame(TEXT, b"{}"),
        client_frame(BINARY, esf_frame(0, 0), fin=False),
        bytes([0xC2]) + client_frame(BINARY, esf_frame(0, 0))[1:],  # an RSV bit
        bytes([0x82, 0xFE, 0, HLEN + 4]) + b"\x00" * 4 + esf_frame(0, 0),  # 16 bits for 7
        client_frame(BINARY, b"x" * 70000),  # a 64-bit length
        client_frame(BINARY, esf_frame(0, MAX)),  # over the limit
    ],
    ids=["unmasked", "ping", "text", "fragment", "rsv", "long-encoding", "64-bit", "over-limit"],
)
def test_anything_else_is_autobahns_from_where_it_starts(frame):
    first, last = esf_frame(1, 5), esf_frame(2, 5)
    parser = MessageParser(HLEN)
    rest = frame + client_frame(BINARY, last)
    assert parser.feed(client_frame(BINARY, first) + rest, MAX) == ([first], None, rest)
    assert parser.pending is None


def test_a_message_that_is_not_one_frame_is_refused_after_those_before():
    first, second = esf_frame(1, 5), esf_frame(2, 5)
    after = client_frame(BINARY, esf_frame(3, 5))
    parser = MessageParser(HLEN)
    frames, refusal, rest = parser.feed(
        client_frame(BINARY, first) + client_frame(BINARY, first + second) + after, MAX
    )
    assert frames == [first]
    assert refusal == refuse_message(first + second, HLEN, MAX)
    assert refusal.reason == DisconnectedType.INVALID_MESSAGE
    assert rest == after  # autobahn's, as the connection closes


def test_one_byte_of_the_next_header_is_kept():
    frame = esf_frame(1, 5)
    parser = MessageParser(HLEN)
    assert parser.feed(client_frame(BINARY, frame) + b"\x82", MAX) == ([frame], None, b"")
    assert parser.pending == b"\x82"
    # A read that ends there for a caller that stops parsing: handed on whole.
    assert parser.gather(b"\x89") == b"\x82\x89"
    assert parser.pending is None


def test_gather_waits_for_the_whole_message():
    message = client_frame(BINARY, esf_frame(1, 50))
    parser = MessageParser(HLEN)
    parser.feed(message[:10], MAX)
    assert parser.gather(message[10:20]) == b""
    assert parser.gather(message[20:] + b"more") == message + b"more"
    assert parser.gather(b"after") == b"after"  # nothing pending


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=40),
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=25),
)
def test_any_chunking_gives_the_same_messages(cuts, sizes):
    """
    The case of C{test_websocket_channel.test_any_chunking_relays_the_same_frames}
    on the parser alone: whole messages, pings and fragmented messages, cut
    into reads anywhere; the same messages come out, in order, and every
    whole message the parser meets between frames is its own.
    """
    frames = [esf_frame(n, size) for n, size in enumerate(sizes)]
    stream = b""
    expected = []
    for n, frame in enumerate(frames):
        mask = bytes([n % 256, 7, 11, 13])
        if n % 5 == 3:
            stream += client_frame(BINARY, frame[:5], fin=False, mask=mask)
            stream += client_frame(PING, bytes([n % 256]), mask=mask)
            stream += client_frame(CONTINUATION, frame[5:], fin=True, mask=mask)
            expected += [("ping", bytes([n % 256])), ("binary", frame)]
        else:
            stream += client_frame(BINARY, frame, mask=mask)
            expected.append(("binary", frame))
    chunks, offset = [], 0
    for cut in cuts:
        chunks.append(stream[offset : offset + cut])
        offset += cut
    chunks.append(stream[offset:])
    events, taken, _ = relay([c for c in chunks if c])
    assert events == expected
    if all(n % 5 != 3 for n in range(len(frames))):
        assert taken == len(frames)  # nothing but whole messages: all the parser's


@pytest.mark.parametrize(
    ("message", "limit", "reason", "code", "text"),
    [
        (b"x" * 10, MAX, DisconnectedType.INVALID_MESSAGE, 1002, "shorter than one"),
        (esf_frame(1, MAX), MAX, DisconnectedType.MESSAGE_TOO_LARGE, 1009, "exceeds the maximum"),
        (esf_frame(1, 5)[:8] + struct.pack("<i", -1) + esf_frame(1, 5)[12:], MAX,
         DisconnectedType.INVALID_MESSAGE, 1002, "is negative"),
        (esf_frame(1, 50)[:-1], MAX, DisconnectedType.INVALID_MESSAGE, 1002, "part of a frame"),
        (esf_frame(1, 5) * 2, MAX, DisconnectedType.INVALID_MESSAGE, 1002, "more than one frame"),
    ],
    ids=["short", "too-large", "negative", "part", "two"],
)  # fmt: skip
def test_why_a_message_is_refused(message, limit, reason, code, text):
    refusal = refuse_message(message, HLEN, limit)
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.code) == (reason, code)
    assert text in refusal.text


def test_binary_messages_out():
    frames = [esf_frame(1, 0), esf_frame(2, 100), esf_frame(3, 1000)]
    data = binary_messages(b"".join(frames), HLEN)
    out = []
    while data:
        assert data[0] == 0x82 and not data[1] & 0x80  # final, binary, unmasked
        n, offset = data[1], 2
        if n == 126:
            n, offset = struct.unpack("!H", data[2:4])[0], 4
        out.append(data[offset : offset + n])
        data = data[offset + n :]
    assert out == frames
    assert (
        binary_messages(frames[2], HLEN)
        == b"\x82\x7e" + struct.pack("!H", len(frames[2])) + frames[2]
    )


def _feed_all(chunks, limit, take):
    """
    What a parser returns for C{chunks} with the compiled message taker
    C{take} (or none), each read fed as the adapter would: until a refusal,
    and only while autobahn holds nothing.
    """
    saved = _websocket_frames._take_messages
    _websocket_frames._take_messages = take
    try:
        parser = MessageParser(HLEN)
        out = []
        for chunk in chunks:
            frames, refusal, rest = parser.feed(chunk, limit)
            out.append((frames, refusal, rest, parser.pending))
            if refusal is not None or rest:
                break
        return out
    finally:
        _websocket_frames._take_messages = saved


messages = st.one_of(
    # A message of one whole frame, short or with a 16-bit length.
    st.integers(0, 300).map(lambda size: ("frame", size)),
    # Anything else: a frame too long for the limit, part of a frame, two,
    # a ping, a text or unfinished message, an unmasked one, a length not
    # in its shortest encoding, a 64-bit length, a bad start token.
    st.sampled_from(["long", "part", "two", "ping", "text", "fragment", "unmasked",
                     "wide", "huge", "rsv", "short"]),
)  # fmt: skip


def _message(kind, n: int, mask: bytes) -> bytes:
    if isinstance(kind, tuple):
        return client_frame(BINARY, esf_frame(n, kind[1]), mask=mask)
    frame = esf_frame(n, 20)
    return {
        "long": client_frame(BINARY, esf_frame(n, MAX), mask=mask),
        "part": client_frame(BINARY, frame[:-3], mask=mask),
        "two": client_frame(BINARY, frame * 2, mask=mask),
        "ping": client_frame(PING, b"p", mask=mask),
        "text": client_frame(TEXT, frame, mask=mask),
        "fragment": client_frame(BINARY, frame, fin=False, mask=mask),
        "unmasked": bytes([0x82, len(frame)]) + frame,
        "wide": bytes([0x82, 0xFE, 0, len(frame)])
        + mask
        + client_frame(BINARY, frame, mask=mask)[6:],
        "huge": bytes([0x82, 0xFF]) + bytes(8) + mask,
        "rsv": bytes([0xC2]) + client_frame(BINARY, frame, mask=mask)[1:],
        "short": client_frame(BINARY, b"x" * 10, mask=mask),
    }[kind]


@settings(max_examples=300, deadline=None)
@given(
    kinds=st.lists(messages, min_size=1, max_size=12),
    masks=st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
    limit=st.sampled_from([MAX, 200, 0x10000]),
)
def test_the_compiled_taker_changes_nothing(kinds, masks, cuts, limit):
    """
    With the compiled message taker and without it, a parser returns the
    same frames, refusal, rest and pending message for every stream:
    frames of every size, each kind of message it must not take, any mask,
    cut into reads anywhere.
    """
    if _websocket_frames._take_messages is None and not COMPILED:
        missing("the compiled loops are not built (see tests/conftest.py)")
    from esf.wire._speedups import take_messages

    stream = b"".join(_message(kind, n, masks[n % len(masks)]) for n, kind in enumerate(kinds))
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    assert _feed_all(chunks, limit, take_messages) == _feed_all(chunks, limit, None)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=5),
    cut=st.integers(0, 100),
)
def test_the_compiled_framing_changes_nothing(sizes, cut):
    """
    The compiled C{binary_messages} gives what the Python one gives, for
    frames short and long (7- and 16-bit lengths), and leaves to it what it
    must judge (frames cut off, or too long for a 16-bit length: it raises).
    """
    if not COMPILED:
        missing("the compiled loops are not built (see tests/conftest.py)")
    from esf.wire._speedups import frame_messages

    frames = [esf_frame(n, size) for n, size in enumerate(sizes)]
    data = b"".join(frames)
    data = data[: len(data) - cut]
    saved = _websocket_frames._frame_messages
    try:
        _websocket_frames._frame_messages = None
        expected = binary_messages(data, HLEN)
    except Exception as e:  # (the Python framing's own failure, the same with both)
        expected = type(e)
    finally:
        _websocket_frames._frame_messages = saved
    framed = frame_messages(data, HLEN)
    if framed is None:
        assert cut or max(map(len, frames)) > 0xFFFF
    else:
        assert framed == expected
