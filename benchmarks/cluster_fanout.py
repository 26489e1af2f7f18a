"""
Broadcasts across the nodes of a cluster: one member of a group on one
node broadcasts to the group, whose other members are all on a second
node; the rate at which the copies reach them.

Two real ``twistd esf --cluster`` nodes and a ``redis-server`` of its own
on 127.0.0.1 (the test suite's helpers start them: run it from a checkout,
which is the esf measured).  The groups are those of ``esf-bench --pattern
fanout`` (``--handler esf.bench._groups:blocks``): ``u1.0`` broadcasts
one-way Broadcasts (MessageID 0) to ``g1.<G>.0`` as fast as its node reads
them; ``u1.1`` to ``u1.<G-1>`` count what they receive.

    python benchmarks/cluster_fanout.py --group 50 --broadcasts 5000 --size 1000

It prints the deliveries per second until every member had every copy (or
the time ran out: with an inbox too small for the burst, copies are
refused and counted at the nodes, and the run says how many arrived).
"""

from __future__ import annotations

import argparse
import json
import select
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]  # the suite's raw client and process helpers

import rawclient as rc  # noqa: E402
from _redis import RedisServer  # noqa: E402
from test_e2e import ServerProcess  # noqa: E402

BROADCAST = 601
HANDLER = ["--handler", "esf.bench._groups:blocks", "--work-rate", "1000000"]


def measure(group: int, broadcasts: int, size: int, timeout: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="esf-fanout-"))
    (workdir / "redis").mkdir()
    redis = RedisServer(workdir / "redis").start()
    nodes: list[ServerProcess] = []
    try:
        for name in ("f1", "f2"):
            node = ServerProcess(
                workdir / f"{name}.log",
                [
                    "--cluster",
                    redis.url,
                    "--node-id",
                    name,
                    "--logon-rate-limit",
                    "100000",
                    *HANDLER,
                ],
            )
            nodes.append(node)
            node.wait_listening()
            node.wait_for_log("in the cluster as " + name, timeout=10)
        sender = rc.connect(nodes[0].port)
        assert sender.logon("u1.0", "pw")["result"] == 0
        members = []
        for i in range(1, group):
            member = rc.connect(nodes[1].port)
            assert member.logon(f"u1.{i}", "pw")["result"] == 0
            member.sock.setblocking(False)
            members.append(member)
        time.sleep(1.0)  # the sender's node lists every member
        body = struct.pack("<i", 1) + bytes(size)
        frame = rc.pack_header(BROADCAST, len(body), "u1.0", f"g1.{group}.0") + body
        want = len(frame) * broadcasts
        got = {m.sock: 0 for m in members}

        def send() -> None:
            left = broadcasts
            while left:
                n = min(left, 50)
                sender.sock.sendall(frame * n)
                left -= n

        started = time.monotonic()
        threading.Thread(target=send, daemon=True).start()
        deadline = started + timeout
        while time.monotonic() < deadline and min(got.values()) < want:
            ready, _, _ = select.select(list(got), [], [], 1.0)
            for sock in ready:
                try:
                    got[sock] += len(sock.recv(1 << 20))
                except BlockingIOError:
                    pass
        elapsed = time.monotonic() - started
        delivered = sum(min(n, want) for n in got.values()) // len(frame)
        return {
            "group": group, "broadcasts": broadcasts, "size": size,
            "deliveries": delivered, "expected": broadcasts * (group - 1),
            "seconds": elapsed, "deliveries_per_s": delivered / elapsed,
            "esf": str(ROOT / "esf"),
        }  # fmt: skip
    finally:
        for node in nodes:
            node.stop()
        redis.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", type=int, default=50, help="members, the sender among them")
    parser.add_argument("--broadcasts", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1000, help="payload bytes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds at most")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    result = measure(args.group, args.broadcasts, args.size, args.timeout)
    print(
        f"esf measured: {result['esf']}\n"
        f"{result['deliveries']:,} of {result['expected']:,} deliveries in "
        f"{result['seconds']:.2f} s: {result['deliveries_per_s']:,.0f} deliveries/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["deliveries"] == result["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
