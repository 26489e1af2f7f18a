"""
Tests of C{twistd esf --log-level} (esf.tap._loglevel): the observer twistd
would make, filtered, set on twistd's application.
"""

from __future__ import annotations

import pytest
from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from esf.tap import Options, makeService
from esf.tap._loglevel import TwistdLogRoot, filtered, parse_level


def twistd(*args):
    """
    Parse a C{twistd -n --logfile=- esf ARGS} command line (the log to
    stdout); make its application as twistd does.
    """
    config = ServerOptions()
    config.parseOptions(["-n", "--logfile=-", "esf", "--port", "tcp:0:interface=127.0.0.1", *args])
    root = makeService(config.subOptions)
    application = service.Application("esf")
    root.setServiceParent(application)
    return root, application


def emit(observer):
    log = Logger(namespace="esf.test", observer=observer)
    for level in LogLevel.iterconstants():
        log.emit(level, "a {name} event", name=level.name)


@pytest.mark.parametrize(
    "args, written",
    [
        ((), ["info", "warn", "error", "critical"]),
        (("--log-level", "debug"), ["debug", "info", "warn", "error", "critical"]),
        (("--log-level", "WARN"), ["warn", "error", "critical"]),
    ],
)
def test_twistds_observer_is_filtered(capsys, args, written):
    root, application = twistd(*args)
    assert isinstance(root, TwistdLogRoot)
    observer = application.getComponent(ILogObserver)
    assert observer is not None
    emit(observer)
    text = capsys.readouterr().out
    assert [
        n for n in ("debug", "info", "warn", "error", "critical") if f"a {n} event" in text
    ] == written


def test_below_the_level_is_never_formatted():
    formatted = []

    class Spy:
        def __format__(self, spec):
            formatted.append(spec)
            return "spy"

    seen = []
    observer = filtered(seen.append, LogLevel.info)  # a legacy observer
    log = Logger(observer=observer)
    log.debug("{spy}", spy=Spy())
    assert seen == [] and formatted == []
    log.info("{x}", x=1)
    assert len(seen) == 1


def test_bad_level():
    with pytest.raises(usage.UsageError, match="--log-level: a log level is one of debug, info"):
        Options().parseOptions(["--log-level", "verbose"])
    assert parse_level(" Error ") is LogLevel.error


def test_without_twistd_the_service_is_the_servers():
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
    assert not isinstance(makeService(options), TwistdLogRoot)
