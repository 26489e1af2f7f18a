"""
The server's time per relayed Send, in process: no sockets, no reactor.

One session is fed reads of N Send frames (100-byte payloads) to another,
whose output goes to an in-memory transport; the time per frame is the best
of several rounds.  With --profile, cProfile's table of the same work.

    python benchmarks/relay_profile.py                 # reads of 200 and of 20 frames
    python benchmarks/relay_profile.py --interleave 4  # each read alternates among 4 receivers
    python benchmarks/relay_profile.py --profile       # where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from esf import AcceptAll, ServerConfig, ServerEngine, ServerFactory
from esf.wire import Logon, MessageType, encode_frame


def connected(engine: ServerEngine, factory: ServerFactory, user_id: str, port: int):
    peer = IPv4Address("TCP", "127.0.0.1", port)
    transport = StringTransport(peerAddress=peer)
    protocol = factory.buildProtocol(peer)
    protocol.makeConnection(transport)
    logon = encode_frame(
        engine.config.wire, MessageType.LOGON, Logon(1, "", "pw").encode(), message_id=1,
        user_id=user_id,
    )  # fmt: skip
    protocol.dataReceived(logon)
    transport.clear()
    return protocol, transport


def setup(frames: int, receivers: int):
    # The reactor as the clock (it never runs here): timers are made as in
    # a server, and none fires.
    from twisted.internet import reactor

    engine = ServerEngine(ServerConfig(), handler=AcceptAll(), clock=reactor)
    factory = ServerFactory(engine)
    sender, _ = connected(engine, factory, "sender", 1)
    outs = [connected(engine, factory, f"r{i}", 2 + i)[1] for i in range(receivers)]
    wire = engine.config.wire
    body = (1).to_bytes(4, "little") + b"x" * 96
    each = [
        encode_frame(wire, MessageType.SEND, body, user_id="sender", dest_user_id=f"r{i}")
        for i in range(receivers)
    ]
    data = b"".join(each[n % receivers] for n in range(frames))
    return engine, sender, outs, data


def measure(frames: int, receivers: int, reads: int, rounds: int = 5) -> float:
    engine, sender, outs, data = setup(frames, receivers)
    gc.disable()
    try:
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(reads):
                sender.dataReceived(data)
                for out in outs:
                    out.clear()
            best = min(best, time.perf_counter() - started)
    finally:
        gc.enable()
        engine.stop()
    return best / (reads * frames) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interleave", type=int, default=1, metavar="N",
                        help="receivers each read alternates among (default 1)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="print cProfile's table")
    args = parser.parse_args()
    if args.profile:
        engine, sender, outs, data = setup(200, args.interleave)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            sender.dataReceived(data)
            for out in outs:
                out.clear()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
        return
    for frames, reads in ((200, 2000), (20, 20000)):
        ns = measure(frames, args.interleave, reads)
        print(f"reads of {frames} Sends to {args.interleave} receiver(s): {ns:.0f} ns per relayed Send")


if __name__ == "__main__":
    main()
