"""gevent-websocket's upgrade handler, made to upgrade only where the app routes websockets.

The stock ``WebSocketHandler`` answers 101 to any upgrade request before the application
runs, so a websocket aimed at a wrong path sees ``101`` and then a close frame. This
subclass first asks the Flask app's URL map whether the path has a ``websocket=True``
route; if not, it does not upgrade and the app answers over plain HTTP (404 for an
unknown path, 400 for a path that only serves HTTP). Everything else is gevent-websocket.

For greenchat's own endpoint (``chat.websocket``) it then hands the upgraded socket to
the app's hub itself instead of calling the Flask app: routing is still Flask's URL map,
but no request context, ``before_request`` hook or ``wsgi_app`` middleware runs for it.
That halves the handshake's cost where handshakes are the CPU bill (measured with
``bench/idle_broadcast.py``: ~590 -> ~370 us of server CPU per handshake). Other
websocket routes (a classic ``ws.receive()`` view) go through Flask as usual.

It also answers 400 to a ``Sec-WebSocket-Key`` that is not base64: gevent-websocket 0.10.1
catches only Python 2's ``TypeError`` there, so on Python 3 such a request got a 500.

Used by ``greenchat serve`` and gunicorn.conf.py's worker; the card's stock
``GeventWebSocketWorker`` works too, with the stock behaviour for wrong paths.
"""

from __future__ import annotations

import base64
import binascii
import weakref

from geventwebsocket.handler import WebSocketHandler
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from .app import adopt

__all__ = ["ChatWebSocketHandler", "routes_websocket"]


# Answers of routes_websocket per app and (host, path). Matching costs ~50 us, a tenth of
# a whole handshake; a client population asks about very few paths. Bounded, so a client
# inventing paths cannot grow it: past the bound, answers are computed, not stored.
_route_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ROUTE_CACHE_SIZE = 1024


def websocket_endpoint(app, environ: dict) -> str | None:
    """The endpoint of ``app``'s websocket route for this request's path, or None.

    A WSGI app that is not a Flask app (no ``url_map``) is assumed to want the upgrade,
    as with the stock handler (endpoint "").
    """
    url_map = getattr(app, "url_map", None)
    if url_map is None:
        return ""
    key = (environ.get("HTTP_HOST"), environ.get("PATH_INFO"))
    answers = _route_cache.get(app)
    if answers is None:
        answers = _route_cache[app] = {}
    answer = answers.get(key)
    if answer is None:
        adapter = url_map.bind_to_environ(environ, server_name=app.config.get("SERVER_NAME"))
        try:
            answer = adapter.match(method="GET", websocket=True)[0]
        except (HTTPException, RequestRedirect):
            answer = ""  # cached as "no route"; None means "not cached"
        if len(answers) < _ROUTE_CACHE_SIZE:
            answers[key] = answer
    return answer or None


def key_is_valid(key: str) -> bool:
    """RFC 6455 4.2.1: the key is 16 bytes, base64-encoded."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


class ChatWebSocketHandler(WebSocketHandler):
    """gevent-websocket's handler: upgrade only on websocket routes, and hand greenchat's
    own endpoint straight to its hub (see the module docstring)."""

    _chat_endpoint: str | None = None

    def upgrade_websocket(self):
        environ = self.environ
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return super().upgrade_websocket()  # not for us: plain HTTP
        endpoint = websocket_endpoint(self.application, environ)
        if endpoint is None:
            return None  # run_application then passes the request to the app as plain HTTP
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        if key and not key_is_valid(key):
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"Sec-WebSocket-Key must be 16 bytes in base64\n"]
        if endpoint == "chat.websocket":
            hub = self.application.extensions["chat"]
            if hub.full:
                hub.refuse("full")
                self.start_response("503 Service Unavailable",
                                    [("Content-Type", "text/plain"), ("Retry-After", "5")])
                return [b"server full\n"]
        self._chat_endpoint = endpoint
        return super().upgrade_websocket()

    def run_websocket(self):
        if self._chat_endpoint == "chat.websocket" and not getattr(self, "prevent_wsgi_call", False):
            adopt(self.websocket, self.application.extensions["chat"])
            self.environ["wsgi.websocket"] = None
            self.websocket = None
            return
        super().run_websocket()
