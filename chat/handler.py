"""gevent-websocket's upgrade handler, made to upgrade only where the app routes websockets.

The stock ``WebSocketHandler`` answers 101 to any upgrade request before the application
runs, so a websocket aimed at a wrong path sees ``101`` and then a close frame. This
subclass first asks the Flask app's URL map whether the path has a ``websocket=True``
route; if not, it does not upgrade and the app answers over plain HTTP (404 for an
unknown path, 400 for a path that only serves HTTP). Everything else is gevent-websocket.

For greenchat's own endpoints (``chat.views.ADOPTED_ENDPOINTS``) it then hands the upgraded socket to
the app's hub itself instead of calling the Flask app: routing is still Flask's URL map,
but no request context, ``before_request`` hook or ``wsgi_app`` middleware runs for it.
That halves the handshake's cost where handshakes are the CPU bill (measured with
``bench/idle_broadcast.py``: ~590 -> ~370 us of server CPU per handshake). Other
websocket routes (a classic ``ws.receive()`` view) go through Flask as usual.

gevent-websocket 0.10.1 negotiates no extension; for greenchat's own endpoints this
handler answers a permessage-deflate offer itself (``Hub.negotiate``: the header in the
101, the window bits in the adopted connection's codec). Under the stock
``GeventWebSocketWorker`` gevent-websocket writes the 101 alone, so compression is
never agreed there.

Before the upgrade it applies ``chat.gate``: a malformed handshake gets 400 (gevent-websocket
0.10.1 answered a non-base64 key with a 500 on Python 3, and logged a warning per bad
request), a foreign origin 403, the app's ``authorize`` hook 401/403, a full process 503.
A client that has not delivered its whole HTTP request within ``CHAT_HANDSHAKE_TIMEOUT``
(silent, or a slowloris trickling a byte a second) is dropped; so is a request pywsgi
cannot parse, with a 400 and a rate-limited log line instead of a traceback each.

Used by ``greenchat serve`` and gunicorn.conf.py's worker for every request that
``chat.upgrade`` does not answer in the accept loop (it hands those over with what it
has read, and the time left of their deadline); the card's stock
``GeventWebSocketWorker`` works too, with the stock behaviour for wrong paths.
"""

from __future__ import annotations

import time
import weakref
from http.client import responses

import gevent
from geventwebsocket.handler import WebSocketHandler
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from .gate import Refusal, capacity_error, client_address, handshake_error
from .protocol import PerMessageDeflate
from .takeover import adopt
from .views import ADOPTED_ENDPOINTS, JSON_ENDPOINT, room_id, state_of

__all__ = ["ChatWebSocketHandler", "websocket_route"]


# Answers of websocket_route per app and path (and host, for an app whose routes depend
# on it). Matching costs ~50 us, a tenth of a whole handshake; a client population asks
# about very few paths. Bounded in entries and in the size of each key (both chosen by
# clients: a 64 KiB Host times 1,024 entries was ~74 MB), so a client inventing paths or
# hosts cannot grow it past ~0.8 MB: beyond the bounds, answers are computed, not stored.
_route_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ROUTE_CACHE_SIZE = 1024
_CACHED_KEY_CHARS = 512

# Used when the app has no greenchat hub (a plain Flask app behind our handler).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_KEEPALIVE_TIMEOUT = 5.0

_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nbad request\n")


def websocket_route(app, environ: dict) -> tuple[str, dict] | None:
    """The endpoint and arguments of ``app``'s websocket route for this request's path,
    or None.

    A WSGI app that is not a Flask app (no ``url_map``) is assumed to want the upgrade,
    as with the stock handler (endpoint "").
    """
    url_map = getattr(app, "url_map", None)
    if url_map is None:
        return "", {}
    server_name = app.config.get("SERVER_NAME")
    path = environ.get("PATH_INFO", "")
    host_matters = url_map.host_matching or bool(server_name)  # (subdomains need SERVER_NAME)
    key = (environ.get("HTTP_HOST", ""), path) if host_matters else path
    answers = _route_cache.get(app)
    if answers is None:
        answers = _route_cache[app] = {}
    answer = answers.get(key)
    if answer is None:
        try:  # a Host Werkzeug cannot encode (BadHost) is an HTTPException too
            adapter = url_map.bind_to_environ(environ, server_name=server_name)
            answer = adapter.match(method="GET", websocket=True)
        except (HTTPException, RequestRedirect):
            answer = ()  # cached as "no route"; None means "not cached"
        if len(answers) < _ROUTE_CACHE_SIZE and sum(map(len, key if host_matters
                                                         else (key,))) <= _CACHED_KEY_CHARS:
            answers[key] = answer
    return answer or None


class ChatWebSocketHandler(WebSocketHandler):
    """gevent-websocket's handler: upgrade only on websocket routes, refuse what
    ``chat.gate`` refuses, and hand greenchat's own endpoint straight to its hub (see
    the module docstring)."""

    _chat_endpoint: str | None = None
    _chat_room = ""
    _chat_user: str | None = None  # the identity the authorize hook gave
    # The permessage-deflate agreement for greenchat's own endpoint (added to the 101 by
    # start_response, given to the adopted connection's codec); None: not agreed.
    _deflate: PerMessageDeflate | None = None
    _requests = 0  # requests read on this TCP connection (keep-alive)
    _deadline: gevent.Timeout | None = None
    _idle = False  # waiting for the next request line of a keep-alive connection
    # When the first request's deadline began elsewhere (chat.upgrade read the start of
    # the request before handing it over): time.monotonic() at which it expires.
    deadline: float | None = None

    # -- deadlines -------------------------------------------------------------------

    def handle_one_request(self):
        """One HTTP exchange under a deadline, from its first byte to the last byte of
        the response: the request line, headers and body (read by the app, or discarded
        by pywsgi afterwards), and the response. A request that promises a body and never
        sends it (``Content-Length: 1000000``, or ``Transfer-Encoding: chunked`` and no
        chunk) would otherwise hold its socket for ever after its answer. Between two
        requests of a keep-alive connection the wait is ``CHAT_KEEPALIVE_TIMEOUT``. Only
        an accepted websocket upgrade leaves the deadline: its time is its own."""
        state = state_of(self.server.application)
        hub = state.hub if state is not None else None
        self._idle = self._requests > 0
        if self._idle:
            timeout = state.keepalive_timeout if state is not None else DEFAULT_KEEPALIVE_TIMEOUT
        elif self.deadline is not None:
            timeout = max(self.deadline - time.monotonic(), 0.001)
            self.deadline = None
        else:
            timeout = state.handshake_timeout if state is not None else DEFAULT_HANDSHAKE_TIMEOUT
        self._deadline = gevent.Timeout(timeout)
        self._deadline.start()
        try:
            return super().handle_one_request()
        except gevent.Timeout as expired:
            if expired is not self._deadline:
                raise
            self._expired(hub)
            return None
        finally:
            self._deadline.close()

    def handle_error(self, exc_type, value, tb):
        # pywsgi catches everything the application's part raises (our deadline too, in
        # the middle of a body) and logs a traceback: an expired deadline is not an error.
        if value is not None and value is self._deadline:
            state = state_of(self.server.application)
            self._expired(state.hub if state is not None else None)
            return
        super().handle_error(exc_type, value, tb)

    def _expired(self, hub) -> None:
        # An idle keep-alive connection closed between requests is not an attack.
        if hub is not None and not self._idle:
            reason = "request_timeout" if self._requests else "handshake_timeout"
            hub.refuse(reason, f"from {self.client_address[0]}")
        self.close_connection = True

    def read_requestline(self):
        line = super().read_requestline()
        if self._idle and line:  # the next request begins: the exchange deadline applies
            self._idle = False
            state = state_of(self.server.application)
            self._deadline.close()
            self._deadline = gevent.Timeout(
                state.handshake_timeout if state is not None else DEFAULT_HANDSHAKE_TIMEOUT)
            self._deadline.start()
        return line

    def read_request(self, raw_requestline):
        result = super().read_request(raw_requestline)
        self._requests += 1
        return result

    def _handle_client_error(self, ex):
        # pywsgi's version prints a traceback or an error line per bad request.
        state = state_of(self.server.application)
        if state is not None:
            state.hub.refuse("bad_request", f"from {self.client_address[0]}: "
                                      f"{str(ex)[:100] or type(ex).__name__}")
        return ("400", _BAD_REQUEST)

    # -- the upgrade -----------------------------------------------------------------

    def upgrade_websocket(self):
        environ = self.environ
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return super().upgrade_websocket()  # not for us: plain HTTP
        route = websocket_route(self.application, environ)
        if route is None or environ.get("REQUEST_METHOD") != "GET":
            return None  # run_application then passes the request to the app as plain HTTP
        endpoint, args = route
        state = state_of(self.application)
        hub = state.hub if state is not None else None
        refusal = handshake_error(environ)
        if refusal is None and endpoint.startswith("chat.") and state is not None:
            refusal, self._chat_user = state.gate.check(environ)
            if refusal is None:
                refusal = capacity_error(hub, None if endpoint == JSON_ENDPOINT
                                         else room_id(args.get("name", "")))
        if refusal is not None:
            return self._refuse(hub, refusal)
        self._chat_endpoint = endpoint
        self._chat_room = args.get("name", "")
        if endpoint in ADOPTED_ENDPOINTS and hub is not None:
            # Only where greenchat's codec takes the socket: gevent-websocket's own
            # WebSocket (a classic ws.receive() route) knows no extension.
            self._deflate = hub.negotiate(environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS"))
        self._deadline.cancel()  # an accepted websocket: no deadline on its life
        return super().upgrade_websocket()

    def start_response(self, status, headers, exc_info=None):
        # gevent-websocket 0.10.1 writes its 101 through here and negotiates no extension.
        if self._deflate is not None and status.startswith("101"):
            headers = [*headers, ("Sec-WebSocket-Extensions", self._deflate.response)]
        return super().start_response(status, headers, exc_info)

    def _refuse(self, hub, refusal: Refusal) -> list[bytes]:
        if hub is not None:  # behind a trusted proxy, the client it names (CHAT_TRUSTED_PROXIES)
            client = client_address(self.client_address[0],
                                    self.environ.get("HTTP_X_FORWARDED_FOR"),
                                    state_of(self.application).gate.trusted_proxies)
            hub.refuse(refusal.reason, f"{refusal.message}, from {client}")
        status = f"{refusal.status} {responses.get(refusal.status, 'Refused')}"
        self.start_response(status, [("Content-Type", "text/plain"), *refusal.headers])
        return [refusal.message.encode("utf-8", "replace") + b"\n"]

    def run_websocket(self):
        if self._chat_endpoint in ADOPTED_ENDPOINTS and not getattr(self, "prevent_wsgi_call", False):
            adopt(self.websocket, state_of(self.application).hub, room_id(self._chat_room),
                  self._deflate.window_bits if self._deflate is not None else None,
                  self._chat_user, self._chat_endpoint == JSON_ENDPOINT)
            self.environ["wsgi.websocket"] = None
            self.websocket = None
            return
        super().run_websocket()
