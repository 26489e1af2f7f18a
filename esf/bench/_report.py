"""
The report as text: the tables of C{esf-bench}'s output.
"""

from __future__ import annotations

from ._figures import FIGURES, _row_label
from ._servers import BASELINE


def _fmt(value, figure: str) -> str:
    if value is None:
        return "-"
    if figure.endswith("_us"):
        return f"{value:,.0f} µs"
    if figure.endswith(("_us_per_msg", "_us_per_delivery", "_us_per_request", "_us_per_logon")):
        return f"{value:.2f} µs"
    if figure == "bytes_per_session":
        return f"{value:,.0f} B"
    if figure.endswith("_percent"):
        return f"{value:.0f} %"
    if figure.endswith("_bytes"):
        return f"{value / 2**20:,.1f} MiB"
    if figure.endswith("_s") and not figure.endswith("per_s"):
        return f"{value:,.2f} s"
    return f"{value:,.0f}"


_EXTRA = {
    "send": [
        "elapsed_s",
        "server_cpu_percent",
        "load_cpu_percent",
        "machine_cpu_percent",
        "server_peak_rss_bytes",
    ],
    "fanout": [
        "elapsed_s",
        "server_cpu_percent",
        "load_cpu_percent",
        "machine_cpu_percent",
        "server_peak_rss_bytes",
    ],
    "request": ["server_cpu_percent", "load_cpu_percent"],
    "logons": ["elapsed_s", "server_cpu_percent", "load_cpu_percent"],
    "idle": ["logons_per_s", "server_rss_bytes", "server_cpu_percent", "load_cpu_percent"],
}


def format_table(report: dict) -> str:
    machine = report["machine"]
    options = report["options"]
    lines = [
        f"esf-bench: {machine['nproc']} CPU(s)"
        + (
            f" of {machine['cpu_count']}"
            if machine.get("cpu_count", machine["nproc"]) != machine["nproc"]
            else ""
        )
        + f", {machine['cpu_model']}, {machine['python']}; "
        f"payload {options['size']} B (frame {options['frame_bytes']} B); server {options['server']}"
        + (
            f" on {machine['server_python']}"
            if options.get("server_python") and machine.get("server_python")
            else ""
        )
        + f"; load generator: {options.get('load_procs', 1)} process(es)",
        "",
        "baseline: the coalescing relay (esf/bench/relays/coalescing.py, one write per destination per "
        "read); the line under each main figure: the write-per-frame relay (esf/bench/relays/bare.py)",
        "",
        "| measurement | esf | baseline | esf/baseline | target |",
        "|---|---:|---:|---:|---|",
    ]
    if machine.get("esf"):
        # The esf the servers imported: two checkouts compared show each its own.
        # And the loop their frame decoders ran, where it is known.
        loop = machine.get("decoder_loop")
        lines.insert(
            1, f"esf measured: {machine['esf']}" + (f" ({loop} decoder loop)" if loop else "")
        )
    targets = {(t["row"], t["figure"]): t for t in report["targets"]}
    for row in report["results"]:
        label = _row_label(row)
        esf, base, bare = row.get("esf") or {}, row.get(BASELINE) or {}, row.get("bare") or {}
        for kind, res in (("esf", esf), (BASELINE, base), ("bare", bare)):
            if "error" in res:
                lines.append(f"| {label}: {kind} FAILED | {res['error'][:80]} | | | |")
        main = [f for f, _, _ in FIGURES[row["mode"]]]
        for figure in main + _EXTRA[row["mode"]]:
            if figure not in esf and figure not in base:
                continue
            ratio = row.get("ratio", {}).get(figure)
            median = row.get("ratio_median", {}).get(figure)
            t = targets.get((label, figure))
            target = ""
            if t is not None:
                target = f"{t['target']}: {'met' if t['met'] else 'NOT met'}"
            capped = " (capped)" if esf.get("capped") or base.get("capped") else ""
            ratio_text = "-" if ratio is None else f"{ratio:.2f}"
            if median is not None:
                ratio_text += f" (medians {median:.2f})"
            lines.append(
                f"| {label}: {figure}{capped} | {_fmt(esf.get(figure), figure)} | "
                f"{_fmt(base.get(figure), figure)} | {ratio_text} | {target} |"
            )
            if figure in main and figure in bare:
                per_frame = row.get("ratio_bare", {}).get(figure)
                lines.append(
                    f"| ↳ write-per-frame relay | | {_fmt(bare.get(figure), figure)} | "
                    f"{'-' if per_frame is None else f'{per_frame:.2f}'} | |"
                )
    if report.get("cluster"):
        if not report["results"]:
            lines = lines[:2]
        lines += [
            "",
            "| cluster: measured / baseline, pairs | figure | measured | baseline | ratio |",
            "|---|---|---:|---:|---:|",
        ]
        for row in report["cluster"]:
            if "error" in row:
                lines.append(
                    f"| {row['row']}, {row['pairs']} | FAILED | {row['error'][:80]} | | |"
                )
                continue
            ratio = row.get("ratio")
            lines.append(
                f"| {row['row']}, {row['pairs']} | {row['figure']} | "
                f"{_fmt(row['measured'], row['figure'])} | {_fmt(row['baseline'], row['figure'])} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |"
            )
        by_process = [row for row in report["cluster"] if all(row.get("by_process") or [None])]
        if by_process:
            lines += [
                "",
                "| cluster: CPU per message, request or logon, by process, pairs | measured | baseline |",
                "|---|---|---|",
            ]
            for row in by_process:
                measured, baseline = (
                    ", ".join(f"{name} {value:.2f} µs" for name, value in side.items())
                    for side in row["by_process"]
                )
                lines.append(f"| {row['row']}, {row['pairs']} | {measured} | {baseline} |")
    ws_rows = [row for row in report["results"] if "ws" in row]
    if ws_rows:
        lines += [
            "",
            "| WebSocket relay | WebSocket | TCP | WebSocket/TCP |",
            "|---|---:|---:|---:|",
        ]
    for row in ws_rows:
        label = _row_label(row)
        ws, tcp = row["ws"], row.get("esf") or {}
        if "error" in ws:
            lines.append(f"| {label}: WebSocket FAILED | {ws['error'][:80]} | | |")
            continue
        for figure in ["msgs_per_s", "server_cpu_percent", "server_peak_rss_bytes"]:
            ratio = row.get("ws_ratio", {}).get(figure)
            lines.append(
                f"| {label}: {figure} | {_fmt(ws.get(figure), figure)} | {_fmt(tcp.get(figure), figure)} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |"
            )
    if report.get("warnings"):
        lines += [
            "",
            "WARNING: in these runs the server was not the bottleneck (their figures understate it):",
        ]
        lines += [f"- {warning}" for warning in report["warnings"]]
    return "\n".join(lines)
