#!/usr/bin/env python3
"""
Draw the send-mode throughput of esf and of the two bare relays (the
coalescing baseline and the write-per-frame relay) against the number
of sender/receiver pairs, from one or more C{esf-bench --json} outputs (one
per server interpreter, e.g. CPython and PyPy), into a PNG.

The left panel is messages per second (the best run of each side); the right
panel is the server's CPU time per relayed message (the lowest of the runs'
C{server_cpu_us_per_msg}: server CPU seconds from C{/proc} over the timed
interval, divided by the messages), which moves much less than the wall-clock rate when other work
shares the machine.

    python benchmarks/plot.py cpython.json pypy.json -o docs/performance-throughput.png

Each input file is labelled by the interpreter that ran its servers (the
C{server_python} that C{esf-bench} records, else the Python that ran the
benchmark); C{--label} overrides that, once per file.  Needs matplotlib, a
benchmark-only dependency (C{pip install matplotlib}).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: One colour per input file (interpreter); esf solid, the coalescing relay
#: dashed, the write-per-frame relay dotted.
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def load(path: Path) -> tuple[str, dict]:
    """
    The interpreter label of an esf-bench report and its send-mode rows
    C{{pairs: {"esf": msgs/s, "coalescing": msgs/s, "bare": msgs/s, "esf_cpu": µs, ...}}}:
    the best rate and the lowest server CPU time per message of each side.
    """
    report = json.loads(path.read_text())
    machine = report.get("machine", {})
    label = machine.get("server_python") or machine.get("python") or path.stem
    points: dict[int, dict[str, float]] = {}
    for row in report.get("results", []):
        if row.get("mode") != "send":
            continue
        for kind in ("esf", "coalescing", "bare"):
            best = row.get(kind) or {}
            value = best.get("msgs_per_s")
            if value is not None:
                points.setdefault(row["pairs"], {})[kind] = value
            # The figure each run reports: server CPU and messages counted over
            # the same interval (not rebuilt from the CPU percentage, whose
            # window is not that of elapsed_s).
            cpu = [
                r["server_cpu_us_per_msg"]
                for r in best.get("runs", [best])
                if r.get("server_cpu_us_per_msg") is not None
            ]
            if cpu:
                points.setdefault(row["pairs"], {})[f"{kind}_cpu"] = min(cpu)
    return label, points


def draw(series: list[tuple[str, dict]], out: Path, target: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(13, 6.5), dpi=110)
    all_pairs: set[int] = set()
    for i, (label, points) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pairs = sorted(points)
        all_pairs.update(pairs)
        for kind, style, marker, name in (
            ("esf", "-", "o", "esf"),
            ("coalescing", "--", "s", "coalescing relay (baseline)"),
            ("bare", ":", "^", "write-per-frame relay"),
        ):
            for axis, key in ((ax, kind), (ax_cpu, f"{kind}_cpu")):
                xs = [p for p in pairs if key in points[p]]
                ys = [points[p][key] for p in xs]
                if not xs:
                    continue
                axis.plot(
                    xs,
                    ys,
                    style,
                    marker=marker,
                    color=colour,
                    linewidth=2,
                    markersize=7,
                    label=f"{name}, {label}",
                )
    if target:
        ax.axhline(
            target, color="grey", linestyle=":", linewidth=1.5, label=f"{target / 1e6:g} M msgs/s"
        )
    for axis in (ax, ax_cpu):
        axis.set_xscale("log")
        axis.set_xticks(sorted(all_pairs))
        axis.get_xaxis().set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.minorticks_off()
        axis.set_ylim(bottom=0)
        axis.set_xlim(min(all_pairs) / 1.5, max(all_pairs) * 2)
        axis.set_xlabel("sender/receiver pairs")
        axis.grid(True, alpha=0.3)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g} M"))
    ax.set_ylabel("messages relayed per second (best run)")
    ax.set_title("throughput (higher is better)")
    ax_cpu.set_ylabel("server CPU time per message, µs (lowest run)")
    ax_cpu.set_title("server cost per message (lower is better)")
    fig.suptitle(title)
    # One legend for both panels, under them, where it hides no line.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="esf-bench --json outputs")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("docs/performance-throughput.png")
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        help="label of the n-th report (default: the servers' interpreter)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=1e6,
        help="draw a horizontal line at this many msgs/s (0: none; default 1000000)",
    )
    parser.add_argument("--title", default="esf-bench send mode: 140-byte frames over 127.0.0.1")
    args = parser.parse_args(argv)
    if len(args.label) > len(args.reports):
        parser.error("more --label options than reports")
    series = []
    for i, path in enumerate(args.reports):
        label, points = load(path)
        if i < len(args.label):
            label = args.label[i]
        if not points:
            print(f"plot: {path} has no send-mode results", file=sys.stderr)
            continue
        series.append((label, points))
    if not series:
        parser.error("nothing to draw")
    draw(series, args.output, args.target or None, args.title)
    print(f"plot: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
