"""Every HTTP route greenchat adds to a Flask app, and the per-app state they read.

Under ``CHAT_PATH`` (default ``/``) and ``CHAT_ROOMS_PATH`` (default ``/rooms``)::

    websocket  /                         the lobby (the 2015 clients' endpoint)
    GET        /                         the web chat page (CHAT_PAGE)
    GET        /stats                    JSON figures (CHAT_STATS_PATH)
    websocket  /ws                       the JSON protocol: many rooms (CHAT_JSON_PATH)
    websocket  /rooms/<name>             join room <name> (the lobby is ``lobby``, same as /)
    GET        /rooms                    {"rooms": {"lobby": 3, "general": 2}, "total": 5}
    GET        /rooms/<name>             {"room": "general", "members": 2}
    POST       /rooms/<name>/messages    publish the body (UTF-8 text) to the room;
                                         ``Authorization: Bearer <CHAT_PUBLISH_TOKEN>``
    POST       /users/<id>/messages      the same, to every connection of a user (the
                                         rooms prefix's sibling ``users``)

``/metrics`` and ``/dashboard`` are in ``chat.metrics``.

A room name is 1-64 characters of ``A-Z a-z 0-9 _ . ~ -`` (URL-safe as is); any other
path under the prefix matches no route, so a bad name gets 404 before any upgrade.
Messages stay plain text frames, as on ``/``. Presence counts are global with the Redis
backplane (each worker's counts, refreshed every second) and local otherwise.

The websocket views run only under the card's stock ``GeventWebSocketWorker`` (or any
server that calls the app for an upgrade): ``chat.handler`` adopts greenchat's own
endpoints without calling Flask. Routing is the same in both cases: the URL map.
"""

from __future__ import annotations

import gc
import hmac
from dataclasses import dataclass
from importlib import resources
from typing import Any

from flask import Flask, Response, abort, current_app, jsonify, request
from greenlet import greenlet
from markupsafe import escape
from werkzeug.routing import BaseConverter

from .gate import MAX_USER_BYTES, Gate, capacity_error
from .hub import Hub
from .takeover import adopt, refuse_upgraded

__all__ = ["AppState", "state_of", "hub_of", "register", "LOBBY", "room_id", "room_name",
           "RoomConverter", "ADOPTED_ENDPOINTS", "JSON_ENDPOINT", "admin_refusal",
           "users_path"]

LOBBY = "lobby"
# greenchat's own websocket endpoints: adopted by ``chat.handler`` without calling Flask.
ADOPTED_ENDPOINTS = ("chat.websocket", "chat.room", "chat.json")
# The endpoint of the JSON protocol (CHAT_JSON_PATH): its clients start in no room.
JSON_ENDPOINT = "chat.json"


@dataclass(slots=True)
class AppState:
    """What greenchat keeps per Flask app, in ``app.extensions["chat"]``."""

    hub: Hub
    gate: Gate
    # Seconds one HTTP exchange may take, request and response (CHAT_HANDSHAKE_TIMEOUT).
    handshake_timeout: float
    # Seconds a keep-alive connection may wait for its next request (CHAT_KEEPALIVE_TIMEOUT).
    keepalive_timeout: float = 5.0
    # Upgrades answered in the accept loop (chat.upgrade), not through pywsgi (CHAT_FAST_PATH).
    fast_path: bool = True
    # The Prometheus registry of /metrics (chat.metrics), made by ``register``.
    metrics: Any = None


def state_of(app) -> AppState | None:
    """greenchat's state in ``app``; None for a WSGI app without greenchat."""
    return getattr(app, "extensions", {}).get("chat")


def hub_of(app) -> Hub | None:
    """The hub of ``app``: the one way to reach it. None for an app without greenchat."""
    state = state_of(app)
    return state.hub if state is not None else None


class RoomConverter(BaseConverter):
    """A room name in a URL: what the routes accept is what is valid."""

    regex = r"[A-Za-z0-9_.~-]{1,64}"


def room_id(name: str) -> str:
    """The hub's key for a room name: the lobby is ``""``."""
    return "" if name == LOBBY else name


def room_name(room: str) -> str:
    return room or LOBBY


def register(app: Flask) -> None:
    """Add greenchat's routes to ``app``, at the paths its ``CHAT_*`` settings name."""
    config = app.config
    path = config["CHAT_PATH"]
    app.add_url_rule(path, "chat.websocket", websocket_view, websocket=True)
    app.add_url_rule(config["CHAT_JSON_PATH"], JSON_ENDPOINT, json_websocket_view,
                     websocket=True)
    if config["CHAT_PAGE"]:
        app.add_url_rule(path, "chat.page", page_view)
    app.add_url_rule(config["CHAT_STATS_PATH"], "chat.stats", stats_view)
    prefix = config["CHAT_ROOMS_PATH"].rstrip("/")
    app.url_map.converters["chat_room"] = RoomConverter
    app.add_url_rule(f"{prefix}/<chat_room:name>", "chat.room", room_websocket_view,
                     websocket=True)
    app.add_url_rule(f"{prefix}/<chat_room:name>", "chat.room_presence", room_presence_view)
    app.add_url_rule(prefix or "/", "chat.rooms", rooms_view)
    app.add_url_rule(f"{prefix}/<chat_room:name>/messages", "chat.publish", publish_view,
                     methods=["POST"])
    app.add_url_rule(f"{users_path(config)}/<user>/messages", "chat.publish_user",
                     publish_user_view, methods=["POST"])


def users_path(config) -> str:
    """Where the user publish API lives: ``users`` beside the rooms prefix (``/users``
    for ``/rooms``, ``/chat/users`` for ``/chat/rooms``)."""
    parent = config["CHAT_ROOMS_PATH"].rstrip("/").rpartition("/")[0]
    return f"{parent}/users"


def _current_hub() -> Hub:
    hub = state_of(current_app).hub
    hub.start()  # the backplane reports this worker from its first request on
    return hub


# -- websockets (the stock worker) ----------------------------------------------------


def websocket_view() -> Response:
    """Adopt the upgraded socket into a Connection in the lobby, then end the request."""
    return _adopt_view("")


def room_websocket_view(name: str) -> Response:
    """The same for a named room (``/rooms/<name>``)."""
    return _adopt_view(room_id(name))


def json_websocket_view() -> Response:
    """The same for the JSON endpoint (``/ws``): a client in no room yet."""
    return _adopt_view("", json=True)


def _adopt_view(room: str, json: bool = False) -> Response:
    ws = request.environ.get("wsgi.websocket")
    if ws is None:
        # Reached only when the server does not run gevent-websocket's handler.
        return Response("greenchat needs gevent-websocket's WebSocketHandler to upgrade; "
                        "see README.md (greenchat serve, or gunicorn -c gunicorn.conf.py)\n",
                        status=400, mimetype="text/plain")
    state = state_of(current_app)
    hub = state.hub
    # The 101 is already sent: say no with a close code.
    refusal, user = state.gate.check(request.environ)
    refusal = refusal or capacity_error(hub, None if json else room)
    if refusal is not None:
        refuse_upgraded(ws, hub, refusal)
    else:
        adopt(ws, hub, room, user=user, json=json)
    # gevent-websocket ignores the response of an upgraded request.
    return Response(status=204)


# -- pages and figures ---------------------------------------------------------------


def page_view() -> Response:
    """The chat page, told where the rooms and the JSON endpoint (which it speaks) are
    when mounted under a prefix."""
    page = resources.files("chat").joinpath("static/index.html").read_text("utf-8")
    config = current_app.config
    root = request.script_root
    for name, path in (("rooms", config["CHAT_ROOMS_PATH"]), ("json", config["CHAT_JSON_PATH"])):
        page = page.replace(f'<meta name="greenchat-{name}" content="">',
                            f'<meta name="greenchat-{name}" content="{escape(root + path)}">', 1)
    return Response(page, mimetype="text/html")


def _bearer_matches(token: str) -> bool:
    given = request.headers.get("Authorization", "").encode()
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def admin_refusal(page: bool = False) -> Response | None:
    """401 for a request to an operator's route (/stats, /metrics, the dashboard) without
    ``CHAT_ADMIN_TOKEN``; None when it may go on (or no token is set). A page a browser
    opens takes the token as ``?token=``; figures want the header."""
    token = current_app.config["CHAT_ADMIN_TOKEN"]
    if not token or _bearer_matches(token):
        return None
    if page and hmac.compare_digest(request.args.get("token", "").encode(), token.encode()):
        return None
    return Response("a valid 'Authorization: Bearer <token>' header is required\n", 401,
                    {"WWW-Authenticate": "Bearer"}, mimetype="text/plain")


def stats_view() -> Response:
    refusal = admin_refusal()
    if refusal is not None:
        return refusal
    hub = _current_hub()
    stats = hub.stats()
    cluster = hub.backplane.cluster_stats()
    if cluster is not None:
        stats["cluster"] = cluster
    if request.args.get("greenlets") and current_app.config["CHAT_STATS_GREENLETS"]:
        # Walks every object the GC tracks, on the event loop: for diagnosis only.
        stats["greenlets"] = sum(1 for o in gc.get_objects() if isinstance(o, greenlet))
    return jsonify(stats)


# -- rooms ---------------------------------------------------------------------------


def rooms_view() -> Response:
    presence = _current_hub().presence(everywhere=True)
    counts = {room_name(room): members for room, members in sorted(presence.items())}
    return jsonify({"rooms": counts, "total": sum(counts.values())})


def room_presence_view(name: str) -> Response:
    members = _current_hub().presence(everywhere=True).get(room_id(name), 0)
    return jsonify({"room": name, "members": members})


def publish_view(name: str) -> Response:
    """Publish the request body to a room, for the application's backend.

    401 without the right bearer token, 404 when no token is configured (the API is
    off), 413 over ``CHAT_MAX_MESSAGE_SIZE``, 400 for a body that is not UTF-8 text.
    """
    return _publish(room_id(name), None)


def publish_user_view(user: str) -> Response:
    """Publish the request body to every connection of ``user`` (the identity the
    authorize hook gave), in every process; the same answers as ``publish_view``."""
    if len(user.encode("utf-8", "surrogatepass")) > MAX_USER_BYTES:
        return _bad(404, f"no user can have an identity over {MAX_USER_BYTES} bytes")
    return _publish("", user)


def _publish(room: str, user: str | None) -> Response:
    token = current_app.config["CHAT_PUBLISH_TOKEN"]
    if not token:
        abort(404)
    if not _bearer_matches(token):
        return Response("a valid 'Authorization: Bearer <token>' header is required\n", 401,
                        {"WWW-Authenticate": "Bearer"}, mimetype="text/plain")
    hub = _current_hub()
    limit = hub.max_message_size
    if request.content_length is not None and request.content_length > limit:
        return _bad(413, f"message over {limit} bytes")
    # Never past Content-Length: gevent's input is not bounded by it in every case.
    length = request.content_length
    body = request.stream.read(limit + 1 if length is None else min(length, limit + 1))
    if len(body) > limit:
        return _bad(413, f"message over {limit} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return _bad(400, f"message is not UTF-8 text ({error.reason} at byte {error.start})")
    hub.publish(text, room, user)
    return Response(status=204)


def _bad(status: int, reason: str) -> Response:
    return Response(reason + "\n", status, mimetype="text/plain")
