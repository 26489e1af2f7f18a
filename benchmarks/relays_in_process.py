"""
The two yardstick relays' time per frame, in process: no sockets, no
reactor loop.  Each relay's C{dataReceived} is fed reads of frames from one
sender, and after each read every receiver's transport (Twisted's own
C{FileDescriptor}, with a socket that takes everything) writes what it was
given, as the reactor would once the socket is writable.

    python benchmarks/relays_in_process.py coalescing interleaved
    python benchmarks/relays_in_process.py bare pairs
    python benchmarks/relays_in_process.py coalescing fanout
    python benchmarks/relays_in_process.py --relay-dir /tmp coalescing_before interleaved

Run one relay and pattern per process (on PyPy, a loop compiled for one
relay would serve the other badly).  Patterns: C{interleaved} (reads of 200
frames to 50 receivers in turn), C{pairs} (reads of 200 frames to one
receiver), C{fanout} (reads of 20 broadcasts to a group of 10).
"""

from __future__ import annotations

import argparse
import importlib
import struct
import sys
import time
from pathlib import Path

from twisted.internet.abstract import FileDescriptor

RELAYS = Path(__file__).resolve().parent.parent / "esf" / "bench" / "relays"


class _Reactor:
    """What a transport asks of its reactor when it writes."""

    def __init__(self) -> None:
        self.writers: set = set()

    def addWriter(self, writer) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer) -> None:
        self.writers.discard(writer)

    def addReader(self, reader) -> None:
        pass

    def removeReader(self, reader) -> None:
        pass


class _Transport(FileDescriptor):
    """Twisted's buffering, over a socket that takes every byte."""

    connected = 1

    def writeSomeData(self, data) -> int:
        return len(data)

    def abortConnection(self) -> None:
        pass

    def fileno(self) -> int:
        return -1


def _frame(dest: bytes, payload: bytes) -> bytes:
    body = bytes([len(dest)]) + dest + payload
    return struct.pack("<I", len(body)) + body


def _hello(name: bytes, group: bytes = b"") -> bytes:
    text = name + (b"\x00" + group if group else b"")
    return struct.pack("<I", len(text)) + text


def measure(relay, pattern: str, reads: int = 3000, rounds: int = 5) -> float:
    """The best time per frame (ns) of C{rounds} rounds of C{reads} reads."""
    reactor = _Reactor()
    factory = relay.RelayFactory()
    receivers, group = (9, b"g") if pattern == "fanout" else (50, b"")

    def connect(hello: bytes):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(_Transport(reactor))
        protocol.dataReceived(hello)
        return protocol

    for i in range(receivers):
        connect(_hello(b"r%d" % i, group))
    sender = connect(_hello(b"s", group))
    payload = b"x" * 100
    if pattern == "interleaved":
        frames = [_frame(b"r%d" % (k % receivers), payload) for k in range(200)]
    elif pattern == "pairs":
        frames = [_frame(b"r0", payload) for _ in range(200)]
    else:
        frames = [_frame(group, payload) for _ in range(20)]
    data = b"".join(frames)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(reads):
            sender.dataReceived(data)
            for transport in list(reactor.writers):
                transport.doWrite()
        best = min(best, (time.perf_counter() - started) / (reads * len(frames)) * 1e9)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("relay", help="a relay module's name: coalescing, bare, ...")
    parser.add_argument("pattern", choices=("interleaved", "pairs", "fanout"))
    parser.add_argument(
        "--relay-dir", default=str(RELAYS), help="where the relay module (and bare.py) are"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, args.relay_dir)
    relay = importlib.import_module(args.relay)
    print(f"{args.relay}, {args.pattern}: {measure(relay, args.pattern):.0f} ns per frame")


if __name__ == "__main__":
    main()
