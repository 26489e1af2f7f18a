"""
The C{--web-demo} site: the JavaScript client and the chat page, served
beside the WebSocket endpoint on one twisted.web site.

See C{docs/websocket.md}.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from ._engine import ServerEngine
from ._http import QuietSite, handed_over
from ._websocket import WEBSOCKET_PATH, WebSocketFactory

__all__ = ["WEB_FILES", "web_demo_site"]


class _TakeOverResource(WebSocketResource):
    """
    autobahn's WebSocket resource, handing the connection over from
    twisted.web cleanly: the HTTP channel is the transport's producer and
    keeps an idle timer, and the WebSocket protocol takes both roles.
    """

    def render(self, request: Any) -> Any:
        transport = request.channel.transport
        if transport is not None:
            handed_over(request.channel)  # out of --websocket-max-handshakes
            request.channel.setTimeout(None)
            transport.unregisterProducer()
        return super().render(request)  # type: ignore[no-untyped-call]


class WebDemoSite(QuietSite):
    """
    The web demo's site, without an access log (its name shows in the log:
    "WebDemoSite starting on PORT").
    """


class _Root(Resource):
    def getChild(self, path: bytes, request: Any) -> Any:
        return notFound()


class _File(Resource):
    isLeaf = True

    #: The demo page loads nothing but its own files and talks only to its
    #: own server.
    POLICY = (
        b"default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )

    def __init__(self, data: bytes, content_type: bytes, shared: bool = False):
        super().__init__()  # type: ignore[no-untyped-call]
        self.data = data
        self.content_type = content_type
        #: Pages of other origins may load it: a module imported across
        #: origins needs CORS.  Only the client module is: it holds nothing
        #: of the server, and the WebSocket still checks the page's origin.
        self.shared = shared

    def render_GET(self, request: Any) -> bytes:
        if self.shared:
            request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", self.POLICY)
        request.setHeader(b"cache-control", b"no-cache")
        return self.data

    def render_HEAD(self, request: Any) -> bytes:
        self.render_GET(request)
        return b""


#: The files C{--web-demo} serves: URL path -> (file in esf/web, type).
WEB_FILES = {
    b"": ("chat.html", b"text/html; charset=utf-8"),
    b"chat.js": ("chat.js", b"text/javascript; charset=utf-8"),
    b"chat.css": ("chat.css", b"text/css; charset=utf-8"),
    b"esf.js": ("esf.js", b"text/javascript; charset=utf-8"),
}


def web_demo_site(
    engine: ServerEngine, allowed_origins: Iterable[str] = (), *, reactor: Any = None
) -> Site:
    """
    A twisted.web site that serves the WebSocket at C{/esf}, the JavaScript
    client at C{/esf.js} and the chat page at C{/}.
    """
    root = _Root()  # type: ignore[no-untyped-call]
    web = resources.files("esf") / "web"
    for path, (name, content_type) in WEB_FILES.items():
        root.putChild(path, _File((web / name).read_bytes(), content_type, name == "esf.js"))
    factory = WebSocketFactory(engine, allowed_origins, reactor=reactor)
    root.putChild(WEBSOCKET_PATH.strip("/").encode(), _TakeOverResource(factory))  # type: ignore[no-untyped-call]
    site = WebDemoSite(root)  # type: ignore[no-untyped-call]  # Site has no annotations
    site.displayTracebacks = False
    site.noisy = False
    return site
