"""
C{esf-bench}: load and measure an esf server, next to two bare Twisted
relays.

What it measures, each on a freshly started server (when the server is
local) and then, for comparison, in the same run, on the baseline, the
coalescing relay of C{benchmarks/coalescing_relay.py} (it writes once per
destination per read), and on the write-per-frame relay of
C{benchmarks/bare_relay.py} (one write per frame), reported as a second
line under each figure (C{--no-bare} measures esf only):

- B{send}: N sender/receiver pairs log on; each sender relays its share of
  M one-way Send (202) messages to its receiver through the server.  The
  senders keep a bounded window of messages in flight (they know how many
  their receiver has counted: both ends of a pair live in the same load
  worker).  Reported: messages per second, the server's CPU (and CPU time
  per message) and RSS.  The same relay over WebSocket (C{twistd esf
  --websocket}, one frame per binary message) is measured too, and
  reported as a ratio to TCP (C{--no-websocket} skips it).
- B{request}: N pairs; each sender keeps one Request (203) outstanding, its
  receiver answers each with a Response (204); the round trip is timed at
  the sender.  Reported: p50/p90/p99/max and requests per second.
- B{logons}: K connections log on (at most C{--logon-window} at once);
  reported: logons per second from the first connect to the last Succeed.
- B{idle}: K sessions log on and stay, each sending a HeartBeat every
  C{--heartbeat} seconds, for C{--hold} seconds; reported: the server's RSS
  growth per session.

- B{cluster} (C{--mode cluster}, not part of C{all}; needs C{redis-server},
  which this run starts on a free port): esf nodes joined by C{--cluster}.
  Send and request between users on two different nodes, as a ratio to
  the same users on one node; and the aggregate send throughput of two
  nodes (each pair on one node) against one node carrying every pair.

The load is raw frames (precomputed bytes, counted at the receiver by
size; C{--check} decodes and validates every frame instead), written by
C{--load-procs} load worker processes (default: one per core but the
server's, at most 4), each with its own reactor and its share of the pairs,
logons or idle sessions; the process that runs C{esf-bench} only
coordinates them and reads the server's and the workers' CPU from
C{/proc}.  The server runs as its own process (C{python -m twisted esf
...}, or the relay script).  Each esf figure is also given as a ratio to
the baseline's, because the ratio is what survives a noisy machine; a
warning says when the load, not the server, was the bottleneck.

    esf-bench                        # every mode, 1 pair, defaults
    esf-bench --mode send --pairs 1,50 --messages 200000
    esf-bench --quick --json out.json
    esf-bench --server 127.0.0.1:4530 --mode request --no-bare
    esf-bench --mode cluster --pairs 4

Performance never changes the exit status: it is 0 when every phase ran,
1 when one failed (refused logons, lost connections, a desynchronised
stream) and 2 for bad options.  A load worker that exits or stops
answering, or a phase still running after C{--phase-timeout} seconds
(default: C{--duration} + 30), ends the whole run at once, with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol

from ._wire import (  # noqa: F401  (the dialects' names stay esf.bench's too)
    INFO_TYPE,
    BareDialect,
    BenchError,
    EsfDialect,
    WsDialect,
    _ws_header,
)
from esf.wire._frames import FrameError

__all__ = ["main"]

MODES = ("send", "request", "logons", "idle")

_I32 = struct.Struct("<i")


class RunAborted(Exception):
    """
    The run cannot go on: a load worker stopped answering, exited or sent
    what it should not, or the coordinator failed at a sync point.  Unlike
    a L{BenchError}, which fails one measurement, this ends the run: the
    workers are in an unknown state.
    """


# -- the machine and the processes ---------------------------------------------


def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        # As the nproc command counts: the cores this process may run on.
        "nproc": len(usable_cpus()),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "loadavg_at_start": load,
    }


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float | None:
    """
    User + system CPU seconds of process C{pid}, from C{/proc}.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def usable_cpus() -> set[int]:
    """
    The cores this process may run on (its affinity, which the servers and
    load workers it starts inherit), not every core of the machine.
    """
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def cpu_times(stat: str, cpus: set[int]) -> tuple[float, float] | None:
    """
    C{(busy, steal)}: CPU seconds the cores C{cpus} spent busy (user, nice,
    system, irq, softirq: not idle, not waiting for I/O, not stolen) and
    stolen (by the hypervisor, for other guests: no process of this machine
    had them) since boot, from the text of C{/proc/stat}; L{None} if it has
    no line for one of them.
    """
    busy = steal = 0
    found = set()
    for line in stat.splitlines():
        name, _, values = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        fields = [int(v) for v in values.split()] + [0] * 8  # older kernels: fewer columns
        user, nice, system, _idle, _iowait, irq, softirq, stolen = fields[:8]
        busy += user + nice + system + irq + softirq
        steal += stolen
        found.add(int(name[3:]))
    if found != cpus:
        return None
    return busy / _TICKS, steal / _TICKS


def machine_cpu_seconds() -> tuple[float, float] | None:
    """
    L{cpu_times} of the cores this process may use, now.
    """
    try:
        with open("/proc/stat") as f:
            return cpu_times(f.read(), usable_cpus())
    except (OSError, ValueError):
        return None


def proc_memory(pid: int) -> dict:
    """
    C{VmRSS} and C{VmHWM} (peak RSS) of process C{pid} in bytes, from C{/proc}.
    """
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def raise_fd_limit(wanted: int) -> int:
    """
    Raise this process's soft RLIMIT_NOFILE towards C{wanted} (child servers
    inherit it); return the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def free_port() -> int:
    """
    A TCP port of 127.0.0.1 that is free now (the kernel's pick; the one
    definition the tests and the benchmark scripts use too).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_env() -> dict[str, str]:
    """
    This process's environment with the checkout this module comes from
    first on C{PYTHONPATH}: the esf that the servers and load workers it
    starts import.
    """
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def wait_listening(process: subprocess.Popen, ports, timeout: float) -> str | None:
    """
    Wait until 127.0.0.1 accepts connections on every one of C{ports};
    L{None} once it does, else why not (C{process} exited, or the time
    ran out).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with status {process.returncode}"
        try:
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return None
        except OSError:
            time.sleep(0.05)
    return f"did not listen within {timeout:g} s"


def stop_process(process: subprocess.Popen) -> None:
    """
    SIGTERM (and SIGCONT, which a stopped process needs to act on it),
    SIGKILL after 10 s.
    """
    if process.poll() is None:
        process.terminate()
        process.send_signal(signal.SIGCONT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def esf_server_argv(python: str, port: int, log_path, backlog: int, args) -> list[str]:
    """
    The command of a C{twistd esf} on 127.0.0.1:C{port}, logging to
    C{log_path}, with C{args} after its C{--port}.
    """
    return [
        python, "-m", "twisted", "--log-file", str(log_path), "--log-format", "text",
        "esf", "--port", f"tcp:{port}:interface=127.0.0.1:backlog={backlog}", *args,
    ]  # fmt: skip


def start_esf_server(port: int, args, log_path, timeout: float = 30.0) -> subprocess.Popen:
    """
    Start a C{twistd esf} of this checkout on 127.0.0.1:C{port} with
    C{args} (listen backlog 1024), its log in C{log_path}, and wait until
    it listens (for the benchmark scripts).  Raises L{BenchError}, the
    process killed, if it exits or does not listen within C{timeout}.
    """
    process = subprocess.Popen(esf_server_argv(sys.executable, port, log_path, 1024, args), env=checkout_env())
    why = wait_listening(process, [port], timeout)
    if why is not None:
        process.kill()
        process.wait()
        raise BenchError(f"the esf server {why}: see {log_path}")
    return process


def interpreter_info(executable: str) -> str | None:
    """
    C{"Implementation version"} of the Python at C{executable}, or L{None}
    if it cannot be run.
    """
    if executable == sys.executable:
        return f"{platform.python_implementation()} {platform.python_version()}"
    try:
        out = subprocess.run(
            [executable, "-c", "import platform; print(platform.python_implementation(), platform.python_version())"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


#: The relays measured next to esf, by kind: the script in benchmarks/ and
#: what the report calls it.  The first is the baseline of the ratios.
BASELINES = {
    "coalescing": ("coalescing_relay.py", "coalescing relay (one write per destination per read)"),
    "bare": ("bare_relay.py", "write-per-frame relay"),
}
BASELINE = "coalescing"


def find_relay(kind: str, given: str | None) -> Path | None:
    if given:
        path = Path(given)
        return path if path.is_file() else None
    path = Path(__file__).resolve().parent.parent.parent / "benchmarks" / BASELINES[kind][0]
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
            args = ["--logon-rate-limit", "1000000", "--max-connections", str(max_connections), *extra]
            if self.ws_port is not None:
                args += ["--websocket", f"tcp:{self.ws_port}:interface=127.0.0.1:backlog={opts.backlog}"]
            argv = esf_server_argv(opts.server_python, self.port, self.log_path, opts.backlog, args)
        else:
            argv = [
                opts.server_python, opts.relay_paths[kind],
                "--port", str(self.port), "--backlog", str(opts.backlog),
            ]  # fmt: skip
        self._log = open(self.log_path, "ab")
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


# -- connections -------------------------------------------------------------------


class Conn(Protocol):
    """
    One load connection: says hello (logs on), then hands every byte to
    L{on_data}.
    """

    on_data = None
    on_lost = None
    lost = False

    def __init__(self, name: str, hello: bytes, parser):
        self.name = name
        self._hello = hello
        self._parser = parser
        self.ready = defer.Deferred()
        self.unexpected = 0

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(self._hello)

    def dataReceived(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        if self.ready.called:
            self.unexpected += len(data)
            return
        status, rest = self._parser.feed(data)
        if status is None:
            return
        self._parser = None
        if status is True:
            self.ready.callback(self)
            if rest:
                self.dataReceived(rest)
        else:
            self.ready.errback(BenchError(f"{self.name}: {status}"))
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.lost = True
        if not self.ready.called:
            self.ready.errback(BenchError(f"{self.name}: connection lost before logon: {reason.value}"))
        if self.on_lost is not None:
            self.on_lost(self)


class _ConnFactory(ClientFactory):
    noisy = False

    def __init__(self, conn: Conn):
        self.conn = conn

    def buildProtocol(self, addr):
        self.conn.factory = self
        return self.conn

    def clientConnectionFailed(self, connector, reason):
        if not self.conn.ready.called:
            self.conn.ready.errback(BenchError(f"{self.conn.name}: cannot connect: {reason.value}"))


def close_all(reactor, conns) -> defer.Deferred:
    """
    Abort every connection; fire when they are all gone (at most 10 s).
    """
    waiting = [c for c in conns if not c.lost and c.transport is not None]
    if not waiting:
        return defer.succeed(None)
    done = defer.Deferred()
    left = [len(waiting)]

    def gone(_conn):
        left[0] -= 1
        if left[0] == 0 and not done.called:
            done.callback(None)

    for conn in waiting:
        conn.on_lost = gone
        conn.transport.abortConnection()
    timer = reactor.callLater(10, lambda: done.called or done.callback(None))
    done.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
    return done


class Progress:
    """
    A one-line progress bar on stderr (only when stderr is a terminal,
    unless forced), of whatever stage of a phase L{progress_of} says.
    """

    def __init__(self, reactor, enabled: bool):
        self.reactor = reactor
        self.enabled = enabled
        self._loop = None

    def start(self, state) -> None:
        """
        Draw C{state()} every 0.2 s: L{None} (nothing to show yet) or
        C{(label, done, total, unit, t0)}, C{t0} the C{time.perf_counter()}
        at which the stage began.
        """
        self.state = state
        if self.enabled:
            self._loop = task.LoopingCall(self.draw)
            self._loop.clock = self.reactor
            self._loop.start(0.2)

    def draw(self) -> None:
        state = self.state()
        if state is None:
            return
        label, done, total, unit, t0 = state
        elapsed = time.perf_counter() - t0
        width = 24
        filled = min(width, int(width * done / total)) if total > 0 else width
        if unit == "s":
            figures = f"{done:>9.1f}/{total:.1f} s"
        else:
            rate = done / elapsed if elapsed > 0 else 0
            figures = f"{done:>9,}/{total:,} {rate:>11,.0f}/s"
        line = f"\r{label:<30.30} [{'#' * filled}{'.' * (width - filled)}] {figures} {elapsed:6.1f} s"
        sys.stderr.write(line)
        sys.stderr.flush()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
            self.draw()
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def progress_of(stages: list[dict]) -> tuple[str, float, float, str, float] | None:
    """
    What the progress bar of a phase shows, from each of its workers' last
    report of each stage (C{{stage: (done, total, unit, t0)}}, in the order
    the stages came): the first stage some worker is still in, with its
    done and its total summed over the workers (averaged for a stage
    counted in seconds, C{unit} C{"s"}), so that both are of the same stage
    and sum the same workers, and when the first worker began it.  L{None}
    until every worker has reported.
    """
    if not stages or not all(stages):
        return None
    k = min(len(s) for s in stages) - 1
    at = [list(s.items())[k] for s in stages]
    name = at[0][0]
    done = sum(value[0] for _, value in at)
    total = sum(value[1] for _, value in at)
    unit = at[0][1][2]
    if unit == "s":
        done, total = done / len(at), total / len(at)
    return name, done, total, unit, min(value[3] for _, value in at)


class Bench:
    """
    The load of each phase, as one load worker process runs its part of it
    (L{LoadGenerator} splits a phase over the workers and merges what they
    measured).

    A phase waits at named points (C{await self.sync(point)}) until every
    worker has reached the point and the coordinator has taken its readings
    (the server's CPU and memory, the workers' CPU): C{start} before the
    timed interval, C{measured} after it, and for idle sessions C{settled}
    before any connection.  Each phase returns what this worker saw, with
    C{t0} and C{t1} (C{time.perf_counter}, which every process on the
    machine reads from one clock) around its timed interval.
    """

    def __init__(self, reactor, opts, progress, sync, tag: str):
        self.reactor = reactor
        self.opts = opts
        self.progress = progress
        self.sync = sync
        self.tag = tag
        self.esf = EsfDialect(opts.size, opts.password, opts.system_token)
        self.bare = BareDialect(self.esf.frame_size)
        self.ws = WsDialect(self.esf)

    def dialect(self, kind: str):
        return self.ws if kind == "ws" else self.esf if kind == "esf" else self.bare

    def connect(self, server, dialect, name: str) -> Conn:
        conn = Conn(name, dialect.hello(name), dialect.hello_parser())
        node = server.node_for(name)
        port = node.ws_port if dialect.kind == "ws" else node.port
        self.reactor.connectTCP(node.host, port, _ConnFactory(conn), timeout=10)
        return conn

    def log_on(self, server, dialect, names: list[str], stage: str, deadline: float, window: int) -> defer.Deferred:
        """
        Open one logged-on connection per name, at most C{window} at a time
        (the progress C{stage}).  Fires with C{(conns, failures,
        first_error, t0, t1)}.
        """
        conns: list[Conn] = []
        state = {"next": 0, "inflight": 0, "failures": 0, "error": None, "finished": 0}
        done = defer.Deferred()
        t0 = time.perf_counter()

        def finish():
            if not done.called:
                timer.cancel() if timer.active() else None
                self.progress.stop()
                done.callback((conns, state["failures"], state["error"], t0, time.perf_counter()))

        def ok(conn):
            conns.append(conn)
            settle()

        def failed(failure):
            state["failures"] += 1
            if state["error"] is None:
                state["error"] = str(failure.value)
            settle()

        def settle():
            state["inflight"] -= 1
            state["finished"] += 1
            if state["finished"] == len(names):
                finish()
            else:
                start_more()

        def start_more():
            while state["inflight"] < window and state["next"] < len(names) and not done.called:
                name = names[state["next"]]
                state["next"] += 1
                state["inflight"] += 1
                self.connect(server, dialect, name).ready.addCallbacks(ok, failed)

        def too_late():
            state["error"] = state["error"] or f"logons still unanswered after the {self.opts.duration:g} s cap"
            state["failures"] += len(names) - state["finished"]
            finish()

        timer = self.reactor.callLater(max(deadline - time.perf_counter(), 0.1), too_late)
        self.progress.start(stage, len(names), lambda: state["finished"])
        if not names:
            finish()
        else:
            start_more()
        return done

    async def _pairs(self, server, dialect, indices: list[int], prefix: str, deadline: float, window: int):
        senders = [f"{prefix[0]}{self.tag}{i}" for i in indices]
        receivers = [f"{prefix[1]}{self.tag}{i}" for i in indices]
        conns, failures, error, _, _ = await self.log_on(
            server, dialect, senders + receivers, "log on", deadline, window
        )
        if failures:
            await close_all(self.reactor, conns)
            raise BenchError(f"{failures} of {2 * len(indices)} logons failed; first: {error}")
        by_name = {c.name: c for c in conns}
        if server.cluster:
            # Cluster nodes learn of logons on other nodes through Redis
            # (within milliseconds): let them before anything is sent.
            await task.deferLater(self.reactor, 0.5, lambda: None)
        return [(by_name[s], by_name[r]) for s, r in zip(senders, receivers)], conns

    async def _exchange(self, server, dialect, part: dict, mode: str, names: str, make_pair):
        """
        The timed part of send and request: log the pairs on, make each
        pair's state (C{make_pair(sender, receiver, share, totals, done,
        pairs)}, a L{_Pair}), start every pair at the C{start} sync point and
        wait until each has done its share, one fails, or the C{--duration}
        cap.  Returns the states, the count done and C{{"t0", "t1",
        "capped"}}.

        A server that stops answering (nothing arrives for L{stall_seconds})
        fails the phase: it is not a slow server whose figures the cap
        would report.
        """
        deadline = time.perf_counter() + self.opts.duration
        couples, conns = await self._pairs(server, dialect, part["pairs"], names, deadline, part["window"])
        shares = part["shares"]
        done = defer.Deferred()
        totals = {"count": 0, "pairs_done": 0}
        states = []
        for (sender, receiver), share in zip(couples, shares):
            st = make_pair(sender, receiver, share, totals, done, len(couples))
            states.append(st)
            if share == 0:
                st.finished()
        lost = []
        for c in conns:
            c.on_lost = lost.append
        await self.sync("start")
        t0 = time.perf_counter()
        self.progress.start(mode, sum(shares), lambda: totals["count"])
        timer = self.reactor.callLater(
            max(deadline - time.perf_counter(), 0.1), lambda: done.called or done.callback("capped")
        )
        stall = stall_seconds(self.opts.duration)
        seen = [totals["count"], self.reactor.seconds()]

        def watch() -> None:
            if totals["count"] != seen[0]:
                seen[:] = [totals["count"], self.reactor.seconds()]
            elif self.reactor.seconds() - seen[1] >= stall and not done.called:
                done.callback("stalled")

        watchdog = task.LoopingCall(watch)
        watchdog.clock = self.reactor
        watchdog.start(stall / 10, now=False)
        for st in states:
            st.begin()
        outcome = await done
        t1 = time.perf_counter()
        watchdog.stop()
        if timer.active():
            timer.cancel()
        self.progress.stop()
        await self.sync("measured")
        errors = [st.error for st in states if st.error]
        unexpected = sum(c.unexpected for c in conns)
        await close_all(self.reactor, conns)
        if errors:
            raise BenchError(errors[0])
        if lost:
            raise BenchError(f"{len(lost)} connection(s) lost during the run")
        if unexpected:
            raise BenchError(f"senders received {unexpected} unexpected bytes (an error reply?)")
        if outcome == "stalled":
            raise BenchError(
                f"the server stopped answering: nothing arrived for {stall:g} s "
                f"({totals['count']} of {sum(shares)} {mode}s done)"
            )
        return states, totals["count"], {"t0": t0, "t1": t1, "capped": outcome == "capped"}

    async def send(self, server, kind: str, part: dict) -> dict:
        opts = self.opts
        dialect = self.dialect(kind)
        size = dialect.frame_size
        window = max(1, min(opts.window_bytes, opts.total_window_bytes // part["all_pairs"]) // size)

        def make_pair(sender, receiver, share, totals, done, pairs):
            frame = dialect.message(sender.name, receiver.name)
            st = _SendPair(sender, receiver, share, totals, done, pairs, frame, window, size)
            if opts.check:
                st.checker = dialect.checker(sender.name, receiver.name)
            receiver.on_data = st.received_checked if opts.check else st.received
            return st

        if opts.pattern == "interleaved":
            make_pair = _Ring(dialect, window, size, opts.check).make_pair

        _, received, timed = await self._exchange(server, dialect, part, "send", "sr", make_pair)
        return {"received": received, "frame_bytes": size, "window_per_pair": window, **timed}

    async def request(self, server, kind: str, part: dict) -> dict:
        dialect = self.dialect(kind)

        def make_pair(sender, receiver, share, totals, done, pairs):
            return _RequestPair(sender, receiver, share, totals, done, pairs, dialect)

        states, _, timed = await self._exchange(server, dialect, part, "request", "qp", make_pair)
        return {"rtts": [r for st in states for r in st.rtts], "frame_bytes": dialect.frame_size, **timed}

    async def logons(self, server, kind: str, part: dict) -> dict:
        dialect = self.dialect(kind)
        names = [f"L{self.tag}{i}" for i in part["names"]]
        await self.sync("start")
        deadline = time.perf_counter() + self.opts.duration
        conns, failures, error, t0, t1 = await self.log_on(
            server, dialect, names, "logons", deadline, part["window"]
        )
        await self.sync("measured")
        await close_all(self.reactor, conns)
        if failures:
            raise BenchError(f"{failures} of {len(names)} logons failed; first: {error}")
        return {"logged_on": len(conns), "t0": t0, "t1": t1}

    async def idle(self, server, kind: str, part: dict) -> dict:
        opts = self.opts
        dialect = self.dialect(kind)
        names = [f"I{self.tag}{i}" for i in part["names"]]
        deadline = time.perf_counter() + opts.duration
        await self.sync("settled")  # the coordinator reads the server's RSS before any logon
        conns, failures, error, logon_t0, logon_t1 = await self.log_on(
            server, dialect, names, "log on", deadline, part["window"]
        )
        if failures:
            await close_all(self.reactor, conns)
            raise BenchError(f"{failures} of {len(names)} logons failed; first: {error}")
        lost = []
        received = [0]

        def count(data):
            received[0] += len(data)

        beats = [dialect.heartbeat(c.name) for c in conns]
        for c in conns:
            c.on_lost = lost.append
            c.on_data = count
        tick = 0.1
        per_tick = max(1, math.ceil(len(conns) * tick / opts.heartbeat)) if conns else 0
        cursor = [0]
        sent = [0]

        def beat():
            start = cursor[0]
            for i in range(start, min(start + per_tick, len(conns))):
                conn = conns[i]
                if not conn.lost:
                    conn.transport.write(beats[i])
                    sent[0] += 1
            cursor[0] = start + per_tick if start + per_tick < len(conns) else 0

        hold = min(opts.hold, max(deadline - time.perf_counter(), 0.1))
        await self.sync("start")
        loop = task.LoopingCall(beat)
        loop.clock = self.reactor
        if conns:
            loop.start(tick)
        t0 = time.perf_counter()
        self.progress.start("hold", hold, lambda: min(hold, time.perf_counter() - t0), unit="s")
        await task.deferLater(self.reactor, hold, lambda: None)
        self.progress.stop()
        if loop.running:
            loop.stop()
        t1 = time.perf_counter()
        await self.sync("measured")
        await close_all(self.reactor, conns)
        if lost:
            raise BenchError(f"{len(lost)} idle session(s) were closed while held")
        return {
            "sessions": len(conns),
            "heartbeats_sent": sent[0],
            "logon_t0": logon_t0,
            "logon_t1": logon_t1,
            "t0": t0,
            "t1": t1,
        }


#: How long a send or request phase may see nothing arrive before the
#: server counts as stopped (at most half of --duration).
STALL_SECONDS = 10.0


def stall_seconds(duration: float) -> float:
    return min(STALL_SECONDS, duration / 2)


class _Pair:
    """
    One sender/receiver pair of a timed phase (L{Bench._exchange}): adds
    what it got done to C{totals["count"]}, and fires C{done} once every
    pair has done its share (with C{"error"} as soon as one fails).
    """

    error = None
    _finished = False

    def __init__(self, sender, receiver, share, totals, done, pairs):
        self.sender, self.receiver = sender, receiver
        self.share, self.totals, self.done, self.pairs = share, totals, done, pairs

    def begin(self) -> None:
        raise NotImplementedError

    def fail(self, text: str) -> None:
        self.error = text
        if not self.done.called:
            self.done.callback("error")

    def finished(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.totals["pairs_done"] += 1
        if self.totals["pairs_done"] == self.pairs and not self.done.called:
            self.done.callback("done")


class _SendPair(_Pair):
    checker = None

    def __init__(self, sender, receiver, share, totals, done, pairs, frame, window, size):
        super().__init__(sender, receiver, share, totals, done, pairs)
        # size: the bytes a receiver gets per message (over WebSocket, not
        # what the sender writes, which is masked).
        self.frame, self.size = frame, size
        self.window = window
        self.sent = 0
        self.got = 0
        self.bytes = 0
        self.low = max(1, window // 2)
        self._batches: dict[int, bytes] = {}

    def begin(self) -> None:
        self.pump()

    def pump(self) -> None:
        inflight = self.sent - self.got
        if self.sent >= self.share or inflight > self.low:
            return
        n = min(self.window - inflight, self.share - self.sent)
        batch = self._batches.get(n)
        if batch is None:
            batch = self.frame * n
            if len(self._batches) < 4:
                self._batches[n] = batch
        self.sender.transport.write(batch)
        self.sent += n

    def received(self, data: bytes) -> None:
        self.bytes += len(data)
        got = self.bytes // self.size
        self.totals["count"] += got - self.got
        self.got = got
        if got >= self.share:
            self.finished()
        else:
            self.pump()

    def received_checked(self, data: bytes) -> None:
        try:
            n = self.checker.feed(data)
        except (BenchError, FrameError) as e:
            self.sender.transport.abortConnection()
            self.fail(str(e))
            return
        self.got += n
        self.totals["count"] += n
        if self.got >= self.share:
            self.finished()
        else:
            self.pump()


class _Ring:
    """
    The senders and receivers of one worker in the interleaved pattern
    (C{--pattern interleaved}): every sender cycles over every receiver,
    starting at its own (sender i writes to receivers i, i+1, ..., i-1,
    and again), so that consecutive frames of a read go to different
    receivers.  The window is the pairs' windows together, over all of
    them (a receiver cannot tell which sender a frame came from without
    decoding it); each sender's share is what its pair would have sent.
    """

    def __init__(self, dialect, window: int, size: int, check: bool):
        self.dialect, self.window, self.size, self.check = dialect, window, size, check
        self.senders: list[_RingSender] = []
        self.sent = self.got = 0
        self.share = 0
        #: Per sender, its frames to every receiver in turn, repeated: a
        #: batch is one slice of it.
        self._cycles: list[bytes] | None = None
        #: What a sender writes per frame (over WebSocket, masked: not
        #: C{size}, what a receiver gets).
        self._written = 0

    def make_pair(self, sender, receiver, share, totals, done, pairs) -> _RingSender:
        st = _RingSender(self, sender, receiver, share, totals, done, pairs)
        self.senders.append(st)
        self.share += share
        received = [0]

        def count(data: bytes) -> None:
            received[0] += len(data)
            got = received[0] // self.size
            n, st.receiver_got = got - st.receiver_got, got
            self._got(n)

        def checked(data: bytes) -> None:
            try:
                n = st.checker.feed(data)
            except (BenchError, FrameError) as e:
                for other in self.senders:
                    other.sender.transport.abortConnection()
                st.fail(str(e))
                return
            self._got(n)

        receiver.on_data = checked if self.check else count
        return st

    def begin(self) -> None:
        if self._cycles is not None:
            return
        names = [st.receiver.name for st in self.senders]
        n = len(names)
        senders = {st.sender.name for st in self.senders}
        repeat = self.window // n + 2
        self._cycles = []
        for i, st in enumerate(self.senders):
            cycle = b"".join(self.dialect.message(st.sender.name, names[(i + k) % n]) for k in range(n))
            self._written = len(cycle) // n  # every frame of a dialect is the same size
            self._cycles.append(cycle * repeat)
            if self.check:
                st.checker = self.dialect.checker(senders, st.receiver.name)
        self.pump()

    def pump(self) -> None:
        inflight = self.sent - self.got
        limit = self.window * len(self.senders)
        if inflight > limit // 2:
            return
        active = [i for i, st in enumerate(self.senders) if st.sent < st.share]
        if not active:
            return
        each = max(1, (limit - inflight) // len(active))
        n_receivers = len(self.senders)
        assert self._cycles is not None
        for i in active:
            st = self.senders[i]
            count = min(each, self.window, st.share - st.sent)
            start = st.sent % n_receivers
            written = self._written
            st.sender.transport.write(self._cycles[i][start * written : (start + count) * written])
            st.sent += count
            self.sent += count

    def _got(self, n: int) -> None:
        if n <= 0:
            return
        self.got += n
        first = self.senders[0]
        first.totals["count"] += n
        if self.got >= self.share:
            for st in self.senders:
                st.finished()
        else:
            self.pump()


class _RingSender(_Pair):
    """
    One sender of a L{_Ring} (and its receiver's count).
    """

    checker = None

    def __init__(self, ring: _Ring, sender, receiver, share, totals, done, pairs):
        super().__init__(sender, receiver, share, totals, done, pairs)
        self.ring = ring
        self.sent = 0
        self.receiver_got = 0

    def begin(self) -> None:
        self.ring.begin()


class _RequestPair(_Pair):
    def __init__(self, sender, receiver, share, totals, done, pairs, dialect):
        super().__init__(sender, receiver, share, totals, done, pairs)
        self.dialect = dialect
        self.request = dialect.request(sender.name, receiver.name)
        self.response = dialect.response(receiver.name, sender.name)
        self.req_off = dialect.mid_offset_in_request
        self.resp_off = dialect.mid_offset_in_response
        self.size = dialect.frame_size
        self.mid = 0
        self.t0 = 0.0
        self.rtts: list[float] = []
        self._sbuf = b""
        self._rbuf = b""
        sender.on_data = self.answered
        receiver.on_data = self.asked

    def begin(self) -> None:
        self.send()

    def send(self) -> None:
        if self.share == 0:
            return
        self.mid = self.mid % 0x7FFFFFFF + 1
        _I32.pack_into(self.request, self.req_off, self.mid)
        self.t0 = time.perf_counter()
        self.sender.transport.write(bytes(self.request))

    def asked(self, data: bytes) -> None:
        buf = self._rbuf + data if self._rbuf else data
        size = self.size
        offset = 0
        while len(buf) - offset >= size:
            frame = buf[offset : offset + size]
            offset += size
            if not self.dialect.is_request(frame):
                return self.fail(f"the receiver {self.receiver.name} got an unexpected frame: {bytes(frame[:40]).hex()}")
            self.response[self.resp_off : self.resp_off + 4] = frame[self.req_off : self.req_off + 4]
            self.receiver.transport.write(bytes(self.response))
        self._rbuf = buf[offset:]

    def answered(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._sbuf + data if self._sbuf else data
        if len(buf) < self.size:
            self._sbuf = buf
            return
        if len(buf) > self.size:
            return self.fail(f"the sender {self.sender.name} got more than one answer")
        self._sbuf = b""
        if not self.dialect.is_response(buf) or _I32.unpack_from(buf, self.resp_off)[0] != self.mid:
            return self.fail(f"the sender {self.sender.name} got an unexpected frame: {buf[:40].hex()}")
        self.rtts.append(now - self.t0)
        self.totals["count"] += 1
        if len(self.rtts) >= self.share:
            self.finished()
        else:
            self.send()


def _percentile(sorted_values: list[float], p: float) -> float:
    """
    The nearest-rank percentile of sorted values.
    """
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- the load generator's processes ----------------------------------------------------


def default_load_procs() -> int:
    """
    Load worker processes by default: one per core but the server's, at
    most 4 (a 2-core machine: one worker, and the server has a core).
    """
    return max(1, min(4, len(usable_cpus()) - 1))


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


class _WorkerProgress:
    """
    L{Progress} in a load worker: reports the stage of the phase it is in,
    with its done and total, to the coordinator every 0.25 s and at the
    stage's end (when there is a progress bar to draw; L{progress_of}
    merges the workers' reports).
    """

    def __init__(self, reactor, report, enabled: bool):
        self.reactor, self.report, self.enabled = reactor, report, enabled
        self._loop = None

    def start(self, stage: str, total: float, done, unit: str = "") -> None:
        """
        A stage begins: C{total} to do, C{done()} done so far, counted in
        C{unit} (C{""}: things, C{"s"}: seconds).
        """
        self.stop()
        self.stage, self.total, self.done, self.unit = stage, total, done, unit
        self.t0 = time.perf_counter()
        if self.enabled:
            self._loop = task.LoopingCall(self._report)
            self._loop.clock = self.reactor
            self._loop.start(0.25)

    def _report(self) -> None:
        self.report({"progress": [self.stage, self.done(), self.total, self.unit, self.t0]})

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
            self._report()


def worker_main() -> int:
    """
    A load worker (C{python -m esf.bench --load-worker}): runs the phases
    its coordinator sends as JSON lines on stdin, one at a time, and answers
    on stdout (C{{"at": point}}, C{{"progress": [stage, done, total, unit,
    t0]}}, C{{"result": ...}} or C{{"error": text}}).
    """
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    class Control(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 2**24

        bench = None
        waiting = None

        def send(self, message: dict) -> None:
            self.sendLine(json.dumps(message).encode())

        def sync(self, point: str) -> defer.Deferred:
            self.waiting = defer.Deferred()
            self.send({"at": point})
            return self.waiting

        def lineReceived(self, line: bytes) -> None:
            message = json.loads(line)
            if "init" in message:
                opts = argparse.Namespace(**message["init"])
                progress = _WorkerProgress(reactor, self.send, opts.progress)
                self.bench = Bench(reactor, opts, progress, self.sync, message["tag"])
            elif "go" in message:
                waiting, self.waiting = self.waiting, None
                waiting.callback(None)
            elif "run" in message:
                d = defer.Deferred.fromCoroutine(self.run(message))
                d.addErrback(lambda f: self.send({"error": f.getTraceback()}))

        async def run(self, message: dict) -> None:
            try:
                method = getattr(self.bench, message["run"])
                server = ServerAddress.from_json(message["server"])
                result = await method(server, message["kind"], message["part"])
            except BenchError as e:
                self.send({"error": str(e)})
            else:
                self.send({"result": result})

        def connectionLost(self, reason) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Control())
    reactor.run()
    return 0


class LineTooLong(Exception):
    """
    A line grew past the longest one allowed.
    """


class Lines:
    """
    Splits a byte stream into lines (without their C{\\n}), in time linear
    in its length: the unfinished tail is kept as the chunks it came in and
    joined once, when its line ends.  (Splitting the whole buffer again for
    each chunk, as C{LineOnlyReceiver} does, or cutting one line at a time
    off it, as C{LineReceiver} does, is quadratic in the length of a line
    that comes in many chunks, such as a request phase's round-trip times.)
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._tail: list[bytes] = []
        self._tail_length = 0

    def feed(self, data: bytes) -> list[bytes]:
        """
        The lines that C{data} ends; raises L{LineTooLong} when a line, ended
        or not, is longer than C{max_length}.
        """
        end = data.rfind(b"\n")
        if end < 0:
            self._tail.append(data)
            self._tail_length += len(data)
            if self._tail_length > self.max_length:
                raise LineTooLong(self._tail_length)
            return []
        if self._tail:
            self._tail.append(data[:end])
            lines = b"".join(self._tail).split(b"\n")
        else:
            lines = data[:end].split(b"\n")
        rest = data[end + 1 :]
        self._tail = [rest] if rest else []
        self._tail_length = len(rest)
        longest = max(self._tail_length, *map(len, lines))
        if longest > self.max_length:
            raise LineTooLong(longest)
        return lines


class _Worker(ProcessProtocol):
    """
    The coordinator's end of one load worker process.
    """

    pid = None

    def __init__(self, coordinator, index: int):
        self.coordinator, self.index = coordinator, index
        # The longest line: a request phase's result, about 25 bytes per
        # round-trip time.
        self._lines = Lines(2**20 + 32 * coordinator.opts.requests)
        self.started = defer.Deferred()
        self.finished: defer.Deferred | None = None
        self.point: str | None = None
        #: What it did last, for the message when it stops answering.
        self.last = "idle"
        #: Its last progress report of each stage of the phase, in order.
        self.stages: dict[str, tuple] = {}
        self.gone = False
        #: Why it cannot be used any more (it exited, or sent nonsense).
        self.broken: str | None = None

    def __str__(self) -> str:
        return f"load worker {self.index} (pid {self.pid})"

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.started.callback(self)

    def send(self, message: dict) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")

    def outReceived(self, data: bytes) -> None:
        if self.broken is not None:
            return
        try:
            lines = self._lines.feed(data)
        except LineTooLong as e:
            self.fail(f"{self} sent a line of {e} bytes or more, longer than any message")
            return
        for line in lines:
            if self.broken is not None:
                return
            try:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self.fail(f"{self} sent a line that is not a message ({e}): {line[:80]!r}")
                return
            if "at" in message:
                self.point = message["at"]
                self.last = f"waiting at {self.point!r}"
                self.coordinator.arrived()
            elif "progress" in message:
                try:
                    stage, done, total, unit, t0 = message["progress"]
                except (TypeError, ValueError):
                    self.fail(f"{self} sent a progress report that is not [stage, done, total, unit, t0]: {line[:80]!r}")
                    return
                self.stages[stage] = (done, total, unit, t0)
            elif "result" in message or "error" in message:
                self.point = None
                self.last = "idle"
                finished, self.finished = self.finished, None
                if finished is None:
                    self.fail(f"{self} sent a result with no phase running")
                    return
                finished.callback(message)
                self.coordinator.arrived()
            else:
                self.fail(f"{self} sent an unknown message: {line[:80]!r}")

    def fail(self, why: str) -> None:
        """
        This worker cannot be used any more: end the phase and the run.
        """
        if self.broken is None:
            self.broken = why
        self.coordinator.abort(why)

    def processEnded(self, reason) -> None:
        self.gone = True
        self.point = None
        if self.finished is not None:
            self.finished = None
            self.fail(f"{self} exited during a phase: {reason.value}")
        self.coordinator.arrived()


class LoadGenerator:
    """
    The load of every phase, spread over C{--load-procs} worker processes,
    each with its own reactor and its share of the pairs, logons or idle
    sessions.  The coordinator (this process) starts a phase in every
    worker, releases each sync point once all the workers are there (after
    reading the server's and the workers' CPU from C{/proc}), and merges
    what they measured.
    """

    def __init__(self, reactor, opts, progress: Progress):
        self.reactor, self.opts, self.progress = reactor, opts, progress
        tag = os.getpid() % 1296
        self.tag = _ALPHABET[tag // 36] + _ALPHABET[tag % 36]
        self.workers: list[_Worker] = []
        self._active: list[_Worker] = []
        self._action = None
        #: Fails the phase in progress (L{abort}).
        self._aborted: defer.Deferred | None = None
        #: The readings at a sync point are being taken.
        self._reading = False

    async def start(self) -> None:
        env = checkout_env()
        init = {k: v for k, v in vars(self.opts).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
        init["progress"] = bool(self.opts.progress)
        for i in range(self.opts.load_procs):
            worker = _Worker(self, i)
            self.reactor.spawnProcess(
                worker, sys.executable, [sys.executable, "-m", "esf.bench", "--load-worker"],
                env=env, childFDs={0: "w", 1: "r", 2: 2},
            )  # fmt: skip
            self.workers.append(worker)
        for worker in self.workers:
            await worker.started
            worker.send({"init": init, "tag": self.tag})

    def stop(self, kill: bool = False) -> None:
        """
        Let the workers go: end of input, on which they exit; C{kill}:
        SIGKILL (after an aborted run, when a worker may not be reading).
        """
        for worker in self.workers:
            if worker.gone:
                continue
            if kill:
                try:
                    worker.transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
            else:
                worker.transport.closeStdin()

    def abort(self, why: str) -> None:
        """
        End the phase in progress, if any, with L{RunAborted}.
        """
        aborted, self._aborted = self._aborted, None
        if aborted is not None:
            aborted.errback(RunAborted(why))

    def _too_slow(self, what: str, timeout: float) -> None:
        running = [w for w in self._active if w.finished is not None]
        late = [f"{w} ({w.last})" for w in running if w.point is None]
        if late:
            why = f"no answer from {', '.join(late)}"
        else:  # every worker waits at a sync point
            why = f"the coordinator did not release {', '.join(f'{w} ({w.last})' for w in running)}"
        self.abort(f"{what} did not end within {timeout:g} s (--phase-timeout): {why}")

    def _parts(self, mode: str, pairs: int | None) -> list[dict]:
        """
        Each worker's share of a phase (only workers with something to do).
        """
        opts = self.opts
        procs = self.opts.load_procs
        if mode in ("send", "request"):
            total = opts.messages if mode == "send" else opts.requests
            shares = _split(total, pairs)
            groups = _split(pairs, min(procs, pairs))
            window = max(1, math.ceil(opts.logon_window / len(groups)))
            parts, first = [], 0
            for n in groups:
                indices = list(range(first, first + n))
                parts.append({"pairs": indices, "shares": [shares[i] for i in indices],
                              "all_pairs": pairs, "window": window})  # fmt: skip
                first += n
            return parts
        count = opts.logons if mode == "logons" else opts.idle
        groups = [n for n in _split(count, procs) if n]
        window = max(1, math.ceil(opts.logon_window / len(groups)))
        parts, first = [], 0
        for n in groups:
            parts.append({"names": list(range(first, first + n)), "all_names": count, "window": window})
            first += n
        return parts

    def arrived(self) -> None:
        """
        A worker reached a sync point or finished: release the point once
        every worker still running is there.
        """
        running = [w for w in self._active if w.finished is not None]
        points = {w.point for w in running}
        if not running or len(points) != 1 or None in points or self._action is None or self._reading:
            return
        (point,) = points
        self._reading = True
        aborted = self._aborted

        def release(_):
            self._reading = False
            if self._aborted is not aborted:  # the phase was aborted meanwhile
                return
            for w in running:
                w.point = None
                w.last = f"released from {point!r}"
                if not w.gone:
                    w.send({"go": point})

        def failed(failure):
            self._reading = False
            self.abort(
                f"the coordinator failed at sync point {point!r}: "
                f"{failure.type.__name__}: {failure.getErrorMessage()}\n{failure.getTraceback()}"
            )

        d = defer.Deferred.fromCoroutine(self._action(point))
        d.addCallbacks(release, failed)

    async def measure(self, mode: str, server, kind: str, pairs: int | None) -> dict:
        """
        One phase against C{server}: the merged figures, as one process
        would have measured them, and the load generator's own CPU.
        """
        parts = self._parts(mode, pairs)
        workers = self.workers[: len(parts)]
        for w in self.workers:
            if w.broken is not None or w.gone:
                raise RunAborted(w.broken or f"{w} has exited")
        readings: dict[str, dict] = {}

        async def action(point: str) -> None:
            if point == "settled":
                await task.deferLater(self.reactor, 0.5, lambda: None)  # let the server settle
            readings[point] = {
                "t": time.perf_counter(),
                "server_cpu": server.cpu_seconds(),
                "load_cpu": [proc_cpu_seconds(w.pid) for w in workers],
                "machine_cpu": machine_cpu_seconds(),
                "memory": server.memory(),
            }

        aborted = self._aborted = defer.Deferred()
        self._active, self._action = workers, action
        address = ServerAddress.of(server).to_json()
        outcomes = []
        for worker, part in zip(workers, parts):
            worker.finished = defer.Deferred()
            worker.stages = {}
            worker.last = "running the phase"
            outcomes.append(worker.finished)
            worker.send({"run": mode, "kind": kind, "server": address, "part": part})
        timeout = self.opts.phase_timeout
        timer = self.reactor.callLater(timeout, self._too_slow, f"{kind}: {mode}", timeout)
        # Whichever comes first: every worker's outcome, or an abort.
        defer.gatherResults(outcomes).addCallback(lambda r: aborted.called or aborted.callback(r))

        def state():
            shown = progress_of([w.stages for w in workers])
            if shown is None:
                return None
            stage, done, total, unit, t0 = shown
            return (f"{kind}: {mode}" + ("" if stage == mode else f", {stage}"), done, total, unit, t0)

        self.progress.start(state)
        try:
            results = await aborted
        finally:
            if timer.active():
                timer.cancel()
            self.progress.stop()
            self._active, self._action, self._aborted, self._reading = [], None, None, False
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise BenchError(errors[0])
        return _merge(mode, self.opts, pairs, [r["result"] for r in results], readings)


_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


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
    if mode == "send" and elapsed is not None:
        return (
            f"the server used only {server:.0f}% of a core: the load's window (--window-bytes) "
            f"or its CPU ({load:.0f}%) set the rate"
        )
    return None


# -- clusters ------------------------------------------------------------------------


class LocalRedis:
    """
    A redis-server this benchmark started on a free 127.0.0.1 port, without
    persistence.
    """

    def __init__(self, workdir: Path, timeout: float):
        executable = shutil.which("redis-server")
        if executable is None:
            raise BenchError("cluster mode needs redis-server (Debian: apt-get install redis-server)")
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

    def cpu_seconds(self):
        total = 0.0
        for pid in [n.pid for n in self.nodes] + [self.redis.pid]:
            seconds = proc_cpu_seconds(pid)
            if seconds is None:
                return None
            total += seconds
        return total

    def memory(self) -> dict:
        return self.nodes[0].memory()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(n.log_tail(lines) for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _receivers_elsewhere(name: str) -> int:
    # Pairs are named s<tag><i> / r<tag><i> (send), q<tag><i> / p<tag><i>
    # (request): senders on node 0, receivers on node 1.
    return 0 if name[0] in "sq" else 1


def _pair_index(name: str) -> int:
    # Each pair on one node, pairs spread over the nodes.
    return int(name[3:])


#: How cluster users are placed on nodes, by name (load workers get the name).
PLACEMENTS = {"receivers_elsewhere": _receivers_elsewhere, "pair_index": _pair_index}


#: (row, figure, which way is better): the cluster rows and what they compare.
CLUSTER_ROWS = [
    ("send on one node: with --cluster / without", "msgs_per_s", "higher"),
    ("send across nodes / one node", "msgs_per_s", "higher"),
    ("request across nodes / one node", "rtt_p50_us", "lower"),
    ("request across nodes / one node", "requests_per_s", "higher"),
    ("send: two nodes / one node, aggregate", "msgs_per_s", "higher"),
]


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
        results = [await measure_once(mode, pairs, nodes, place, cluster) for _ in range(opts.repeat)]
        return _best(mode, results)

    async def measure_once(mode: str, pairs: int, nodes: int, place, cluster: bool) -> dict:
        runs[0] += 1
        group = None
        try:
            extra = ("--cluster", redis.url, "--node-id", f"bench{runs[0]}-") if cluster else ()
            started = [
                LocalServer(
                    "esf", opts, workdir, 2 * pairs + 64, extra[:-1] + (extra[-1] + str(i),)
                    if extra else (),
                )  # fmt: skip
                for i in range(nodes)
            ]
            group = NodeGroup(started, redis, place)
            # Every node must be in the cluster before the pairs log on.
            await task.deferLater(load.reactor, 1.0, lambda: None)
            return await load.measure(mode, group, "esf", pairs)
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
            for (label, figure, better), (two, one) in zip(
                CLUSTER_ROWS,
                [
                    (one_send, alone),
                    (two_send, one_send),
                    (two_req, one_req),
                    (two_req, one_req),
                    (spread, one_send),
                ],
            ):
                row = {"row": label, "pairs": pairs, "figure": figure, "better": better,
                       "measured": two.get(figure), "baseline": one.get(figure)}  # fmt: skip
                errors = [r["error"] for r in (two, one) if "error" in r]
                if errors:
                    row["error"] = errors[0]
                elif row["baseline"]:
                    row["ratio"] = row["measured"] / row["baseline"]
                rows.append(row)
    finally:
        redis.stop()
    return rows


# -- the run -----------------------------------------------------------------------

#: (mode, figure, which way is better, the issue's target: (kind, bound)).
#: kind "ratio": esf/bare against bound; "min"/"max": the esf figure itself.
FIGURES = {
    "send": [("msgs_per_s", "higher", ("ratio_min", 0.6)), ("server_cpu_us_per_msg", "lower", None)],
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
    The issue's targets for a row (C{server_python}: the implementation and
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
        if kind.startswith("ratio"):
            value = row.get("ratio", {}).get(figure)
            text = f"esf/baseline {'>=' if kind == 'ratio_min' else '<='} {bound:.3g}"
            met = None if value is None else (value >= bound if kind == "ratio_min" else value <= bound)
        else:
            value = esf.get(figure)
            text = f"{'>=' if kind == 'min' else '<='} {bound:g}"
            met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        if value is not None:
            out.append({"row": _row_label(row), "figure": figure, "value": value, "target": text, "met": met})
    return out


def _row_label(row: dict) -> str:
    mode = row["mode"]
    if mode in ("send", "request"):
        label = f"{mode}, {row['pairs']} pair{'s' if row['pairs'] != 1 else ''}"
        return label + (", interleaved" if row.get("pattern") == "interleaved" else "")
    return f"{mode}, {row['count']:,}"


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
            variants = opts.pairs if mode in ("send", "request") else [None]
            for pairs in variants:
                row = {"mode": mode}
                if pairs is not None:
                    row["pairs"] = pairs
                if mode == "send" and opts.pattern == "interleaved":
                    row["pattern"] = "interleaved"
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
                        mode, (row.get("esf") or {}).get("median"), (row.get(BASELINE) or {}).get("median")
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
        "machine": machine | {"loadavg_at_end": _loadavg(), "server_python": opts.server_python_version},
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
    conns_needed = (2 * pairs if pairs else row["count"]) + 64
    server = None
    try:
        if kind == "ws" and opts.server:
            raise BenchError("the WebSocket measurement needs a server this run starts (no --server)")
        if kind == "esf" and opts.server:
            server = RemoteServer(*opts.server)
        else:
            server = LocalServer(kind, opts, workdir, conns_needed)
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
            out[figure] = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    return out


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- output ------------------------------------------------------------------------


def _fmt(value, figure: str) -> str:
    if value is None:
        return "-"
    if figure.endswith("_us"):
        return f"{value:,.0f} µs"
    if figure.endswith("_us_per_msg"):
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
    "send": ["elapsed_s", "server_cpu_percent", "load_cpu_percent",
             "machine_cpu_percent", "server_peak_rss_bytes"],
    "request": ["server_cpu_percent", "load_cpu_percent"],
    "logons": ["elapsed_s", "server_cpu_percent", "load_cpu_percent"],
    "idle": ["logons_per_s", "server_rss_bytes", "server_cpu_percent", "load_cpu_percent"],
}


def format_table(report: dict) -> str:
    machine = report["machine"]
    options = report["options"]
    lines = [
        f"esf-bench: {machine['nproc']} CPU(s)"
        + (f" of {machine['cpu_count']}" if machine.get("cpu_count", machine["nproc"]) != machine["nproc"] else "")
        + f", {machine['cpu_model']}, {machine['python']}; "
        f"payload {options['size']} B (frame {options['frame_bytes']} B); server {options['server']}"
        + (f" on {machine['server_python']}" if options.get("server_python") and machine.get("server_python") else "")
        + f"; load generator: {options.get('load_procs', 1)} process(es)",
        "",
        "baseline: the coalescing relay (benchmarks/coalescing_relay.py, one write per destination per "
        "read); the line under each main figure: the write-per-frame relay (benchmarks/bare_relay.py)",
        "",
        "| measurement | esf | baseline | esf/baseline | target |",
        "|---|---:|---:|---:|---|",
    ]
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
                lines.append(f"| {row['row']}, {row['pairs']} | FAILED | {row['error'][:80]} | | |")
                continue
            ratio = row.get("ratio")
            lines.append(
                f"| {row['row']}, {row['pairs']} | {row['figure']} | "
                f"{_fmt(row['measured'], row['figure'])} | {_fmt(row['baseline'], row['figure'])} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |"
            )
    ws_rows = [row for row in report["results"] if "ws" in row]
    if ws_rows:
        lines += ["", "| WebSocket relay | WebSocket | TCP | WebSocket/TCP |", "|---|---:|---:|---:|"]
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
        lines += ["", "WARNING: in these runs the server was not the bottleneck (their figures understate it):"]
        lines += [f"- {warning}" for warning in report["warnings"]]
    return "\n".join(lines)


# -- options -----------------------------------------------------------------------


#: What a phase may take beyond --duration before the run is ended as hung:
#: a worker's phase is capped at --duration, then closes its connections
#: (at most 10 s); the rest is slack for a loaded machine.
PHASE_GRACE = 30.0


def _host_port(value: str):
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--server takes HOST:PORT, not {value!r}")
    return host or "127.0.0.1", int(port)


def _pairs(value: str) -> list[int]:
    try:
        pairs = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pairs takes numbers, e.g. 1,50, not {value!r}") from None
    if not pairs or any(p < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"--pairs takes positive numbers, not {value!r}")
    return pairs


def _positive(kind):
    def parse(value: str):
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {value}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="esf-bench",
        description="Load an esf server from load worker processes and measure relay throughput "
        "(over TCP and WebSocket), round-trip latency, logons/s and memory per idle session, next to "
        "two bare Twisted relays: the coalescing baseline (one write per destination per read) and "
        "the write-per-frame relay.",
    )
    p.add_argument("--server", type=_host_port, metavar="HOST:PORT",
                   help="measure this running esf server instead of starting one (no CPU/RSS figures)")
    p.add_argument("--mode", default="all", choices=MODES + ("all", "cluster"),
                   help="what to measure (default all; cluster: nodes joined through a redis-server "
                   "this run starts)")
    p.add_argument("--pairs", type=_pairs, default=None, metavar="N[,N...]",
                   help="sender/receiver pairs for send and request; a list runs each (default 1)")
    p.add_argument("--messages", type=_positive(int), default=None, help="messages in send mode, in all (default 100000)")
    p.add_argument("--requests", type=_positive(int), default=None, help="round trips in request mode, in all (default 20000)")
    p.add_argument("--size", type=int, default=100, help="payload bytes per message (default 100)")
    p.add_argument("--logons", type=_positive(int), default=None, help="connections that log on in logons mode (default 10000)")
    p.add_argument("--idle", type=_positive(int), default=None, help="sessions held in idle mode (default 10000)")
    p.add_argument("--hold", type=_positive(float), default=None, help="seconds the idle sessions are held (default 12)")
    p.add_argument("--heartbeat", type=_positive(float), default=10.0, help="seconds between heartbeats of an idle session (default 10)")
    p.add_argument("--logon-window", type=_positive(int), default=500, help="logons in flight at once (default 500)")
    p.add_argument("--backlog", type=_positive(int), default=1024,
                   help="listen backlog of the servers this run starts (default 1024; Twisted's own is 50)")
    p.add_argument("--pattern", choices=("pairs", "interleaved"), default="pairs",
                   help="in send mode, who sends to whom: pairs (each sender to its own receiver, "
                   "the default) or interleaved (every sender cycles over every receiver of its "
                   "load worker, so that consecutive frames go to different receivers)")
    p.add_argument("--window-bytes", type=_positive(int), default=2**20,
                   help="bytes one sender may have in flight in send mode (default 1048576)")
    p.add_argument("--total-window-bytes", type=_positive(int), default=8 * 2**20,
                   help="bytes all senders together may have in flight (default 8 MiB)")
    p.add_argument("--bare", dest="bare", action="store_true", default=True,
                   help="also measure the two bare relays and print ratios (default)")
    p.add_argument("--no-bare", dest="bare", action="store_false", help="measure esf only")
    p.add_argument("--load-procs", type=_positive(int), default=None, metavar="N",
                   help="load generator processes, each with its own reactor and a share of the load "
                   f"(default {default_load_procs()}: one per core but the server's, at most 4)")
    p.add_argument("--websocket", dest="websocket", action="store_true", default=None,
                   help="in send mode, also relay over WebSocket and give the ratio to TCP "
                   "(default, unless --server)")
    p.add_argument("--no-websocket", dest="websocket", action="store_false",
                   help="relay over TCP only")
    p.add_argument("--baseline-relay", dest="baseline_relay", metavar="PATH",
                   help="the baseline relay, which writes once per destination per read "
                   "(default: benchmarks/coalescing_relay.py of this checkout)")
    p.add_argument("--bare-relay", dest="bare_relay", metavar="PATH",
                   help="the write-per-frame relay, the second yardstick "
                   "(default: benchmarks/bare_relay.py of this checkout)")
    p.add_argument("--server-python", metavar="PATH", default=sys.executable,
                   help="the Python that runs the servers this benchmark starts, esf and the bare relays "
                   "(default: this one); it must be able to import Twisted, attrs and zope.interface, "
                   "and imports esf from this checkout")
    p.add_argument("--check", action="store_true", default=None,
                   help="decode and validate every frame at the receivers (slower load generator)")
    p.add_argument("--duration", type=_positive(float), default=None,
                   help="cap in seconds on each phase; a capped phase reports what it got (default 120); "
                   "in send and request, nothing arriving for 10 s (at most half of it) fails the phase")
    p.add_argument("--phase-timeout", type=_positive(float), default=None, metavar="SECONDS",
                   help="how long one phase may take in all before the run is ended as hung, with status 1: "
                   "a load worker or the coordinator stopped answering (default: --duration + "
                   f"{PHASE_GRACE:g})")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (2 pairs, 2000 messages, 200 logons, 200 idle sessions, --check): a smoke test")
    p.add_argument("--repeat", type=_positive(int), default=1,
                   help="run each measurement this many times, alternating esf and bare, and keep "
                   "the best run of each (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (- for stdout)")
    p.add_argument("--password", default="bench", help="password sent at logon")
    p.add_argument("--system-token", default="", help="system token sent at logon")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress bar even when stderr is not a terminal")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--keep-logs", action="store_true", help="keep the started servers' logs")
    p.add_argument("--startup-timeout", type=_positive(float), default=20.0, help=argparse.SUPPRESS)
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
        "check": True if quick else False,
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
                # checked above): a checkout without benchmarks/.
                print(
                    f"esf-bench: the {BASELINES[kind][1]} (benchmarks/{BASELINES[kind][0]}) is not here; "
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
    limit = raise_fd_limit(most + 256)
    if limit < most + 64:
        parser.error(f"the open-files limit ({limit}) is too low for {most} connections; raise ulimit -n")
    return opts


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

