"""The upgrade handler's own state: what a client can make it keep."""

from __future__ import annotations

import sys

from chat import create_app
from chat.handler import _route_cache, websocket_route


def test_the_route_cache_cannot_be_grown_by_client_chosen_hosts_and_paths():
    app = create_app()
    for i in range(3000):
        environ = {"REQUEST_METHOD": "GET", "wsgi.url_scheme": "http",
                   "HTTP_HOST": f"h{i}." + "x" * 60000, "PATH_INFO": f"/no/{i}/" + "p" * 7000,
                   "SERVER_NAME": "chat", "SERVER_PORT": "80"}
        assert websocket_route(app, environ) is None
    for path in ("/", "/rooms/general"):
        environ = {"REQUEST_METHOD": "GET", "wsgi.url_scheme": "http", "HTTP_HOST": "chat",
                   "PATH_INFO": path, "SERVER_NAME": "chat", "SERVER_PORT": "80"}
        assert websocket_route(app, environ)[0] in ("chat.websocket", "chat.room")
    answers = _route_cache[app]
    stored = sum(sys.getsizeof(key) for key in answers)
    assert len(answers) == 2 and stored < 10_000  # only the short, real paths were kept
