"""
A real C{redis-server} for tests, on a free 127.0.0.1 port, started and
stopped by the test run (never a shared or system one).

Where C{redis-server} is missing the tests that need it skip with a loud
reason, except under CI, where they fail (L{_real_parts.missing}).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from _real_parts import need_program

from esf.bench import free_port

__all__ = ["RedisServer", "require_redis_server"]


def require_redis_server() -> str:
    """
    The path of C{redis-server}; skip (fail under CI) without it.
    """
    __tracebackhide__ = True
    return need_program(
        "redis-server",
        "the cluster tests need a real one (Debian: apt-get install redis-server; .ci/run installs it)",
    )


class RedisServer:
    """
    One C{redis-server} process without persistence, its files in
    C{directory}; L{restart} keeps its port (and loses its data).
    """

    def __init__(self, directory: Path, port: int | None = None, args: tuple = ()):
        self.executable = require_redis_server()
        self.args = tuple(args)
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.log_path),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log()}")
            try:
                if self.command("PING") in (b"+PONG", b"-NOAUTH Authentication required."):
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"redis-server did not answer within {timeout} s: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        """
        Kill it and start it again on the same port, empty.
        """
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def command(self, *args: str | bytes) -> bytes:
        """
        Run one command over a plain socket; the first line of the reply
        (enough for checks like PING, DBSIZE, EXISTS).
        """
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]
