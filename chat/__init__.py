"""greenchat: a websocket broadcast chat server built on gevent, gevent-websocket and Flask.

Embed it in a Flask app with ``Chat(app)`` (or ``chat.init_app(app)``), or run it on its
own with ``greenchat serve`` or gunicorn (see README.md).
"""

__version__ = "0.1.0"

from .app import Chat, create_app  # noqa: E402  (the version must be importable first)

__all__ = ["Chat", "create_app", "__version__"]
