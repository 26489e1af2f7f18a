"""
What C{twistd esf} tells about where it listens, once it does: the port
file (C{--port-file}), which names every listening port for programs and
tests that start the server on port 0, and the web demo's address
(C{--web-demo}), logged for whoever opens it.

Both wrap a server endpoint: its C{listen} is the one moment the bound
address is known, and the services that listen (L{esf.ServerService},
the metrics and admin services) need not know they are watched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["PortFile", "announce_web_demo"]

log = Logger(namespace="esf.server")


@implementer(IStreamServerEndpoint)
class _Told:
    """
    An endpoint that hands the port it listens on to C{tell} as well.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, tell: Callable[[IListeningPort], None]):
        self.endpoint = endpoint
        self.tell = tell

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.tell(port)
            return port

        return self.endpoint.listen(factory).addCallback(listening)


def address_of(port: IListeningPort) -> dict[str, Any]:
    """
    Where C{port} listens, as the port file writes it: C{{"host", "port"}}
    for TCP, C{{"path"}} for a UNIX socket.
    """
    address = port.getHost()
    if isinstance(address, (IPv4Address, IPv6Address)):
        return {"host": address.host, "port": address.port}
    if isinstance(address, UNIXAddress):
        name = address.name
        return {"path": name.decode("utf-8", "replace") if isinstance(name, bytes) else name}
    return {"address": str(address)}


class PortFile(Service):
    """
    Writes C{path} once every endpoint given to L{watch} listens and the
    reactor runs: a JSON object with the server's process ID (C{"pid"})
    and, for each kind of listener (C{"esf"}, C{"websocket"},
    C{"metrics"}, C{"admin-api"}), a list of addresses in the order the
    endpoints were given.  It is written to a temporary file that is then
    renamed, so a reader never sees half of it; it is removed when the
    service stops.

    Why wait for the reactor: C{twistd} listens before the reactor runs
    (C{privilegedStartService}), and only a running reactor has its signal
    handlers; a SIGTERM sent as soon as the ports are known would kill
    the process rather than stop the server.
    """

    def __init__(self, path: str, reactor: IReactorCore):
        self.path = path
        self.reactor = reactor
        self._ports: dict[str, list[dict[str, Any] | None]] = {}
        self._waiting = 1  # the reactor running, then each endpoint

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        self._waiting -= 1
        if not self._waiting:
            self._write()

    def watch(self, kind: str, endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
        """
        C{endpoint}, whose port is written under C{kind} once it listens.
        """
        slots = self._ports.setdefault(kind, [])
        index = len(slots)
        slots.append(None)
        self._waiting += 1

        def tell(port: IListeningPort) -> None:
            slots[index] = address_of(port)
            self._ready()

        return _Told(endpoint, tell)

    def _write(self) -> None:
        content = json.dumps({"pid": os.getpid(), **self._ports}, indent=1) + "\n"
        directory = os.path.dirname(os.path.abspath(self.path))
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".esf-ports-")
        try:
            with os.fdopen(handle, "w") as f:
                f.write(content)
            os.chmod(temporary, 0o644)  # mkstemp's 0600: the ports are no secret
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise
        log.info("esf: the listening ports are in {path}", path=self.path, esf_event="port_file")

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def announce_web_demo(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    C{endpoint}, which logs the web demo's address (C{web_demo}) once it
    listens.
    """

    def tell(port: IListeningPort) -> None:
        address = port.getHost()
        host = getattr(address, "host", "localhost")
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        # A TLS port's factory is Twisted's TLS wrapper; if its module is not
        # loaded, no port uses TLS (and pyOpenSSL, which it needs, is an
        # optional dependency: importing it here would make it a required one).
        tls = sys.modules.get("twisted.protocols.tls")
        secure = tls is not None and isinstance(
            getattr(port, "factory", None), tls.TLSMemoryBIOFactory
        )
        url = f"{'https' if secure else 'http'}://{host}:{getattr(address, 'port', '')}/"
        log.info("esf: the web demo is at {url}", url=url, esf_event="web_demo")

    return _Told(endpoint, tell)
