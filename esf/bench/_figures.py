"""
The figures of a phase: merged from what the load workers measured and the
coordinator's readings (L{_merge}), judged (L{load_bound}), compared with
the baseline's (L{_ratios}) and with their targets (L{_targets}), over
repeated runs (L{_best}, L{_medians}).
"""

from __future__ import annotations

import math

from ._wire import BenchError


def _percentile(sorted_values: list[float], p: float) -> float:
    """
    The nearest-rank percentile of sorted values.
    """
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _merge(mode: str, opts, pairs: int | None, parts: list[dict], readings: dict) -> dict:
    """
    The figures of one phase from its workers' parts and the coordinator's
    readings at the sync points.
    """
    t0, t1 = min(p["t0"] for p in parts), max(p["t1"] for p in parts)
    elapsed = t1 - t0
    if mode == "send":
        received = sum(p["received"] for p in parts)
        result = {
            "pairs": pairs,
            "messages": opts.messages,
            "received": received,
            "frame_bytes": parts[0]["frame_bytes"],
            "window_per_pair": parts[0]["window_per_pair"],
            "elapsed_s": elapsed,
            "msgs_per_s": received / elapsed if elapsed > 0 else 0.0,
            "mb_per_s": received * parts[0]["frame_bytes"] / elapsed / 1e6 if elapsed > 0 else 0.0,
            "capped": any(p["capped"] for p in parts),
            "checked": bool(opts.check),
        }
    elif mode == "fanout":
        deliveries = sum(p["deliveries"] for p in parts)
        result = {
            "group_size": pairs,
            "groups": sum(p["groups"] for p in parts),
            "messages": opts.messages,
            "broadcasts": sum(p["broadcasts"] for p in parts),
            "deliveries": deliveries,
            "expected_deliveries": sum(p["expected"] for p in parts),
            "member_min": min(p["member_min"] for p in parts),
            "member_max": max(p["member_max"] for p in parts),
            "share_min": min(p["share_min"] for p in parts),
            "share_max": max(p["share_max"] for p in parts),
            "received_bytes": sum(p["received_bytes"] for p in parts),
            "frame_bytes": parts[0]["frame_bytes"],
            "window_per_group": parts[0]["window_per_group"],
            "elapsed_s": elapsed,
            "deliveries_per_s": deliveries / elapsed if elapsed > 0 else 0.0,
            "capped": any(p["capped"] for p in parts),
            "checked": bool(opts.check),
        }
    elif mode == "request":
        rtts = sorted(r for p in parts for r in p["rtts"])
        if not rtts:
            raise BenchError("no request was answered")
        result = {
            "pairs": pairs,
            "requests": opts.requests,
            "answered": len(rtts),
            "frame_bytes": parts[0]["frame_bytes"],
            "elapsed_s": elapsed,
            "requests_per_s": len(rtts) / elapsed if elapsed > 0 else 0.0,
            "rtt_p50_us": _percentile(rtts, 50) * 1e6,
            "rtt_p90_us": _percentile(rtts, 90) * 1e6,
            "rtt_p99_us": _percentile(rtts, 99) * 1e6,
            "rtt_max_us": rtts[-1] * 1e6,
            "capped": any(p["capped"] for p in parts),
        }
    elif mode == "logons":
        logged_on = sum(p["logged_on"] for p in parts)
        result = {
            "logons": opts.logons,
            "logged_on": logged_on,
            "window": opts.logon_window,
            "elapsed_s": elapsed,
            "logons_per_s": logged_on / elapsed if elapsed > 0 else 0.0,
        }
    else:
        sessions = sum(p["sessions"] for p in parts)
        logon_elapsed = max(p["logon_t1"] for p in parts) - min(p["logon_t0"] for p in parts)
        result = {
            "sessions": sessions,
            "hold_s": elapsed,
            "heartbeat_s": opts.heartbeat,
            "heartbeats_sent": sum(p["heartbeats_sent"] for p in parts),
            "logon_elapsed_s": logon_elapsed,
            "logons_per_s": sessions / logon_elapsed if logon_elapsed > 0 else 0.0,
        }
        before = readings.get("settled", {}).get("memory", {}).get("VmRSS")
        after = readings.get("measured", {}).get("memory", {}).get("VmRSS")
        if before is not None and after is not None:
            result["rss_before_bytes"] = before
            result["bytes_per_session"] = (after - before) / max(sessions, 1)
    result.update(_usage(readings.get("start"), readings.get("measured")))
    if mode == "send" and "server_cpu_s" in result and result["received"]:
        # What a relayed message costs the server: unlike the rate, this
        # hardly moves when other work shares the machine.
        result["server_cpu_us_per_msg"] = result["server_cpu_s"] / result["received"] * 1e6
    if mode == "request" and "server_cpu_s" in result and result["answered"]:
        result["server_cpu_us_per_request"] = result["server_cpu_s"] / result["answered"] * 1e6
    if mode == "fanout" and "server_cpu_s" in result and result["deliveries"]:
        result["server_cpu_us_per_delivery"] = result["server_cpu_s"] / result["deliveries"] * 1e6
    if mode == "logons" and "server_cpu_s" in result and result["logged_on"]:
        result["server_cpu_us_per_logon"] = result["server_cpu_s"] / result["logged_on"] * 1e6
    return result


def _usage(start: dict | None, end: dict | None) -> dict:
    """
    The server's and the load generator's CPU over the timed interval (the
    coordinator's readings at C{start} and C{measured}), and the server's
    memory at its end.
    """
    out: dict = {}
    if start is None or end is None:
        return out
    interval = end["t"] - start["t"]
    if interval <= 0:
        return out
    if start["server_cpu"] is not None and end["server_cpu"] is not None:
        out["server_cpu_s"] = end["server_cpu"] - start["server_cpu"]
        out["server_cpu_percent"] = 100 * out["server_cpu_s"] / interval
    if start.get("machine_cpu") is not None and end.get("machine_cpu") is not None:
        # Every process on the cores this run may use, its own and others',
        # in % of one core; and what the hypervisor took from those cores.
        (busy0, steal0), (busy1, steal1) = start["machine_cpu"], end["machine_cpu"]
        out["machine_cpu_percent"] = 100 * (busy1 - busy0) / interval
        out["machine_steal_percent"] = 100 * (steal1 - steal0) / interval
    load = [
        100 * (b - a) / interval
        for a, b in zip(start["load_cpu"], end["load_cpu"])
        if a is not None and b is not None
    ]
    if load:
        out["load_procs"] = len(load)
        out["load_cpu_percent"] = sum(load)
        out["load_cpu_max_percent"] = max(load)
    memory = end["memory"]
    if "VmRSS" in memory:
        out["server_rss_bytes"] = memory["VmRSS"]
    if "VmHWM" in memory:
        out["server_peak_rss_bytes"] = memory["VmHWM"]
    return out


#: A load worker busier than this (% of one core) while the server is below
#: it makes the phase's figure the load generator's, not the server's.
BUSY_PERCENT = 85.0
#: Phases shorter than this (seconds) are not judged by L{load_bound}.
MIN_JUDGED_S = 0.5


def load_bound(result: dict, nproc: int, mode: str) -> str | None:
    """
    Why the load generator, not the server, limited a phase; L{None} when
    it did not (or when the server's CPU is unknown).  In send mode the
    server should be busy all along: if it was not, the load set the rate.
    C{nproc}: the cores the server and the load may use (L{usable_cpus}).
    Idle mode generates no load (it holds sessions and reads memory): never
    a warning there.
    """
    if mode == "idle":
        return None
    elapsed = result.get("elapsed_s")
    if elapsed is not None and elapsed < MIN_JUDGED_S:
        # CPU times come in clock ticks (10 ms): a phase this short gives
        # percentages that say nothing (a worker at 180% of a core).
        return None
    server, busiest, load = (
        result.get("server_cpu_percent"), result.get("load_cpu_max_percent"), result.get("load_cpu_percent")
    )  # fmt: skip
    if server is None or busiest is None or server >= BUSY_PERCENT:
        return None
    machine = result.get("machine_cpu_percent")
    if machine is not None and machine - server - load >= 0.5 * BUSY_PERCENT:
        return (
            f"other processes used {machine - server - load:.0f}% of the {nproc} core(s) this run may use "
            f"(this server {server:.0f}%, the load generator {load:.0f}%): measure on a quiet machine"
        )
    steal = result.get("machine_steal_percent")
    if steal is not None and steal >= 0.5 * BUSY_PERCENT:
        return (
            f"the hypervisor took {steal:.0f}% of the {nproc} core(s) this run may use (steal time) "
            f"while the server used {server:.0f}%: measure on a quiet machine"
        )
    if busiest >= BUSY_PERCENT:
        return (
            f"a load worker used {busiest:.0f}% of a core ({result.get('load_procs')} worker(s), "
            f"{load:.0f}% in all) while the server used {server:.0f}%"
        )
    if server + load >= BUSY_PERCENT * nproc:
        return (
            f"the {nproc} core(s) this run may use were busy ({load:.0f}% load generator, {server:.0f}% server): "
            "the server did not have a core to itself"
        )
    if mode in ("send", "fanout") and elapsed is not None:
        return (
            f"the server used only {server:.0f}% of a core: the load's window (--window-bytes) "
            f"or its CPU ({load:.0f}%) set the rate"
        )
    return None


#: (mode, figure, which way is better, the target it is held to: (kind, bound)).
#: kind "ratio": esf/bare against bound; "min"/"max": the esf figure itself.
FIGURES = {
    # 0.6 for pairs; interleaved traffic is held to more (see _targets).
    "send": [
        ("msgs_per_s", "higher", ("ratio_min", 0.6)),
        ("server_cpu_us_per_msg", "lower", None),
    ],
    "fanout": [
        ("deliveries_per_s", "higher", ("ratio_min", 0.8)),
        ("server_cpu_us_per_delivery", "lower", None),
    ],
    "request": [
        ("rtt_p50_us", "lower", ("ratio_max", 1.3)),
        ("rtt_p90_us", "lower", None),
        ("rtt_p99_us", "lower", None),
        ("rtt_max_us", "lower", None),
        ("requests_per_s", "higher", None),
    ],
    # Time at most 1.5x the baseline's: a rate at least 1/1.5 of its rate.
    "logons": [("logons_per_s", "higher", ("ratio_min", 1 / 1.5))],
    # 2.5 KB per session on CPython, 3.5 KB on PyPy (see _targets).
    "idle": [("bytes_per_session", "lower", ("max", 2560.0))],
}

#: The idle target on PyPy, whose objects are larger.
IDLE_MAX_PYPY = 3584.0

#: The send target of the interleaved pattern: every sender's reads hold
#: frames for many receivers, as a chat room's or a lobby's do.
INTERLEAVED_MIN = 0.8


def _ratios(mode: str, esf: dict | None, bare: dict | None) -> dict:
    out = {}
    if not esf or not bare or "error" in esf or "error" in bare:
        return out
    for figure, _, _ in FIGURES[mode]:
        a, b = esf.get(figure), bare.get(figure)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
            out[figure] = a / b
    return out


def _targets(row: dict, server_python: str | None = None) -> list[dict]:
    """
    The targets for a row (C{server_python}: the implementation and
    version of the Python that ran the server, when known).
    """
    out = []
    esf = row.get("esf") or {}
    if "error" in esf:
        return out
    for figure, _, target in FIGURES[row["mode"]]:
        if target is None:
            continue
        kind, bound = target
        if figure == "bytes_per_session" and (server_python or "").startswith("PyPy"):
            bound = IDLE_MAX_PYPY
        if figure == "msgs_per_s" and row.get("pattern") == "interleaved":
            bound = INTERLEAVED_MIN
        if kind.startswith("ratio"):
            value = row.get("ratio", {}).get(figure)
            text = f"esf/baseline {'>=' if kind == 'ratio_min' else '<='} {bound:.3g}"
            met = (
                None
                if value is None
                else (value >= bound if kind == "ratio_min" else value <= bound)
            )
        else:
            value = esf.get(figure)
            text = f"{'>=' if kind == 'min' else '<='} {bound:g}"
            met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        if value is not None:
            out.append(
                {
                    "row": _row_label(row),
                    "figure": figure,
                    "value": value,
                    "target": text,
                    "met": met,
                }
            )
    return out


def _row_label(row: dict) -> str:
    mode = row["mode"]
    if mode in ("send", "request"):
        label = f"{mode}, {row['pairs']} pair{'s' if row['pairs'] != 1 else ''}"
        return label + (", interleaved" if row.get("pattern") == "interleaved" else "")
    if mode == "fanout":
        groups = row["groups"]
        return f"fanout, {groups:,} group{'s' if groups != 1 else ''} of {row['group_size']:,}"
    return f"{mode}, {row['count']:,}"


def _best(mode: str, runs: list[dict]) -> dict:
    """
    The best of repeated runs by the mode's main figure (the first failure,
    if any run failed).
    """
    for result in runs:
        if "error" in result:
            return dict(result)
    figure, better, _ = FIGURES[mode][0]
    pick = max if better == "higher" else min
    best = pick(runs, key=lambda r: r.get(figure, 0))
    return dict(best, repeats=len(runs))


def _medians(mode: str, runs: list[dict]) -> dict | None:
    """
    The median of each of the mode's figures over repeated runs (L{None} if
    a run failed).
    """
    if any("error" in r for r in runs):
        return None
    out = {}
    for figure, _, _ in FIGURES[mode]:
        values = sorted(r[figure] for r in runs if isinstance(r.get(figure), (int, float)))
        if values:
            middle = len(values) // 2
            out[figure] = (
                values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
            )
    return out
