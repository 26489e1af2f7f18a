"""
A real C{twistd -n esf} process for end-to-end tests (L{TwistdServer}),
exported by L{esf.testing}.

It starts the server on port 0 with C{--port-file}, learns every port it
listens on from that file (written once all listen), and stops it with
SIGTERM, counting the documented exit by the re-raised signal as a clean
one.  Its log is kept in a file and put into every failure's message.

Waiting is on the wall clock: blocking (L{TwistdServer.start},
L{TwistdServer.stop}) for plain tests, or on a reactor
(L{TwistdServer.start_deferred}, L{TwistdServer.stop_deferred}) for
trial's C{TestCase} and pytest-twisted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

import esf

__all__ = ["TwistdServer", "TwistdFailed"]

#: How often the process and its port file are looked at, in seconds.
POLL = 0.05

#: How much of the end of the log a failure's message shows.
LOG_TAIL = 20_000


class TwistdFailed(AssertionError):
    """
    The server did not start, or did not stop cleanly; the message ends
    with its log.
    """


class TwistdServer:
    """
    One C{twistd -n esf} process with the application's options.

    @ivar ports: once started, the port file's content: for each kind of
        listener (C{"esf"}, and C{"websocket"}, C{"metrics"},
        C{"admin-api"} when asked for) a list of C{{"host", "port"}},
        and the server's C{"pid"}.
    @ivar port: once started, the port of the esf listener (0 for a
        UNIX socket).
    @ivar directory: where the log (C{twistd.log}) and the port file
        (C{ports.json}) are, and the server's working directory unless
        C{cwd} is given.
    @ivar returncode: once stopped, the process's exit status (negative:
        the signal that ended it).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        directory: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        python_path: Sequence[str | os.PathLike[str]] = (),
        port: str | None = "tcp:0:interface=127.0.0.1",
        twistd_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ):
        """
        @param args: C{twistd esf}'s options (C{--handler}, C{--auth},
            C{--offline}, C{--websocket}, ...).
        @param directory: for the log and the port file; a temporary
            directory (removed by L{stop}) when C{None}.
        @param cwd: the server's working directory (C{directory} when
            C{None}, so that relative paths in C{args} land there).
        @param env: variables set for the server on top of this process's.
        @param python_path: directories put first on the server's
            C{PYTHONPATH} (where the application's modules are); then
            come the directory esf is imported from, this process's
            working directory and its C{PYTHONPATH}, each made absolute.
        @param port: the C{--port} given (C{None}: give your own in
            C{args}).
        @param twistd_args: C{twistd}'s own options, before C{esf}.
        """
        self.args = list(args)
        self._owned = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="esf-twistd-")).absolute()
        self.cwd = Path(cwd).absolute() if cwd is not None else self.directory
        self.log_path = self.directory / "twistd.log"
        self.port_file = self.directory / "ports.json"
        self.env = dict(env or {})
        self.python_path = [str(p) for p in python_path]
        self.port_option = port
        self.twistd_args = list(twistd_args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, Any] = {}
        self.port = 0
        self.returncode: int | None = None
        self._log_file: IO[bytes] | None = None
        self._log_text: str | None = None
        self._deadline = 0.0
        self._killed = False
        self._stopped = False

    def __repr__(self) -> str:
        state = f"port {self.port}" if self.port else "not started"
        return f"<TwistdServer {state} {' '.join(self.args)}>"

    # -- what it runs -------------------------------------------------------------------

    def command(self) -> list[str]:
        """
        The command line: this interpreter runs C{twistd} (so the server
        imports what this process would), without a pid file, logging to
        standard output.
        """
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        command += ["-n", "--pidfile=", "--logfile=-", *self.twistd_args, "esf"]
        if self.port_option is not None:
            command += ["--port", self.port_option]
        return command + ["--port-file", str(self.port_file), *self.args]

    def environment(self) -> dict[str, str]:
        """
        The server's environment.
        """
        env = dict(os.environ)
        env.update(self.env)
        esf_root = str(Path(esf.__file__).resolve().parent.parent)
        paths = [*self.python_path, esf_root, os.getcwd()]
        # Made absolute: the server runs in another directory.
        paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log(self) -> str:
        """
        What the server has logged so far (its standard output and error).
        """
        if self._log_text is not None:
            return self._log_text
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _failed(self, what: str) -> TwistdFailed:
        text = self.log()
        if len(text) > LOG_TAIL:
            text = "...\n" + text[-LOG_TAIL:]
        return TwistdFailed(f"{what}\n{' '.join(self.command())}\n--- its log ---\n{text}")

    # -- starting -----------------------------------------------------------------------

    def _launch(self) -> None:
        if self.process is not None:
            raise RuntimeError(f"{self!r} was already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.port_file.exists():
            self.port_file.unlink()
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 -- open while twistd runs
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=self.environment(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._deadline = time.monotonic() + self.start_timeout

    def _started(self) -> bool:
        """
        Whether the port file is there (then read it); raise when the
        server exited or took too long.
        """
        assert self.process is not None
        if self.port_file.exists():
            self.ports = json.loads(self.port_file.read_text())
            self.port = int(self.ports["esf"][0].get("port", 0))
            return True
        if self.process.poll() is not None:
            self._ended()
            raise self._failed(f"twistd esf exited with {self.returncode} as it started")
        if time.monotonic() > self._deadline:
            self._kill()
            self._ended()
            raise self._failed(f"twistd esf did not listen within {self.start_timeout} s")
        return False

    def start(self) -> TwistdServer:
        """
        Start the server and wait (blocking) until it listens.

        @raise TwistdFailed: it exited first or did not listen in time.
        """
        self._launch()
        while not self._started():
            time.sleep(POLL)
        return self

    def start_deferred(self, reactor: IReactorTime | None = None) -> Deferred[TwistdServer]:
        """
        L{start} without blocking: a Deferred that fires with this server
        once it listens, waiting on C{reactor} (the global one when
        C{None}).
        """
        self._launch()
        return Deferred.fromCoroutine(self._wait(self._started, reactor)).addCallback(
            lambda _: self
        )

    # -- stopping -----------------------------------------------------------------------

    def _signal(self) -> bool:
        """
        Send SIGTERM unless it has exited; whether there is anything to
        wait for.
        """
        if self._stopped or self.process is None:
            return False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self._deadline = time.monotonic() + self.stop_timeout
        return True

    def _exited(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            return True
        if time.monotonic() > self._deadline:
            self._kill()
            return True
        return False

    def _kill(self) -> None:
        assert self.process is not None
        self._killed = True
        self.process.kill()
        self.process.wait(10)

    def _ended(self) -> int:
        """
        The process has exited: keep its log and tidy up.
        """
        assert self.process is not None
        self._stopped = True
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        code = self.returncode = self.process.returncode
        if self._owned:
            self._log_text = self.log()
            shutil.rmtree(self.directory, ignore_errors=True)
        return code

    def _finish(self) -> int:
        """
        The process has exited after L{_signal}: judge the exit.
        """
        code = self._ended()
        if self._killed:
            raise self._failed(f"twistd esf did not stop within {self.stop_timeout} s of SIGTERM")
        # twistd re-raises the SIGTERM that stopped it once the shutdown is
        # done (docs/server.md): the documented clean exit.
        if code not in (0, -signal.SIGTERM):
            raise self._failed(f"twistd esf exited with {code}")
        return code

    def stop(self) -> int | None:
        """
        Stop the server with SIGTERM and wait (blocking) until it exits; it
        is killed after C{stop_timeout} seconds.  Once stopped, calling it
        again does nothing.

        @return: the exit status (C{-SIGTERM}, or 0), or C{None} if it was
            never started.
        @raise TwistdFailed: it had to be killed, or exited with another
            status (it crashed, or failed as it shut down).
        """
        if not self._signal():
            return self.returncode
        while not self._exited():
            time.sleep(POLL)
        return self._finish()

    def kill(self) -> int | None:
        """
        Kill the server with SIGKILL, as a crash would, and wait until it
        is gone: for tests of what survives a crash.  L{stop} then has
        nothing left to do.

        @return: the exit status (C{-SIGKILL}), or C{None} if it was never
            started.
        """
        if self._stopped or self.process is None:
            return self.returncode
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        return self._ended()

    def stop_deferred(self, reactor: IReactorTime | None = None) -> Deferred[int | None]:
        """
        L{stop} without blocking, waiting on C{reactor}.
        """
        if not self._signal():
            return succeed(self.returncode)
        d = Deferred.fromCoroutine(self._wait(self._exited, reactor))
        return d.addCallback(lambda _: self._finish())

    async def _wait(self, done: Callable[[], bool], reactor: IReactorTime | None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        while not done():
            await deferLater(reactor, POLL, lambda: None)

    # -- as a context manager -----------------------------------------------------------

    def __enter__(self) -> TwistdServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
