"""greenchat inside an existing Flask app.

Run it:   python examples/embed.py --port 8000      (then open http://127.0.0.1:8000/chat)
or:       gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker examples.embed:app

What it shows:
- ``Chat()`` + ``init_app(app)`` mounts the broadcast chat at ``CHAT_PATH`` (here /chat:
  websocket upgrade and web page) and /stats, next to the app's own routes;
- ``chat.publish(...)`` sends to every client from ordinary server code (a POST view);
- a classic blocking handler (``ws.receive()`` in a loop) still works through
  gevent-websocket, for code that wants that style. Its cost: the request greenlet, the
  WSGI environ and pywsgi's 8 KiB read buffer stay alive for as long as the client is
  connected, about 38 KB per client against under 1 KB for a greenchat connection.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after monkey-patching, as gevent asks)

from flask import Flask, request  # noqa: E402

from chat import Chat  # noqa: E402

app = Flask(__name__)
app.config["CHAT_PATH"] = "/chat"
chat = Chat()
chat.init_app(app)


@app.get("/")
def home():
    return "An existing app. Its chat is at /chat.\n"


@app.post("/announce")
def announce():
    """Server-side publish: the request body goes to every chat client."""
    chat.publish(request.get_data(as_text=True))
    return "", 204


@app.route("/echo", websocket=True)
def echo():
    """The classic blocking style: one parked greenlet per client (see the docstring)."""
    ws = request.environ["wsgi.websocket"]
    while (message := ws.receive()) is not None:
        ws.send(message)
    return ""


if __name__ == "__main__":
    import logging

    from chat.server import serve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    serve(app, args.host, args.port)
