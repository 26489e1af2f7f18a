"""
C{esf-bench}'s options: the parser, and the defaults and checks that
depend on more than one option.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._groups import MAX_GROUP_SIZE, group_name, member_name
from ._procs import default_load_procs, interpreter_info, raise_fd_limit
from ._servers import BASELINES, find_relay

MODES = ("send", "request", "logons", "idle")

#: Members in all, by default, of the groups of a fan-out run (so many
#: groups of --group-size G: at least one).
FANOUT_MEMBERS = 1000
FANOUT_MEMBERS_QUICK = 100

#: The longest user ID (and group ID) an esf server takes by default
#: (--max-userid-length).
MAX_ID = 11


#: What a phase may take beyond --duration before the run is ended as hung:
#: a worker's phase is capped at --duration, then closes its connections
#: (at most 10 s); the rest is slack for a loaded machine.
PHASE_GRACE = 30.0


def _host_port(value: str):
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--server takes HOST:PORT, not {value!r}")
    return host or "127.0.0.1", int(port)


def _numbers(option: str, example: str, low: int):
    def parse(value: str) -> list[int]:
        try:
            numbers = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option} takes numbers, e.g. {example}, not {value!r}"
            ) from None
        if not numbers or any(n < low for n in numbers):
            what = "positive numbers" if low == 1 else f"numbers of at least {low}"
            raise argparse.ArgumentTypeError(f"{option} takes {what}, not {value!r}")
        return numbers

    return parse


_pairs = _numbers("--pairs", "1,50", 1)
#: A group of one has nobody but its sender to deliver to.
_group_sizes = _numbers("--group-size", "10,1000", 2)


def fanout_groups(opts, size: int) -> int:
    """
    The groups of a fan-out run with groups of C{size} members: C{--groups},
    else as many as make about L{FANOUT_MEMBERS} members (at least one).
    """
    if opts.groups is not None:
        return opts.groups
    return max(1, (FANOUT_MEMBERS_QUICK if opts.quick else FANOUT_MEMBERS) // size)


def _positive(kind):
    def parse(value: str):
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {value}")
        return number

    return parse


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 10:
        raise argparse.ArgumentTypeError(f"must be in 0..10, not {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="esf-bench",
        description="Load an esf server from load worker processes and measure relay throughput "
        "(over TCP and WebSocket), round-trip latency, logons/s and memory per idle session, next to "
        "two bare Twisted relays: the coalescing baseline (one write per destination per read) and "
        "the write-per-frame relay.",
    )
    p.add_argument(
        "--server",
        type=_host_port,
        metavar="HOST:PORT",
        help="measure this running esf server instead of starting one (no CPU/RSS figures)",
    )
    p.add_argument(
        "--mode",
        default="all",
        choices=MODES + ("all", "cluster"),
        help="what to measure (default all; cluster: nodes joined through a redis-server "
        "this run starts)",
    )
    p.add_argument(
        "--pairs",
        type=_pairs,
        default=None,
        metavar="N[,N...]",
        help="sender/receiver pairs for send and request; a list runs each (default 1)",
    )
    p.add_argument(
        "--messages",
        type=_positive(int),
        default=None,
        help="messages in send mode, in all (default 100000)",
    )
    p.add_argument(
        "--requests",
        type=_positive(int),
        default=None,
        help="round trips in request mode, in all (default 20000)",
    )
    p.add_argument("--size", type=int, default=100, help="payload bytes per message (default 100)")
    p.add_argument(
        "--logons",
        type=_positive(int),
        default=None,
        help="connections that log on in logons mode (default 10000)",
    )
    p.add_argument(
        "--idle",
        type=_positive(int),
        default=None,
        help="sessions held in idle mode (default 10000)",
    )
    p.add_argument(
        "--hold",
        type=_positive(float),
        default=None,
        help="seconds the idle sessions are held (default 12)",
    )
    p.add_argument(
        "--heartbeat",
        type=_positive(float),
        default=10.0,
        help="seconds between heartbeats of an idle session (default 10)",
    )
    p.add_argument(
        "--logon-window",
        type=_positive(int),
        default=500,
        help="logons in flight at once (default 500)",
    )
    p.add_argument(
        "--backlog",
        type=_positive(int),
        default=1024,
        help="listen backlog of the servers this run starts (default 1024; Twisted's own is 50)",
    )
    p.add_argument(
        "--pattern",
        choices=("pairs", "interleaved", "fanout"),
        default="pairs",
        help="in send mode, who sends to whom: pairs (each sender to its own receiver, "
        "the default), interleaved (every sender cycles over every receiver of its "
        "load worker, so that consecutive frames go to different receivers) or fanout "
        "(Broadcasts to groups of --group-size members, measured in deliveries/s; "
        "--messages counts deliveries; with --server, that server must run "
        "--handler esf.bench._groups:blocks)",
    )
    p.add_argument(
        "--group-size",
        dest="group_sizes",
        type=_group_sizes,
        default=None,
        metavar="G[,G...]",
        help="with --pattern fanout: the members of each group, the sender among them; "
        "a list runs each (default 10)",
    )
    p.add_argument(
        "--groups",
        type=_positive(int),
        default=None,
        metavar="N",
        help="with --pattern fanout: the groups, each with one sender "
        f"(default: {FANOUT_MEMBERS} members in all, at least one group; "
        f"{FANOUT_MEMBERS_QUICK} with --quick)",
    )
    p.add_argument(
        "--window-bytes",
        type=_positive(int),
        default=2**20,
        help="bytes one sender may have in flight in send mode (default 1048576)",
    )
    p.add_argument(
        "--total-window-bytes",
        type=_positive(int),
        default=8 * 2**20,
        help="bytes all senders together may have in flight (default 8 MiB)",
    )
    p.add_argument(
        "--bare",
        dest="bare",
        action="store_true",
        default=True,
        help="also measure the two bare relays and print ratios (default)",
    )
    p.add_argument("--no-bare", dest="bare", action="store_false", help="measure esf only")
    p.add_argument(
        "--load-procs",
        type=_positive(int),
        default=None,
        metavar="N",
        help="load generator processes, each with its own reactor and a share of the load "
        f"(default {default_load_procs()}: one per core but the server's, at most 4)",
    )
    p.add_argument(
        "--websocket",
        dest="websocket",
        action="store_true",
        default=None,
        help="in send mode, also relay over WebSocket and give the ratio to TCP "
        "(default, unless --server)",
    )
    p.add_argument(
        "--no-websocket", dest="websocket", action="store_false", help="relay over TCP only"
    )
    p.add_argument(
        "--baseline-relay",
        dest="baseline_relay",
        metavar="PATH",
        help="the baseline relay, which writes once per destination per read "
        "(default: esf/bench/relays/coalescing.py, installed with esf)",
    )
    p.add_argument(
        "--bare-relay",
        dest="bare_relay",
        metavar="PATH",
        help="the write-per-frame relay, the second yardstick "
        "(default: esf/bench/relays/bare.py, installed with esf)",
    )
    p.add_argument(
        "--server-python",
        metavar="PATH",
        default=sys.executable,
        help="the Python that runs the servers this benchmark starts, esf and the bare relays "
        "(default: this one); it must be able to import Twisted, attrs and zope.interface, "
        "and imports esf from this checkout",
    )
    p.add_argument(
        "--check",
        action="store_true",
        default=None,
        help="decode and validate every frame at the receivers (slower load generator)",
    )
    p.add_argument(
        "--duration",
        type=_positive(float),
        default=None,
        help="cap in seconds on each phase; a capped phase reports what it got (default 120); "
        "in send and request, nothing arriving for 10 s (at most half of it) fails the phase",
    )
    p.add_argument(
        "--phase-timeout",
        type=_positive(float),
        default=None,
        metavar="SECONDS",
        help="how long one phase may take in all before the run is ended as hung, with status 1: "
        "a load worker or the coordinator stopped answering (default: --duration + "
        f"{PHASE_GRACE:g})",
    )
    p.add_argument(
        "--warmup",
        type=_fraction,
        default=0.25,
        metavar="FRACTION",
        help="in send and request, before the timed part, the same traffic at this fraction "
        "of its count, untimed, on every server alike: a long-lived server runs warm, and "
        "on PyPy the first messages pay for the JIT's compiling (default 0.25; 0 for none)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run (2 pairs, 2000 messages, 200 logons, 200 idle sessions, --check): a smoke test",
    )
    p.add_argument(
        "--repeat",
        type=_positive(int),
        default=1,
        help="run each measurement this many times, alternating esf and bare, and keep "
        "the best run of each (default 1)",
    )
    p.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH (- for stdout)"
    )
    p.add_argument("--password", default="bench", help="password sent at logon")
    p.add_argument("--system-token", default="", help="system token sent at logon")
    p.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar even when stderr is not a terminal",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--keep-logs", action="store_true", help="keep the started servers' logs")
    p.add_argument(
        "--startup-timeout", type=_positive(float), default=20.0, help=argparse.SUPPRESS
    )
    return p


def parse_options(argv: list[str] | None):
    parser = build_parser()
    opts = parser.parse_args(argv)
    quick = opts.quick
    defaults = {
        "pairs": [2] if quick else [1],
        "messages": 2000 if quick else 100_000,
        "requests": 500 if quick else 20_000,
        "logons": 200 if quick else 10_000,
        "idle": 200 if quick else 10_000,
        "hold": 1.0 if quick else 12.0,
        "duration": 20.0 if quick else 120.0,
        "check": bool(quick),
    }
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.phase_timeout is None:
        opts.phase_timeout = opts.duration + PHASE_GRACE
    if opts.progress is None:
        opts.progress = sys.stderr.isatty()
    opts.cluster = opts.mode == "cluster"
    opts.modes = MODES if opts.mode == "all" else () if opts.cluster else (opts.mode,)
    fanout = opts.pattern == "fanout"
    if fanout:
        # The fan-out is a send phase of its own ("fanout" in the report).
        if opts.mode not in ("all", "send"):
            parser.error("--pattern fanout measures sends: it goes with --mode send (or none)")
        opts.modes = ("fanout",)
        if opts.websocket:
            parser.error("--pattern fanout is measured over TCP only: not with --websocket")
        opts.websocket = False
        if opts.group_sizes is None:
            opts.group_sizes = [10]
        for size in opts.group_sizes:
            if size > MAX_GROUP_SIZE:
                parser.error(f"--group-size must be at most {MAX_GROUP_SIZE}, not {size}")
            count = fanout_groups(opts, size)
            # The load's tag is two characters: the longest IDs of the run.
            longest = max(
                len(group_name("xx", size, count - 1)),
                len(member_name("xx", size * count - 1)),
            )
            if longest > MAX_ID:
                parser.error(
                    f"{count} groups of {size} need IDs of {longest} characters, more than "
                    f"esf's {MAX_ID}: fewer --groups or a smaller --group-size"
                )
    elif opts.group_sizes is not None or opts.groups is not None:
        parser.error("--group-size and --groups go with --pattern fanout")
    if opts.cluster and opts.server is not None:
        parser.error("--mode cluster starts its own nodes; it takes no --server")
    if opts.websocket is None:
        opts.websocket = opts.server is None and not opts.cluster
    elif opts.websocket and opts.server is not None:
        parser.error("--websocket needs a server this run starts: not with --server")
    if opts.size < 0:
        parser.error("--size must be 0 or more")
    if opts.size + 40 > 1024 * 1024:
        parser.error("--size must fit one frame of the default maximum message size")
    opts.server_python_version = None
    if os.sep in opts.server_python:
        # A path: the servers start in a directory of their own.
        opts.server_python = os.path.abspath(opts.server_python)
    if opts.server is None:
        opts.server_python_version = interpreter_info(opts.server_python)
        if opts.server_python_version is None:
            parser.error(f"--server-python {opts.server_python!r} cannot be run")
    relays = (
        ("coalescing", "--baseline-relay", opts.baseline_relay),
        ("bare", "--bare-relay", opts.bare_relay),
    )
    for kind, option, given in relays:
        if given and find_relay(kind, given) is None:
            parser.error(f"{option} {given!r} is not a file")
    opts.relay_paths = {}
    if opts.bare:
        for kind, option, given in relays:
            path = find_relay(kind, given)
            if path is None:
                # Only a default path can be missing here (a given one was
                # checked above): an esf installed without its relays'
                # files (from a zip, say).
                print(
                    f"esf-bench: the {BASELINES[kind][1]} (esf/bench/relays/{BASELINES[kind][0]}) "
                    "is not here; "
                    f"give {option} PATH or --no-bare. Measuring esf only.",
                    file=sys.stderr,
                )
                opts.bare = False
                opts.relay_paths = {}
                break
            opts.relay_paths[kind] = str(path)
    if opts.load_procs is None:
        opts.load_procs = default_load_procs()
    most = max([opts.logons, opts.idle] + [2 * p for p in opts.pairs])
    if fanout:
        most = max(size * fanout_groups(opts, size) for size in opts.group_sizes)
    limit = raise_fd_limit(most + 256)
    if limit < most + 64:
        parser.error(
            f"the open-files limit ({limit}) is too low for {most} connections; raise ulimit -n"
        )
    return opts
