#!/usr/bin/env python3
"""
Throughput of the esf wire codec: FrameDecoder.feed and encode_frame.

The decoder is measured on a prepared byte stream of Send frames (100-byte
and 64 KiB bodies), cut into chunks of a fixed size (64 KiB, as a TCP
transport typically delivers under load, and 1 KiB, a worst-ish case), and
fed chunk by chunk to a fresh decoder.  Each measurement is repeated and the
best run is kept; the garbage collector is off while a run is timed, as
timeit does.  MB are 10**6 bytes.

    python benchmarks/bench_codec.py            # full run
    python benchmarks/bench_codec.py --quick    # a few seconds, to check it works
    python benchmarks/bench_codec.py --json     # machine-readable output
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

# The esf of this checkout, not an installed one: the figures are this code's.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esf.wire import FrameDecoder, Information, MessageType, WireConfig, encode_frame

KIB = 1024
BODY_SIZES = {"100 B": 100, "64 KiB": 64 * KIB}
CHUNK_SIZES = {"64 KiB": 64 * KIB, "1 KiB": KIB}


def _body(size: int) -> bytes:
    """
    An Information body (information_type 1001) of exactly C{size} bytes.
    """
    return Information(1001, bytes(range(256)) * (size // 256 + 1)).encode()[:size]


def _frame(config: WireConfig, body: bytes) -> bytes:
    return encode_frame(
        config,
        MessageType.SEND,
        body,
        client_type=5,
        message_id=0,
        user_id="alice",
        dest_user_id="bob",
    )


def _best(run, repeat: int) -> float:
    """
    The shortest of C{repeat} timings of C{run()}, in seconds.
    """
    best = float("inf")
    for _ in range(repeat):
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
        finally:
            if gc_was_enabled:
                gc.enable()
        best = min(best, elapsed)
    return best


def bench_decode(
    config: WireConfig, body_size: int, chunk_size: int, stream_bytes: int, repeat: int
):
    frame = _frame(config, _body(body_size))
    count = max(1, stream_bytes // len(frame))
    stream = frame * count
    chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]

    def run():
        decoder = FrameDecoder(config)
        feed = decoder.feed
        n = 0
        for chunk in chunks:
            n += len(feed(chunk))
        if n != count or decoder.buffered:
            raise AssertionError(f"decoded {n} frames of {count}")

    seconds = _best(run, repeat)
    return count, len(stream), seconds


def bench_encode(config: WireConfig, body_size: int, stream_bytes: int, repeat: int):
    body = _body(body_size)
    frame_size = len(_frame(config, body))
    count = max(1, stream_bytes // frame_size)

    def run():
        for i in range(count):
            encode_frame(
                config,
                MessageType.SEND,
                body,
                client_type=5,
                message_id=i,
                user_id="alice",
                dest_user_id="bob",
            )

    seconds = _best(run, repeat)
    return count, count * frame_size, seconds


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run (about 1 MB per case, 2 repeats)"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per case, best kept (default 7)"
    )
    parser.add_argument(
        "--megabytes",
        type=float,
        default=None,
        help="stream size per case in MB (default 32)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    repeat = args.repeat or (2 if args.quick else 7)
    megabytes = args.megabytes or (1 if args.quick else 32)
    stream_bytes = int(megabytes * 1e6)
    config = WireConfig()

    results = []
    for body_name, body_size in BODY_SIZES.items():
        for chunk_name, chunk_size in CHUNK_SIZES.items():
            frames, nbytes, seconds = bench_decode(
                config, body_size, chunk_size, stream_bytes, repeat
            )
            results.append(
                {
                    "operation": "decode",
                    "body": body_name,
                    "chunk": chunk_name,
                    "frames": frames,
                    "bytes": nbytes,
                    "seconds": seconds,
                    "frames_per_s": frames / seconds,
                    "mb_per_s": nbytes / seconds / 1e6,
                }
            )
        frames, nbytes, seconds = bench_encode(config, body_size, stream_bytes, repeat)
        results.append(
            {
                "operation": "encode_frame",
                "body": body_name,
                "chunk": None,
                "frames": frames,
                "bytes": nbytes,
                "seconds": seconds,
                "frames_per_s": frames / seconds,
                "mb_per_s": nbytes / seconds / 1e6,
            }
        )

    info = {
        "machine": machine(),
        "settings": {
            "max_userid_length": config.max_userid_length,
            "header_length": config.header_length,
            "stream_megabytes": megabytes,
            "repeat": repeat,
        },
        "results": results,
    }
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0

    m = info["machine"]
    print(
        f"{m['python']}, {m['cpu']}, {m['nproc']} CPUs; "
        f"{megabytes:g} MB per case, best of {repeat}"
    )
    print()
    print("| operation | body | chunk | frames/s | MB/s |")
    print("|---|---|---|---:|---:|")
    for r in results:
        print(
            f"| {r['operation']} | {r['body']} | {r['chunk'] or '-'} "
            f"| {r['frames_per_s']:,.0f} | {r['mb_per_s']:,.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
