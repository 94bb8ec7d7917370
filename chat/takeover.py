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
import ssl

from gevent.ssl import SSLSocket as GeventSSLSocket

from .connection import (READ_SIZE, Connection, JsonConnection, PlainSocket, TlsConnection,
                         TlsJsonConnection)
from .gate import Refusal
from .hub import Hub
from .protocol import CloseCode, encode_close

__all__ = ["take_over", "adopt", "connection_class", "refuse_upgraded", "TlsStream"]


def take_over(websocket) -> tuple[socket.socket, bytes, TlsStream | None]:
    """Take the TCP socket from gevent-websocket after its upgrade, leaving nothing behind.

    Takes the bytes pywsgi already buffered (a client may send its first frame right
    behind the handshake), detaches the file descriptor (so pywsgi's own close on return
    is a no-op), and marks the gevent-websocket object closed so it sends no close frame
    of its own. When the request returns, its greenlet ends and all of it is freed.
    Returns the socket, those bytes, and the TLS stream the request came through (None
    for plain TCP), whose TLS session the connection must go on with.
    """
    handler = websocket.handler
    gsock = handler.socket
    tls = gsock if isinstance(gsock, TlsStream) else None
    raw = tls.sock if tls is not None else gsock
    raw.setblocking(False)
    try:
        buffered = handler.rfile.read1(READ_SIZE) or b""
    except OSError:
        buffered = b""
    family = raw.family
    fd = raw.detach()
    websocket.closed = True
    # Its __del__ calls close(), which on a closed object builds a throwaway class
    # (current_app's MockApp) and raises internally: ~60 us per handshake. Without a
    # handler, close() fails at its first line, and __del__ swallows that.
    websocket.handler = None
    return PlainSocket(family, socket.SOCK_STREAM, fileno=fd), buffered, tls


def connection_class(json: bool, tls: bool) -> type[Connection]:
    """The connection class for an endpoint (plain text or JSON) over TCP or TLS."""
    if json:
        return TlsJsonConnection if tls else JsonConnection
    return TlsConnection if tls else Connection


def _connection(websocket, hub: Hub, room: str = "", deflate: int | None = None,
                user: str | None = None, json: bool = False) -> tuple[Connection, bytes]:
    sock, buffered, tls = take_over(websocket)
    cls = connection_class(json, tls is not None)
    if tls is None:
        return cls(sock, hub, room, hub.max_message_size, deflate=deflate, user=user), buffered
    return cls(sock, hub, room, hub.max_message_size, deflate=deflate, user=user, tls=tls.tls,
               tls_in=tls.tls_in, tls_out=tls.tls_out), buffered


def adopt(websocket, hub: Hub, room: str = "", deflate: int | None = None,
          user: str | None = None, json: bool = False) -> Connection | None:
    """Take the upgraded socket from gevent-websocket into a started Connection in ``room``
    (with ``json``, a JSON endpoint's client, in no room yet).

    ``deflate``: the window bits of the permessage-deflate agreement the 101 carried
    (``chat.handler`` adds it; the stock worker's 101 never does), else None. ``user``:
    the identity the authorize hook gave (``chat.gate``), else None.

    Not over gevent's own TLS socket (the card's stock worker with ``--certfile``): its
    TLS session lives inside a blocking-style socket object that cannot be taken over,
    so the client gets close 1011 saying so, the refusal is counted (``tls_stock_worker``)
    and None is returned, instead of a silent 101 with nothing after it.
    """
    if isinstance(websocket.handler.socket, GeventSSLSocket):
        hub.refuse("tls_stock_worker", "wss needs chat.worker.GreenchatWorker "
                   "(gunicorn -c gunicorn.conf.py) or greenchat serve --certfile")
        _close_in_place(websocket, CloseCode.INTERNAL_ERROR, "wss needs greenchat's worker")
        return None
    connection, buffered = _connection(websocket, hub, room, deflate, user, json)
    connection.start(buffered)
    return connection


def _close_in_place(websocket, code: int, reason: str) -> None:
    """Send a close frame through gevent-websocket's own socket and let the request end
    (pywsgi closes the socket)."""
    websocket.handler.socket.sendall(encode_close(code, reason))
    websocket.closed = True
    websocket.handler = None


def refuse_upgraded(websocket, hub: Hub, refusal: Refusal) -> None:
    """Say no to a client whose 101 is already sent (the stock handler upgrades before
    the app runs): a close frame, 1013 when the process is full (503), else 1008.

    The close reason names the check only: the refusal's message may quote client
    input of any length.
    """
    hub.refuse(refusal.reason, refusal.message)
    code = CloseCode.TRY_AGAIN_LATER if refusal.status == 503 else CloseCode.POLICY_VIOLATION
    if isinstance(websocket.handler.socket, GeventSSLSocket):  # (see adopt)
        _close_in_place(websocket, code, f"refused: {refusal.reason}")
        return
    connection, _ = _connection(websocket, hub)
    connection.close(code, f"refused: {refusal.reason}")


class TlsStream:
    """The socket pywsgi and gevent-websocket see for a TLS request that ``chat.upgrade``
    handed to them: the TLS session it began, over a cooperative gevent socket.

    Only what they use: ``recv``/``recv_into`` (through ``rfile``), ``sendall``,
    ``close``; a greenlet waits on the socket's readiness instead of blocking.
    """

    def __init__(self, sock, tls: ssl.SSLObject, tls_in: ssl.MemoryBIO,
                 tls_out: ssl.MemoryBIO) -> None:
        self.sock = sock
        self.tls = tls
        self.tls_in = tls_in
        self.tls_out = tls_out
        self.family = sock.family
        self._io_refs = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        data = self.recv(nbytes or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b""
            self._flush()
            data = self.sock.recv(READ_SIZE)
            if not data:
                return b""
            self.tls_in.write(data)

    def sendall(self, data) -> None:
        self.tls.write(data)
        self._flush()

    def _flush(self) -> None:
        out = self.tls_out.read()
        if out:
            self.sock.sendall(out)

    def _decref_socketios(self) -> None:
        self._io_refs -= 1

    def close(self) -> None:
        self.sock.close()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def settimeout(self, value) -> None:
        self.sock.settimeout(value)

    def detach(self) -> int:
        raise OSError("a TLS stream cannot be detached from its TLS session")
