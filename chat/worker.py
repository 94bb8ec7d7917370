"""gunicorn worker: the card's ``GeventWebSocketWorker`` with greenchat's upgrade server
(``chat.upgrade``: its own websocket routes answered in the accept loop, TLS included),
a graceful goodbye, an upgrade only on websocket routes (``chat.handler``), and a full
worker that stops listening while it is full.

gunicorn's gevent worker, on SIGTERM, stops accepting and waits for request greenlets.
greenchat's clients have no greenlet after the upgrade, so the worker would exit at once
and every client would see its TCP connection drop (1006). This subclass adds one step
after the stock shutdown: every client gets a close frame with 1001 (going away).
Everything else is gevent-websocket's worker unchanged (``wsgi_handler`` is a subclass of
its ``WebSocketHandler``; ``server_class`` a subclass of pywsgi's server, which gunicorn
builds per listening socket with its ``ssl_context`` for ``--certfile``/``--keyfile``).

A full worker and SO_REUSEPORT (``gunicorn.conf.py`` turns it on for several workers):
each worker listens on a socket of its own, and the kernel picks one socket of the
group for each new connection by a hash of the connection's addresses and ports. It
does not know that a worker is full (``CHAT_MAX_CONNECTIONS``), so a full worker keeps
getting its share of the new clients and refusing them with 503, and a client that
comes back from the same address and port meets it at every retry. After a crash
(``bench/storm.py --trigger kill``) the first worker gunicorn forks again listens alone
for a moment and takes every client that comes back until it is full. With
:class:`LeavingServer` a full worker closes its listening socket within ``ROOM_CHECK``
seconds, so the kernel leaves it out of the group and sends every new client to a
worker that has room; at ``RELISTEN_FRACTION`` of its limit it opens a new socket and
joins again. If every worker is full, nobody listens: a client's connect() is refused
at once, and it retries with its backoff as after a 503.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import Callable

import gevent
import gevent.socket
from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
from gunicorn.sock import TCP6Socket, TCPSocket

from .handler import ChatWebSocketHandler
from .hub import Hub
from .upgrade import UpgradeServer
from .views import hub_of

__all__ = ["GreenchatWorker", "LeavingServer"]

log = logging.getLogger(__name__)

# A worker that left the group listens again once it holds at most this share of
# CHAT_MAX_CONNECTIONS. Not at the limit itself: each departure resets the connections
# that were waiting in the socket's queue, and a worker at the edge would leave and come
# back at every client that leaves and every one that arrives.
RELISTEN_FRACTION = 0.95
# Seconds between two looks at the connection count: less than the page's shortest
# reconnect delay (0.25 s), so a client refused because its worker just became full
# retries after that worker has left.
ROOM_CHECK = 0.1
# ... while it holds at least RELISTEN_FRACTION of its limit, or has left; further from
# full, every ROOM_CHECK_FAR seconds (an accept while full still leaves at once). Ten
# wake-ups a second of every idle worker were most of what 63 idle workers cost.
ROOM_CHECK_FAR = 1.0


class LeavingServer(UpgradeServer):
    """greenchat's server on a worker's own SO_REUSEPORT socket: while its process is
    full it is out of the kernel's group for the port.

    It leaves at the first connection it accepts while full, or at the next look at the
    count (every ``ROOM_CHECK`` seconds) when handshakes already under way filled it.
    The clients refused meanwhile get their 503, and their retries meet the group without
    this worker. The connections waiting in the socket's queue when it closes are reset
    by the kernel and retry the same way. ``listen_again(address)`` is the worker's: a
    new listening socket made as gunicorn makes each worker's, on the same address.
    """

    def __init__(self, listener, *args, hub: Hub,
                 listen_again: Callable[[tuple], gevent.socket.socket], **kwargs) -> None:
        super().__init__(listener, *args, **kwargs)
        self.hub = hub
        self.listen_again = listen_again
        self.left_at: tuple | None = None  # the address while out of the group
        self._relisten_failed = False  # logged once per departure, not at every look
        self._room_timer = None

    @property
    def relisten_at(self) -> int:
        """The most clients a worker that left may hold to listen again."""
        return int(self.hub.max_connections * RELISTEN_FRACTION)

    def start(self) -> None:
        super().start()
        self._schedule_check()

    def _schedule_check(self) -> None:
        """The next look at the count: soon near the limit or out of the group, later
        far from it (see ``ROOM_CHECK_FAR``)."""
        near = self.left_at is not None or self.hub.connections >= self.relisten_at
        self._room_timer = self.loop.timer(ROOM_CHECK if near else ROOM_CHECK_FAR)
        self._room_timer.start(self._check_room)

    def close(self) -> None:
        if self._room_timer is not None:
            self._room_timer.close()
            self._room_timer = None
        super().close()

    def do_read(self):
        if self.left_at is not None:
            return None  # the socket is closed: gevent's accept loop must not touch it
        return super().do_read()

    def do_handle(self, *args) -> None:
        if self.left_at is None and self.hub.full:
            self._leave()
        super().do_handle(*args)

    def start_accepting(self) -> None:
        # gevent calls it again after a pause (its pool was full, an accept error): never
        # while the socket is closed.
        if self.left_at is None:
            super().start_accepting()

    def _check_room(self) -> None:
        # In the gevent hub: never raises (a socket that cannot be made is tried again).
        try:
            if self.left_at is None:
                if self.hub.full:
                    self._leave()
            elif not self.hub.full and self.hub.connections <= self.relisten_at:
                self._rejoin()
        finally:
            if self._room_timer is not None:  # not closed meanwhile
                self._room_timer.close()
                self._schedule_check()

    def _leave(self) -> None:
        self.left_at = self.socket.getsockname()
        self.stop_accepting()
        self.socket.close()
        self._relisten_failed = False
        log.warning("worker full (%d clients): stopped listening on %s:%d, new clients go "
                    "to the other workers until this one holds %d", self.hub.connections,
                    self.left_at[0], self.left_at[1], self.relisten_at)

    def _rejoin(self) -> None:
        try:
            sock = self.listen_again(self.left_at)
        except OSError as error:
            if not self._relisten_failed:
                self._relisten_failed = True
                log.warning("could not listen again on %s:%d: %s (trying again every "
                            "%.1f s)", self.left_at[0], self.left_at[1], error, ROOM_CHECK)
            return
        self.socket = sock
        self.left_at = None
        log.info("listening again on %s:%d with %d clients", sock.getsockname()[0],
                 sock.getsockname()[1], self.hub.connections)
        self.start_accepting()


class GreenchatWorker(GeventWebSocketWorker):
    server_class = UpgradeServer
    wsgi_handler = ChatWebSocketHandler

    def run(self) -> None:
        hub = hub_of(self.wsgi)
        if hub is not None and self.cfg.reuse_port and self.cfg.workers > 1:
            # GeventWorker.run builds one server per listening socket with
            # self.server_class(listener, ...); unix sockets have no reuseport group.
            self.server_class = partial(_server_for, hub=hub, listen_again=self._listen_again)
        super().run()
        if hub is not None:
            closed = hub.close_all()
            self.log.info("closed %d clients with 1001 (going away)", closed)
            gevent.sleep(0.2)  # let the close frames leave before the process exits

    def _listen_again(self, address: tuple) -> gevent.socket.socket:
        """A listening socket on ``address`` made as gunicorn makes each worker's
        (its options, SO_REUSEPORT and backlog from the settings), as gevent's worker
        wraps it."""
        family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
        listener = (TCP6Socket if family == socket.AF_INET6 else TCPSocket)(
            address, self.cfg, self.log)
        sock = gevent.socket.socket(family, socket.SOCK_STREAM, fileno=listener.sock.detach())
        sock.setblocking(1)
        return sock


def _server_for(listener, *args, hub: Hub, listen_again, **kwargs) -> UpgradeServer:
    if listener.family in (socket.AF_INET, socket.AF_INET6):
        return LeavingServer(listener, *args, hub=hub, listen_again=listen_again, **kwargs)
    return UpgradeServer(listener, *args, **kwargs)
