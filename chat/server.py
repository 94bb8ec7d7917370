"""The embedded default server: gevent's WSGIServer with gevent-websocket's handler
(``chat.handler.ChatWebSocketHandler``, which upgrades only on websocket routes).

One process, no external services: what ``greenchat serve`` runs. For several processes
use gunicorn (gunicorn.conf.py).
"""

from __future__ import annotations

import logging
import os
import signal

import gevent
import gevent.event
from flask import Flask
from gevent.pywsgi import WSGIServer

from .handler import ChatWebSocketHandler
from .system import listen_backlog, max_clients_per_process
from .views import hub_of

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(app: Flask, host: str = "0.0.0.0", port: int = 8080, backlog: int | None = None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then close every client with 1001 and return."""
    backlog = backlog or listen_backlog()
    # log=None: no access-log line per handshake (a million of them would cost real CPU).
    server = WSGIServer((host, port), app, handler_class=ChatWebSocketHandler, backlog=backlog,
                        log=None)
    server.start()
    hub = hub_of(app)
    hub.start()
    max_clients = max_clients_per_process()
    backplane = hub.backplane.describe()
    # The extras are fields of their own in JSON lines (CHAT_LOG_FORMAT=json).
    log.info("greenchat listening on http://%s:%d (pid %d, max %d clients by open files, "
             "backlog %d, backplane: %s)", host, server.server_port,
             os.getpid(), max_clients, backlog, backplane,
             extra={"bind": f"{host}:{server.server_port}", "pid": os.getpid(), "workers": 1,
                    "max_clients": max_clients, "backlog": backlog, "backplane": backplane})
    stopping = gevent.event.Event()

    def stop(signum: int) -> None:
        log.info("greenchat stopping on %s: closing %d clients with 1001",
                 signal.Signals(signum).name, hub.connections)
        stopping.set()

    handlers = [gevent.signal_handler(sig, stop, sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        stopping.wait()
    finally:
        for handler in handlers:
            handler.cancel()
        server.stop(timeout=1)
        hub.close_all()
        # Let the close frames leave; sockets of clients that never answer are dropped.
        gevent.sleep(0.2)
