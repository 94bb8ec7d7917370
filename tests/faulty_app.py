"""A greenchat app whose message handler raises for the text "boom", for
tests/test_connection.py: one client's fault must close that client only (1011)."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import sys  # noqa: E402

from flask import Flask  # noqa: E402

from chat import Chat  # noqa: E402
from chat.hub import broadcast_message  # noqa: E402
from chat.server import serve  # noqa: E402


def on_message(connection, event):
    if getattr(event, "text", None) == "boom":
        raise ValueError("the application's handler failed")
    broadcast_message(connection, event)


app = Flask(__name__)
Chat(app, on_message=on_message)

if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    serve(app, "127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
