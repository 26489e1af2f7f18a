"""
C{twistd esf --log-level}: events below the level are dropped before
twistd's log observer formats them.

twistd chooses its log observer (C{--logfile}, C{--syslog}, stdout under
C{--nodaemon}) as it starts the application, after the plugin has made its
service; the one way it offers an application to choose instead is the
application's L{ILogObserver} component.  L{TwistdLogRoot}, the root of the
server's services under twistd, sets that component when twistd adds it to
the application: the observer twistd would have made, behind a
L{FilteringLogObserver}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
)

__all__ = ["LEVELS", "TwistdLogRoot", "filtered", "parse_level"]

#: The names --log-level takes, lowest first.
LEVELS = tuple(level.name for level in LogLevel.iterconstants())


def parse_level(name: str) -> LogLevel:
    """
    The level called C{name} (C{"debug"}, C{"info"}, C{"warn"},
    C{"error"}, C{"critical"}).

    @raise ValueError: there is none of that name.
    """
    try:
        level: LogLevel = LogLevel.levelWithName(name.strip().lower())
    except Exception:  # InvalidLogLevelError; a NamedConstant lookup may raise others
        raise ValueError(f"a log level is one of {', '.join(LEVELS)}, not {name!r}") from None
    return level


def filtered(observer: Any, level: LogLevel) -> ILogObserver:
    """
    C{observer} (a L{twisted.logger} or legacy observer) behind a filter
    that drops every event below C{level}, so that it never formats them.
    """
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


class TwistdLogRoot(MultiService):
    """
    The root of C{twistd esf}'s services: when twistd adds it to its
    application, it gives the application, as its L{ILogObserver}, the log
    observer twistd would have made from C{twistd_options}, filtered at
    C{level}.

    (An observer given with twistd's own C{--logger} is twistd's to call
    and is not filtered.)
    """

    def __init__(self, level: LogLevel, twistd_options: Any):
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService has no annotations
        self.level = level
        self.twistd_options = twistd_options

    def setServiceParent(self, parent: Any) -> None:
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None and not self.twistd_options.get("logger"):
            # The platform's runner knows how twistd makes its observer.
            from twisted.scripts import twistd

            runner: Any = getattr(twistd, "_SomeApplicationRunner")
            logger = runner.loggerFactory(self.twistd_options)
            set_component(ILogObserver, filtered(logger._getLogObserver(), self.level))
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]
