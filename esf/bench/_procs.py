"""
The machine and the processes C{esf-bench} starts: what the machine is,
the CPU and memory of a process and of the cores from C{/proc}, free ports,
and starting, awaiting and stopping a server process.
"""

from __future__ import annotations

import inspect
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ._wire import BenchError


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
        # Which esf is measured: the servers import the one this module
        # comes from (checkout_env), whatever the current directory holds.
        "esf": str(checkout_root() / "esf"),
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


def default_load_procs() -> int:
    """
    Load worker processes by default: one per core but the server's, at
    most 4 (a 2-core machine: one worker, and the server has a core).
    """
    return max(1, min(4, len(usable_cpus()) - 1))


def _ephemeral_ports() -> tuple[int, int]:
    """
    The range the kernel picks the local ports of outgoing connections
    (and of binds to port 0) from.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(n) for n in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """
    A TCP port of 127.0.0.1 that is free now (the one definition the tests
    and the benchmark scripts use too).

    Drawn at random from below the kernel's ephemeral range where there is
    room (10000 up to it), not the kernel's pick for a bind to port 0: such
    a port is in the range the kernel takes the local ports of outgoing
    connections from, so that another process's connection (a test running
    beside this one, a client of a node) may take it between this call and
    the bind of the server it is for.
    """
    low, _high = _ephemeral_ports()
    candidates = range(10000, low) if low - 10000 >= 1000 else None
    for _ in range(100):
        port = random.choice(candidates) if candidates is not None else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise BenchError("no free TCP port found on 127.0.0.1")


def checkout_root() -> Path:
    """
    The directory that holds the esf package this module comes from (a
    checkout, or an environment's site-packages).
    """
    return Path(__file__).resolve().parent.parent.parent


def checkout_env() -> dict[str, str]:
    """
    This process's environment with the checkout this module comes from
    first on C{PYTHONPATH}: the esf that the servers and load workers it
    starts import.
    """
    root = str(checkout_root())
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
    process = subprocess.Popen(
        esf_server_argv(sys.executable, port, log_path, 1024, args), env=checkout_env()
    )
    why = wait_listening(process, [port], timeout)
    if why is not None:
        process.kill()
        process.wait()
        raise BenchError(f"the esf server {why}: see {log_path}")
    return process


def describe_interpreter() -> str:
    """
    C{"Implementation version"} of this Python; on PyPy, with the size of
    its garbage collector's nursery (C{PYPY_GC_NURSERY}), which moves a
    relay's figures there by a third or more (docs/performance.md, "What to
    tune"): the figures of two runs compare only at the same size.  (Run as
    it is, source and all, in the Python a benchmark describes: it imports
    nothing of esf.)
    """
    import gc
    import platform

    text = f"{platform.python_implementation()} {platform.python_version()}"
    if platform.python_implementation() == "PyPy":
        text += f", GC nursery {gc.get_stats().nursery_size}"  # type: ignore[attr-defined]
    return text


def interpreter_info(executable: str) -> str | None:
    """
    L{describe_interpreter} of the Python at C{executable}, or L{None} if
    it cannot be run.
    """
    if executable == sys.executable:
        return describe_interpreter()
    script = inspect.getsource(describe_interpreter) + "\nprint(describe_interpreter())\n"
    try:
        out = subprocess.run(
            [executable, "-c", script],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
