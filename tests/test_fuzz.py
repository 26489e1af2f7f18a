"""
Fuzzing the frame codec, the server engine and a live server.

  - The codec is checked against a second decoder written from the wire
    contract alone (L{reference_decode}): for any byte stream, cut anywhere,
    both accept the same frames and reject at the same header.
  - The engine gets random byte streams, near-valid frames, truncated
    headers, lying lengths and valid frames in invalid orders over an
    in-memory transport: no exception leaves C{dataReceived}, nothing is
    logged as a failure, and the good sessions beside it keep answering.
  - A live C{twistd esf} process gets the same from many sockets while two
    good sessions relay to each other; its RSS stays bounded and its log
    holds no traceback.

The C{soak} tests are the same at a larger size: C{ESF_SOAK_SCALE} (default
0.02) scales them, 1.0 being the full size (10^5 codec examples, 10^4 live
fuzz connections).  C{HYPOTHESIS_PROFILE=soak} raises every property test
here to 10^5 examples.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import time
import unicodedata

import pytest
import rawclient as rc
from _helpers import Client, LogCapture, connect, make_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esf import DisconnectedType, MessageType
from esf import wire as w

SCALE = float(os.environ.get("ESF_SOAK_SCALE", "0.002"))


def soak_size(full: int, minimum: int) -> int:
    """
    C{full} scaled by C{ESF_SOAK_SCALE}, at least C{minimum}.
    """
    return max(minimum, int(full * SCALE))


def soak_examples() -> int:
    """
    Examples for a soak property test: 10^5 at scale 1, and never fewer
    than the loaded Hypothesis profile asks for.
    """
    return max(settings.default.max_examples, soak_size(100_000, 200))


# -- a reference decoder, from the contract -------------------------------------------------

INVALID, TOO_LARGE = DisconnectedType.INVALID_MESSAGE, DisconnectedType.MESSAGE_TOO_LARGE


def _id_problem(length: int, slot: bytes) -> bool:
    if length > len(slot) or any(slot[length:]):
        return True
    try:
        text = slot[:length].decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(unicodedata.category(c) == "Cc" for c in text)


def reference_decode(stream: bytes, n: int, max_size: int):
    """
    Decode C{stream} as the contract says: a list of C{(client_type,
    message_type, message_id, user_id, dest_user_id, raw)} and, when a
    complete header is invalid, the set of reasons that header may be
    rejected with (C{None} when none is).  A trailing incomplete frame is
    simply not returned.
    """
    h = (2 * n + 14 + 3) // 4 * 4
    s = (h - 14) // 2
    frames, at = [], 0
    while len(stream) - at >= h:
        head = stream[at : at + h]
        length = struct.unpack_from("<i", head, 8)[0]
        reasons = set()
        if head[0] != 0xFF:
            reasons.add(INVALID)
        if length < 0:
            reasons.add(INVALID)
        elif length > max_size - h:
            reasons.add(TOO_LARGE)
        uid_len, uid = head[12], head[13 : 13 + s]
        dest_len, dest = head[13 + s], head[14 + s : 14 + 2 * s]
        if _id_problem(uid_len, uid) or _id_problem(dest_len, dest):
            reasons.add(INVALID)
        if reasons:
            return frames, reasons
        if len(stream) - at - h < length:
            break
        raw = stream[at : at + h + length]
        frames.append(
            (
                head[1],
                struct.unpack_from("<H", head, 2)[0],
                struct.unpack_from("<i", head, 4)[0],
                uid[:uid_len].decode("utf-8"),
                dest[:dest_len].decode("utf-8"),
                raw,
            )
        )
        at += h + length
    return frames, None


# -- strategies --------------------------------------------------------------------------------

IDS = ["", "_0", "*", "alice", "bob", "fuzz", "bob#0", "bob#5", "bob#x", "#", "a#999999999"]
MESSAGE_TYPES = sorted({int(t) for t in MessageType} | {0, 1, 99, 100, 113, 199, 299, 600, 65535})


def _fits(text: str, n: int = 11) -> bool:
    try:
        w.validate_id(text, w.WireConfig(n))
    except ValueError:
        return False
    return True


def ids(n: int = 11):
    return st.sampled_from([i for i in IDS if _fits(i, n)]) | st.text(max_size=n).filter(
        lambda t: _fits(t, n)
    )


def header_fields(n: int = 11):
    return st.fixed_dictionaries(
        {
            "client_type": st.integers(0, 255),
            "message_type": st.sampled_from(MESSAGE_TYPES) | st.integers(0, 65535),
            "message_id": st.sampled_from([0, 1, 2, -1, 2**31 - 1])
            | st.integers(-(2**31), 2**31 - 1),
            "user_id": ids(n),
            "dest_user_id": ids(n),
        }
    )


@st.composite
def streams(draw, n: int = 11, body_max: int = 300):
    """
    Bytes that are mostly frames: valid, with bytes changed, with a lying
    BodyLength, cut short, or plain noise, concatenated.
    """
    config = w.WireConfig(n)
    h = config.header_length
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["valid", "valid", "mutated", "lying", "truncated", "noise"]))
        if kind == "noise":
            out += draw(st.binary(max_size=2 * h))
            continue
        fields = draw(header_fields(n))
        body = draw(st.binary(max_size=body_max))
        frame = bytearray(w.encode_frame(config, body=body, **fields))
        if kind == "mutated":
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, h - 1))
                frame[at] = draw(st.integers(0, 255))
        elif kind == "lying":
            frame[8:12] = struct.pack(
                "<i",
                draw(
                    st.sampled_from([-1, -(2**31), 2**31 - 1, len(body) + 1])
                    | st.integers(-(2**31), 2**31 - 1)
                ),
            )
        elif kind == "truncated":
            frame = frame[: draw(st.integers(0, len(frame)))]
        out += frame
    return bytes(out)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({min(p, len(data)) for p in points})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


def _frames(items: list) -> list[w.Frame]:
    """
    The frames of what L{w.FrameDecoder.feed_runs} returned.
    """
    out = []
    for item in items:
        out.extend(w.FrameRun(*item).frames() if isinstance(item, tuple) else [item])
    return out


def check_codec(stream: bytes, points: list[int], n: int, max_size: int) -> None:
    expected, reasons = reference_decode(stream, n, max_size)
    for runs in (False, True):
        check_decoder(stream, points, n, max_size, expected, reasons, runs)


def check_decoder(stream, points, n, max_size, expected, reasons, runs: bool) -> None:
    """
    C{stream} cut at C{points} decodes to the reference decoder's frames and
    error, fed with L{w.FrameDecoder.feed} or (C{runs}) with
    L{w.FrameDecoder.feed_runs} taking Sends and Broadcasts in runs.
    """
    decoder = w.FrameDecoder(w.WireConfig(n, max(max_size, w.header_length_for(n))))
    decoder.max_message_size = max_size
    got, error = [], None
    for chunk in cut(stream, points):
        try:
            if runs:
                got += _frames(
                    decoder.feed_runs(chunk, w.MessageType.SEND, w.MessageType.BROADCAST)
                )
            else:
                got += decoder.feed(chunk)
        except w.FrameError as e:
            got += _frames(e.frames)
            error = e
            break
        # Never more than one header and one maximum body.
        assert decoder.buffered <= max_size
    as_tuples = [
        (f.client_type, f.message_type, f.message_id, f.user_id, f.dest_user_id, f.raw)
        for f in got
    ]
    assert as_tuples == expected
    if reasons is None:
        assert error is None
    else:
        assert error is not None, f"accepted a header the contract rejects ({reasons})"
        assert error.reason in reasons
        with pytest.raises(w.FrameError):  # sticky
            decoder.feed(b"\xff" * 64)


codec_cases = st.tuples(
    st.sampled_from([11, 11, 11, 1, 2, 20]).flatmap(lambda n: st.tuples(st.just(n), streams(n))),
    st.lists(st.integers(0, 3000), max_size=12),
    st.sampled_from([4096, 1 << 20, 100]),
)


@pytest.mark.usefixtures("compiled_loops")
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec_cases)
def test_codec_agrees_with_the_contract(case):
    (n, stream), points, max_size = case
    check_codec(stream, points, n, max_size)


@pytest.mark.soak
@pytest.mark.usefixtures("compiled_loops")
def test_codec_agrees_with_the_contract_soak():
    """
    The same property at soak size (10^5 examples at ESF_SOAK_SCALE=1).
    """

    @settings(
        max_examples=soak_examples(),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(codec_cases)
    def run(case):
        (n, stream), points, max_size = case
        check_codec(stream, points, n, max_size)

    run()


def test_reference_decoder_sanity():
    config = w.WireConfig()
    frame = w.encode_frame(config, 202, b"\x01\x00\x00\x00hi", user_id="alice", dest_user_id="bob")
    frames, reasons = reference_decode(frame + frame[:10], 11, 1 << 20)
    assert reasons is None and [f[5] for f in frames] == [frame]
    assert reference_decode(bytes(36), 11, 1 << 20) == ([], {INVALID})
    big = bytearray(frame)
    big[8:12] = struct.pack("<i", 1 << 20)
    assert reference_decode(bytes(big), 11, 1 << 20) == ([], {TOO_LARGE})


# -- the engine, in memory -----------------------------------------------------------------

ENGINE_MAX = 4096


@st.composite
def session_scripts(draw):
    """
    What one hostile connection sends: maybe a logon first (as a user the
    good sessions are not), then anything, in any order, cut anywhere.
    """
    config = w.WireConfig(max_message_size=ENGINE_MAX)
    parts = []
    if draw(st.booleans()):
        user = draw(st.sampled_from(["fuzz", "mallory", "x" * 11]))
        kind = draw(st.sampled_from([0, 5, 8, 9]))
        body = w.Logon(draw(st.sampled_from([1, 1, 1, 2])), "", "pw").encode()
        parts.append(
            w.encode_frame(config, 112, body, client_type=kind, message_id=1, user_id=user)
        )
        me = user
    else:
        me = draw(st.sampled_from(["fuzz", ""]))
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["frame", "frame", "frame", "typed", "stream"]))
        if kind == "stream":
            parts.append(draw(streams(body_max=200)))
            continue
        message_type = draw(st.sampled_from(MESSAGE_TYPES))
        body_class = w.REQUEST_BODIES.get(message_type)
        if kind == "typed" and body_class is not None:
            body = _typed_body(draw, body_class)
        else:
            body = draw(st.binary(max_size=120))
        parts.append(
            w.encode_frame(
                config,
                message_type,
                body,
                client_type=draw(st.sampled_from([0, 5, 9])),
                message_id=draw(st.sampled_from([0, 0, 1, 7, -1])),
                user_id=draw(st.sampled_from([me, me, me, "alice"]) | ids()),
                dest_user_id=draw(st.sampled_from(IDS)),
            )
        )
    stream = b"".join(parts)
    points = draw(st.lists(st.integers(0, len(stream)), max_size=10))
    return cut(stream, points)


def _typed_body(draw, body_class) -> bytes:
    ints = st.integers(0, 2**32 - 1)
    samples = {
        w.Logon: lambda: w.Logon(draw(st.integers(0, 65535)), draw(st.text(max_size=5)), "pw"),
        w.Empty: w.Empty,
        w.KickOut: lambda: w.KickOut(draw(st.text(max_size=20))),
        w.GetAllOnlineUsers: lambda: w.GetAllOnlineUsers(draw(ints), draw(ints)),
        w.QueryOnlines: lambda: w.QueryOnlines(draw(st.lists(ids(), max_size=5))),
        w.Information: lambda: w.Information(
            draw(st.integers(-5, 5)), draw(st.binary(max_size=50))
        ),
        w.Ack: lambda: w.Ack(draw(st.integers(-5, 5))),
        w.BlobFragment: lambda: w.BlobFragment(
            draw(st.integers(-2, 2)),
            draw(st.integers(0, 3)),
            draw(st.integers(0, 3)),
            draw(st.booleans()),
            draw(st.binary(max_size=60)),
        ),
    }
    return samples[body_class]().encode()


def frames_written(client) -> list:
    """
    The frames the server wrote to C{client} since the last call, headers
    decoded and bodies left alone: relayed bodies are the sender's bytes,
    and a hostile sender's need not parse.
    """
    data = client.transport.value()
    chunk, client._read = data[client._read :], len(data)
    frames = client._decoder.feed(chunk)
    assert client._decoder.buffered == 0, "the server wrote a partial frame"
    return frames


def _pings(engine, good, peer, message_id):
    """
    The good session pings the server and its peer; both answer.
    """
    good.send(MessageType.PING_BY_SERVER, message_id=message_id)
    good.send(MessageType.PING_BY_SERVER, message_id=message_id + 1, dest="bob")
    relayed = [
        (r.user_id, r.message_id)
        for r in frames_written(peer)
        if r.message_type == MessageType.PING_BY_SERVER and r.user_id == "alice"
    ]
    assert relayed == [("alice", message_id + 1)]
    peer.send(MessageType.PING_ACK, message_id=message_id + 1, dest="alice")
    acks = [(r.message_type, r.message_id, r.user_id) for r in frames_written(good)]
    assert (MessageType.PING_ACK, message_id, "_0") in acks
    assert (MessageType.PING_ACK, message_id + 1, "bob") in acks


def run_engine_fuzz(scripts) -> None:
    logs = LogCapture().start()
    try:
        engine = make_engine(max_message_size=ENGINE_MAX, max_output_buffer=64 * 1024)
        good = connect(engine, "alice", host="10.0.0.1")
        peer = connect(engine, "bob", host="10.0.0.2")
        hostile = []
        for number, script in enumerate(scripts):
            client = Client(engine, host="10.9.9.9")
            hostile.append(client)
            for chunk in script:
                client.send_raw(chunk)  # must not raise
                assert client.protocol.session.decoder.buffered <= ENGINE_MAX
            engine.clock.advance(0.5)
            _pings(engine, good, peer, 100 + 2 * number)
        # What the server wrote to every hostile peer is a clean frame stream
        # that ends, when the server closed it, with a DisconnectNotice.
        for client in hostile:
            received = frames_written(client)
            if client.closing and received:
                ended = client.protocol.session.ended
                assert ended
                kinds = [r.message_type for r in received]
                if MessageType.DISCONNECT_NOTICE in kinds:
                    assert kinds.index(MessageType.DISCONNECT_NOTICE) == len(kinds) - 1
        # Presence holds exactly the logged-on sessions.
        on = {(s.user_id, s.client_type) for s in engine.sessions if s.logged_on}
        listed = {(d.user_id, int(d.client_type)) for d in engine.user_manager.get_all_user_data()}
        assert on == listed
        assert {("alice", 0), ("bob", 0)} <= on
        for client in hostile:
            client.lose()
        engine.clock.advance(engine.config.close_timeout + 1)
        assert {s.user_id for s in engine.sessions} == {"alice", "bob"}
        assert engine._open == len(engine.sessions)
        _pings(engine, good, peer, 10)
        assert not logs.failures(), logs.failures()
    finally:
        logs.stop()


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(session_scripts(), min_size=1, max_size=3))
def test_engine_survives_hostile_sessions(scripts):
    run_engine_fuzz(scripts)


@pytest.mark.soak
def test_engine_survives_hostile_sessions_soak():
    @settings(
        max_examples=soak_size(20_000, 100),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(st.lists(session_scripts(), min_size=1, max_size=3))
    def run(scripts):
        run_engine_fuzz(scripts)

    run()


# -- a live server ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """
    The resident set size of process C{pid}, in KiB (Linux).
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hostile_payload(rng: random.Random) -> bytes:
    """
    One hostile connection's bytes, from a seeded generator (the live test
    cannot use Hypothesis's shrinking across processes anyway).
    """
    kind = rng.choice(
        ["noise", "near-valid", "truncated", "lying", "order", "order", "huge", "wrong-user"]
    )
    logon = struct.pack("<H", 1) + rc.pack_str("") + rc.pack_str("pf")
    if kind == "noise":
        return rng.randbytes(rng.randrange(1, 400))
    if kind == "near-valid":
        frame = bytearray(rc.pack_header(rc.LOGON, len(logon), "fuzz", rc.SERVER, 1) + logon)
        for _ in range(rng.randrange(1, 5)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    if kind == "truncated":
        return rc.pack_header(rng.choice([112, 202, 104]), 10, "fuzz", rc.SERVER)[
            : rng.randrange(1, 36)
        ]
    if kind == "lying":
        length = rng.choice([len(logon) + 50, 60_000, -1, 2**31 - 1, 0])
        return rc.pack_header(rc.LOGON, length, "fuzz", rc.SERVER, 1) + logon
    if kind == "huge":
        return rc.pack_header(rc.LOGON, 70_000, "fuzz", rc.SERVER, 1)
    if kind == "wrong-user":
        return (
            rc.pack_header(rc.LOGON, len(logon), "fuzz", rc.SERVER, 1)
            + logon
            + rc.pack_header(rc.PING, 0, "alice", rc.SERVER, 2)
        )
    # Valid frames in an invalid order: requests before the logon, two
    # logons, relays to the good sessions, a logoff in the middle.
    frames = []
    for _ in range(rng.randrange(1, 8)):
        t = rng.choice(
            [rc.LOGON, rc.LOGON, rc.HEARTBEAT, rc.PING, 202, rc.LOGOFF, rc.QUERY_ONLINE, 601, 207]
        )
        body = logon if t == rc.LOGON else rng.randbytes(rng.randrange(0, 30))
        dest = rng.choice([rc.SERVER, "alice", "bob", "*", "bob#0", ""])
        frames.append(rc.pack_header(t, len(body), "fuzz", dest, rng.randrange(0, 3)) + body)
    return b"".join(frames)


def drain(socks, deadline: float) -> int:
    """
    Read from C{socks} until the server has closed each or C{deadline}
    passes; return how many the server closed.
    """
    open_socks = set(socks)
    closed = 0
    while open_socks and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_socks), [], [], max(deadline - time.monotonic(), 0))
        for sock in ready:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                open_socks.discard(sock)
                closed += 1
    return closed


def live_fuzz(server, connections: int, seed: int) -> dict:
    """
    C{connections} hostile sockets, 20 at a time, against C{server}, while
    alice and bob relay pings to each other; return the figures.
    """
    rng = random.Random(seed)
    alice, bob = rc.connect(server.port), rc.connect(server.port)
    try:
        assert alice.logon("alice", "pa")["result"] == 0
        assert bob.logon("bob", "pb")["result"] == 0
        rss_before = rss_kib(server.process.pid)
        rss_peak = rss_before
        worst_ping = 0.0
        done = closed_by_server = 0
        started = time.monotonic()
        while done < connections:
            batch = []
            for _ in range(min(20, connections - done)):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                batch.append(sock)
                try:
                    sock.sendall(hostile_payload(rng))
                except OSError:
                    pass  # the server may already have closed it
            closed_by_server += drain(batch, deadline=time.monotonic() + 0.25)
            for sock in batch:
                if rng.random() < 0.3:
                    # Reset instead of a clean close.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            done += len(batch)
            # The good sessions relay to each other and hear the server.
            t0 = time.monotonic()
            alice.send(rc.PING, dest="bob", msg_id=done)
            header, _ = bob.recv_until(rc.PING, timeout=5)
            assert header["message_id"] == done
            bob.send(rc.PING_ACK, dest="alice", msg_id=done)
            header, _ = alice.recv_until(rc.PING_ACK, timeout=5)
            assert header["message_id"] == done
            alice.send(rc.HEARTBEAT, dest=rc.SERVER)
            bob.send(rc.HEARTBEAT, dest=rc.SERVER)
            worst_ping = max(worst_ping, time.monotonic() - t0)
            rss_peak = max(rss_peak, rss_kib(server.process.pid))
        elapsed = time.monotonic() - started
        return {
            "connections": connections,
            "closed_by_server": closed_by_server,
            "seconds": elapsed,
            "rss_before_kib": rss_before,
            "rss_peak_kib": rss_peak,
            "worst_relay_round_trip": worst_ping,
        }
    finally:
        alice.close()
        bob.close()


def assert_clean_log(server) -> None:
    log = server.log()
    for bad in ("Unhandled", "Traceback"):
        assert bad not in log, log[-5000:]


@pytest.fixture
def live_server(tmp_path):
    from test_e2e import AUTH, start_server

    server = start_server(
        tmp_path / "fuzz.log",
        AUTH + ["--logon-timeout", "2", "--logon-rate-limit", "1000000"],
    )
    yield server
    server.stop()


@pytest.mark.e2e
def test_live_server_survives_hostile_connections(live_server):
    figures = live_fuzz(live_server, connections=200, seed=1)
    print(figures)
    assert figures["rss_peak_kib"] < 200 * 1024
    assert figures["worst_relay_round_trip"] < 2.0
    assert_clean_log(live_server)


@pytest.mark.e2e
@pytest.mark.soak
def test_live_server_survives_hostile_connections_soak(live_server):
    figures = live_fuzz(live_server, connections=soak_size(10_000, 300), seed=2)
    print(figures)
    assert figures["rss_peak_kib"] < 200 * 1024
    # Growth, not absolute size: no leak per connection.
    assert figures["rss_peak_kib"] - figures["rss_before_kib"] < 50 * 1024
    assert_clean_log(live_server)
