"""
The server's time per relayed Send, in process: no sockets, no reactor.

One session is fed reads of N Send frames (100-byte payloads) to another,
whose output goes to an in-memory transport; the time per frame is the best
of several rounds.  With --profile, cProfile's table of the same work.

    python benchmarks/relay_profile.py                 # reads of 200 and of 20 frames
    python benchmarks/relay_profile.py --interleave 4  # each read alternates among 4 receivers
    python benchmarks/relay_profile.py --profile       # where the time goes
    python benchmarks/relay_profile.py --websocket     # the sender on WebSocket (masked frames)
    python benchmarks/relay_profile.py --broadcast 10  # Broadcasts to a group of 10 receivers
    python benchmarks/relay_profile.py --policy allow  # a relay policy that allows every frame
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import os
import pstats
import sys
import time
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from zope.interface import implementer

# The esf of this checkout, not an installed one: the figures are this code's.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esf import AcceptAll, ServerConfig, ServerEngine, ServerFactory, WebSocketFactory
from esf.interfaces import IGroupManager, IRelayPolicy
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


def ws_message(payload: bytes, mask: bytes) -> bytes:
    """
    One masked, final, binary WebSocket frame, as a browser sends it.
    """
    n = len(payload)
    head = bytes((0x82, 0x80 | n)) if n < 126 else bytes((0x82, 0xFE)) + n.to_bytes(2, "big")
    masked = (
        int.from_bytes(payload, "little") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    ).to_bytes(n, "little")
    return head + mask + masked


def ws_connected(engine: ServerEngine, user_id: str, port: int):
    peer = IPv4Address("TCP", "127.0.0.1", port)
    transport = StringTransport(peerAddress=peer)
    protocol = WebSocketFactory(engine).buildProtocol(peer)
    protocol.makeConnection(transport)
    key = base64.b64encode(os.urandom(16)).decode()
    protocol.dataReceived(
        (
            "GET /esf HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: esf.v1\r\n\r\n"
        ).encode()
    )
    logon = encode_frame(
        engine.config.wire, MessageType.LOGON, Logon(1, "", "pw").encode(), message_id=1,
        user_id=user_id,
    )  # fmt: skip
    protocol.dataReceived(ws_message(logon, os.urandom(4)))
    transport.clear()
    return protocol, transport


@implementer(IGroupManager)
class OneGroup:
    """
    The group C{"g"}: the receivers, answered synchronously.
    """

    def __init__(self, members: list[str]):
        self.members = members

    def get_members(self, group_id: str) -> list[str]:
        return self.members

    def can_broadcast(self, user_id: str, group_id: str) -> bool:
        return True


@implementer(IRelayPolicy)
class Allow:
    """
    A relay policy that allows every frame at once (C{--policy allow}).
    """

    def may_relay(self, sender: str, receiver: str, message_type: int, information: int) -> bool:
        return True


@implementer(IRelayPolicy)
class AllowDeferred:
    """
    One that allows every frame with a Deferred that has fired already
    (C{--policy allow-deferred}): each frame takes the queue of frames
    waiting for decisions.
    """

    def may_relay(
        self, sender: str, receiver: str, message_type: int, information: int
    ) -> Deferred[bool]:
        return succeed(True)


POLICIES = {"none": None, "allow": Allow, "allow-deferred": AllowDeferred}


def setup(
    frames: int,
    receivers: int,
    websocket: bool = False,
    broadcast: bool = False,
    policy: str = "none",
):
    # The reactor as the clock (it never runs here): timers are made as in
    # a server, and none fires.
    from twisted.internet import reactor

    # A Broadcast is a request to the server, charged to the work budget:
    # raised here, as the load is the point.
    config = ServerConfig(work_rate=1e12, work_burst=1e12)
    groups = OneGroup([f"r{i}" for i in range(receivers)])
    make_policy = POLICIES[policy]
    engine = ServerEngine(
        config,
        handler=AcceptAll(),
        clock=reactor,
        group_manager=groups,
        relay_policy=make_policy() if make_policy is not None else None,
    )
    factory = ServerFactory(engine)
    if websocket:
        sender, _ = ws_connected(engine, "sender", 1)
    else:
        sender, _ = connected(engine, factory, "sender", 1)
    outs = [connected(engine, factory, f"r{i}", 2 + i)[1] for i in range(receivers)]
    wire = engine.config.wire
    body = (1).to_bytes(4, "little") + b"x" * 96
    each = [
        encode_frame(wire, MessageType.SEND, body, user_id="sender", dest_user_id=f"r{i}")
        for i in range(receivers)
    ]
    if broadcast:
        each = [
            encode_frame(wire, MessageType.BROADCAST, body, user_id="sender", dest_user_id="g")
        ]
        receivers = 1
    if websocket:  # one message per frame, each with its own mask
        data = b"".join(ws_message(each[n % receivers], os.urandom(4)) for n in range(frames))
    else:
        data = b"".join(each[n % receivers] for n in range(frames))
    return engine, sender, outs, data


def measure(
    frames: int,
    receivers: int,
    reads: int,
    rounds: int = 5,
    websocket: bool = False,
    broadcast: bool = False,
    policy: str = "none",
) -> float:
    engine, sender, outs, data = setup(frames, receivers, websocket, broadcast, policy)
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
    per = reads * frames * (receivers if broadcast else 1)
    return best / per * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interleave", type=int, default=1, metavar="N",
                        help="receivers each read alternates among (default 1)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="print cProfile's table")
    parser.add_argument("--websocket", action="store_true",
                        help="the sender speaks WebSocket (the receivers TCP)")  # fmt: skip
    parser.add_argument("--broadcast", type=int, default=0, metavar="G",
                        help="Broadcasts to one group of G receivers; time per delivery")  # fmt: skip
    parser.add_argument("--policy", choices=sorted(POLICIES), default="none",
                        help="the relay policy: none, one that allows at once, or with a "
                        "Deferred (default none)")  # fmt: skip
    args = parser.parse_args()
    receivers = args.broadcast or args.interleave
    if args.profile:
        _engine, sender, outs, data = setup(
            200, receivers, args.websocket, bool(args.broadcast), args.policy
        )
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            sender.dataReceived(data)
            for out in outs:
                out.clear()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
        return
    kind = "WebSocket messages" if args.websocket else "Sends"
    if args.broadcast:
        kind = "Broadcasts"
    for frames, sends in ((200, 2000), (20, 20000)):
        # (Broadcasts: about as many deliveries as relayed Sends otherwise.)
        reads = max(1, sends // args.broadcast) if args.broadcast else sends
        ns = measure(frames, receivers, reads, websocket=args.websocket,
                     broadcast=bool(args.broadcast), policy=args.policy)  # fmt: skip
        what = "delivery" if args.broadcast else "relayed Send"
        policy = f", relay policy {args.policy}" if args.policy != "none" else ""
        print(
            f"reads of {frames} {kind} to {receivers} receiver(s){policy}: {ns:.0f} ns per {what}"
        )


if __name__ == "__main__":
    main()
