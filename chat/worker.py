"""gunicorn worker: the card's ``GeventWebSocketWorker`` with greenchat's upgrade server
(``chat.upgrade``: its own websocket routes answered in the accept loop, TLS included),
a graceful goodbye, and an upgrade only on websocket routes (``chat.handler``).

gunicorn's gevent worker, on SIGTERM, stops accepting and waits for request greenlets.
greenchat's clients have no greenlet after the upgrade, so the worker would exit at once
and every client would see its TCP connection drop (1006). This subclass adds one step
after the stock shutdown: every client gets a close frame with 1001 (going away).
Everything else is gevent-websocket's worker unchanged (``wsgi_handler`` is a subclass of
its ``WebSocketHandler``; ``server_class`` a subclass of pywsgi's server, which gunicorn
builds per listening socket with its ``ssl_context`` for ``--certfile``/``--keyfile``).
"""

from __future__ import annotations

import gevent
from geventwebsocket.gunicorn.workers import GeventWebSocketWorker

from .handler import ChatWebSocketHandler
from .upgrade import UpgradeServer
from .views import hub_of

__all__ = ["GreenchatWorker"]


class GreenchatWorker(GeventWebSocketWorker):
    server_class = UpgradeServer
    wsgi_handler = ChatWebSocketHandler

    def run(self) -> None:
        super().run()
        hub = hub_of(self.wsgi)
        if hub is not None:
            closed = hub.close_all()
            self.log.info("closed %d clients with 1001 (going away)", closed)
            gevent.sleep(0.2)  # let the close frames leave before the process exits
