"""
The servers C{esf-bench} measures: an esf server it starts (C{twistd esf}),
one somebody else runs, the relays it compares with (in
L{esf.bench.relays}), and for cluster mode a C{redis-server} and esf nodes
joined through it; and where a load worker connects to each
(L{ServerAddress}).
"""

from __future__ import annotations

import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

from ._procs import (
    checkout_env,
    esf_server_argv,
    free_port,
    proc_cpu_seconds,
    proc_memory,
    stop_process,
    wait_listening,
)
from ._wire import BenchError

#: The relays measured next to esf, by kind: the script in L{esf.bench.relays}
#: and what the report calls it.  The first is the baseline of the ratios.
BASELINES = {
    "coalescing": ("coalescing.py", "coalescing relay (one write per destination per read)"),
    "bare": ("bare.py", "write-per-frame relay"),
}
BASELINE = "coalescing"


def find_relay(kind: str, given: str | None) -> Path | None:
    """
    The script of the relay C{kind}: C{given}, else the one installed with
    esf; L{None} if it is not a file.

    The relays run by path (C{python .../relays/coalescing.py}), not as
    C{python -m esf.bench.relays.coalescing}: that would import C{esf},
    whose C{__init__} imports the server, into the baseline's process, and
    its memory and its objects into what the baseline is measured with.
    """
    if given:
        path = Path(given)
        return path if path.is_file() else None
    try:
        resource = files("esf.bench.relays") / BASELINES[kind][0]
    except ModuleNotFoundError:  # an install that left the relays out
        return None
    # An esf installed as files (the wheel, a checkout): the script itself.
    path = Path(str(resource))
    return path if path.is_file() else None


class LocalServer:
    """
    A server process this benchmark started, on 127.0.0.1 at a free port.
    """

    def __init__(self, kind: str, opts, workdir: Path, max_connections: int, extra: tuple = ()):
        self.kind = kind
        self.port = free_port()
        self.ws_port = free_port() if kind == "ws" else None
        self.host = "127.0.0.1"
        self.log_path = workdir / f"{kind}-{self.port}.log"
        if kind in ("esf", "ws"):
            args = [
                "--logon-rate-limit",
                "1000000",
                "--max-connections",
                str(max_connections),
                *extra,
            ]
            if self.ws_port is not None:
                args += [
                    "--websocket",
                    f"tcp:{self.ws_port}:interface=127.0.0.1:backlog={opts.backlog}",
                ]
            argv = esf_server_argv(
                opts.server_python, self.port, self.log_path, opts.backlog, args
            )
        else:
            argv = [
                opts.server_python, opts.relay_paths[kind],
                "--port", str(self.port), "--backlog", str(opts.backlog),
            ]  # fmt: skip
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- open while the server runs
        self.process = subprocess.Popen(
            argv, cwd=workdir, env=checkout_env(), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.pid = self.process.pid
        ports = [p for p in (self.port, self.ws_port) if p is not None]
        why = wait_listening(self.process, ports, opts.startup_timeout)
        if why is not None:
            self.stop()
            raise BenchError(f"the {kind} server {why}:\n" + self.log_tail())

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float | None:
        return proc_cpu_seconds(self.pid)

    def memory(self) -> dict:
        return proc_memory(self.pid)

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


class RemoteServer:
    """
    A server somebody else runs: no CPU or memory figures.
    """

    kind = "esf"
    pid = None

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def cpu_seconds(self):
        return None

    def memory(self) -> dict:
        return {}

    def stop(self) -> None:
        pass

    def log_tail(self, lines: int = 20) -> str:
        return ""


class _Node:
    def __init__(self, host: str, port: int, ws_port: int | None):
        self.host, self.port, self.ws_port = host, port, ws_port


class ServerAddress:
    """
    Where a load worker connects: one server, or cluster nodes and the rule
    that places each user on one (a name in L{PLACEMENTS}).
    """

    def __init__(self, nodes: list[_Node], place: str | None = None):
        self.nodes, self.place = nodes, place
        self.cluster = place is not None

    def node_for(self, name: str) -> _Node:
        if self.place is None:
            return self.nodes[0]
        return self.nodes[PLACEMENTS[self.place](name) % len(self.nodes)]

    def to_json(self) -> dict:
        return {"nodes": [[n.host, n.port, n.ws_port] for n in self.nodes], "place": self.place}

    @classmethod
    def of(cls, server) -> ServerAddress:
        if isinstance(server, NodeGroup):
            return cls([_Node(n.host, n.port, n.ws_port) for n in server.nodes], server.place)
        return cls([_Node(server.host, server.port, getattr(server, "ws_port", None))])

    @classmethod
    def from_json(cls, data: dict) -> ServerAddress:
        return cls([_Node(*node) for node in data["nodes"]], data["place"])


# -- clusters ------------------------------------------------------------------------


class LocalRedis:
    """
    A redis-server this benchmark started on a free 127.0.0.1 port, without
    persistence.
    """

    def __init__(self, workdir: Path, timeout: float):
        executable = shutil.which("redis-server")
        if executable is None:
            raise BenchError(
                "cluster mode needs redis-server (Debian: apt-get install redis-server)"
            )
        self.port = free_port()
        self.log_path = workdir / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.pid = self.process.pid
        why = wait_listening(self.process, [self.port], timeout)
        if why is not None:
            self.stop()
            raise BenchError(f"redis-server {why}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.process)


class NodeGroup:
    """
    Cluster nodes seen as one server: C{PLACEMENTS[place](name)} picks the
    node a user connects to; CPU is the sum of the nodes' and Redis's.
    """

    kind = "esf"

    def __init__(self, nodes: list, redis: LocalRedis, place: str):
        self.nodes, self.redis, self.place = nodes, redis, place
        #: Each process's CPU seconds at each reading (node0, node1, ...,
        #: redis), for the figures per process (L{cpu_by_process}).
        self.cpu_readings: list[dict[str, float]] = []

    def cpu_seconds(self):
        readings = {f"node{i}": proc_cpu_seconds(n.pid) for i, n in enumerate(self.nodes)}
        readings["redis"] = proc_cpu_seconds(self.redis.pid)
        if any(seconds is None for seconds in readings.values()):
            return None
        self.cpu_readings.append(readings)
        return sum(readings.values())

    def cpu_by_process(self, count: int) -> dict[str, float]:
        """
        Each process's CPU between the last two readings (a phase's start
        and end), in µs per one of C{count} (messages, requests).
        """
        if len(self.cpu_readings) < 2 or not count:
            return {}
        start, end = self.cpu_readings[-2], self.cpu_readings[-1]
        return {name: (end[name] - start[name]) / count * 1e6 for name in end}

    def memory(self) -> dict:
        return self.nodes[0].memory()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(n.log_tail(lines) for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _receivers_elsewhere(name: str) -> int:
    # Pairs are named s<tag><i> / r<tag><i> (send), q<tag><i> / p<tag><i>
    # (request): senders on node 0, receivers (and logons, L<tag><i>) on
    # node 1.
    return 0 if name[0] in "sq" else 1


def _pair_index(name: str) -> int:
    # Each pair on one node, pairs spread over the nodes.
    return int(name[3:])


#: How cluster users are placed on nodes, by name (load workers get the name).
PLACEMENTS = {"receivers_elsewhere": _receivers_elsewhere, "pair_index": _pair_index}
