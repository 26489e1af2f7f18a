"""
esf-bench's WebSocket relay measurement: it runs, every message arrives
(checked frame by frame), and the report gives the ratio to TCP.  How fast
anything is, is never asserted here.
"""

from __future__ import annotations

import json

from test_bench import run_bench

from esf.bench import _options, _wire
from esf.wire import FrameDecoder, MessageType, WireConfig


def test_websocket_frames():
    """
    The load's frames: one masked binary WebSocket frame per ESF frame; a
    receiver gets the ESF frame behind a 4-byte header.
    """
    esf = _wire.EsfDialect(100, "pw", "")
    ws = _wire.WsDialect(esf)
    message = ws.message("s1", "r1")
    assert message[0] == 0x82  # FIN, binary
    assert message[1] == 0x80 | 126 and int.from_bytes(message[2:4], "big") == esf.frame_size
    mask, masked = message[4:8], message[8:]
    unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(masked))
    assert unmasked == esf.message("s1", "r1")
    [frame] = FrameDecoder(WireConfig()).feed(unmasked)
    assert (frame.message_type, frame.user_id, frame.dest_user_id) == (
        MessageType.SEND,
        "s1",
        "r1",
    )
    assert ws.frame_size == 4 + esf.frame_size
    assert ws.hello("s1").startswith(b"GET /esf HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Protocol: esf.v1\r\n" in ws.hello("s1")


def test_websocket_checker_counts_whole_messages():
    esf = _wire.EsfDialect(100, "pw", "")
    checker = _wire.WsDialect(esf).checker("s1", "r1")
    frame = esf.message("s1", "r1")
    received = _wire._ws_header(2, len(frame), False) + frame
    stream = received * 3
    assert checker.feed(stream[:100]) == 0
    assert checker.feed(stream[100:]) == 3


def test_quick_send_over_websocket_and_tcp():
    proc = run_bench("--quick", "--mode", "send", "--no-bare", "--no-progress", "--json", "-")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["options"]["websocket"] is True
    [row] = report["results"]
    for kind in ("esf", "ws"):
        assert row[kind]["received"] == row[kind]["messages"] == 2000, kind
        assert row[kind]["checked"] is True
        assert row[kind]["msgs_per_s"] > 0
    assert row["ws_ratio"]["msgs_per_s"] > 0
    assert row["ws_ratio"]["msgs_per_s"] == row["ws"]["msgs_per_s"] / row["esf"]["msgs_per_s"]


def test_websocket_is_off_against_a_remote_server():
    opts = _options.parse_options(["--server", "127.0.0.1:4530", "--no-bare"])
    assert opts.websocket is False
