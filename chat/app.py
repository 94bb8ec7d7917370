"""Flask integration: the ``Chat`` extension and the ``create_app`` factory.

Flask does what it is good at (routing, configuration, the web page, living inside an
existing app); gevent-websocket does the HTTP upgrade; after the upgrade the socket is
handed to a :class:`~chat.connection.Connection` and the request ends (see
``chat.takeover`` for why).

This module only assembles: the hub and its backplane (``chat.hub``, ``chat.backplane``),
who may connect (``chat.gate``), the routes (``chat.views``, ``chat.metrics``).

The upgrade routes are declared with ``websocket=True``: Werkzeug >= 2 otherwise answers
400 to a request it sees as a websocket, after gevent-websocket already sent 101.
"""

from __future__ import annotations

from typing import Any, Mapping

from flask import Flask, current_app

from . import metrics, views
from .backplane import create_backplane
from .config import DEFAULTS, from_environ, validate
from .gate import Authorize, Gate
from .hub import AuthorizeJoin, Hub, MessageHandler, broadcast_message
from .system import max_clients_per_process
from .views import AppState, hub_of

__all__ = ["Chat", "create_app", "hub_of"]


class Chat:
    """Adds the broadcast chat to a Flask app: ``Chat(app)`` or ``chat.init_app(app)``.

    Per-app state (the :class:`~chat.hub.Hub`, the gate) lives in ``app.extensions["chat"]``
    (a :class:`~chat.views.AppState`); ``hub_of(app)`` reaches the hub.
    ``on_message(connection, event)`` replaces the default handler, which broadcasts
    what a client sends to everyone in its room; it runs in a greenlet and may block.
    ``authorize(request)`` is asked before each upgrade (see :class:`~chat.gate.Gate`):
    a true value accepts, a false one refuses with 403, ``abort(401)`` with 401; a
    non-empty string accepts and is the client's identity (its user id).
    ``authorize_join(user, room)`` is asked at each join of a JSON client (the user is
    None for an anonymous one); it runs in the client's message greenlet and may block.
    ``on_message`` applies to the plain endpoints; a JSON client's frames are requests.
    """

    def __init__(self, app: Flask | None = None, *,
                 on_message: MessageHandler = broadcast_message,
                 authorize: Authorize | None = None,
                 authorize_join: AuthorizeJoin | None = None) -> None:
        self.on_message = on_message
        self.authorize = authorize
        self.authorize_join = authorize_join
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        validate(app.config)
        config = app.config
        hub = Hub(
            max_backlog=config["CHAT_MAX_BACKLOG"],
            send_buffer=config["CHAT_SEND_BUFFER"],
            close_timeout=float(config["CHAT_CLOSE_TIMEOUT"]),
            max_message_size=config["CHAT_MAX_MESSAGE_SIZE"],
            deflate=config["CHAT_DEFLATE"],
            max_connections=config["CHAT_MAX_CONNECTIONS"] or max_clients_per_process(),
            on_message=self.on_message,
            backplane=create_backplane(config),
            rate_limit=float(config["CHAT_RATE_LIMIT"]),
            rate_burst=config["CHAT_RATE_BURST"],
            rate_limit_action=config["CHAT_RATE_LIMIT_ACTION"],
            ping_interval=float(config["CHAT_PING_INTERVAL"]),
            history=config["CHAT_HISTORY"],
            history_bytes=config["CHAT_HISTORY_BYTES"],
            history_total_bytes=config["CHAT_HISTORY_TOTAL_BYTES"],
            max_rooms=config["CHAT_MAX_ROOMS"],
            presence_notices=config["CHAT_PRESENCE_NOTICES"],
            presence_users=config["CHAT_PRESENCE_USERS"],
            max_rooms_per_connection=config["CHAT_MAX_ROOMS_PER_CONNECTION"],
            authorize_join=self.authorize_join,
        )
        app.extensions["chat"] = AppState(
            hub=hub,
            gate=Gate(app, config["CHAT_ALLOWED_ORIGINS"], self.authorize,
                      config["CHAT_TRUSTED_PROXIES"]),
            handshake_timeout=float(config["CHAT_HANDSHAKE_TIMEOUT"]),
            keepalive_timeout=float(config["CHAT_KEEPALIVE_TIMEOUT"]),
            fast_path=config["CHAT_FAST_PATH"],
        )
        views.register(app)
        metrics.register(app)

    def publish(self, message: str | bytes, room: str = "", app: Flask | None = None, *,
                user: str | None = None) -> None:
        """Broadcast ``message`` from server code (a view, a greenlet) to a room's clients,
        or with ``user`` to every connection of that identity, in every process."""
        hub_of(app or current_app).publish(message, room, user)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """The standalone greenchat app: defaults, then ``CHAT_*`` environment, then ``test_config``."""
    app = Flask("chat")
    app.config.from_mapping(DEFAULTS)
    app.config.from_mapping(from_environ())
    if test_config:
        app.config.from_mapping(test_config)
    Chat(app)
    return app
