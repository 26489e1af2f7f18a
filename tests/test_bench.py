"""
esf-bench and the bare relay it compares with.

The smoke run here is what CI runs of the benchmark: it checks that the
harness works end to end and reports every figure, never how fast anything
is.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import StringTransport

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bare_relay  # noqa: E402

from esf import bench  # noqa: E402

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


def test_quick_run(tmp_path):
    """
    C{esf-bench --quick} starts an esf server and the bare relay, runs every
    mode against both and writes a JSON report with every figure.
    """
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "esf.bench", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| measurement | esf | bare | esf/bare | target |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["machine"]["nproc"] >= 1
    assert [row["mode"] for row in report["results"]] == list(MODES)
    for row in report["results"]:
        mode = row["mode"]
        for kind in ("esf", "bare"):
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
        assert row["ratio"][RATIOS[mode]] > 0
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
    proc = subprocess.run(
        [
            sys.executable, "-m", "esf.bench", "--quick", "--mode", "request",
            "--requests", "50", "--no-bare", "--json", "-",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    (row,) = report["results"]
    assert row["esf"]["answered"] == 50
    assert "bare" not in row and row["ratio"] == {}


def test_bad_options():
    with pytest.raises(SystemExit) as e:
        bench.parse_options(["--pairs", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        bench.parse_options(["--server", "nowhere"])


def test_percentile():
    values = sorted(float(v) for v in range(1, 101))
    assert bench._percentile(values, 50) == 50
    assert bench._percentile(values, 99) == 99
    assert bench._percentile(values, 100) == 100
    assert bench._percentile([7.0], 90) == 7.0


def test_frames_are_the_same_size():
    """
    The bare relay's frames stand for esf frames of the same size, so that
    both servers move the same bytes.
    """
    esf = bench.EsfDialect(100, "pw", "")
    bare = bench.BareDialect(esf.frame_size)
    assert esf.frame_size == 36 + 4 + 100
    for dialect in (esf, bare):
        assert len(dialect.message("s1", "r1")) == esf.frame_size
        assert len(dialect.request("s1", "r1")) == esf.frame_size
        assert len(dialect.response("r1", "s1")) == esf.frame_size


def _relay_pair():
    factory = bare_relay.RelayFactory()
    ends = []
    for name in (b"alice", b"bob"):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(len(name).to_bytes(4, "little") + name)
        assert transport.value() == b"\x00\x00\x00\x00"
        transport.clear()
        ends.append((proto, transport))
    return factory, ends


def test_bare_relay_forwards_partial_frames():
    """
    The bare relay reassembles frames split anywhere and forwards each one
    unchanged to the named connection.
    """
    factory, [(alice, _), (_, bob_out)] = _relay_pair()
    payload = b"\x03bob" + b"x" * 50
    frame = len(payload).to_bytes(4, "little") + payload
    stream = frame * 3
    for i in range(len(stream)):
        alice.dataReceived(stream[i : i + 1])
    assert bob_out.value() == stream
    bob_out.clear()
    alice.dataReceived(stream[:70])
    alice.dataReceived(stream[70:])
    assert bob_out.value() == stream
    # Unknown destinations are counted and dropped.
    other = b"\x03eve" + b"y"
    alice.dataReceived(len(other).to_bytes(4, "little") + other)
    assert factory.dropped == 1


def test_bare_relay_forgets_closed_connections():
    factory, [(alice, _), (bob, _)] = _relay_pair()
    bob.connectionLost(None)
    assert b"bob" not in factory.routes and b"alice" in factory.routes
