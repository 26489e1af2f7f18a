"""
Sizing a cluster on one host: N ``twistd esf`` nodes joined through one
``redis-server``, S sessions logged on across them (user i on node i mod
N), held for H seconds with heartbeats; then the memory each node spends
per session it holds, what Redis spends per online device, and how long the
logons took (docs/cluster.md, "Sizing").

    python benchmarks/cluster_sizing.py --nodes 6 --sessions 100000 --hold 120
    python benchmarks/cluster_sizing.py --nodes 2 --sessions 2000 --hold 5   # a smoke run

It drives esf-bench's idle phase (its load workers log the sessions on and
send the heartbeats; the coordinator reads each process's memory before the
first logon and after the hold) against a group of nodes, and adds what
esf-bench's report leaves out: every node's memory and Redis's.  A process
may hold --fd-limit descriptors: a node holds sessions/nodes of them and a
load worker sessions/workers, so choose --nodes and --load-procs to fit.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # esf from this checkout: the one its nodes run

from twisted.internet import defer, task  # noqa: E402

from esf.bench._coordinator import LoadGenerator  # noqa: E402
from esf.bench._options import parse_options  # noqa: E402
from esf.bench._procs import proc_memory, raise_fd_limit  # noqa: E402
from esf.bench._progress import Progress  # noqa: E402
from esf.bench._servers import LocalRedis, LocalServer, NodeGroup  # noqa: E402


def redis_info(port: int) -> dict[str, str]:
    """
    What C{INFO memory} and C{INFO keyspace} say, as a dict.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*1\r\n$4\r\nINFO\r\n")
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        header, _, rest = data.partition(b"\r\n")
        size = int(header[1:])
        while len(rest) < size + 2:
            rest += s.recv(65536)
    out = {}
    for line in rest[:size].decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value
    return out


class MeasuredGroup(NodeGroup):
    """
    The nodes as one server whose memory is their sum; each reading also
    keeps every node's and Redis's (L{readings}).
    """

    def __init__(self, nodes, redis, place):
        super().__init__(nodes, redis, place)
        self.readings: list[dict] = []

    def memory(self) -> dict:
        per_node = [proc_memory(n.pid).get("VmRSS", 0) for n in self.nodes]
        info = redis_info(self.redis.port)
        self.readings.append(
            {
                "nodes_rss": per_node,
                "redis_used_memory": int(info["used_memory"]),
                "redis_rss": int(info["used_memory_rss"]),
            }
        )
        return {"VmRSS": sum(per_node)}


async def measure(reactor, args) -> dict:
    opts = parse_options(
        [
            "--mode", "idle", "--idle", "1", "--hold", str(args.hold),
            "--heartbeat", str(args.heartbeat), "--load-procs", str(args.load_procs),
            "--logon-window", str(args.logon_window), "--duration", str(args.duration),
            "--no-progress",
        ]
    )  # fmt: skip
    # esf-bench checks its descriptors against one server holding them all;
    # here each node and each load worker holds its share.
    opts.idle = args.sessions
    raise_fd_limit(args.fd_limit)
    workdir = Path(tempfile.mkdtemp(prefix="esf-sizing-"))
    load = LoadGenerator(reactor, opts, Progress(reactor, False))
    redis = nodes = None
    try:
        await load.start()
        redis = LocalRedis(workdir, opts.startup_timeout)
        per_node = math.ceil(args.sessions / args.nodes)
        cluster = ("--cluster", redis.url, "--node-id")
        nodes = [
            LocalServer("esf", opts, workdir, per_node + 64, (*cluster, f"size{i}"))
            for i in range(args.nodes)
        ]
        # Sessions are named I<tag><i>: "pair_index" puts session i on node i mod N.
        group = MeasuredGroup(nodes, redis, "pair_index")
        await task.deferLater(reactor, 2.0, lambda: None)  # every node joined
        result = await load.measure("idle", group, "esf", None)
    finally:
        if nodes:
            for node in nodes:
                node.stop()
        if redis is not None:
            redis.stop()
        load.stop()
    before, after = group.readings[0], group.readings[-1]
    sessions = result["sessions"]
    held = [
        sessions // args.nodes + (1 if i < sessions % args.nodes else 0) for i in range(args.nodes)
    ]
    per_session = [
        (a - b) / max(n, 1) for a, b, n in zip(after["nodes_rss"], before["nodes_rss"], held)
    ]
    return {
        "nodes": args.nodes,
        "sessions": sessions,
        "hold_s": round(result["hold_s"], 1),
        "heartbeat_s": args.heartbeat,
        "heartbeats_sent": result["heartbeats_sent"],
        "logon_elapsed_s": round(result["logon_elapsed_s"], 2),
        "logons_per_s": round(result["logons_per_s"]),
        "node_rss_before_bytes": before["nodes_rss"],
        "node_rss_after_bytes": after["nodes_rss"],
        "node_bytes_per_session": [round(x) for x in per_session],
        "redis_used_memory_before": before["redis_used_memory"],
        "redis_used_memory_after": after["redis_used_memory"],
        "redis_bytes_per_device": round(
            (after["redis_used_memory"] - before["redis_used_memory"]) / max(sessions, 1)
        ),
        "redis_rss_after": after["redis_rss"],
        "nodes_cpu_s": result.get("server_cpu_s"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--hold", type=float, default=120.0, help="seconds the sessions are held")
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--load-procs", type=int, default=6)
    parser.add_argument("--logon-window", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=900.0, help="the phase's cap (s)")
    parser.add_argument("--fd-limit", type=int, default=20_000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    from twisted.internet import reactor

    outcome: dict = {}

    def start() -> None:
        d = defer.Deferred.fromCoroutine(measure(reactor, args))
        d.addCallback(outcome.update)
        d.addErrback(lambda f: outcome.update(error=f))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if "error" in outcome:
        outcome["error"].printTraceback(file=sys.stderr)
        return 1
    text = json.dumps(outcome, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
