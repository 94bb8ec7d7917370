"""A Flask app with greenchat and an ``authorize`` hook, for tests/test_gate.py.

``?token=letmein`` is accepted, no token is refused with 401 (``abort``), a wrong token
with 403 (the hook returns False), and a Flask session with ``user`` set is accepted
(the hook runs in a request context). ``GET /login`` sets that session. The room
``staff`` (``/rooms/staff``) is for that session only, whatever the token. An accepted
client's identity (the hook's string) is its session's user, or ``?user=`` with the
token. ``CHAT_*`` settings come from the environment, as for ``greenchat serve``.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import sys  # noqa: E402

from flask import Flask, abort, session  # noqa: E402

from chat import Chat  # noqa: E402
from chat.config import from_environ  # noqa: E402
from chat.server import serve  # noqa: E402


def authorize(request):
    if (request.view_args or {}).get("name") == "staff":  # a named room: /rooms/<name>
        return session.get("user") == "ada"
    if session.get("user"):
        return session["user"]
    token = request.args.get("token")
    if token is None:
        abort(401, "a token is required")
    return token == "letmein" and request.args.get("user", True)


app = Flask(__name__)
app.config.from_mapping(from_environ())
app.secret_key = "tests only"
Chat(app, authorize=authorize)


@app.get("/login")
def login():
    session["user"] = "ada"
    return "logged in\n"


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    serve(app, "127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
