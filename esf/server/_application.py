"""
An application given as one or several objects: each is used for the
interfaces it provides.

C{twistd esf --handler} and L{engine_for} share these rules: an object must
provide at least one of L{IBasicHandler}, L{ICustomizeHandler},
L{IGroupManager}, L{IOfflinePolicy}, L{IRelogonPolicy}, L{IRelayPolicy}
and L{IEngineAware}; the first six are roles the engine has one of, so two
objects providing the same one are refused; every L{IEngineAware} object
is initialized with the engine, in the order given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface.interface import InterfaceClass

from esf.interfaces import (
    IBasicHandler,
    ICustomizeHandler,
    IEngineAware,
    IGroupManager,
    IOfflinePolicy,
    IOfflineStore,
    IPresence,
    IRelayPolicy,
    IRelogonPolicy,
)

from ._config import ServerConfig
from ._engine import ServerEngine

__all__ = ["Applications", "engine_for"]

#: The interfaces an application object may provide, in the order errors name them.
APPLICATION_INTERFACES: tuple[InterfaceClass, ...] = (
    IBasicHandler,
    ICustomizeHandler,
    IGroupManager,
    IOfflinePolicy,
    IRelogonPolicy,
    IRelayPolicy,
    IEngineAware,
)

#: The interfaces the engine uses one object for.
_ONE_EACH: tuple[InterfaceClass, ...] = (
    IBasicHandler,
    ICustomizeHandler,
    IGroupManager,
    IOfflinePolicy,
    IRelogonPolicy,
    IRelayPolicy,
)


@attrs.frozen
class Applications:
    """
    Application objects sorted by the part they play.

    @ivar handler: the L{IBasicHandler}, or C{None}.
    @ivar customize_handler: the L{ICustomizeHandler}, or C{None}.
    @ivar group_manager: the L{IGroupManager}, or C{None}.
    @ivar offline_policy: the L{IOfflinePolicy}, or C{None}.
    @ivar relogon_policy: the L{IRelogonPolicy}, or C{None}.
    @ivar relay_policy: the L{IRelayPolicy}, or C{None}.
    @ivar engine_aware: every L{IEngineAware} object, in the order given.
    """

    handler: Any = None
    customize_handler: Any = None
    group_manager: Any = None
    engine_aware: tuple[Any, ...] = ()
    offline_policy: Any = None
    relogon_policy: Any = None
    relay_policy: Any = None

    @classmethod
    def sort(cls, applications: Iterable[Any]) -> Applications:
        """
        Sort C{applications} by the interfaces each provides.

        @raise ValueError: with a one-line message when an object provides
            none of the interfaces, is given twice, or provides a role
            another object already fills.
        """
        holders: dict[InterfaceClass, Any] = {}
        engine_aware: list[Any] = []
        given: list[Any] = []
        for app in applications:
            if any(app is other for other in given):
                raise ValueError(f"application object {app!r} is given twice")
            given.append(app)
            provided = [i for i in APPLICATION_INTERFACES if i.providedBy(app)]
            if not provided:
                names = ", ".join(i.__name__ for i in APPLICATION_INTERFACES)
                raise ValueError(f"application object {app!r} provides none of {names}")
            for interface in provided:
                if interface is IEngineAware:
                    engine_aware.append(app)
                elif interface in holders:
                    raise ValueError(
                        f"{interface.__name__} is provided by both {holders[interface]!r} "
                        f"and {app!r}; give one object per interface"
                    )
                else:
                    holders[interface] = app
        return cls(
            holders.get(IBasicHandler),
            holders.get(ICustomizeHandler),
            holders.get(IGroupManager),
            tuple(engine_aware),
            holders.get(IOfflinePolicy),
            holders.get(IRelogonPolicy),
            holders.get(IRelayPolicy),
        )

    def initialize(self, engine: ServerEngine) -> None:
        """
        Call C{initialize(engine)} on every L{IEngineAware} object.
        """
        for app in self.engine_aware:
            app.initialize(engine)


def engine_for(
    *applications: Any,
    config: ServerConfig | None = None,
    clock: IReactorTime,
    presence: IPresence | None = None,
    node_id: str | None = None,
    offline_store: IOfflineStore | None = None,
) -> ServerEngine:
    """
    A L{ServerEngine} for an application given as one object or several,
    each used for the interfaces it provides (L{IBasicHandler},
    L{ICustomizeHandler}, L{IGroupManager}, L{IOfflinePolicy},
    L{IRelogonPolicy}, L{IRelayPolicy}); every L{IEngineAware} object is
    then initialized with the engine, before any connection.

    @param config: the server's settings (the defaults when C{None}).
    @param clock: the reactor, or any L{twisted.internet.interfaces.IReactorTime}.
    @param presence: the registry of online devices (the in-process one
        when C{None}).
    @param node_id: this node's ID (host and process ID when C{None}).
    @param offline_store: where messages to offline users are kept (none
        are when C{None}); an L{IOfflinePolicy} application decides which.
    @raise ValueError: see L{Applications.sort}.
    """
    apps = Applications.sort(applications)
    engine = ServerEngine(
        config,
        clock=clock,
        handler=apps.handler,
        customize_handler=apps.customize_handler,
        group_manager=apps.group_manager,
        presence=presence,
        node_id=node_id,
        offline_store=offline_store,
        offline_policy=apps.offline_policy,
        relogon_policy=apps.relogon_policy,
        relay_policy=apps.relay_policy,
    )
    apps.initialize(engine)
    return engine
