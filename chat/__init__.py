"""greenchat: a websocket broadcast chat server built on gevent, gevent-websocket and Flask.

Embed it in a Flask app with ``Chat(app)`` (or ``chat.init_app(app)``), or run it on its
own with ``greenchat serve`` or gunicorn (see README.md).
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Chat", "create_app", "__version__"]

if TYPE_CHECKING:
    from .app import Chat, create_app


def __getattr__(name: str):
    # Imported on first use: `greenchat bench` load-client workers import chat.bench only,
    # and Flask plus gevent would cost each of them ~25 MB of RSS for nothing.
    if name in ("Chat", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'chat' has no attribute {name!r}")
