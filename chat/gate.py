"""Who may open a websocket: the checks made on the HTTP request, before the upgrade.

Everything a server of strangers must refuse before it spends a socket on them, in the
order :class:`~chat.handler.ChatWebSocketHandler` applies it:

1. a malformed handshake (RFC 6455 4.2.1: version, key, ``Connection: Upgrade``): 400;
2. a browser page from another site (cross-site websocket hijacking: a page on
   evil.example opens a websocket to us with the user's cookies): 403, unless its
   ``Origin`` is allowed by ``CHAT_ALLOWED_ORIGINS``;
3. the application's own ``authorize(request)`` hook (a token, a Flask session): 401/403;
4. a full process (``CHAT_MAX_CONNECTIONS``): 503.

Each refusal is counted by reason in ``/stats`` ``refused`` and logged without a storm
(:meth:`~chat.hub.Hub.refuse`). The checks are pure functions of the WSGI environ, so
the stock gevent-websocket worker (which upgrades before the app runs) applies the same
ones in the view and says no with a close code instead of a status.

Behind a reverse proxy (nginx: deploy/nginx/) every client's TCP peer is the proxy.
:func:`client_address` finds the client's own address in ``X-Forwarded-For``, believing
only the proxies named in ``CHAT_TRUSTED_PROXIES``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any, Callable, NamedTuple
from urllib.parse import urlsplit

from werkzeug.exceptions import HTTPException

from .errors import ConfigError
from .hub import Hub

__all__ = ["Refusal", "Gate", "MAX_USER_BYTES", "TrustedProxies", "client_address", "parse_origins",
           "parse_trusted_proxies", "handshake_error", "key_is_valid", "capacity_error"]

# The websocket versions gevent-websocket's handler speaks (13 is RFC 6455).
SUPPORTED_VERSIONS = ("13", "8", "7")

Authorize = Callable[[Any], Any]
# Longest identity the authorize hook may return: its key (``@`` + identity) names a
# Redis stream and travels in every message's envelope, which allows 255 bytes of room.
MAX_USER_BYTES = 200
# The networks of the reverse proxies whose X-Forwarded-For is believed (CHAT_TRUSTED_PROXIES).
TrustedProxies = frozenset[ipaddress.IPv4Network | ipaddress.IPv6Network]


class Refusal(NamedTuple):
    """Why a client is refused: the HTTP status, the /stats reason, a one-line message."""

    status: int
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def key_is_valid(key: str) -> bool:
    """RFC 6455 4.2.1: the key is 16 bytes, base64-encoded."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def handshake_error(environ: dict) -> Refusal | None:
    """What is wrong with a websocket upgrade request, or None.

    gevent-websocket checks the same things but logs a warning per bad request (a log
    storm under attack) and, on Python 3, answers a non-base64 key with a 500.
    """
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return Refusal(400, "bad_handshake", "websocket needs HTTP/1.1")
    if "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
        return Refusal(400, "bad_handshake", "Connection header must contain Upgrade")
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
    if version not in SUPPORTED_VERSIONS:
        return Refusal(426 if not version else 400, "bad_handshake",
                       f"unsupported Sec-WebSocket-Version {version!r}",
                       (("Sec-WebSocket-Version", ", ".join(SUPPORTED_VERSIONS)),))
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not key_is_valid(key):
        return Refusal(400, "bad_handshake", "Sec-WebSocket-Key must be 16 bytes in base64")
    return None


def capacity_error(hub: Hub, room: str | None) -> Refusal | None:
    """503 when this process holds ``CHAT_MAX_CONNECTIONS`` clients, or ``CHAT_MAX_ROOMS``
    rooms and ``room`` would be one more (None: a JSON client, in no room yet); None when
    there is room."""
    if hub.full:
        return Refusal(503, "full", "server full", (("Retry-After", "5"),))
    if room is not None and hub.room_limit_reached(room):
        return Refusal(503, "rooms", "too many rooms", (("Retry-After", "5"),))
    return None


def parse_origins(setting: str) -> frozenset[str] | None:
    """``CHAT_ALLOWED_ORIGINS`` as a set of ``scheme://host[:port]``; None means any ("*")."""
    origins = {item.strip().rstrip("/").lower() for item in setting.split(",") if item.strip()}
    if "*" in origins:
        return None
    return frozenset(origins)


def parse_trusted_proxies(setting: str) -> TrustedProxies:
    """``CHAT_TRUSTED_PROXIES`` (addresses or CIDR networks, comma-separated) as a set of
    networks; a single address is a network of one. Refuses what is neither, in one line."""
    networks = set()
    for item in setting.split(","):
        if item.strip():
            try:
                networks.add(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"CHAT_TRUSTED_PROXIES: {item.strip()!r} is not an IP "
                                  "address or network (like 10.0.0.0/8)") from None
    return frozenset(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address (an IPv4-mapped IPv6 address as its IPv4 one), or None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def _trusted(address, trusted: TrustedProxies) -> bool:
    return any(address in network for network in trusted)


def client_address(peer: str, forwarded_for: str | None, trusted: TrustedProxies) -> str:
    """The address of the client behind a request, for the refusal logs.

    ``peer`` is the TCP peer's address (``client_address[0]`` of a pywsgi handler, or
    ``REMOTE_ADDR``), ``forwarded_for`` the request's ``X-Forwarded-For`` header or None,
    ``trusted`` the proxies' networks (:func:`parse_trusted_proxies`; a Gate keeps the
    app's as ``gate.trusted_proxies``).

    Without a trusted peer the answer is the peer: anyone can write X-Forwarded-For.
    From a trusted peer, the header is read from its right end, where each proxy appended
    the address it received the request from, and the first address that is not a trusted
    proxy is the client (the right-most untrusted one); what lies left of it was written
    by the client and is not believed. A hop that is not an address (``unknown``, junk)
    ends the walk at the last address known. When every hop is trusted, the left-most is
    the answer (a request made by a proxy host itself). Pure and cheap: with an empty
    ``trusted`` (the default) it returns ``peer`` without parsing anything.
    """
    if not trusted or not forwarded_for:
        return peer
    address = _ip(peer)
    if address is None or not _trusted(address, trusted):
        return peer
    for hop in reversed(forwarded_for.split(",")):
        hop_address = _ip(hop)
        if hop_address is None:
            break
        address = hop_address
        if not _trusted(address, trusted):
            break
    return str(address)


def _same_host(origin: str, host: str) -> bool:
    """True when a browser Origin names the host the request was sent to (Host header)."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.lower()


class Gate:
    """The per-app policy: allowed origins, the optional ``authorize`` hook, and the
    trusted proxies (``CHAT_TRUSTED_PROXIES``, for :func:`client_address`).

    ``authorize(request)`` gets a Flask request (inside a request context, so
    ``flask.session`` works) and returns a true value to accept: a non-empty string is
    the client's identity (see :meth:`authenticate`). A false value refuses with 403;
    raising a Werkzeug HTTP error (``flask.abort(401)``) refuses with its status.
    """

    __slots__ = ("app", "origins", "authorize", "trusted_proxies")

    def __init__(self, app, allowed_origins: str = "", authorize: Authorize | None = None,
                 trusted_proxies: str = "") -> None:
        self.app = app
        self.origins = parse_origins(allowed_origins)
        self.authorize = authorize
        self.trusted_proxies = parse_trusted_proxies(trusted_proxies)

    def origin_error(self, environ: dict) -> Refusal | None:
        """403 for a browser page of another site. A browser's Origin is always a
        serialized origin, ``scheme://host[:port]`` or ``null`` (RFC 6454 6.1); one without
        a scheme (tsung 1.7 sends ``Origin: 127.0.0.1``) comes from no browser and is
        treated like a missing one, as the non-browser client it is."""
        origin = environ.get("HTTP_ORIGIN")
        if origin is None or self.origins is None:
            return None  # not a browser (browsers always send it), or any origin allowed
        normalized = origin.strip().rstrip("/").lower()
        if normalized != "null" and "://" not in normalized:
            return None  # not a browser either
        if normalized in self.origins:
            return None
        if not self.origins and _same_host(normalized, environ.get("HTTP_HOST", "")):
            return None
        return Refusal(403, "origin", f"origin {origin[:200]!r} is not allowed")

    def authenticate(self, environ: dict) -> tuple[Refusal | None, str | None]:
        """Ask the ``authorize`` hook: (a refusal, or None to accept; the identity).

        A string the hook returns is the client's identity (its user id), carried into
        its connection; any other true value accepts it anonymously. An identity longer
        than ``MAX_USER_BYTES`` in UTF-8 is the application's mistake: refused with 500.
        """
        if self.authorize is None:
            return None, None
        with self.app.request_context(environ):
            from flask import request  # the context's request, built lazily from environ

            try:
                allowed = self.authorize(request)
            except HTTPException as error:
                return Refusal(error.code or 403, "auth", error.description or error.name), None
        if not allowed:
            return Refusal(403, "auth", "not authorized"), None
        if type(allowed) is not str:
            return None, None
        if len(allowed.encode("utf-8", "surrogatepass")) > MAX_USER_BYTES:
            return Refusal(500, "auth", f"identity over {MAX_USER_BYTES} bytes"), None
        return None, allowed

    def check(self, environ: dict) -> tuple[Refusal | None, str | None]:
        """The first reason to refuse this upgrade request (None to accept it), and the
        client's identity when the ``authorize`` hook gave one."""
        refusal = self.origin_error(environ)
        if refusal is not None:
            return refusal, None
        return self.authenticate(environ)
