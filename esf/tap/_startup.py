"""
How C{twistd esf} fails to start: with one line that says what to change,
and exit status 1, never a traceback.

A usage error (a wrong option) is found before twistd begins logging: it
ends the process with the line on stderr (L{start_failed}).  An endpoint
that cannot listen is found once twistd has begun logging and is starting
the services: the line is logged, and L{StartFailed} goes through twistd's
own handling of a failed start (L{OptionEndpoint}, L{quiet_start_failures}).
"""

from __future__ import annotations

import errno
import sys
from types import TracebackType
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["OptionEndpoint", "StartFailed", "quiet_start_failures", "start_failed"]

log = Logger(namespace="esf.server")


def start_failed(text: str) -> NoReturn:
    """
    End C{twistd esf} before it runs, with C{text} as the one line on
    stderr and exit status 1 (what twistd does for its own start-up
    errors, such as a user ID it cannot switch to).
    """
    raise SystemExit(f"twistd esf: {text}")


#: What to change when a port cannot be bound, by the socket's errno.
_LISTEN_ADVICE: dict[int, str] = {
    errno.EADDRINUSE: "something else listens there: stop it, or give another",
    errno.EACCES: (
        "not allowed: a port below 1024 needs root (drop it with twistd --uid), or give another"
    ),
    errno.EADDRNOTAVAIL: "this machine has no such address: give another",
}


class StartFailed(Exception):
    """
    A service of C{twistd esf} could not start; why, and what to change, is
    logged already, in one line.
    """


def quiet_start_failures() -> None:
    """
    Under twistd: a L{StartFailed} is not printed again as a traceback.

    twistd handles an exception from the application's start itself (it
    removes the PID file, and tells the parent of a daemon what failed),
    then lets it end the process, with exit status 1, through
    C{sys.excepthook}: the one place left to keep the traceback out of the
    log.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not issubclass(kind, StartFailed):
            previous(kind, value, tb)

    sys.excepthook = hook


@implementer(IStreamServerEndpoint)
class OptionEndpoint:
    """
    The endpoint an option names.  When it cannot listen, the server's start
    logs one line saying which option to change and raises L{StartFailed}.
    """

    def __init__(self, option: str, description: str, endpoint: IStreamServerEndpoint):
        self.option = option
        self.description = description
        self.endpoint = endpoint

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        return self.endpoint.listen(factory).addErrback(self._failed)

    def _failed(self, failure: Failure) -> NoReturn:
        error = failure.value
        cause = error.socketError if isinstance(error, CannotListenError) else error
        code = getattr(cause, "errno", None)
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        advice = "give another"
        if isinstance(code, int):
            advice = _LISTEN_ADVICE.get(code, advice)
        text = (
            f"--{self.option} {self.description!r} cannot listen ({reason}): "
            f"{advice} --{self.option}"
        )
        log.error("twistd esf: {text}", text=text, esf_event="listen_failed", option=self.option)
        raise StartFailed(text)
