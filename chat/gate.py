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
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, NamedTuple
from urllib.parse import urlsplit

from werkzeug.exceptions import HTTPException

from .hub import Hub

__all__ = ["Refusal", "Gate", "parse_origins", "handshake_error", "key_is_valid",
           "capacity_error"]

# The websocket versions gevent-websocket's handler speaks (13 is RFC 6455).
SUPPORTED_VERSIONS = ("13", "8", "7")

Authorize = Callable[[Any], Any]


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


def capacity_error(hub: Hub, room: str) -> Refusal | None:
    """503 when this process holds ``CHAT_MAX_CONNECTIONS`` clients, or ``CHAT_MAX_ROOMS``
    rooms and ``room`` would be one more; None when there is room."""
    if hub.full:
        return Refusal(503, "full", "server full", (("Retry-After", "5"),))
    if hub.room_limit_reached(room):
        return Refusal(503, "rooms", "too many rooms", (("Retry-After", "5"),))
    return None


def parse_origins(setting: str) -> frozenset[str] | None:
    """``CHAT_ALLOWED_ORIGINS`` as a set of ``scheme://host[:port]``; None means any ("*")."""
    origins = {item.strip().rstrip("/").lower() for item in setting.split(",") if item.strip()}
    if "*" in origins:
        return None
    return frozenset(origins)


def _same_host(origin: str, host: str) -> bool:
    """True when a browser Origin names the host the request was sent to (Host header)."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.lower()


class Gate:
    """The per-app policy: allowed origins and the optional ``authorize`` hook.

    ``authorize(request)`` gets a Flask request (inside a request context, so
    ``flask.session`` works) and returns a true value to accept. A false value refuses
    with 403; raising a Werkzeug HTTP error (``flask.abort(401)``) refuses with its status.
    """

    __slots__ = ("app", "origins", "authorize")

    def __init__(self, app, allowed_origins: str = "", authorize: Authorize | None = None) -> None:
        self.app = app
        self.origins = parse_origins(allowed_origins)
        self.authorize = authorize

    def origin_error(self, environ: dict) -> Refusal | None:
        origin = environ.get("HTTP_ORIGIN")
        if origin is None or self.origins is None:
            return None  # not a browser (browsers always send it), or any origin allowed
        normalized = origin.strip().rstrip("/").lower()
        if normalized in self.origins:
            return None
        if not self.origins and _same_host(normalized, environ.get("HTTP_HOST", "")):
            return None
        return Refusal(403, "origin", f"origin {origin[:200]!r} is not allowed")

    def auth_error(self, environ: dict) -> Refusal | None:
        if self.authorize is None:
            return None
        with self.app.request_context(environ):
            from flask import request  # the context's request, built lazily from environ

            try:
                allowed = self.authorize(request)
            except HTTPException as error:
                return Refusal(error.code or 403, "auth", error.description or error.name)
        if allowed:
            return None
        return Refusal(403, "auth", "not authorized")

    def check(self, environ: dict) -> Refusal | None:
        """The first reason to refuse this upgrade request, or None to accept it."""
        return self.origin_error(environ) or self.auth_error(environ)
