"""
Who the admin API answers, and what it lets them do: the checks every
C{/api/} request passes before anything is read or changed, and the two
start-up questions beside them (is an endpoint local; is a token file
sound).

A request is judged in this order; the first check that fails answers it
(L{Refusal}), and nothing is read or changed:

  1. C{Host} names this server: a loopback name or address, the address the
     request came in on, or a name given with C{--admin-host}.  Else C{403
     host_not_allowed}: a page whose own name was made to resolve to this
     machine (DNS rebinding) is not served.
  2. The request comes from the API's own origin: an C{Origin} header, when
     there is one, is C{http(s)://} and the request's own C{Host}; a
     C{Sec-Fetch-Site} header, when there is one, says C{same-origin} or
     C{none}.  Else C{403 cross_origin}: a page on another site is not obeyed.
  3. The bearer token, when one is configured.  Else C{401 unauthorized}.

and then, for a request that would change something:

  4. A token is configured at all.  Else C{403 token_required}: without a
     token the API only reads.
  5. The body is declared C{Content-Type: application/json}.  Else C{415
     unsupported_media_type}: a form or a no-cors C{fetch} cannot send that
     without the browser asking the server first, which this server never
     allows.

docs/security.md says why each check is there.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Iterable
from typing import Callable

import attrs
from twisted.logger import Logger
from twisted.web.server import Request

from esf.server._policy import SlidingWindow

__all__ = [
    "Refusal",
    "RequestPolicy",
    "RefusalLog",
    "LOOPBACK_NAMES",
    "REFUSALS_LOGGED",
    "allowed_host_name",
    "endpoint_is_local",
    "read_token_file",
]

log = Logger(namespace="esf.admin")

#: The names besides loopback addresses that a Host header may give.
LOOPBACK_NAMES = frozenset({"localhost"})
#: Refusals logged per kind (a bad token, another check), host and minute;
#: more are not logged.
REFUSALS_LOGGED = 10
#: The longest header value or path a log event carries, in characters.
_LOGGED_CHARS = 200

# A Host header: a name or IPv4 address, or an IPv6 address in brackets,
# and maybe a port.  (re.ASCII: \d is 0-9 only.)
_HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([^\[\]:/@\s]+))(?::\d{1,5})?", re.ASCII | re.I)
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", re.ASCII)


def _shown(value: str) -> str:
    return value[:_LOGGED_CHARS]


@attrs.frozen
class Refusal:
    """
    A request the admin API does not carry out: the HTTP C{status}, a short
    C{code} and a C{message} in words for the answer; which C{check}
    refused it and what the request said (C{value}) for the log.
    """

    status: int
    code: str
    message: str
    check: str
    value: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()


def allowed_host_name(name: str) -> str:
    """
    C{name} (for C{--admin-host}) as the policy compares it: a DNS name in
    lower case, or an IP address in its short form.

    @raise ValueError: neither.
    """
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a host name or an IP address (no port, no scheme)")
    return name


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    The IP address C{text} gives, an IPv4 one for an IPv4-mapped IPv6 one
    (what a C{tcp6} port listening on C{::} sees of an IPv4 client), or
    C{None}.
    """
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _header(request: Request, name: bytes) -> tuple[str | None, bool]:
    """
    The one value of header C{name} (C{None} if absent), and whether there
    was at most one.
    """
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None, True
    return values[-1].decode("latin-1"), len(values) == 1


class RequestPolicy:
    """
    The checks of the module's docstring, as decisions: each returns a
    L{Refusal} or C{None} and does nothing else.

    @param token: the bearer token; C{None} makes the API read-only.
    @param hosts: names (or addresses) a Host header may give besides the
        loopback ones and the address a request came in on.
    """

    def __init__(self, token: str | None, hosts: Iterable[str] = ()):
        self.token = token.encode("utf-8") if token is not None else None
        self.hosts = LOOPBACK_NAMES | {allowed_host_name(h) for h in hosts}

    @property
    def read_only(self) -> bool:
        return self.token is None

    def admit(self, request: Request) -> Refusal | None:
        """
        Checks 1 to 3: whether C{request} may be answered at all.
        """
        return self._host(request) or self._origin(request) or self._token(request)

    def may_change(self, request: Request) -> Refusal | None:
        """
        Checks 4 and 5: whether C{request}, admitted, may change something.
        """
        if self.token is None:
            return Refusal(
                403,
                "token_required",
                "this admin API is read-only: it was started without --admin-token-file",
                "read_only",
            )
        content_type, single = _header(request, b"content-type")
        media_type = (content_type or "").partition(";")[0].strip().lower()
        if media_type != "application/json" or not single:
            return Refusal(
                415,
                "unsupported_media_type",
                "send the body as Content-Type: application/json",
                "content_type",
                _shown(content_type or ""),
            )
        return None

    def _host(self, request: Request) -> Refusal | None:
        host, single = _header(request, b"host")
        if host is not None and single and self._serves(host, request):
            return None
        return Refusal(
            403,
            "host_not_allowed",
            "the Host header does not name this server: use localhost or 127.0.0.1, "
            "or start the server with --admin-host NAME",
            "host",
            _shown(host or ""),
        )

    def _serves(self, host: str, request: Request) -> bool:
        match = _HOST.fullmatch(host)
        if match is None:
            return False
        name = (match.group(1) or match.group(2)).lower()
        if name in self.hosts:
            return True
        address = _address(name)
        if address is None:
            return False
        # Only a name can be made to resolve to this machine: a page whose
        # origin is one of its addresses is this machine's own.
        local = _address(getattr(request.getHost(), "host", None))
        return address.is_loopback or str(address) in self.hosts or address == local

    def _origin(self, request: Request) -> Refusal | None:
        origin, single = _header(request, b"origin")
        site, _ = _header(request, b"sec-fetch-site")
        if origin is not None:
            host, _ = _header(request, b"host")
            # The scheme is not compared: behind a proxy that ends TLS the
            # page is https:// and the request here plain HTTP.
            scheme, sep, authority = origin.partition("://")
            if not (
                single
                and sep
                and scheme.lower() in ("http", "https")
                and authority.lower() == (host or "").lower()
            ):
                return self._cross_origin(origin)
        if site is not None and site.lower() not in ("same-origin", "none"):
            return self._cross_origin(f"Sec-Fetch-Site: {site}")
        return None

    def _cross_origin(self, value: str) -> Refusal:
        return Refusal(
            403,
            "cross_origin",
            "requests from another site's pages are refused: use the dashboard or a client "
            "that sends no Origin",
            "origin",
            _shown(value),
        )

    def _token(self, request: Request) -> Refusal | None:
        if self.token is None:
            return None
        given = request.getHeader(b"authorization") or b""
        scheme, _, credential = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token):
            return None
        return Refusal(
            401,
            "unauthorized",
            "send the admin token: Authorization: Bearer TOKEN",
            "token",
            headers=((b"www-authenticate", b'Bearer realm="esf"'),),
        )


class RefusalLog:
    """
    Logs each L{Refusal} as one event (C{admin_auth_failed} for a bad token,
    C{admin_request_refused} for the others), at most L{REFUSALS_LOGGED} of
    each a minute per host: a page that repeats a refused request in a loop
    cannot fill the log.
    """

    def __init__(self, seconds: Callable[[], float]):
        self.seconds = seconds
        self._window = SlidingWindow(60, REFUSALS_LOGGED)

    def refused(self, request: Request, refusal: Refusal) -> None:
        peer = peer_of(request)
        token = refusal.check == "token"
        if self._window.hit((token, peer.rpartition(":")[0]), self.seconds()) > REFUSALS_LOGGED:
            return
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("ascii", "replace")[:_LOGGED_CHARS]
        if token:
            log.warn(
                "admin API: {method} {path} from {peer} without a valid token",
                esf_event="admin_auth_failed", peer=peer, method=method, path=path,
            )  # fmt: skip
        else:
            log.warn(
                "admin API: refused {method} {path} from {peer} ({check}: {value})",
                esf_event="admin_request_refused", peer=peer, method=method, path=path,
                check=refusal.check, value=refusal.value, status=refusal.status,
            )  # fmt: skip


def peer_of(request: Request) -> str:
    """
    C{host:port} (C{[host]:port} for IPv6) of the client of C{request}.
    """
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer)
    return f"[{host}]:{peer.port}" if ":" in host else f"{host}:{peer.port}"


# -- starting ----------------------------------------------------------------------


def _split_endpoint(description: str) -> list[str]:
    # Twisted's endpoint strings split on ':' with '\:' as an escape; its own
    # parser is private, hence these few lines.
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def endpoint_is_local(description: str) -> bool:
    """
    Whether a server endpoint string listens only where this machine's own
    users can connect: a TCP or TLS endpoint whose C{interface} is a
    loopback address (or C{localhost}), or a UNIX socket.  Anything else
    (no interface: every address; an endpoint type this cannot read) is
    not local.
    """
    parts = _split_endpoint(description.strip())
    if len(parts) == 1 and parts[0].isdigit():
        return False  # a bare port: every interface
    kind = parts[0].lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = ""
    for part in parts[1:]:
        name, sep, value = part.partition("=")
        if sep and name == "interface":
            interface = value
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def read_token_file(path: str) -> str:
    """
    The bearer token in C{path} (surrounding whitespace removed).

    @raise ValueError: unreadable, empty, or readable by other users.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(4097)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} may be read by other users; chmod 600 it")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if len(data) > 4096:
        raise ValueError(f"{path} is longer than 4096 bytes")
    if len(token) < 16:
        raise ValueError(f"the token in {path} is shorter than 16 characters")
    if any(c.isspace() for c in token):
        raise ValueError(f"the token in {path} holds whitespace")
    return token
