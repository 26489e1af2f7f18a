"""
The compiled loops (C{esf/wire/_speedups.pyx}: the frame decoder's, the
WebSocket message taker's) read headers in place, in C: a read past a
frame's bytes would be a server crash or a leak of memory, which no Python
test sees.  Here they are built with AddressSanitizer and fed damaged
streams, cut anywhere, beside the pure-Python code: any read outside the
bytes aborts the process, and any difference in what the two return fails
the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _real_parts import missing, need_program

REPO = Path(__file__).resolve().parent.parent

#: The streams fed, and the most time they may take (ASan slows the loop).
STREAMS = 4000
TIMEOUT = 240

FEEDER = textwrap.dedent(
    """
    import random, sys, time
    from esf.wire import FrameError, MessageType, WireConfig, _decoder, encode_frame

    assert _decoder.COMPILED, "the compiled loop did not load"
    SEND, BROADCAST = MessageType.SEND, MessageType.BROADCAST

    class Python(_decoder.FrameDecoder):
        __slots__ = ()
        _feed = _decoder.FrameDecoder._feed_python

    def fed(decoder, chunks, run_types):
        out = []
        for chunk in chunks:
            try:
                out.append(decoder._run(chunk, run_types))
            except FrameError as e:
                out.append((e.frames, e.reason, e.message))
                break
        return out, decoder.decoded, decoder.buffered

    rng = random.Random(int(sys.argv[1]))
    deadline = time.monotonic() + float(sys.argv[3]) / 2
    streams = 0
    for n in range(int(sys.argv[2])):
        if time.monotonic() > deadline:
            break
        streams += 1
        length = rng.choice([1, 11, 20])
        config = WireConfig(max_userid_length=length, max_message_size=4096)
        ids = ["".join(rng.choice("ab_#9") for _ in range(rng.randint(1, min(3, length))))
               for _ in range(rng.randint(1, 4))]
        stream = bytearray()
        for _ in range(rng.randint(1, 40)):
            kind = rng.choice([SEND, SEND, SEND, BROADCAST, rng.randrange(65536)])
            body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 100, 600])))
            frame = encode_frame(config, kind, body, client_type=rng.randrange(256),
                                 message_id=rng.randrange(-2**31, 2**31),
                                 user_id=rng.choice(ids), dest_user_id=rng.choice(ids))
            stream += frame * rng.randint(1, 4)
        for _ in range(rng.randint(0, 3)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        if rng.random() < 0.3:
            del stream[rng.randrange(len(stream)):]
        data = bytes(stream)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 10)))
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        run_types = rng.choice([(), (SEND,), (SEND, BROADCAST)])
        compiled = fed(_decoder.FrameDecoder(config), chunks, run_types)
        assert compiled == fed(Python(config), chunks, run_types), (n, len(data), cuts, run_types)
    from esf.server import _websocket_frames as ws
    from esf.wire._speedups import frame_messages, take_messages

    def parsed(chunks, limit, take):
        ws._take_messages = take
        parser, out = ws.MessageParser(36), []
        for chunk in chunks:
            frames, refusal, rest = parser.feed(chunk, limit)
            out.append((frames, refusal, rest, parser.pending))
            if refusal is not None or rest:
                break
        return out

    config = WireConfig()
    deadline = time.monotonic() + float(sys.argv[3]) / 2
    for m in range(int(sys.argv[2])):
        if time.monotonic() > deadline:
            break
        stream = bytearray()
        for _ in range(rng.randint(1, 20)):
            body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 90, 200, 1000])))
            frame = encode_frame(config, SEND, body, user_id="a", dest_user_id="b")
            mask = bytes(rng.randrange(256) for _ in range(4))
            size = len(frame)
            head = (bytes([0x82, 0x80 | size]) if size < 126
                    else bytes([0x82, 0xFE]) + size.to_bytes(2, "big"))
            stream += head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(frame))
        for _ in range(rng.randint(0, 3)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        data = bytes(stream)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 6)))
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        limit = rng.choice([4096, 100, 65536])
        assert parsed(chunks, limit, take_messages) == parsed(chunks, limit, None), (m, cuts)
        # And the taker alone, from anywhere in the stream; and the framing
        # out, of whole frames and of cut or damaged ones.
        take_messages(data, rng.randrange(len(data) + 1), limit, 36, [])
        frames = b"".join(parsed(chunks, limit, None)[0][0]) if chunks else b""
        ws._frame_messages = None
        expected = ws.binary_messages(frames, 36)
        ws._frame_messages = frame_messages
        assert ws.binary_messages(frames, 36) == expected
        frame_messages(data[: rng.randrange(len(data) + 1)], 36)
    print("fed", streams, m + 1)
    """
)


def _libasan() -> str:
    gcc = need_program("gcc", "the compiled loop is built with it (apt-get install gcc)")
    path = subprocess.run(
        [gcc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not Path(path).exists():
        missing("gcc's AddressSanitizer runtime is not installed (Debian: libasan8)")
    return path


def test_the_compiled_loops_read_nothing_outside_the_frames(tmp_path):
    """
    Built with AddressSanitizer, the compiled loops read only the bytes
    they were given over thousands of damaged streams (of ESF frames, and
    of WebSocket messages), and return what the pure-Python code returns
    for each.
    """
    if sys.implementation.name != "cpython":
        pytest.skip("the compiled loop is built on CPython only")
    libasan = _libasan()
    pytest.importorskip("Cython", reason="Cython builds the compiled loop (pip install Cython)")
    shutil.copytree(REPO / "esf", tmp_path / "esf", ignore=shutil.ignore_patterns("*.so", "*.c"))
    flags = "-fsanitize=address -fno-omit-frame-pointer -O1 -g"
    build = subprocess.run(
        [sys.executable, "-c",
         "import sys; from setuptools import Extension, setup; "
         "from Cython.Build import cythonize; "
         "sys.argv = ['setup', 'build_ext', '--inplace']; "
         "setup(ext_modules=cythonize([Extension('esf.wire._speedups', "
         "['esf/wire/_speedups.pyx'])], language_level=3, quiet=True))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, CFLAGS=flags, LDFLAGS="-fsanitize=address"),
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    env = dict(
        os.environ,
        PYTHONPATH=str(tmp_path),
        LD_PRELOAD=libasan,
        # Every object from malloc, so that ASan bounds each bytes object.
        PYTHONMALLOC="malloc",
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
    )
    env.pop("ESF_PURE_PYTHON", None)
    run = subprocess.run(
        [sys.executable, "-c", FEEDER, "7", str(STREAMS), str(TIMEOUT - 60)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stderr[-4000:]
    frames, messages = map(int, run.stdout.split()[-2:])
    assert frames >= 500 and messages >= 500, run.stdout
