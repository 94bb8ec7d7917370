"""Flask integration: the ``Chat`` extension and the ``create_app`` factory.

Flask does what it is good at (routing, configuration, the web page, living inside an
existing app); gevent-websocket does the HTTP upgrade; after the upgrade the socket is
handed to a :class:`~chat.connection.Connection` and the request ends (see
``connection.take_over`` for why).

The upgrade route is declared with ``websocket=True``: Werkzeug >= 2 otherwise answers
400 to a request it sees as a websocket, after gevent-websocket already sent 101.
"""

from __future__ import annotations

import gc
from importlib import resources
from typing import Any, Mapping

from greenlet import greenlet
from flask import Flask, Response, current_app, jsonify, request
from markupsafe import escape

from . import metrics, rooms
from .backplane import create_backplane
from .gate import Authorize, Gate, Refusal
from .config import DEFAULTS, from_environ, validate
from .connection import Connection, take_over
from .protocol import CloseCode
from .system import max_clients_per_process
from .hub import Hub, MessageHandler, broadcast_message

__all__ = ["Chat", "create_app"]


class Chat:
    """Adds the broadcast chat to a Flask app: ``Chat(app)`` or ``chat.init_app(app)``.

    Per-app state (the :class:`~chat.hub.Hub`) lives in ``app.extensions["chat"]``.
    ``on_message(connection, event)`` replaces the default handler, which broadcasts
    what a client sends to everyone in its room; it runs in a greenlet and may block.
    ``authorize(request)`` is asked before each upgrade (see :class:`~chat.gate.Gate`):
    a true value accepts, a false one refuses with 403, ``abort(401)`` with 401.
    """

    def __init__(self, app: Flask | None = None, *,
                 on_message: MessageHandler = broadcast_message,
                 authorize: Authorize | None = None) -> None:
        self.on_message = on_message
        self.authorize = authorize
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        validate(app.config)
        config = app.config
        app.extensions["chat"] = Hub(
            max_backlog=config["CHAT_MAX_BACKLOG"],
            close_timeout=float(config["CHAT_CLOSE_TIMEOUT"]),
            max_message_size=config["CHAT_MAX_MESSAGE_SIZE"],
            max_connections=config["CHAT_MAX_CONNECTIONS"] or max_clients_per_process(),
            on_message=self.on_message,
            backplane=create_backplane(config["CHAT_REDIS_URL"], config["CHAT_REDIS_CHANNEL"],
                                       config["CHAT_HISTORY"]),
            gate=Gate(app, config["CHAT_ALLOWED_ORIGINS"], self.authorize),
            handshake_timeout=float(config["CHAT_HANDSHAKE_TIMEOUT"]),
            rate_limit=float(config["CHAT_RATE_LIMIT"]),
            rate_burst=config["CHAT_RATE_BURST"],
            rate_limit_action=config["CHAT_RATE_LIMIT_ACTION"],
            ping_interval=float(config["CHAT_PING_INTERVAL"]),
            history=config["CHAT_HISTORY"],
            presence_notices=config["CHAT_PRESENCE_NOTICES"],
        )
        path = config["CHAT_PATH"]
        app.add_url_rule(path, "chat.websocket", websocket_view, websocket=True)
        if config["CHAT_PAGE"]:
            app.add_url_rule(path, "chat.page", page_view)
        app.add_url_rule(config["CHAT_STATS_PATH"], "chat.stats", stats_view)
        rooms.init_app(app)
        metrics.init_app(app, app.extensions["chat"])

    @staticmethod
    def hub(app: Flask | None = None) -> Hub:
        """The hub of ``app`` (default: the current app)."""
        return (app or current_app).extensions["chat"]

    def publish(self, message: str | bytes, room: str = "", app: Flask | None = None) -> None:
        """Broadcast ``message`` from server code (a view, a greenlet) to a room's clients."""
        self.hub(app).publish(message, room)


def websocket_view() -> Response:
    """Adopt the upgraded socket into a Connection in the lobby, then end the request."""
    return _adopt_view("")


def room_websocket_view(name: str) -> Response:
    """The same for a named room (``/rooms/<name>``, see ``chat.rooms``)."""
    return _adopt_view(rooms.room_id(name))


def _adopt_view(room: str) -> Response:
    ws = request.environ.get("wsgi.websocket")
    hub = Chat.hub()
    # Under the stock handler the 101 is already sent: say no with a close code.
    refusal = hub.gate.check(request.environ) if ws is not None else None
    if refusal is not None or ws is not None and hub.full:
        if refusal is None:
            refusal = Refusal(503, "full", "server full")
        hub.refuse(refusal.reason, refusal.message)
        code = CloseCode.TRY_AGAIN_LATER if refusal.reason == "full" else CloseCode.POLICY_VIOLATION
        sock, _ = take_over(ws)
        # The reason names the check only: the message may quote client input of any length.
        Connection(sock, hub, max_message_size=hub.max_message_size).close(
            code, f"refused: {refusal.reason}")
        return Response(status=204)
    if ws is None:
        # Reached only when the server does not run gevent-websocket's handler.
        return Response("greenchat needs gevent-websocket's WebSocketHandler to upgrade; "
                        "see README.md (greenchat serve, or gunicorn -c gunicorn.conf.py)\n",
                        status=400, mimetype="text/plain")
    adopt(ws, hub, room)
    # gevent-websocket ignores the response of an upgraded request.
    return Response(status=204)


def adopt(ws, hub: Hub, room: str = "") -> Connection:
    """Take the upgraded socket from gevent-websocket into a started Connection."""
    sock, buffered = take_over(ws)
    connection = Connection(sock, hub, room, hub.max_message_size)
    connection.start(buffered)
    return connection


def page_view() -> Response:
    """The chat page, told where the lobby and the rooms are when mounted under a prefix."""
    page = resources.files("chat").joinpath("static/index.html").read_text("utf-8")
    config = current_app.config
    root = request.script_root
    for name, path in (("lobby", config["CHAT_PATH"]), ("rooms", config["CHAT_ROOMS_PATH"])):
        page = page.replace(f'<meta name="greenchat-{name}" content="">',
                            f'<meta name="greenchat-{name}" content="{escape(root + path)}">', 1)
    return Response(page, mimetype="text/html")


def stats_view() -> Response:
    hub = Chat.hub()
    hub.start()
    stats = hub.stats()
    cluster = hub.backplane.cluster_stats()
    if cluster is not None:
        stats["cluster"] = cluster
    if request.args.get("greenlets"):
        # Walks every object the GC tracks: for tests and diagnosis, not for polling.
        stats["greenlets"] = sum(1 for o in gc.get_objects() if isinstance(o, greenlet))
    return jsonify(stats)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """The standalone greenchat app: defaults, then ``CHAT_*`` environment, then ``test_config``."""
    app = Flask("chat")
    app.config.from_mapping(DEFAULTS)
    app.config.from_mapping(from_environ())
    if test_config:
        app.config.from_mapping(test_config)
    Chat(app)
    return app
