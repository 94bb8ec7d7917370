"""The JSON endpoint (``/ws``) on each of the three upgrade paths, behind the same gate as
``/`` and ``/rooms/<name>``, in a server in this process (gevent sockets as clients)."""

from __future__ import annotations

import json

import pytest
from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from chat import Chat
from chat.protocol import TextMessage
from chat.views import hub_of
from test_upgrade import Client, _passthrough, serve  # noqa: F401 (serve: a fixture)


def events_of(client: Client, count: int) -> list[dict]:
    events = []
    while len(events) < count:
        event = client.receive()
        assert type(event) is TextMessage, event
        events.append(json.loads(event.text))
    return events


def request(client: Client, body: dict, count: int = 1) -> list[dict]:
    client.send(json.dumps(body).encode())
    return events_of(client, count)


def identified_app(config: dict | None = None) -> Flask:
    """greenchat whose authorize hook makes ``?user=<id>`` the client's identity and
    refuses ``?user=`` (empty)."""
    app = Flask("identified")
    app.config.from_mapping(config or {})
    Chat(app, authorize=lambda req: req.args.get("user", True))
    return app


def the_protocol_works(port: int, app: Flask, prefix: str = "") -> None:
    """A JSON client and a plain one meet in a room; the JSON client's identity is
    carried through the gate: a message to its user reaches it."""
    json_client = Client.to(port, f"{prefix}/ws?user=alice")
    plain = Client.to(port, f"{prefix}/rooms/general")
    assert (json_client.status, plain.status) == (101, 101)
    assert request(json_client, {"op": "join", "room": "general", "ref": 1}) == [
        {"type": "joined", "room": "general", "ref": 1}]
    plain.send(b"hello from /rooms/general")
    (message,) = events_of(json_client, 1)
    assert (message["room"], message["text"]) == ("general", "hello from /rooms/general")
    assert plain.receive().text == "hello from /rooms/general"
    json_client.send(json.dumps({"op": "send", "room": "general", "text": "hi"}).encode())
    assert plain.receive().text == "hi"
    assert events_of(json_client, 1)[0]["text"] == "hi"
    hub = hub_of(app)
    assert hub.presence() == {"general": 2} and hub.connections == 2
    hub.publish("for alice only", user="alice")
    (private,) = events_of(json_client, 1)
    assert (private["room"], private["text"]) == ("@alice", "for alice only")
    (error,) = request(json_client, {"op": "send", "room": "elsewhere", "text": "x"})
    assert error["error"] == "not_member"
    json_client.close()
    plain.close()


def test_the_fast_path_serves_the_json_endpoint(serve):
    app = identified_app()
    the_protocol_works(serve(app), app)


def test_the_pywsgi_handler_serves_the_json_endpoint(serve):
    app = identified_app()
    app.wsgi_app = _passthrough(app.wsgi_app)  # every request through the handler
    the_protocol_works(serve(app), app)


def test_the_flask_view_of_the_stock_worker_serves_the_json_endpoint(serve):
    """Mounted under a prefix, the app is reached through its views (as under the card's
    GeventWebSocketWorker, which upgrades before the app runs)."""
    app = identified_app()
    the_protocol_works(serve(DispatcherMiddleware(Flask("outer"), {"/chat": app})), app,
                       prefix="/chat")


@pytest.mark.parametrize("wrap", [False, True])
def test_the_json_endpoint_is_behind_the_same_gate(serve, wrap):
    app = identified_app({"CHAT_MAX_CONNECTIONS": 1, "CHAT_JSON_PATH": "/multi"})
    if wrap:
        app.wsgi_app = _passthrough(app.wsgi_app)
    port = serve(app)
    assert Client.to(port, "/multi?user=").status == 403  # the hook said no
    assert Client.to(port, "/ws").status == 404  # the setting moved it
    first = Client.to(port, "/multi")
    assert first.status == 101
    assert Client.to(port, "/multi").status == 503  # one connection, however many rooms
    assert Client.to(port, "/").status == 503
    assert hub_of(app).refused == {"auth": 1, "full": 2}
    first.close()
