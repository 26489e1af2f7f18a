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
from typing import Any, BinaryIO

from _real_parts import need_program

from esf.bench import free_port

__all__ = ["RedisServer", "SentinelSet", "connected_link", "require_redis_server"]


def require_redis_server() -> str:
    """
    The path of C{redis-server}; skip (fail under CI) without it.
    """
    __tracebackhide__ = True
    return need_program(
        "redis-server",
        "the cluster tests need a real one (Debian: apt-get install redis-server; .ci/run installs it)",
    )


async def connected_link(url: str) -> Any:
    """
    A L{esf.cluster._link.RedisLink} to C{url} on the global reactor, once
    it is connected (stop it with C{await link.stop()}).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from esf.cluster._link import RedisLink, RedisURL

    link = RedisLink(reactor, RedisURL.parse(url))
    connected: Deferred[None] = Deferred()
    link.start(lambda: connected.called or connected.callback(None), lambda: None)
    await connected
    return link


class RedisServer:
    """
    One C{redis-server} process without persistence, its files in
    C{directory}; L{restart} keeps its port (and loses its data).
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        args: tuple = (),
        *,
        sentinel_config: Path | None = None,
    ):
        self.executable = require_redis_server()
        self.args = tuple(args)
        self.sentinel_config = sentinel_config
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.sentinel_config is not None:
            # A Sentinel: its configuration file says everything (and is
            # rewritten by it).
            argv = [self.executable, str(self.sentinel_config), "--sentinel"]
        else:
            argv = [
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
            ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(_request(args))
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def reply(self, *args: str | bytes) -> Any:
        """
        Run one command over a plain socket; its whole reply: L{bytes},
        L{int}, C{None} or a list of them (an error reply raises
        L{AssertionError}).
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(_request(args))
            return _read_reply(s.makefile("rb"))

    def info(self, section: str) -> bytes:
        """
        What C{INFO section} says.
        """
        return bytes(self.reply("INFO", section))


def _request(args: tuple[str | bytes, ...]) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _read_reply(f: BinaryIO) -> Any:
    line = f.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise AssertionError(f"Redis answered an error: {rest.decode(errors='replace')}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        data = f.read(int(rest) + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(f) for _ in range(count)]
    raise AssertionError(f"not a Redis reply: {line!r}")


class SentinelSet:
    """
    A master, one replica of it and three Sentinels watching them (quorum
    2), each a C{redis-server} of the test run's own on a free 127.0.0.1
    port with its files in C{directory}; the Sentinels are C{redis-server
    CONF --sentinel} (Debian's redis-server package has no
    C{redis-sentinel} of its own), and notice a dead master within
    C{down_after} ms.

    @ivar service: the name the Sentinels know the master by.
    """

    service = "esf-test"

    def __init__(self, directory: Path, *, down_after: int = 500, failover_timeout: int = 2000):
        self.directory = directory
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.master = RedisServer(directory / "master")
        self.replica = RedisServer(
            directory / "replica", args=("--replicaof", "127.0.0.1", str(self.master.port))
        )
        self.sentinels: list[RedisServer] = []

    def url(self, db: int = 0) -> str:
        """
        The C{redis+sentinel://} URL of the service.
        """
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    def start(self, timeout: float = 15.0) -> SentinelSet:
        """
        Start them all, and wait until a failover could happen; whatever
        started is stopped again if that fails.
        """
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> SentinelSet:
        for server in (self.master, self.replica):
            server.directory.mkdir(parents=True, exist_ok=True)
            server.start()
        for i in range(3):
            directory = self.directory / f"sentinel{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"  # Sentinel rewrites it: one each
            sentinel = RedisServer(directory, sentinel_config=conf)
            conf.write_text(
                f"port {sentinel.port}\nbind 127.0.0.1\ndir {directory}\n"
                f"logfile {sentinel.log_path}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(sentinel)  # stopped by stop() even if it fails to start
            sentinel.start()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the Sentinels did not see the replica and each other within {timeout} s: "
                    + "\n".join(s.log() for s in self.sentinels)
                )
            time.sleep(0.1)
        return self

    def ready(self) -> bool:
        """
        Whether the replica is in sync and every Sentinel knows it and the
        two other Sentinels (so that a failover can happen).
        """
        if b"master_link_status:up" not in self.replica.info("replication"):
            return False
        for sentinel in self.sentinels:
            state = sentinel.reply("SENTINEL", "MASTER", self.service)
            fields = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else {}
            if fields.get(b"num-slaves") != b"1" or fields.get(b"num-other-sentinels") != b"2":
                return False
        return True

    def master_port(self) -> int:
        """
        The port of the master the first Sentinel names now.
        """
        _host, port = self.sentinels[0].reply("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def stop(self) -> None:
        for server in (*self.sentinels, self.master, self.replica):
            server.stop()
