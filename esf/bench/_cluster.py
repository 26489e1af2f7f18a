"""
Cluster mode (C{--mode cluster}): esf nodes joined through a
C{redis-server} this run starts, each figure measured on one node and on
two (a logon's CPU on three as well).
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import task

from ._coordinator import LoadGenerator
from ._figures import _best
from ._servers import LocalRedis, LocalServer, NodeGroup
from ._wire import BenchError

#: What a phase's CPU is counted per, by mode.
_COUNTED = {"send": "received", "request": "answered", "logons": "logged_on"}

#: (row, figure, which way is better): the cluster rows and what they compare.
CLUSTER_ROWS = [
    ("send on one node: with --cluster / without", "msgs_per_s", "higher"),
    ("send across nodes / one node", "msgs_per_s", "higher"),
    ("send across nodes / one node", "server_cpu_us_per_msg", "lower"),
    ("request across nodes / one node", "rtt_p50_us", "lower"),
    ("request across nodes / one node", "requests_per_s", "higher"),
    ("request across nodes / one node", "server_cpu_us_per_request", "lower"),
    ("send: two nodes / one node, aggregate", "msgs_per_s", "higher"),
]
#: The logon rows: every logon at one node, the CPU of every process (the
#: nodes, which each mirror it, and Redis) per logon, against one node
#: without a cluster.
LOGON_ROWS = [
    ("logon: two nodes / one node without a cluster", "server_cpu_us_per_logon", "lower"),
    ("logon: three nodes / one node without a cluster", "server_cpu_us_per_logon", "lower"),
]


#: What a node logs once it is in the cluster (its mirror loaded).
_JOINED = "in the cluster as "


async def _joined(reactor, nodes: list[LocalServer], prefix: str, timeout: float) -> None:
    """
    Wait until every node of C{nodes}, whose IDs are C{prefix} and its
    index, has logged that it is in the cluster (a log file may hold an
    earlier server's lines: its port was used before).

    @raise BenchError: one has not within C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    lines = [f"{_JOINED}{prefix}{i}:" for i in range(len(nodes))]
    while not all(
        line in node.log_path.read_text(errors="replace") for line, node in zip(lines, nodes)
    ):
        if reactor.seconds() > deadline:
            raise BenchError(f"the nodes were not all in the cluster within {timeout:g} s")
        await task.deferLater(reactor, 0.05, lambda: None)


async def run_cluster(load: LoadGenerator, opts, workdir: Path) -> list[dict]:
    """
    The cluster rows: each figure measured on one node and on two, with
    their ratio.
    """
    redis = LocalRedis(workdir, opts.startup_timeout)
    rows = []
    runs = [0]

    async def measure(mode: str, pairs: int, nodes: int, place, cluster: bool = True) -> dict:
        # The best of --repeat runs, as for the other modes.
        results = [
            await measure_once(mode, pairs, nodes, place, cluster) for _ in range(opts.repeat)
        ]
        return _best(mode, results)

    async def measure_once(mode: str, pairs: int, nodes: int, place, cluster: bool) -> dict:
        runs[0] += 1
        group = None
        try:
            extra = ("--cluster", redis.url, "--node-id", f"bench{runs[0]}-") if cluster else ()
            started = [
                LocalServer(
                    "esf",
                    opts,
                    workdir,
                    (opts.logons if mode == "logons" else 2 * pairs) + 64,
                    extra[:-1] + (extra[-1] + str(i),) if extra else (),
                )
                for i in range(nodes)
            ]
            group = NodeGroup(started, redis, place)
            if cluster:
                # Every node must be in the cluster before the pairs log on.
                await _joined(load.reactor, started, extra[-1], opts.startup_timeout)
            result = await load.measure(mode, group, "esf", pairs)
            # The CPU of each process (the nodes and Redis) per message,
            # request or logon: where a cluster's work costs what it costs.
            count = result.get(_COUNTED[mode], 0)
            result["cpu_us_by_process"] = group.cpu_by_process(count)
            return result
        except BenchError as e:
            print(f"esf-bench: cluster {mode}, {nodes} node(s): {e}", file=sys.stderr)
            return {"error": str(e)}
        finally:
            if group is not None:
                group.stop()

    try:
        for pairs in opts.pairs:
            alone = await measure("send", pairs, 1, "receivers_elsewhere", cluster=False)
            one_send = await measure("send", pairs, 1, "receivers_elsewhere")
            two_send = await measure("send", pairs, 2, "receivers_elsewhere")
            one_req = await measure("request", pairs, 1, "receivers_elsewhere")
            two_req = await measure("request", pairs, 2, "receivers_elsewhere")
            spread = await measure("send", pairs, 2, "pair_index")
            compared = list(
                zip(
                    CLUSTER_ROWS,
                    [
                        (one_send, alone),
                        (two_send, one_send),
                        (two_send, one_send),
                        (two_req, one_req),
                        (two_req, one_req),
                        (two_req, one_req),
                        (spread, one_send),
                    ],
                )
            )
            if pairs == opts.pairs[0]:
                # A logon's cost does not depend on the pairs: once.
                alone = await measure("logons", pairs, 1, "receivers_elsewhere", cluster=False)
                two = await measure("logons", pairs, 2, "receivers_elsewhere")
                three = await measure("logons", pairs, 3, "receivers_elsewhere")
                compared += zip(LOGON_ROWS, [(two, alone), (three, alone)])
            for (label, figure, better), (two, one) in compared:
                row = {"row": label, "pairs": pairs, "figure": figure, "better": better,
                       "measured": two.get(figure), "baseline": one.get(figure)}  # fmt: skip
                if figure.startswith("server_cpu_us"):
                    row["by_process"] = [
                        two.get("cpu_us_by_process"),
                        one.get("cpu_us_by_process"),
                    ]
                errors = [r["error"] for r in (two, one) if "error" in r]
                if errors:
                    row["error"] = errors[0]
                elif row["baseline"]:
                    row["ratio"] = row["measured"] / row["baseline"]
                rows.append(row)
    finally:
        redis.stop()
    return rows
