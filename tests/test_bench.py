"""
esf-bench and the two bare relays it compares with.

The smoke run here is what CI runs of the benchmark: it checks that the
harness works end to end and reports every figure, never how fast anything
is.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _real_parts import pypy_python
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from esf.bench import (
    _coordinator,
    _figures,
    _groups,
    _load,
    _modes,
    _options,
    _patterns,
    _procs,
    _progress,
    _wire,
)
from esf.bench.relays import bare as bare_relay
from esf.bench.relays import coalescing as coalescing_relay
from esf.interfaces import IGroupManager
from esf.wire import COMPILED

REPO = Path(__file__).resolve().parent.parent

MODES = ("send", "request", "logons", "idle")

#: Figures each mode must report, for esf and for the bare relay.
FIGURES = {
    "send": ["msgs_per_s", "elapsed_s", "received", "server_cpu_percent", "server_rss_bytes"],
    "request": ["rtt_p50_us", "rtt_p90_us", "rtt_p99_us", "rtt_max_us", "requests_per_s"],
    "logons": ["logons_per_s", "elapsed_s"],
    "idle": ["bytes_per_session", "sessions", "server_rss_bytes"],
}
RATIOS = {
    "send": "msgs_per_s",
    "request": "rtt_p50_us",
    "logons": "logons_per_s",
    "idle": "bytes_per_session",
}


def run_bench(
    *args: str, timeout: float = 120, env: dict | None = None, script: str | None = None
) -> subprocess.CompletedProcess:
    """
    C{python -m esf.bench ARGS} from the checkout (C{python -c SCRIPT ARGS}
    with C{script}), its output captured.
    """
    return subprocess.run(
        [sys.executable, *(["-c", script] if script else ["-m", "esf.bench"]), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_run(tmp_path):
    """
    C{esf-bench --quick} starts an esf server and the two bare relays, runs
    every mode against each with the load spread over two worker processes,
    and writes a JSON report with every figure, the load generator's CPU
    among them.
    """
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--load-procs", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| measurement | esf | baseline | esf/baseline | target |" in proc.stdout
    assert "| ↳ write-per-frame relay |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["machine"]["nproc"] >= 1
    # Which esf was measured: the one esf-bench comes from (here the checkout's).
    assert report["machine"]["esf"] == str(REPO / "esf")
    assert f"esf measured: {REPO / 'esf'}" in proc.stdout
    # And which loop its servers' frame decoders ran (on this interpreter).
    loop = "compiled" if COMPILED else "pure-Python"
    assert report["machine"]["decoder_loop"] == loop
    assert f"esf measured: {REPO / 'esf'} ({loop} decoder loop)" in proc.stdout
    assert report["options"]["baseline"] == "coalescing"
    assert report["options"]["load_procs"] == 2
    assert isinstance(report["warnings"], list)
    assert [row["mode"] for row in report["results"]] == list(MODES)
    for row in report["results"]:
        mode = row["mode"]
        for kind in ("esf", "coalescing", "bare"):
            # Two workers took part (the quick run has 2 pairs, 200 logons).
            assert row[kind]["load_procs"] == 2, (mode, kind)
            assert row[kind]["load_cpu_percent"] >= row[kind]["load_cpu_max_percent"] >= 0
            result = row[kind]
            assert "error" not in result, (mode, kind, result)
            for figure in FIGURES[mode]:
                value = result[figure]
                if figure in ("server_cpu_percent", "bytes_per_session"):
                    # Too small a run to be sure of a positive figure.
                    assert isinstance(value, (int, float)), (mode, kind, figure)
                else:
                    assert value > 0, (mode, kind, figure, value)
        if mode == "send":
            assert row["esf"]["received"] == row["esf"]["messages"]
            assert row["esf"]["checked"] is True
        if mode == "request":
            assert row["esf"]["answered"] == row["esf"]["requests"]
        if mode == "idle":
            # 200 sessions may grow the RSS by one page or by none: a ratio
            # of 0 is a true reading of so small a run.
            assert row["ratio"][RATIOS[mode]] >= 0 and row["ratio_bare"][RATIOS[mode]] >= 0
        else:
            assert row["ratio"][RATIOS[mode]] > 0
            assert row["ratio_bare"][RATIOS[mode]] > 0
        # ratio: esf against the coalescing relay; ratio_bare: against the
        # write-per-frame relay.
        figure = RATIOS[mode]
        if row["coalescing"][figure]:
            assert row["ratio"][figure] == row["esf"][figure] / row["coalescing"][figure]
    assert {t["figure"] for t in report["targets"]} == {
        "msgs_per_s",
        "rtt_p50_us",
        "logons_per_s",
        "bytes_per_session",
    }


def test_json_to_stdout(tmp_path):
    """
    C{--json -} prints the report as JSON instead of the table.
    """
    proc = run_bench(
        "--quick", "--mode", "request", "--requests", "50", "--no-bare", "--json", "-"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    (row,) = report["results"]
    assert row["esf"]["answered"] == 50
    assert "bare" not in row and "coalescing" not in row and row["ratio"] == {}


def test_interleaved_pattern_run():
    """
    C{--pattern interleaved}: every sender cycles over every receiver; each
    receiver gets and checks frames from every sender, and the same work is
    measured on the coalescing relay.
    """
    proc = run_bench(
        "--quick", "--mode", "send", "--pairs", "3", "--messages", "3000", "--load-procs", "1",
        "--pattern", "interleaved", "--no-websocket", "--json", "-",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["options"]["pattern"] == "interleaved"
    (row,) = report["results"]
    assert row["pattern"] == "interleaved"
    for kind in ("esf", "coalescing", "bare"):
        assert "error" not in row[kind], row[kind]
        assert row[kind]["received"] == 3000, (kind, row[kind])
    assert row["esf"]["checked"] is True


@pytest.mark.parametrize(
    ("mode", "pattern", "figure", "ratio", "bound", "met"),
    [
        ("send", "pairs", "msgs_per_s", 0.7, 0.6, True),
        ("send", "interleaved", "msgs_per_s", 0.7, 0.8, False),
        ("send", "interleaved", "msgs_per_s", 0.85, 0.8, True),
        ("fanout", "fanout", "deliveries_per_s", 0.79, 0.8, False),
        ("fanout", "fanout", "deliveries_per_s", 1.2, 0.8, True),
    ],
)
def test_each_pattern_is_held_to_its_target(mode, pattern, figure, ratio, bound, met):
    """
    The report's target column holds the project's targets: a send at
    least 0.6 of the coalescing relay's rate, interleaved Sends and the
    fan-out's deliveries at least 0.8.
    """
    row = {"mode": mode, "pattern": pattern, "pairs": 50, "groups": 2, "group_size": 10,
           "esf": {figure: 1.0}, "ratio": {figure: ratio}}  # fmt: skip
    (target,) = [t for t in _figures._targets(row) if t["figure"] == figure]
    assert target["target"] == f"esf/baseline >= {bound:.3g}"
    assert target["met"] is met


def _check_fanout_row(row: dict, size: int, groups: int, messages: int, kinds) -> None:
    """
    Every member of every group got each broadcast of its group's sender
    once, and the deliveries counted are the frames and the bytes the
    members received, on each kind of server.
    """
    broadcasts = -(-messages // (size - 1))
    assert row["mode"] == "fanout" and row["pattern"] == "fanout"
    assert (row["group_size"], row["groups"]) == (size, groups)
    for kind in kinds:
        result = row[kind]
        assert "error" not in result, (kind, result)
        assert result["broadcasts"] == broadcasts, (kind, result)
        assert result["deliveries"] == result["expected_deliveries"], (kind, result)
        assert result["deliveries"] == broadcasts * (size - 1), (kind, result)
        assert result["member_min"] == result["member_max"] == broadcasts // groups, (kind, result)
        assert result["share_min"] == result["share_max"] == broadcasts // groups
        assert result["received_bytes"] == result["deliveries"] * result["frame_bytes"]
        assert result["deliveries_per_s"] > 0 and result["capped"] is False
    assert row["ratio"]["deliveries_per_s"] == (
        row["esf"]["deliveries_per_s"] / row["coalescing"]["deliveries_per_s"]
    )
    assert row["ratio_bare"]["deliveries_per_s"] > 0


def test_fanout_pattern_run():
    """
    C{--pattern fanout}: the first member of each group broadcasts to its
    group (on esf through the benchmark's group manager, on the relays
    through the groups they learnt at logon); every other member checks
    and counts each copy, on esf and on both relays, with the groups spread
    over two load workers.
    """
    proc = run_bench(
        "--pattern", "fanout", "--group-size", "4", "--groups", "2", "--messages", "1200",
        "--load-procs", "2", "--check", "--no-progress", "--json", "-",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["options"]["pattern"] == "fanout"
    assert report["options"]["fanout_server_args"][:2] == ["--handler", "esf.bench._groups:blocks"]
    (row,) = report["results"]
    _check_fanout_row(row, 4, 2, 1200, ("esf", "coalescing", "bare"))
    assert row["esf"]["checked"] is True and row["esf"]["load_procs"] == 2


def test_fanout_run_on_pypy():
    """
    The fan-out with the servers on PyPy, whose environment holds only
    esf's own requirements: esf's server loads the group manager, and each
    member gets each broadcast once.
    """
    python = pypy_python()
    proc = run_bench(
        "--pattern", "fanout", "--group-size", "5", "--groups", "2", "--messages", "800",
        "--load-procs", "1", "--check", "--no-progress", "--server-python", python,
        "--json", "-", timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["machine"]["server_python"].startswith("PyPy ")
    (row,) = report["results"]
    _check_fanout_row(row, 5, 2, 800, ("esf", "coalescing", "bare"))


def test_the_group_manager_imports_no_harness():
    """
    A server that loads the group manager imports C{esf.bench._groups}
    and none of the harness (its load, its processes, its report).
    """
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, esf.bench._groups\n"
         "print(sorted(m for m in sys.modules if m.startswith('esf.bench')))"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["['esf.bench',", "'esf.bench._groups']"]
    # The package's names are still there, imported when first used.
    import esf.bench

    assert esf.bench.free_port is _procs.free_port
    with pytest.raises(AttributeError):
        esf.bench.nothing  # noqa: B018 -- the attribute access is the test


def test_block_groups_answer_from_names():
    """
    Groups in blocks: members C{k*G} to C{k*G + G - 1} of a run form group
    C{k} of size C{G}; a member may broadcast to its own group only; IDs of
    neither form are in no group.
    """
    groups = _groups.blocks
    assert IGroupManager.providedBy(groups)
    assert _groups.group_name("ab", 3, 1) == "gab.3.1"
    assert _groups.member_name("ab", 4) == "uab.4"
    assert groups.get_members("gab.3.0") == ("uab.0", "uab.1", "uab.2")
    assert groups.get_members("gab.3.1") == ("uab.3", "uab.4", "uab.5")
    assert groups.get_members("gab.1000.1") == tuple(f"uab.{n}" for n in range(1000, 2000))
    for user, allowed in [("uab.3", True), ("uab.5", True), ("uab.2", False), ("uab.6", False),
                          ("uxy.4", False), ("ab.4", False), ("uab.x", False), ("uab.+4", False),
                          ("*", False), ("", False)]:  # fmt: skip
        assert groups.can_broadcast(user, "gab.3.1") is allowed, user
    for bad in ["", "*", "gab", "gab.3", "gab.0.1", "gab.3.1.2", "gab.x.1", "gab. 3.1",
                "hab.3.1", f"gab.{_groups.MAX_GROUP_SIZE + 1}.0"]:  # fmt: skip
        assert groups.get_members(bad) == (), bad
        assert groups.can_broadcast("uab.0", bad) is False, bad


def test_a_relative_server_python_is_found_from_the_servers_directory(monkeypatch):
    """
    C{--server-python} given as a path relative to where esf-bench runs
    still names that Python once the servers start in a directory of
    their own.
    """
    monkeypatch.chdir(Path(sys.executable).parent)
    relative = os.path.join(".", Path(sys.executable).name)
    opts = _options.parse_options(["--server-python", relative, "--mode", "send"])
    assert opts.server_python == os.path.join(
        str(Path(sys.executable).parent), Path(sys.executable).name
    )
    assert opts.server_python_version is not None
    assert _options.parse_options(["--mode", "send"]).server_python == sys.executable


def test_the_server_pythons_description(monkeypatch):
    """
    The report names the Python that ran the servers: on CPython its
    implementation and version; on PyPy the size of its GC's nursery too,
    as the servers' environment sets it (it moves a relay's figures there).
    """
    import platform

    assert _procs.interpreter_info(sys.executable) == f"CPython {platform.python_version()}"
    assert _procs.interpreter_info("/nonexistent/python") is None
    python = pypy_python()
    monkeypatch.delenv("PYPY_GC_NURSERY", raising=False)
    default = subprocess.run(
        [python, "-c", "import gc; print(gc.get_stats().nursery_size)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert _procs.interpreter_info(python) == f"PyPy {_pypy_version(python)}, GC nursery {default}"
    monkeypatch.setenv("PYPY_GC_NURSERY", "24MB")
    assert _procs.interpreter_info(python).endswith(", GC nursery 24.0MB")


def _pypy_version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_fanout_options():
    opts = _options.parse_options(["--pattern", "fanout", "--group-size", "10,1000"])
    assert opts.modes == ("fanout",) and opts.group_sizes == [10, 1000]
    assert opts.websocket is False
    assert [_options.fanout_groups(opts, g) for g in opts.group_sizes] == [100, 1]
    opts = _options.parse_options(["--pattern", "fanout", "--mode", "send", "--groups", "3"])
    assert opts.group_sizes == [10] and _options.fanout_groups(opts, 10) == 3
    opts = _options.parse_options(["--pattern", "fanout", "--quick"])
    assert _options.fanout_groups(opts, 10) == 10 and opts.check is True
    for argv in (
        ["--pattern", "fanout", "--group-size", "1"],  # nobody to deliver to
        ["--pattern", "fanout", "--group-size", "ten"],
        ["--pattern", "fanout", "--mode", "request"],
        ["--pattern", "fanout", "--websocket"],
        ["--group-size", "10"],  # without --pattern fanout
        ["--pattern", "interleaved", "--groups", "2"],
        ["--pattern", "fanout", "--group-size", "1000", "--groups", "101"],  # IDs too long
        ["--pattern", "fanout", "--group-size", str(_groups.MAX_GROUP_SIZE + 1)],
    ):
        with pytest.raises(SystemExit) as e:
            _options.parse_options(argv)
        assert e.value.code == 2, argv


def test_fanout_parts_keep_each_group_in_one_worker():
    opts = argparse.Namespace(load_procs=2, messages=1000, logon_window=500, groups=3, quick=False)
    load = _coordinator.LoadGenerator(None, opts, None)
    parts = load._parts("fanout", 11)
    assert [p["groups"] for p in parts] == [[0, 1], [2]]
    # 1000 deliveries: 100 broadcasts to groups of 11, spread over the groups.
    assert [p["shares"] for p in parts] == [[34, 33], [33]]
    assert {(p["group_size"], p["all_groups"]) for p in parts} == {(11, 3)}


def test_a_fanout_group_waits_for_its_slowest_member():
    """
    A group's sender writes at most a window of broadcasts beyond what its
    slowest member got, more once every member is within half a window;
    the group is done when every member has its share, and the deliveries
    are the copies counted.
    """
    sender = _Named("s")
    members = [_Named(f"m{i}") for i in range(3)]
    totals = {"count": 0, "pairs_done": 0}
    done = defer.Deferred()
    group = _patterns._Group(sender, members, 10, totals, done, 1, b"b;", 4, 2)
    group.begin()
    assert sender.transport.value() == b"b;" * 4
    members[0].on_data(b"b;" * 4)
    members[1].on_data(b"b;" * 4)
    assert len(sender.transport.value()) == 8  # the third member has nothing yet
    members[2].on_data(b"b;")  # 3 behind: more than half a window
    assert len(sender.transport.value()) == 8
    members[2].on_data(b"b;b")  # 2 behind, half a frame buffered
    assert sender.transport.value() == b"b;" * 6  # the window again: 2 more
    for member in members:
        member.on_data(b";" + b"b;" * 3 if member is members[2] else b"b;" * 2)
    assert group.floor == 6 and len(sender.transport.value()) == 20  # 10: the share
    assert not done.called
    for member in members:
        member.on_data(b"b;" * 4)
    assert done.called and totals == {"count": 30, "pairs_done": 1}
    assert group.got == [10, 10, 10] and group.bytes == 60


class _Named:
    def __init__(self, name):
        self.name = name
        self.transport = StringTransport()
        self.on_data = None


class _Letters:
    """A dialect whose frames say who sends to whom, all one size."""

    def message(self, src, dst):
        return f"{src}>{dst};".encode()

    def checker(self, srcs, dst):
        return None


def test_interleaved_senders_cycle_over_every_receiver():
    ring = _patterns._Ring(_Letters(), window=4, size=6, check=False)
    totals = {"count": 0, "pairs_done": 0}
    done = defer.Deferred()
    pairs = [(_Named(f"s{i}"), _Named(f"r{i}")) for i in range(3)]
    states = [ring.make_pair(s, r, 4, totals, done, 3) for s, r in pairs]
    for st in states:
        st.begin()
    # Each sender starts at its own receiver and goes round; the window
    # (4 per sender, 12 in all) is shared.
    assert pairs[0][0].transport.value() == b"s0>r0;s0>r1;s0>r2;s0>r0;"
    assert pairs[1][0].transport.value() == b"s1>r1;s1>r2;s1>r0;s1>r1;"
    assert pairs[2][0].transport.value() == b"s2>r2;s2>r0;s2>r1;s2>r2;"
    for _sender, receiver in pairs:
        receiver.on_data(b"x" * 6 * 4)  # what each receiver got
    assert totals["count"] == 12 and done.called


def test_bad_options():
    with pytest.raises(SystemExit) as e:
        _options.parse_options(["--pairs", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        _options.parse_options(["--server", "nowhere"])
    for option in ("--baseline-relay", "--bare-relay"):
        with pytest.raises(SystemExit) as e:
            _options.parse_options([option, "/nonexistent/relay.py"])
        assert e.value.code == 2


def test_missing_relay_scripts(monkeypatch, capsys):
    """
    Without the relay scripts of the checkout, esf is measured alone: one
    warning, and no path stored for either relay.
    """
    monkeypatch.setattr(_options, "find_relay", lambda kind, given: None)
    opts = _options.parse_options(["--quick"])
    assert opts.bare is False and opts.relay_paths == {}
    assert capsys.readouterr().err.count("Measuring esf only") == 1


def test_a_run_that_fails_before_its_first_wait_ends(tmp_path):
    """
    Cluster mode without redis-server fails before the reactor has run
    anything: the run still ends, with the reason on one line and status 1
    (it used to leave the reactor running for ever).
    """
    proc = run_bench(
        "--mode", "cluster", "--no-progress", env=dict(os.environ, PATH=str(tmp_path)), timeout=60
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        proc.stderr.strip()
        == "esf-bench: cluster mode needs redis-server (Debian: apt-get install redis-server)"
    )


def test_percentile():
    values = sorted(float(v) for v in range(1, 101))
    assert _figures._percentile(values, 50) == 50
    assert _figures._percentile(values, 99) == 99
    assert _figures._percentile(values, 100) == 100
    assert _figures._percentile([7.0], 90) == 7.0


def test_frames_are_the_same_size():
    """
    The bare relay's frames stand for esf frames of the same size, so that
    both servers move the same bytes.
    """
    esf = _wire.EsfDialect(100, "pw", "")
    bare = _wire.BareDialect(esf.frame_size)
    assert esf.frame_size == 36 + 4 + 100
    for dialect in (esf, bare):
        assert len(dialect.message("s1", "r1")) == esf.frame_size
        assert len(dialect.request("s1", "r1")) == esf.frame_size
        assert len(dialect.response("r1", "s1")) == esf.frame_size


RELAYS = [bare_relay, coalescing_relay]


class _Transport(StringTransport):
    """
    A transport that also counts the calls that write.
    """

    def __init__(self):
        super().__init__()
        self.writes = 0
        self.aborted = False

    def write(self, data):
        self.writes += 1
        super().write(data)

    def writeSequence(self, data):
        self.writes += 1
        super().writeSequence(data)

    def abortConnection(self):
        self.aborted = True


def _frame(dest: bytes, body: bytes = b"x" * 50) -> bytes:
    payload = bytes([len(dest)]) + dest + body
    return len(payload).to_bytes(4, "little") + payload


def _relay(module, names=(b"alice", b"bob"), **kwargs):
    factory = module.RelayFactory(**kwargs)
    ends = []
    for name in names:
        proto = factory.buildProtocol(None)
        transport = _Transport()
        proto.makeConnection(transport)
        proto.dataReceived(len(name).to_bytes(4, "little") + name)
        assert transport.value() == b"\x00\x00\x00\x00"
        transport.clear()
        transport.writes = 0
        ends.append((proto, transport))
    return factory, ends


@pytest.mark.parametrize("module", RELAYS, ids=lambda m: m.__name__)
def test_relay_forwards_partial_frames(module):
    """
    Both relays reassemble frames split anywhere and forward each one
    unchanged to the named connection.
    """
    factory, [(alice, _), (_, bob_out)] = _relay(module)
    stream = _frame(b"bob") * 3
    for i in range(len(stream)):
        alice.dataReceived(stream[i : i + 1])
    assert bob_out.value() == stream
    bob_out.clear()
    alice.dataReceived(stream[:70])
    alice.dataReceived(stream[70:])
    assert bob_out.value() == stream
    # Unknown destinations are counted and dropped.
    alice.dataReceived(_frame(b"eve", b"y"))
    assert factory.dropped == 1


@pytest.mark.parametrize("module", RELAYS, ids=lambda m: m.__name__)
def test_relay_forgets_closed_connections(module):
    factory, [(_alice, _), (bob, _)] = _relay(module)
    bob.connectionLost(None)
    assert b"bob" not in factory.routes and b"alice" in factory.routes


@pytest.mark.parametrize("module", RELAYS, ids=lambda m: m.__name__)
def test_relay_name_and_frames_in_one_read(module):
    factory = module.RelayFactory()
    bob = factory.buildProtocol(None)
    bob_out = _Transport()
    bob.makeConnection(bob_out)
    bob.dataReceived(b"\x03\x00\x00\x00bob")
    alice = factory.buildProtocol(None)
    alice_out = _Transport()
    alice.makeConnection(alice_out)
    alice.dataReceived(b"\x05\x00\x00\x00alice" + _frame(b"bob") + _frame(b"alice"))
    assert bob_out.value() == b"\x00\x00\x00\x00" + _frame(b"bob")
    assert alice_out.value() == b"\x00\x00\x00\x00" + _frame(b"alice")


@pytest.mark.parametrize("cache_header", [True, False])
def test_coalescing_relay_writes_once_per_destination_per_read(cache_header):
    """
    Frames for several destinations in one read, interleaved, of different
    lengths: each destination gets its frames in order, in one write.
    """
    factory, [(alice, alice_out), (_bob, bob_out), (_carol, carol_out)] = _relay(
        coalescing_relay, (b"alice", b"bob", b"carol"), cache_header=cache_header
    )
    to_bob = [_frame(b"bob", bytes([i]) * (10 + i)) for i in range(5)]
    to_carol = [_frame(b"carol", bytes([i]) * 20) for i in range(3)]
    read = (
        to_bob[0]
        + to_bob[1]
        + to_carol[0]
        + to_bob[2]
        + to_carol[1]
        + to_carol[2]
        + to_bob[3]
        + to_bob[4]
    )
    alice.dataReceived(read)
    assert bob_out.value() == b"".join(to_bob) and bob_out.writes == 1
    assert carol_out.value() == b"".join(to_carol) and carol_out.writes == 1
    assert alice_out.writes == 0
    # A run of identical frames in one read: one write of that slice.
    bob_out.clear()
    bob_out.writes = 0
    alice.dataReceived(to_bob[0] * 100 + to_bob[0][:7])
    assert bob_out.value() == to_bob[0] * 100 and bob_out.writes == 1
    alice.dataReceived(to_bob[0][7:])
    assert bob_out.value() == to_bob[0] * 101 and bob_out.writes == 2
    # A frame for an unknown name between two runs is dropped and counted.
    bob_out.clear()
    alice.dataReceived(to_bob[1] + _frame(b"eve") + to_bob[1])
    assert bob_out.value() == to_bob[1] * 2
    assert factory.dropped == 1


@pytest.mark.parametrize(
    "bad",
    [
        (coalescing_relay.MAX_FRAME + 1).to_bytes(4, "little"),  # too long
        b"\x00\x00\x00\x00",  # no destination
        b"\x03\x00\x00\x00\x09bo",  # a destination longer than the frame
        b"\x04\x00\x00\x00\x09bob",  # the same, the name ending in the next frame
    ],
    ids=["too-long", "empty", "name-past-the-end", "name-into-the-next-frame"],
)
@pytest.mark.parametrize("module", RELAYS, ids=lambda m: m.__name__)
def test_relay_aborts_on_a_bad_frame(module, bad):
    """
    A frame that breaks the framing aborts the connection; the frames before
    it in the same read are forwarded.  Both relays make these checks.
    """
    _factory, [(alice, alice_out), (_, bob_out)] = _relay(module)
    good = _frame(b"bob")
    alice.dataReceived(good * 2 + bad + good)
    assert alice_out.aborted
    assert bob_out.value() == good * 2


def _members(module, members):
    """
    A relay of C{module} with a connection per C{(name, group)}, each of
    which has sent its name frame and been welcomed.
    """
    factory = module.RelayFactory()
    ends = {}
    for name, group in members:
        proto = factory.buildProtocol(None)
        transport = _Transport()
        proto.makeConnection(transport)
        hello = name + (b"\x00" + group if group else b"")
        proto.dataReceived(len(hello).to_bytes(4, "little") + hello)
        assert transport.value() == b"\x00\x00\x00\x00"
        transport.clear()
        transport.writes = 0
        ends[name] = (proto, transport)
    return factory, ends


@pytest.mark.parametrize("module", RELAYS, ids=lambda m: m.__name__)
def test_relay_broadcasts_to_the_other_members_of_a_group(module):
    """
    A frame addressed to a group (named after a zero byte in its members'
    name frames) goes, unchanged, to every member but its sender; a frame
    to a member's name still goes to that member alone; a member that
    leaves is written to no more, and an empty group is forgotten.
    """
    factory, ends = _members(
        module,
        [(b"alice", b"g"), (b"bob", b"g"), (b"carol", b"g"), (b"dave", b"h"), (b"eve", b"")],
    )
    assert set(factory.routes) == {b"alice", b"bob", b"carol", b"dave", b"eve"}
    alice, _ = ends[b"alice"]
    out = {name: transport for name, (_, transport) in ends.items()}
    to_g = [_frame(b"g", bytes([i]) * 20) for i in range(3)]
    alice.dataReceived(to_g[0] + to_g[1] + _frame(b"bob") + to_g[2])
    assert out[b"bob"].value() == to_g[0] + to_g[1] + _frame(b"bob") + to_g[2]
    assert out[b"carol"].value() == to_g[0] + to_g[1] + to_g[2]
    assert out[b"alice"].value() == out[b"dave"].value() == out[b"eve"].value() == b""
    # eve, in no group, broadcasts to g: all its members get it.
    ends[b"eve"][0].dataReceived(to_g[0])
    assert out[b"alice"].value() == to_g[0]
    assert out[b"carol"].value() == b"".join(to_g) + to_g[0]
    ends[b"carol"][0].connectionLost(None)
    for transport in out.values():
        transport.clear()
    alice.dataReceived(to_g[1])
    assert out[b"bob"].value() == to_g[1] and out[b"carol"].value() == b""
    ends[b"dave"][0].connectionLost(None)
    assert b"h" not in factory.groups and len(factory.groups[b"g"]) == 2
    alice.dataReceived(_frame(b"h"))
    assert factory.dropped == 1


def test_relays_write_broadcasts_as_they_write_sends():
    """
    The write-per-frame relay writes each copy of each broadcast by
    itself; the coalescing relay gathers each member's copies of a read,
    runs of broadcasts and frames to it alike, into one write.
    """
    members = [(b"alice", b"g"), (b"bob", b"g"), (b"carol", b"g")]
    read = _frame(b"g") * 5 + _frame(b"bob") + _frame(b"g") * 2
    writes = {}
    for module in RELAYS:
        _factory, ends = _members(module, members)
        ends[b"alice"][0].dataReceived(read)
        writes[module] = {name: transport.writes for name, (_, transport) in ends.items()}
        assert ends[b"bob"][1].value() == read
        assert ends[b"carol"][1].value() == _frame(b"g") * 7
    assert writes[bare_relay] == {b"alice": 0, b"bob": 8, b"carol": 7}
    assert writes[coalescing_relay] == {b"alice": 0, b"bob": 1, b"carol": 1}


def test_parts_spread_the_load_over_the_workers():
    """
    Each load worker gets a share of the pairs (with their messages) or of
    the connections; no worker is left with nothing to do.
    """
    opts = argparse.Namespace(
        load_procs=3, messages=1000, requests=10, logons=7, idle=2, logon_window=500
    )
    load = _coordinator.LoadGenerator(None, opts, None)
    parts = load._parts("send", 5)
    assert [p["pairs"] for p in parts] == [[0, 1], [2, 3], [4]]
    assert sum(sum(p["shares"]) for p in parts) == 1000
    assert {p["all_pairs"] for p in parts} == {5}
    assert [p["pairs"] for p in load._parts("request", 1)] == [[0]]
    assert [p["names"] for p in load._parts("logons", None)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [p["names"] for p in load._parts("idle", None)] == [[0], [1]]
    assert all(p["window"] == 167 for p in load._parts("logons", None))


def test_load_bound_warning():
    """
    The report warns when the load generator, not the server, set the pace.
    """
    busy_load = {
        "server_cpu_percent": 60.0,
        "load_cpu_percent": 97.0,
        "load_cpu_max_percent": 97.0,
        "load_procs": 1,
    }
    assert "97% of a core" in _figures.load_bound(busy_load, 2, "logons")
    crowded = {
        "server_cpu_percent": 70.0,
        "load_cpu_percent": 120.0,
        "load_cpu_max_percent": 60.0,
        "load_procs": 2,
    }
    assert "did not have a core" in _figures.load_bound(crowded, 2, "logons")
    idle_server = {"server_cpu_percent": 50.0, "load_cpu_percent": 20.0, "load_cpu_max_percent": 20.0,
                   "load_procs": 1, "elapsed_s": 2.0}  # fmt: skip
    assert "window" in _figures.load_bound(idle_server, 2, "send")
    assert _figures.load_bound(idle_server, 2, "request") is None
    busy_server = dict(busy_load, server_cpu_percent=99.0)
    assert _figures.load_bound(busy_server, 2, "logons") is None
    assert (
        _figures.load_bound({"load_cpu_max_percent": 99.0}, 2, "send") is None
    )  # no server CPU (--server)
    shared = dict(idle_server, machine_cpu_percent=190.0)
    assert "other processes used 120%" in _figures.load_bound(shared, 2, "send")
    # A phase too short for CPU times counted in 10 ms ticks: not judged.
    assert _figures.load_bound(dict(busy_load, elapsed_s=0.08), 2, "logons") is None
    assert _figures.load_bound(dict(shared, elapsed_s=0.3), 2, "send") is None


def test_no_load_bound_warning_in_idle_mode():
    """
    Idle mode generates no load (it holds sessions and reads the server's
    memory): a busy worker there limits nothing.
    """
    busy_load = {
        "server_cpu_percent": 5.0,
        "load_cpu_percent": 97.0,
        "load_cpu_max_percent": 97.0,
        "load_procs": 1,
    }
    assert _figures.load_bound(busy_load, 2, "logons") is not None
    assert _figures.load_bound(busy_load, 2, "idle") is None


#: /proc/stat: user nice system idle iowait irq softirq steal guest guest_nice.
PROC_STAT = """\
cpu  600 60 330 3000 60 15 15 300 50 0
cpu0 100 10 50 1000 20 5 5 300 50 0
cpu1 200 20 80 1000 20 5 5 0 0 0
cpu2 300 30 200 1000 20 5 5 0 0 0
intr 12345 0 0
ctxt 6789
"""


def test_cpu_times_count_the_usable_cores_and_not_steal():
    """
    Busy is user + nice + system + irq + softirq (guest time is already in
    user and nice); steal, time the hypervisor gave other guests, is
    counted apart; only the cores asked for count.
    """
    ticks = _procs._TICKS
    assert _procs.cpu_times(PROC_STAT, {0}) == (170 / ticks, 300 / ticks)
    assert _procs.cpu_times(PROC_STAT, {0, 2}) == ((170 + 540) / ticks, 300 / ticks)
    assert _procs.cpu_times(PROC_STAT, {0, 1, 2}) == ((170 + 310 + 540) / ticks, 300 / ticks)
    assert _procs.cpu_times(PROC_STAT, {0, 7}) is None  # no line for cpu7
    assert _procs.cpu_times("cpu0 1 2 3 4\n", {0}) == (6 / ticks, 0.0)  # an old kernel's columns


def test_steal_time_is_not_busy_time_of_other_processes():
    """
    A phase in which the server and the load used all the busy time and the
    hypervisor took more: the warning names the steal, not "other
    processes" (counting steal as busy, it used to).
    """
    start = {
        "t": 10.0,
        "server_cpu": 1.0,
        "load_cpu": [1.0],
        "machine_cpu": (50.0, 7.0),
        "memory": {},
    }
    end = {
        "t": 12.0,
        "server_cpu": 2.2,
        "load_cpu": [1.8],
        "machine_cpu": (52.0, 8.2),
        "memory": {},
    }
    usage = _figures._usage(start, end)
    assert usage["server_cpu_percent"] == pytest.approx(60.0)
    assert usage["load_cpu_percent"] == pytest.approx(40.0)
    assert usage["machine_cpu_percent"] == pytest.approx(100.0)
    assert usage["machine_steal_percent"] == pytest.approx(60.0)
    why = _figures.load_bound(usage, 2, "request")
    assert why.startswith(
        "the hypervisor took 60% of the 2 core(s) this run may use (steal time)"
    ), why


def test_the_cores_are_those_of_the_affinity(monkeypatch):
    """
    A run pinned to 2 cores of a 64-core machine (taskset, a cpuset): the
    load workers, the report and the warnings count 2.
    """
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert _procs.usable_cpus() == {3, 5}
    assert _procs.default_load_procs() == 1
    machine = _procs.machine_info()
    assert (machine["nproc"], machine["cpu_count"]) == (2, 64)
    crowded = {
        "server_cpu_percent": 70.0,
        "load_cpu_percent": 120.0,
        "load_cpu_max_percent": 60.0,
        "load_procs": 2,
    }
    assert "2 core(s) this run may use were busy" in _figures.load_bound(
        crowded, len(_procs.usable_cpus()), "send"
    )


def test_quick_run_on_pypy(tmp_path):
    """
    C{esf-bench --quick} with the servers (esf from this checkout, and both
    relays) on PyPy: every mode runs, every figure is there.
    """
    python = pypy_python()
    out = tmp_path / "pypy.json"
    proc = run_bench("--quick", "--server-python", python, "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["machine"]["server_python"].startswith("PyPy ")
    assert [row["mode"] for row in report["results"]] == list(MODES)
    for row in report["results"]:
        for kind in ("esf", "coalescing", "bare"):
            assert "error" not in row[kind], (row["mode"], kind, row[kind])
            assert row[kind][FIGURES[row["mode"]][0]] > 0 or row["mode"] == "idle"
    [send] = [row for row in report["results"] if row["mode"] == "send"]
    assert send["esf"]["received"] == send["esf"]["messages"] and send["esf"]["checked"] is True
    assert send["ws"]["received"] == send["ws"]["messages"]


def test_relay_profile_runs():
    """
    benchmarks/relay_profile.py, the in-process measure of the relay's CPU
    per Send, still runs against the current engine (a few frames).
    """
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "relay_profile.py"
    spec = importlib.util.spec_from_file_location("relay_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for receivers in (1, 3):
        engine, sender, outs, data = module.setup(30, receivers)
        sender.dataReceived(data)
        assert sum(len(out.value()) for out in outs) == len(data)  # every frame relayed
        engine.stop()
    assert module.measure(20, 2, reads=5, rounds=1) > 0


# -- the coordinator, with fake workers on a fake clock ------------------------


class _FakeProcess:
    """
    The coordinator's view of a load worker process: what it was sent, and
    the signals.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.sent: list[dict] = []
        self.signals: list[str] = []
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.sent += [json.loads(line) for line in data.splitlines()]

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)


class _FakeServer:
    """
    A server the coordinator reads at each sync point (C{cpu}: a function).
    """

    host, port, ws_port = "127.0.0.1", 1, None

    def __init__(self, cpu=lambda: 1.0):
        self.cpu = cpu

    def cpu_seconds(self):
        return self.cpu()

    def memory(self) -> dict:
        return {"VmRSS": 1 << 20}


def _fake_coordinator(workers: int = 2, phase_timeout: float = 50.0):
    """
    A L{_coordinator.LoadGenerator} on a L{task.Clock} with fake worker processes.
    """
    clock = task.Clock()
    opts = argparse.Namespace(
        load_procs=workers, logons=2 * workers, idle=2 * workers, logon_window=10,
        messages=100, requests=10, phase_timeout=phase_timeout, progress=False,
    )  # fmt: skip
    load = _coordinator.LoadGenerator(clock, opts, _progress.Progress(clock, False))
    for i in range(workers):
        worker = _coordinator._Worker(load, i)
        worker.makeConnection(_FakeProcess(1000 + i))
        load.workers.append(worker)
    return clock, load


def _report(worker, message: dict) -> None:
    worker.outReceived(json.dumps(message).encode() + b"\n")


def _phase(load, server, mode="logons"):
    outcome = []
    d = defer.Deferred.fromCoroutine(load.measure(mode, server, "esf", None))
    d.addBoth(outcome.append)
    return outcome


def _aborted(outcome) -> str:
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(_coordinator.RunAborted), failure
    return failure.getErrorMessage()


def test_coordinator_releases_each_sync_point_and_merges():
    """
    With every worker at a point the coordinator reads the server and lets
    them go on; their results are merged.  (What the tests below break.)
    """
    clock, load = _fake_coordinator()
    outcome = _phase(load, _FakeServer())
    for point in ("start", "measured"):
        for w in load.workers:
            _report(w, {"at": point})
        assert [w.transport.sent[-1] for w in load.workers] == [{"go": point}] * 2
    for i, w in enumerate(load.workers):
        _report(w, {"result": {"logged_on": 2, "t0": 10.0 + i, "t1": 12.0 + i}})
    [result] = outcome
    assert result["logons_per_s"] == 4 / 3.0
    assert clock.getDelayedCalls() == []  # the phase's deadline is cancelled


def test_a_failure_at_a_sync_point_ends_the_phase_at_once():
    """
    The coordinator's readings at a sync point fail: the phase ends with
    L{_coordinator.RunAborted} naming the point and the error, no worker is let go
    (it used to wait for ever).
    """
    clock, load = _fake_coordinator()

    def broken():
        raise RuntimeError("no /proc")

    outcome = _phase(load, _FakeServer(broken))
    for w in load.workers:
        _report(w, {"at": "start"})
    message = _aborted(outcome)
    assert "the coordinator failed at sync point 'start': RuntimeError: no /proc" in message
    assert all({"go": "start"} not in w.transport.sent for w in load.workers)
    assert clock.getDelayedCalls() == []


def test_an_aborted_run_kills_its_workers():
    """
    At the end of a run the workers are told to go (end of input); after an
    abort, when one may not be reading, they are killed.
    """
    _clock, load = _fake_coordinator()
    load.workers[0].gone = True
    load.stop()
    assert [(w.transport.stdin_closed, w.transport.signals) for w in load.workers] == [
        (False, []),
        (True, []),
    ]
    _clock, load = _fake_coordinator()
    load.stop(kill=True)
    assert [(w.transport.stdin_closed, w.transport.signals) for w in load.workers] == [
        (False, ["KILL"])
    ] * 2


def test_the_coordinator_stuck_at_a_sync_point_ends_the_phase_at_its_deadline():
    clock, load = _fake_coordinator(phase_timeout=30.0)
    outcome = _phase(load, _FakeServer())

    async def stuck(point):  # readings that never end
        await defer.Deferred()

    load._action = stuck
    for w in load.workers:
        _report(w, {"at": "start"})
    clock.advance(30)
    assert _aborted(outcome) == (
        "esf: logons did not end within 30 s (--phase-timeout): the coordinator did not release "
        "load worker 0 (pid 1000) (waiting at 'start'), load worker 1 (pid 1001) (waiting at 'start')"
    )


def test_a_worker_that_stops_answering_ends_the_phase_at_its_deadline():
    clock, load = _fake_coordinator(phase_timeout=50.0)
    outcome = _phase(load, _FakeServer())
    first, _second = load.workers
    for w in load.workers:
        _report(w, {"at": "start"})
    _report(first, {"at": "measured"})  # the second never answers again
    clock.advance(49.9)
    assert outcome == []
    clock.advance(0.2)
    message = _aborted(outcome)
    assert message == (
        "esf: logons did not end within 50 s (--phase-timeout): "
        "no answer from load worker 1 (pid 1001) (released from 'start')"
    )


@pytest.mark.parametrize(
    "line, why",
    [
        (b"Traceback (most recent call last):\n", "a line that is not a message"),
        (b"[1, 2]\n", "a line that is not a message"),
        (b'{"what": 1}\n', "an unknown message"),
    ],
)
def test_a_worker_that_sends_nonsense_ends_the_phase(line, why):
    _clock, load = _fake_coordinator()
    outcome = _phase(load, _FakeServer())
    load.workers[1].outReceived(line)
    assert f"load worker 1 (pid 1001) sent {why}" in _aborted(outcome)
    # And every later phase, at once.
    assert "load worker 1" in _aborted(_phase(load, _FakeServer()))


def test_a_worker_that_exits_during_a_phase_ends_it():
    _clock, load = _fake_coordinator()
    outcome = _phase(load, _FakeServer())
    _report(load.workers[0], {"at": "start"})
    load.workers[1].processEnded(Failure(ProcessTerminated(signal=9)))
    assert "load worker 1 (pid 1001) exited during a phase" in _aborted(outcome)


#: Runs esf-bench with the first load worker stopped (SIGSTOP) as it is let
#: go from the 'start' sync point: a worker that stops answering mid-phase.
_STOP_A_WORKER = """
import os, signal, sys
from esf import bench
from esf.bench import _coordinator

send = _coordinator._Worker.send

def stop_first(worker, message):
    send(worker, message)
    if message == {"go": "start"} and worker.index == 0:
        print("stopped", worker.pid, file=sys.stderr, flush=True)
        os.kill(worker.pid, signal.SIGSTOP)

_coordinator._Worker.send = stop_first
sys.exit(bench.main(sys.argv[1:]))
"""


def test_a_worker_that_stops_answering_ends_the_run(tmp_path):
    """
    A load worker stops in the middle of a phase: the run ends at
    C{--phase-timeout} with status 1 and the reason, and the stopped worker
    is killed, not left behind.
    """
    started = time.monotonic()
    proc = run_bench(
        "--mode", "logons", "--logons", "20", "--no-bare", "--load-procs", "2", "--no-progress",
        "--phase-timeout", "3", script=_STOP_A_WORKER, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    pid = int(re.search(r"^stopped (\d+)$", proc.stderr, re.M).group(1))
    assert (
        f"esf-bench: esf: logons did not end within 3 s (--phase-timeout): "
        f"no answer from load worker 0 (pid {pid}) (released from 'start')"
    ) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert 3 <= took < 30
    # SIGKILLed: gone, or a zombie waiting for its new parent to reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), state


# -- a load worker's phase, on a fake clock ------------------------------------------


class _ConnTransport(StringTransport):
    def __init__(self, conn):
        super().__init__()
        self.conn = conn

    def setTcpNoDelay(self, enabled):
        pass

    def abortConnection(self):
        self.conn.connectionLost(Failure(ConnectionDone()))


def _worker_bench(clock, pairs: int = 1, duration: float = 20.0, warmup: float = 0, syncs=None):
    """
    A L{_modes.Bench} as a load worker runs it, on C{clock}, its C{pairs}
    sender/receiver pairs already logged on (over fake transports), its
    sync points passed at once (and appended to C{syncs}).
    """
    opts = argparse.Namespace(
        size=100, password="pw", system_token="", duration=duration, check=False,
        window_bytes=2**20, total_window_bytes=8 * 2**20, pattern="pairs", warmup=warmup,
    )  # fmt: skip

    async def sync(point):
        if syncs is not None:
            syncs.append(point)

    b = _modes.Bench(clock, opts, _progress._WorkerProgress(clock, None, False), sync, "t")
    conns = []
    for i in range(pairs):
        for name in (f"s{i}", f"r{i}"):
            conn = _load.Conn(name, b"", None)
            conn.makeConnection(_ConnTransport(conn))
            conn.ready.callback(conn)
            conns.append(conn)
    couples = list(zip(conns[::2], conns[1::2]))

    async def logged_on(*args):
        return couples, conns

    b._pairs = logged_on
    return b, couples


def _run(coroutine) -> list:
    outcome = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(outcome.append)
    return outcome


def test_the_warmup_round_runs_before_the_clock_starts():
    """
    C{--warmup 0.5}: half of each pair's share goes and is relayed before
    the C{start} sync point; the timed round then sends the whole share,
    and only it is counted.
    """
    clock = task.Clock()
    syncs = []
    b, [(sender, receiver)] = _worker_bench(clock, warmup=0.5, syncs=syncs)
    part = {"pairs": [0], "shares": [100], "all_pairs": 1, "window": 200}
    outcome = _run(b.send(None, "esf", part))
    size = b.esf.frame_size
    warm = sender.transport.value()
    assert len(warm) == 50 * size and syncs == []  # the warm-up, untimed
    sender.transport.clear()
    receiver.dataReceived(warm)  # relayed
    assert syncs == ["start"]
    timed = sender.transport.value()
    assert len(timed) == 100 * size and outcome == []
    receiver.dataReceived(timed)
    [result] = outcome
    assert syncs == ["start", "measured"]
    assert result["received"] == 100 and result["capped"] is False


def test_a_server_that_stops_answering_while_warming_up_fails_the_phase():
    clock = task.Clock()
    syncs = []
    b, [(sender, receiver)] = _worker_bench(clock, warmup=0.5, syncs=syncs)
    part = {"pairs": [0], "shares": [100], "all_pairs": 1, "window": 200}
    outcome = _run(b.send(None, "esf", part))
    clock.pump([1] * 11)
    [failure] = outcome
    assert failure.getErrorMessage() == (
        "the server stopped answering: nothing arrived for 10 s (0 sends done)"
    )
    assert syncs == [] and sender.lost and receiver.lost


def test_a_server_that_stops_answering_fails_the_phase():
    """
    Nothing arrives at the receivers for 10 s (at most half of --duration):
    the send phase fails, saying so, instead of waiting for its cap and
    reporting what little it got as a capped figure.
    """
    clock = task.Clock()
    b, [(sender, receiver)] = _worker_bench(clock, duration=20.0)
    part = {"pairs": [0], "shares": [100], "all_pairs": 1, "window": 10}
    outcome = _run(b.send(None, "esf", part))
    assert len(sender.transport.value()) == 100 * b.esf.frame_size  # sent, never relayed
    clock.pump([1] * 9)
    assert outcome == []
    clock.pump([1] * 2)
    [failure] = outcome
    assert failure.check(_wire.BenchError)
    assert (
        failure.getErrorMessage()
        == "the server stopped answering: nothing arrived for 10 s (0 of 100 sends done)"
    )
    assert sender.lost and receiver.lost


def test_a_slow_server_is_capped_not_stalled():
    """
    A message every 5 s is slow, not stopped: the phase runs to its cap and
    reports what arrived.
    """
    clock = task.Clock()
    b, [(sender, receiver)] = _worker_bench(clock, duration=20.0)
    part = {"pairs": [0], "shares": [100], "all_pairs": 1, "window": 10}
    outcome = _run(b.send(None, "esf", part))
    frame = sender.transport.value()[: b.esf.frame_size]
    for _ in range(3):  # at 5, 10 and 15 s
        clock.pump([1] * 5)
        receiver.dataReceived(frame)
    clock.pump([1] * 6)  # past the cap at 20 s
    [result] = outcome
    assert result["capped"] is True and result["received"] == 3, result


# -- the coordinator's reading of its workers' lines ---------------------------------


def test_lines_split_anywhere():
    lines = _coordinator.Lines(100)
    assert lines.feed(b'{"at": "st') == []
    assert lines.feed(b'art"}\n{"progress": 1}\n{"res') == [b'{"at": "start"}', b'{"progress": 1}']
    assert lines.feed(b"ult") == []
    assert lines.feed(b'": 1}\n') == [b'{"result": 1}']
    assert lines.feed(b"\n\n") == [b"", b""]
    assert lines.feed(b"a\nb") == [b"a"]
    assert lines.feed(b"\n") == [b"b"]


def test_lines_are_linear_in_a_long_line():
    """
    A 16 MiB line in 16 KiB chunks (the round-trip times of 600,000
    requests): splitting the whole buffer again for every chunk took 9 s
    here; keeping only the unfinished tail takes milliseconds.
    """
    line = bytes(range(32, 127)) * (16 * 2**20 // 95)
    chunks = [line[i : i + 16384] for i in range(0, len(line), 16384)]
    lines = _coordinator.Lines(2**25)
    started = time.perf_counter()
    for chunk in chunks:
        assert lines.feed(chunk) == []
    assert lines.feed(b"\nnext") == [line]
    assert time.perf_counter() - started < 2.0
    assert lines.feed(b"\n") == [b"next"]


def test_lines_longer_than_the_bound_are_refused():
    with pytest.raises(_coordinator.LineTooLong):
        _coordinator.Lines(10).feed(b"x" * 11)
    lines = _coordinator.Lines(10)
    lines.feed(b"x" * 6)
    with pytest.raises(_coordinator.LineTooLong):
        lines.feed(b"x" * 5)
    with pytest.raises(_coordinator.LineTooLong):
        _coordinator.Lines(10).feed(b"ok\n" + b"y" * 11 + b"\n")


def test_a_worker_line_longer_than_any_message_ends_the_phase():
    _clock, load = _fake_coordinator()
    outcome = _phase(load, _FakeServer())
    load.workers[0].outReceived(b"x" * (2**20 + 32 * load.opts.requests + 1))
    assert "load worker 0 (pid 1000) sent a line of" in _aborted(outcome)


# -- the progress bar ------------------------------------------------------------------


def test_progress_shows_one_stage_summed_over_the_workers():
    """
    Each worker reports each stage of a phase with its own done and total
    (and when it began it); the bar shows the first stage a worker is still
    in, both figures summed over the workers (seconds averaged), never one
    stage's count against another's total.
    """
    assert _progress.progress_of([{}, {}]) is None
    # Until every worker has reported, the total would be partial.
    assert _progress.progress_of([{"log on": (2, 4, "", 7.0)}, {}]) is None
    log_on = [{"log on": (2, 4, "", 7.0)}, {"log on": (1, 6, "", 6.5)}]
    assert _progress.progress_of(log_on) == ("log on", 3, 10, "", 6.5)
    # One worker sends while the other still logs on: the log-on stage.
    one_sends = [
        {"log on": (4, 4, "", 7.0), "send": (100, 500, "", 8.0)},
        {"log on": (5, 6, "", 6.5)},
    ]
    assert _progress.progress_of(one_sends) == ("log on", 9, 10, "", 6.5)
    both_send = [
        {"log on": (4, 4, "", 7.0), "send": (100, 500, "", 8.0)},
        {"log on": (6, 6, "", 6.5), "send": (50, 500, "", 8.1)},
    ]
    assert _progress.progress_of(both_send) == ("send", 150, 1000, "", 8.0)
    holding = [
        {"log on": (3, 3, "", 7.0), "hold": (0.5, 1.0, "s", 9.0)},
        {"log on": (3, 3, "", 7.0), "hold": (0.25, 1.0, "s", 9.2)},
    ]
    assert _progress.progress_of(holding) == ("hold", 0.375, 1.0, "s", 9.0)


def _draws(stderr: str) -> list[tuple[str, float, float]]:
    """
    Every drawing of the progress bar: C{(label, done, total)}.
    """
    # (Read as text, the bar's carriage returns are line ends.)
    found = re.findall(r"^(esf: [a-z ,]+?)\s+\[[#.]+\]\s+([\d,.]+)/([\d,.]+)", stderr, re.M)
    return [
        (label, float(done.replace(",", "")), float(total.replace(",", "")))
        for label, done, total in found
    ]


@pytest.mark.parametrize(
    "args, totals",
    [
        (["--mode", "send", "--pairs", "3", "--messages", "3000", "--check"],
         {"esf: send, log on": 6, "esf: send": 3000}),
        (["--mode", "idle", "--idle", "60", "--hold", "0.6"],
         {"esf: idle, log on": 60, "esf: idle, hold": 0.6}),
    ],
    ids=["send", "idle"],
)  # fmt: skip
def test_progress_reports_agree_with_their_totals(args, totals):
    """
    Two load workers, a progress bar on stderr: every drawing shows a
    stage's done against that stage's total, over both workers (the logon
    counts and hold ticks of the workers used to be drawn against the
    messages or sessions), and the last drawing is the last stage, done.
    """
    proc = run_bench(*args, "--no-bare", "--no-websocket", "--load-procs", "2", "--progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    draws = _draws(proc.stderr)
    assert draws, proc.stderr
    for label, done, total in draws:
        assert total == totals[label], (label, done, total)
        assert 0 <= done <= total, (label, done, total)
    last_stage = list(totals)[-1]
    assert draws[-1] == (last_stage, totals[last_stage], totals[last_stage])


def test_a_server_that_cannot_start_is_reported(tmp_path):
    """
    C{start_esf_server} (the benchmark scripts' way to start a server)
    reports a server that exits at once, and where its log is.
    """
    log = tmp_path / "server.log"
    with pytest.raises(
        _wire.BenchError, match=r"^the esf server exited with status \d+: see .*server.log$"
    ):
        _procs.start_esf_server(_procs.free_port(), ["--no-such-option"], log, timeout=30)
