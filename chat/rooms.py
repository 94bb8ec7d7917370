"""Named rooms over HTTP: the websocket route, presence, and the server-side publish API.

Under ``CHAT_ROOMS_PATH`` (default ``/rooms``)::

    websocket  /rooms/<name>             join room <name> (the lobby is ``lobby``, same as /)
    GET        /rooms                    {"rooms": {"lobby": 3, "general": 2}, "total": 5}
    GET        /rooms/<name>             {"room": "general", "members": 2}
    POST       /rooms/<name>/messages    publish the body (UTF-8 text) to the room;
                                         ``Authorization: Bearer <CHAT_PUBLISH_TOKEN>``

A room name is 1-64 characters of ``A-Z a-z 0-9 _ . ~ -`` (URL-safe as is); any other
path under the prefix matches no route, so a bad name gets 404 before any upgrade.
Messages stay plain text frames, as on ``/``. Presence counts are global with the Redis
backplane (each worker's counts, refreshed every second) and local otherwise.
"""

from __future__ import annotations

import hmac

from flask import Flask, Response, abort, current_app, jsonify, request
from werkzeug.routing import BaseConverter

__all__ = ["init_app", "LOBBY", "room_id", "room_name", "RoomConverter"]

LOBBY = "lobby"


class RoomConverter(BaseConverter):
    """A room name in a URL: what the routes accept is what is valid."""

    regex = r"[A-Za-z0-9_.~-]{1,64}"


def room_id(name: str) -> str:
    """The hub's key for a room name: the lobby is ``""``."""
    return "" if name == LOBBY else name


def room_name(room: str) -> str:
    return room or LOBBY


def init_app(app: Flask) -> None:
    prefix = app.config["CHAT_ROOMS_PATH"].rstrip("/")
    app.url_map.converters["chat_room"] = RoomConverter
    from .app import room_websocket_view  # the upgrade lives with the lobby's, in app.py

    app.add_url_rule(f"{prefix}/<chat_room:name>", "chat.room", room_websocket_view,
                     websocket=True)
    app.add_url_rule(f"{prefix}/<chat_room:name>", "chat.room_presence", room_presence_view)
    app.add_url_rule(prefix or "/", "chat.rooms", rooms_view)
    app.add_url_rule(f"{prefix}/<chat_room:name>/messages", "chat.publish", publish_view,
                     methods=["POST"])


def _presence() -> dict[str, int]:
    hub = current_app.extensions["chat"]
    hub.start()
    return hub.backplane.presence(hub)


def rooms_view() -> Response:
    counts = {room_name(room): members for room, members in sorted(_presence().items())}
    return jsonify({"rooms": counts, "total": sum(counts.values())})


def room_presence_view(name: str) -> Response:
    return jsonify({"room": name, "members": _presence().get(room_id(name), 0)})


def publish_view(name: str) -> Response:
    """Publish the request body to a room, for the application's backend.

    401 without the right bearer token, 404 when no token is configured (the API is
    off), 413 over ``CHAT_MAX_MESSAGE_SIZE``, 400 for a body that is not UTF-8 text.
    """
    token = current_app.config["CHAT_PUBLISH_TOKEN"]
    if not token:
        abort(404)
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        return Response("a valid 'Authorization: Bearer <token>' header is required\n", 401,
                        {"WWW-Authenticate": "Bearer"}, mimetype="text/plain")
    hub = current_app.extensions["chat"]
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
    hub.publish(text, room_id(name))
    return Response(status=204)


def _bad(status: int, reason: str) -> Response:
    return Response(reason + "\n", status, mimetype="text/plain")
