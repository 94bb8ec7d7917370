"""gevent-websocket's upgrade handler, made to upgrade only where the app routes websockets.

The stock ``WebSocketHandler`` answers 101 to any upgrade request before the application
runs, so a websocket aimed at a wrong path sees ``101`` and then a close frame. This
subclass first asks the Flask app's URL map whether the path has a ``websocket=True``
route; if not, it does not upgrade and the app answers over plain HTTP (404 for an
unknown path, 400 for a path that only serves HTTP). Everything else is gevent-websocket.

It also answers 400 to a ``Sec-WebSocket-Key`` that is not base64: gevent-websocket 0.10.1
catches only Python 2's ``TypeError`` there, so on Python 3 such a request got a 500.

Used by ``greenchat serve`` and gunicorn.conf.py's worker; the card's stock
``GeventWebSocketWorker`` works too, with the stock behaviour for wrong paths.
"""

from __future__ import annotations

import base64
import binascii

from geventwebsocket.handler import WebSocketHandler
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

__all__ = ["ChatWebSocketHandler", "routes_websocket"]


def routes_websocket(app, environ: dict) -> bool:
    """True when ``app`` (a Flask app) has a websocket route for this request's path.

    A WSGI app that is not a Flask app (no ``url_map``) is assumed to want the upgrade,
    as with the stock handler.
    """
    url_map = getattr(app, "url_map", None)
    if url_map is None:
        return True
    adapter = url_map.bind_to_environ(environ, server_name=app.config.get("SERVER_NAME"))
    try:
        adapter.match(method="GET", websocket=True)
    except (HTTPException, RequestRedirect):
        return False
    return True


def key_is_valid(key: str) -> bool:
    """RFC 6455 4.2.1: the key is 16 bytes, base64-encoded."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


class ChatWebSocketHandler(WebSocketHandler):
    def upgrade_websocket(self):
        environ = self.environ
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return super().upgrade_websocket()  # not for us: plain HTTP
        if not routes_websocket(self.application, environ):
            return None  # run_application then passes the request to the app as plain HTTP
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        if key and not key_is_valid(key):
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"Sec-WebSocket-Key must be 16 bytes in base64\n"]
        return super().upgrade_websocket()
