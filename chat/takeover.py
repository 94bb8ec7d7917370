"""Taking a websocket out of gevent-websocket after its upgrade, into a hibernating Connection.

gevent-websocket does the HTTP upgrade and sends 101; its ``WebSocket`` object, pywsgi's
handler, the WSGI environ and the handler's 8 KiB read buffer would all stay alive as
long as a greenlet sits in ``ws.receive()`` (~23 KB a client, docs/design.md). Instead
the socket is taken over: a :class:`~chat.connection.Connection` with a read watcher and
no greenlet, and the request ends.

Both the Flask view (under the card's stock ``GeventWebSocketWorker``) and greenchat's
own handler (``chat.handler``, which skips Flask for greenchat's endpoints) use it, so it
lives in a leaf of its own that imports neither.
"""

from __future__ import annotations

import socket

from .connection import READ_SIZE, Connection, PlainSocket
from .gate import Refusal
from .hub import Hub
from .protocol import CloseCode

__all__ = ["take_over", "adopt", "refuse_upgraded"]


def take_over(websocket) -> tuple[socket.socket, bytes]:
    """Take the TCP socket from gevent-websocket after its upgrade, leaving nothing behind.

    Takes the bytes pywsgi already buffered (a client may send its first frame right
    behind the handshake), detaches the file descriptor (so pywsgi's own close on return
    is a no-op), and marks the gevent-websocket object closed so it sends no close frame
    of its own. When the request returns, its greenlet ends and all of it is freed.
    """
    handler = websocket.handler
    gsock = handler.socket
    gsock.setblocking(False)
    try:
        buffered = handler.rfile.read1(READ_SIZE) or b""
    except OSError:
        buffered = b""
    family = gsock.family
    fd = gsock.detach()
    websocket.closed = True
    # Its __del__ calls close(), which on a closed object builds a throwaway class
    # (current_app's MockApp) and raises internally: ~60 us per handshake. Without a
    # handler, close() fails at its first line, and __del__ swallows that.
    websocket.handler = None
    return PlainSocket(family, socket.SOCK_STREAM, fileno=fd), buffered


def adopt(websocket, hub: Hub, room: str = "") -> Connection:
    """Take the upgraded socket from gevent-websocket into a started Connection in ``room``."""
    sock, buffered = take_over(websocket)
    connection = Connection(sock, hub, room, hub.max_message_size)
    connection.start(buffered)
    return connection


def refuse_upgraded(websocket, hub: Hub, refusal: Refusal) -> None:
    """Say no to a client whose 101 is already sent (the stock handler upgrades before
    the app runs): a close frame, 1013 when the process is full (503), else 1008.

    The close reason names the check only: the refusal's message may quote client
    input of any length.
    """
    hub.refuse(refusal.reason, refusal.message)
    code = (CloseCode.TRY_AGAIN_LATER if refusal.status == 503 else CloseCode.POLICY_VIOLATION)
    sock, _ = take_over(websocket)
    Connection(sock, hub, max_message_size=hub.max_message_size).close(
        code, f"refused: {refusal.reason}")
