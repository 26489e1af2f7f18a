"""
A run of C{esf-bench}: every measurement of the options, each on a freshly
started server, and C{main}.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer

from esf.wire._decoder import COMPILED

from ._cluster import run_cluster
from ._coordinator import LoadGenerator, RunAborted
from ._figures import _best, _medians, _ratios, _row_label, _targets, load_bound
from ._options import fanout_groups, parse_options
from ._procs import machine_info, usable_cpus
from ._progress import Progress
from ._report import format_table
from ._servers import BASELINE, BASELINES, LocalServer, RemoteServer
from ._wire import BenchError, EsfDialect
from ._worker import worker_main

#: What the esf server of a fan-out run is given, besides what every esf
#: server of the benchmark is: the group manager of the benchmark's groups
#: (logons are accepted as in every other mode: no IBasicHandler), and a
#: work budget that no sender of the run can spend.  A Broadcast is a
#: request to the server, charged to its sender's budget (--work-rate units
#: a second); at the default (2,000) a sender that broadcasts faster would
#: be refused (RateLimited), and the run would measure the budget, not the
#: delivery.  A benchmark setting, not a recommendation.
FANOUT_ESF_ARGS = ("--handler", "esf.bench._groups:blocks", "--work-rate", "1000000")


async def run(reactor, opts) -> dict:
    machine = machine_info()
    progress = Progress(reactor, opts.progress)
    load = LoadGenerator(reactor, opts, progress)
    kinds = ["esf"] + (list(BASELINES) if opts.bare else [])
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="esf-bench-"))
    failed = False
    cluster_rows = []
    warnings: list[str] = []
    aborted = True
    try:
        await load.start()
        if opts.cluster:
            cluster_rows = await run_cluster(load, opts, workdir)
            failed = failed or any("error" in row for row in cluster_rows)
        for mode in opts.modes:
            variants = (
                opts.pairs
                if mode in ("send", "request")
                else opts.group_sizes
                if mode == "fanout"
                else [None]
            )
            for pairs in variants:
                row = {"mode": mode}
                if mode == "fanout":
                    row["group_size"] = pairs
                    row["groups"] = fanout_groups(opts, pairs)
                elif pairs is not None:
                    row["pairs"] = pairs
                if mode == "send" and opts.pattern == "interleaved":
                    row["pattern"] = "interleaved"
                elif mode == "fanout":
                    row["pattern"] = "fanout"
                else:
                    row["count"] = opts.logons if mode == "logons" else opts.idle
                row_kinds = kinds + (["ws"] if mode == "send" and opts.websocket else [])
                runs = {kind: [] for kind in row_kinds}
                for repeat in range(opts.repeat):
                    for kind in row_kinds:
                        result = await _one_run(load, opts, workdir, mode, kind, pairs, row)
                        runs[kind].append(result)
                        if "error" in result:
                            failed = True
                        if not opts.progress:
                            print(
                                f"esf-bench: {_row_label(row)} on {kind}: run {repeat + 1} of "
                                f"{opts.repeat} {'failed' if 'error' in result else 'done'}",
                                file=sys.stderr,
                            )
                for kind in row_kinds:
                    row[kind] = _best(mode, runs[kind])
                    if opts.repeat > 1:
                        row[kind]["runs"] = runs[kind]
                        row[kind]["median"] = _medians(mode, runs[kind])
                # esf against the baseline (the coalescing relay), and against
                # the write-per-frame relay (the "bare" of earlier reports).
                row["ratio"] = _ratios(mode, row.get("esf"), row.get(BASELINE))
                row["ratio_bare"] = _ratios(mode, row.get("esf"), row.get("bare"))
                if opts.repeat > 1:
                    row["ratio_median"] = _ratios(
                        mode,
                        (row.get("esf") or {}).get("median"),
                        (row.get(BASELINE) or {}).get("median"),
                    )
                for kind in row_kinds:
                    for result in runs[kind]:
                        if "load_bound" in result:
                            warnings.append(f"{_row_label(row)} on {kind}: {result['load_bound']}")
                if "ws" in row:
                    # WebSocket against TCP, both esf, in the same run.
                    row["ws_ratio"] = _ratios(mode, row["ws"], row.get("esf"))
                rows.append(row)
        aborted = False
    finally:
        load.stop(kill=aborted)
        if opts.keep_logs:
            print(f"esf-bench: server logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    targets = [t for row in rows for t in _targets(row, opts.server_python_version)]
    return {
        "machine": machine
        | {
            "loadavg_at_end": _loadavg(),
            "server_python": opts.server_python_version,
            "decoder_loop": _decoder_loop(opts),
        },
        "options": {
            "server": f"{opts.server[0]}:{opts.server[1]}" if opts.server else "local",
            "server_python": None if opts.server else opts.server_python,
            "modes": list(opts.modes),
            "pairs": opts.pairs,
            "messages": opts.messages,
            "requests": opts.requests,
            "size": opts.size,
            "frame_bytes": EsfDialect(opts.size, opts.password, opts.system_token).frame_size,
            "logons": opts.logons,
            "idle": opts.idle,
            "hold_s": opts.hold,
            "heartbeat_s": opts.heartbeat,
            "logon_window": opts.logon_window,
            "backlog": opts.backlog,
            "bare": opts.bare,
            "baseline": BASELINE if opts.bare else None,
            "load_procs": opts.load_procs,
            "websocket": opts.websocket,
            "check": opts.check,
            "pattern": opts.pattern,
            "group_sizes": opts.group_sizes,
            "groups": opts.groups,
            "fanout_server_args": list(FANOUT_ESF_ARGS) if "fanout" in opts.modes else None,
            "duration_cap_s": opts.duration,
            "repeat": opts.repeat,
        },
        "results": rows,
        "cluster": cluster_rows,
        "targets": targets,
        "warnings": warnings,
        "ok": not failed,
    }


async def _one_run(load: LoadGenerator, opts, workdir, mode, kind, pairs, row) -> dict:
    """
    One measurement on a freshly started server (or the remote one).
    """
    if mode == "fanout":
        conns_needed = row["group_size"] * row["groups"] + 64
    else:
        conns_needed = (2 * pairs if pairs else row["count"]) + 64
    # The esf server of a fan-out run needs the benchmark's groups.
    extra = FANOUT_ESF_ARGS if mode == "fanout" and kind == "esf" else ()
    server = None
    try:
        if kind == "ws" and opts.server:
            raise BenchError(
                "the WebSocket measurement needs a server this run starts (no --server)"
            )
        if kind == "esf" and opts.server:
            server = RemoteServer(*opts.server)
        else:
            server = LocalServer(kind, opts, workdir, conns_needed, extra)
        result = await load.measure(mode, server, kind, pairs)
        why = load_bound(result, len(usable_cpus()), mode)
        if why is not None:
            result["load_bound"] = why
        return result
    except (BenchError, RunAborted) as e:
        print(f"esf-bench: {_row_label(row)} on {kind}: {e}", file=sys.stderr)
        tail = server.log_tail() if server is not None else ""
        if tail:
            print(f"  last lines of the {kind} server's log:\n{tail}", file=sys.stderr)
        if isinstance(e, RunAborted):
            raise
        return {"error": str(e)}
    finally:
        if server is not None:
            server.stop()


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--load-worker"]:
        return worker_main()
    opts = parse_options(argv)
    from twisted.internet import reactor

    outcome = {}

    async def go():
        outcome["report"] = await run(reactor, opts)

    errors = []

    def start() -> None:
        # Only once the reactor runs: a run that fails before its first
        # wait (cluster mode without redis-server) must still stop it.
        d = defer.Deferred.fromCoroutine(go())
        d.addErrback(errors.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if errors:
        failure = errors[0]
        if failure.check(BenchError, RunAborted):
            print(f"esf-bench: {failure.getErrorMessage()}", file=sys.stderr)
        else:
            failure.printTraceback(file=sys.stderr)
        return 1
    report = outcome["report"]
    if opts.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(report))
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    return 0 if report["ok"] else 1


def _decoder_loop(opts: Any) -> str | None:
    """
    Which loop the frame decoder of the esf servers this run started runs
    (L{esf.wire.COMPILED}): known for servers on PyPy (the pure-Python one)
    and on this very interpreter; C{None} otherwise.
    """
    if opts.server is not None:
        return None
    if (opts.server_python_version or "").startswith("PyPy"):
        return "pure-Python"
    if os.path.realpath(opts.server_python) == os.path.realpath(sys.executable):
        return "compiled" if COMPILED else "pure-Python"
    return None
