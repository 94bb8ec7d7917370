"""The embedded default server: greenchat's upgrade server (``chat.upgrade``: its own
websocket routes answered in the accept loop) in front of gevent's pywsgi with
gevent-websocket's handler (``chat.handler.ChatWebSocketHandler``) for everything else.

One process, no external services: what ``greenchat serve`` runs. For several processes
use gunicorn (gunicorn.conf.py). With a certificate and key it serves ``https://`` and
``wss://`` (see ``tls_context``).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl

import gevent
import gevent.event
from flask import Flask

from .handler import ChatWebSocketHandler
from .system import listen_backlog, max_clients_per_process
from .upgrade import UpgradeServer
from .views import hub_of

__all__ = ["serve", "tls_context"]

log = logging.getLogger(__name__)


def tls_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server TLS context from a PEM certificate (chain) and key; raises OSError or
    ssl.SSLError with the reason when they cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def serve(app: Flask, host: str = "0.0.0.0", port: int = 8080, backlog: int | None = None,
          context: ssl.SSLContext | None = None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then close every client with 1001 and return.

    With ``context`` (:func:`tls_context`) every connection is TLS: https and wss.
    """
    backlog = backlog or listen_backlog()
    tls = {"ssl_context": context} if context is not None else {}
    # log=None: no access-log line per handshake (a million of them would cost real CPU).
    server = UpgradeServer((host, port), app, handler_class=ChatWebSocketHandler,
                           backlog=backlog, log=None, **tls)
    server.start()
    hub = hub_of(app)
    hub.start()
    max_clients = max_clients_per_process()
    backplane = hub.backplane.describe()
    scheme = "https" if context is not None else "http"
    # The extras are fields of their own in JSON lines (CHAT_LOG_FORMAT=json).
    log.info("greenchat listening on %s://%s:%d (pid %d, max %d clients by open files, "
             "backlog %d, backplane: %s)", scheme, host, server.server_port,
             os.getpid(), max_clients, backlog, backplane,
             extra={"bind": f"{host}:{server.server_port}", "pid": os.getpid(), "workers": 1,
                    "max_clients": max_clients, "backlog": backlog, "backplane": backplane,
                    "tls": context is not None})
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
