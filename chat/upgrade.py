"""The fast upgrade path: greenchat's websocket handshakes answered in the accept loop.

A bare epoll loop that accepts, reads a request and answers 101 costs ~31 us of server
CPU per handshake here; the same handshake through pywsgi, a WSGI environ, a greenlet
per request and the handler chain cost ~330 us. Python and gevent are not the
difference, the path is. So :class:`UpgradeServer`, a pywsgi ``WSGIServer``, accepts
each connection itself and watches it with one libev read watcher; httptools parses the
request (~2.6 us); a websocket upgrade to one of greenchat's own routes
(``chat.views.ADOPTED_ENDPOINTS``: the lobby, ``<rooms>/<name>``, the JSON
endpoint) is checked and
answered right there, and the socket becomes a hibernating
:class:`~chat.connection.Connection` under the same watcher. No WSGI environ, no
greenlet, no Flask request: ~53 us per handshake, 1.75x the bare loop (BENCHMARKS.md).

Everything the gate does still happens, with the same answers as
``chat.handler.ChatWebSocketHandler``: the malformed-handshake checks
(``chat.gate.handshake_error``), the origin check, the app's ``authorize(request)``
hook (only then is a WSGI environ and a Flask request context built), the connection
limit (503 with Retry-After), the deadline on the whole request
(``CHAT_HANDSHAKE_TIMEOUT``), and each refusal counted and logged rarely by
``Hub.refuse``. A permessage-deflate offer is answered by ``Hub.negotiate``, as the
handler does: the agreement's header goes into the 101 and its window bits into the
connection's codec.

Everything else falls back to pywsgi with the bytes already read: plain HTTP, other
websocket routes, and any request that is not unambiguously for greenchat (a path
with percent-escapes, a body, a parse error, an app whose ``wsgi_app`` is wrapped or
that is not the Flask app itself). The handler then sees exactly what it would have
seen, under what is left of the same deadline.

TLS (``ssl_context``): the TLS handshake runs under the same watcher through an
``ssl.SSLObject`` over two memory BIOs, so nothing blocks, and an upgraded client
becomes a :class:`~chat.connection.TlsConnection` (see there). A request that falls
back gets the same TLS session through :class:`TlsStream`, a small cooperative socket
for pywsgi.
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import time
from http.client import responses

import httptools
from flask import Flask
from gevent.baseserver import _handle_and_close_when_done
from gevent.pywsgi import WSGIServer
from gevent.socket import socket as GeventSocket

from .connection import PlainSocket
from .gate import Refusal, capacity_error, client_address, handshake_error
from .handler import DEFAULT_HANDSHAKE_TIMEOUT, websocket_route
from .protocol import PerMessageDeflate, accept_key
from .takeover import TlsStream, connection_class
from .views import ADOPTED_ENDPOINTS, JSON_ENDPOINT, AppState, room_id, state_of

__all__ = ["UpgradeServer", "fast_path_state"]

log = logging.getLogger(__name__)

# A request near pywsgi's limits (a request line of 8 KiB, a header line of 64 KiB, 100
# header lines) is not one of ours: pywsgi answers it, with its 400 or 414.
MAX_HEAD = 65536 + 8192
MAX_URL = 8000
MAX_HEADER = 65000
MAX_HEADERS = 100
_RECV = 16384

_RESPONSE_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n")
# The headers the checks read, by their lower-case name, and their WSGI environ key.
_WANTED = {b"host": "HTTP_HOST", b"upgrade": "HTTP_UPGRADE", b"connection": "HTTP_CONNECTION",
           b"sec-websocket-key": "HTTP_SEC_WEBSOCKET_KEY",
           b"sec-websocket-version": "HTTP_SEC_WEBSOCKET_VERSION", b"origin": "HTTP_ORIGIN",
           b"content-length": "CONTENT_LENGTH", b"transfer-encoding": "HTTP_TRANSFER_ENCODING",
           b"x-forwarded-for": "HTTP_X_FORWARDED_FOR",
           b"sec-websocket-extensions": "HTTP_SEC_WEBSOCKET_EXTENSIONS"}


def fast_path_state(application) -> AppState | None:
    """greenchat's state when ``application`` is unambiguously a Flask app of greenchat's
    own, served as it is, with CHAT_FAST_PATH on; None otherwise (then every request goes
    through pywsgi).

    A ``wsgi_app`` or ``__call__`` replaced by middleware may rewrite paths or refuse
    requests before Flask routes them, so only the unwrapped app is answered here.
    """
    state = state_of(application)
    if state is None or not state.fast_path or not isinstance(application, Flask):
        return None
    cls = type(application)
    if ("wsgi_app" in vars(application) or cls.wsgi_app is not Flask.wsgi_app
            or cls.__call__ is not Flask.__call__):
        return None
    return state


def _peer(address) -> str:
    """The TCP peer's host, for log lines (``REMOTE_ADDR`` stays the peer, as pywsgi's)."""
    return address[0] if isinstance(address, tuple) else str(address)


class UpgradeServer(WSGIServer):
    """pywsgi's server with greenchat's websocket upgrades answered in the accept loop.

    Used by ``greenchat serve`` (``chat.server``) and gunicorn.conf.py's worker
    (``chat.worker``). For an app without greenchat it is pywsgi's server unchanged.
    """

    def __init__(self, listener, application=None, *args, **kwargs) -> None:
        self.tls_context: ssl.SSLContext | None = kwargs.get("ssl_context")
        if self.tls_context is None and any(key in kwargs for key in ("keyfile", "certfile")):
            raise ValueError("greenchat's server takes TLS settings as ssl_context=, "
                             "not keyfile=/certfile=")
        super().__init__(listener, application, *args, **kwargs)
        if self.tls_context is not None:
            # One session per TCP connection; a renegotiation would only be an attack.
            self.tls_context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        self.chat = fast_path_state(self.application)

    def do_read(self):
        if self.chat is None and self.tls_context is None:
            return super().do_read()
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        return fd, address

    def do_handle(self, *args) -> None:
        if self.chat is None and self.tls_context is None:
            return super().do_handle(*args)
        fd, address = args
        try:
            sock = PlainSocket(self.socket.family, socket.SOCK_STREAM, fileno=fd)
        except OSError:
            socket.close(fd)
            raise
        try:
            _Handshake(self, sock, address)
        except BaseException:
            sock.close()
            raise

    def fall_back(self, sock, address, data: bytes, deadline: float) -> None:
        """Serve a connection through pywsgi and the handler class in a greenlet of the
        pool, as if it had just been accepted: ``data`` is what was already read."""
        if self.pool is not None and self.pool.full():
            sock.close()  # the worker's connection limit (gunicorn's worker_connections)
            return
        rfile = io.BufferedReader(_Replay(sock, data))
        self._spawn(_handle_and_close_when_done, self._serve_one, self.do_close,
                    (sock, address, rfile, deadline))

    def _serve_one(self, sock, address, rfile, deadline: float) -> None:
        handler = self.handler_class(sock, address, self, rfile=rfile)
        handler.deadline = deadline  # ChatWebSocketHandler's first request keeps it
        handler.handle()


class _Replay(socket.SocketIO):
    """The raw reader under pywsgi's ``rfile``: the bytes the fast path already read,
    then the socket."""

    def __init__(self, sock, data: bytes) -> None:
        super().__init__(sock, "rb")
        sock._io_refs += 1  # as socket.makefile() counts it, so close() stays exact
        self._replay = memoryview(data) if data else None

    def readinto(self, buffer) -> int | None:
        replay = self._replay
        if replay is None:
            return super().readinto(buffer)
        n = min(len(buffer), len(replay))
        buffer[:n] = replay[:n]
        self._replay = replay[n:] if n < len(replay) else None
        return n


class _Handshake:
    """One accepted connection until its upgrade is answered or handed to pywsgi.

    Also httptools' parser callbacks (``on_url``, ``on_header``, ``on_headers_complete``).
    Lives only during the handshake, so it is not lean; the connection after it is.
    """

    __slots__ = ("server", "sock", "address", "reader", "timer", "deadline", "data",
                 "parser", "url", "headers", "done", "upgrade_at", "tls", "tls_in",
                 "tls_out", "plain", "handshaken")

    def __init__(self, server: UpgradeServer, sock: socket.socket, address) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        state = server.chat
        timeout = state.handshake_timeout if state is not None else DEFAULT_HANDSHAKE_TIMEOUT
        self.deadline = time.monotonic() + timeout
        self.data = b""  # what was read (decrypted, over TLS), for a fall-back to pywsgi
        self.parser = httptools.HttpRequestParser(self) if state is not None else None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False
        self.upgrade_at = -1  # where the bytes after the request begin, in the last read
        self.tls = self.tls_in = self.tls_out = None
        self.plain = True
        self.handshaken = False  # the TLS handshake
        sock.setblocking(False)
        if server.tls_context is not None:
            self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = server.tls_context.wrap_bio(self.tls_in, self.tls_out, server_side=True)
            self.plain = False
        loop = server.loop
        self.reader = loop.io(sock.fileno(), 1)
        self.timer = loop.timer(timeout)
        self.timer.start(self._expired)
        self.reader.start(self._on_readable)

    # -- httptools callbacks -------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        if not self.done:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True

    # -- reading -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        # In the gevent hub: never blocks, never raises (a raise would reach the loop).
        try:
            self._read()
        except Exception as error:
            hub = self.server.chat.hub if self.server.chat is not None else None
            if hub is not None:
                hub.fault("upgrade", error)
            else:  # pragma: no cover - not a greenchat app: nobody else to tell
                log.exception("unexpected error in the upgrade")
            self._close()

    def _read(self) -> None:
        try:
            chunk = self.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # gone before its request was complete: nothing to answer
            self._close()
            return
        if not self.plain:
            chunk = self._decrypt(chunk)
            if not chunk:
                return
        self.data += chunk
        if self.parser is None:
            self._fall_back()
            return
        try:
            self.parser.feed_data(chunk)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrade_at = len(self.data) - len(chunk) + upgrade.args[0]
        except httptools.HttpParserError:
            self._fall_back()  # pywsgi says what is wrong (400), as for any request
            return
        if self.done:
            self._decide()
        elif len(self.data) > MAX_HEAD:
            self._fall_back()

    def _decrypt(self, chunk: bytes) -> bytes | None:
        """Feed TLS records; the application bytes they give, b"" for none yet, None when
        the connection is over (closed here)."""
        self.tls_in.write(chunk)
        tls = self.tls
        if not self.handshaken:
            self.handshaken = self._handshake()
            if not self.handshaken:
                return None
        chunks = []
        while True:
            try:
                piece = tls.read(_RECV)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                self._close()
                return None
            if not piece:
                self._close()
                return None
            chunks.append(piece)
        self._flush_tls()
        return b"".join(chunks)

    def _handshake(self) -> bool:
        """Advance the TLS handshake; True once it is done (and its last flight sent)."""
        tls = self.tls
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return False
        except (ssl.SSLError, OSError) as error:
            state = self.server.chat
            if state is not None:
                state.hub.refuse("tls_handshake", f"{getattr(error, 'reason', None) or error}"
                                 f", from {_peer(self.address)}")
            self._flush_tls()
            self._close()
            return False
        self._flush_tls()
        return self.sock.fileno() != -1

    def _flush_tls(self) -> None:
        out = self.tls_out.read()
        if out:
            self._send(out)

    def _send(self, data: bytes) -> bool:
        """One non-blocking send of a small answer; a fresh socket's buffer takes it
        whole, so a client whose buffer does not is dropped."""
        try:
            if self.sock.send(data) == len(data):
                return True
        except OSError:
            pass
        self._close()
        return False

    # -- the answer ----------------------------------------------------------------------

    def _decide(self) -> None:
        """The request head is complete: answer an upgrade for greenchat, else fall back."""
        state = self.server.chat
        parser = self.parser
        url = self.url
        path, _, query = url.partition(b"?")
        environ: dict[str, str] = {}
        for name, value in self.headers:
            key = _WANTED.get(name.lower())
            if key is not None:
                text = value.decode("latin-1").strip()
                environ[key] = environ[key] + "," + text if key in environ else text
        if (len(url) > MAX_URL or len(self.headers) > MAX_HEADERS
                or any(len(name) + len(value) > MAX_HEADER for name, value in self.headers)):
            self._fall_back()
            return
        if (parser.get_method() != b"GET" or b"%" in path or not path.startswith(b"/")
                or environ.get("HTTP_UPGRADE", "").lower() != "websocket"
                or "CONTENT_LENGTH" in environ or "HTTP_TRANSFER_ENCODING" in environ):
            self._fall_back()  # plain HTTP, or not plainly an upgrade: pywsgi's job
            return
        environ["PATH_INFO"] = path.decode("latin-1")
        environ["REQUEST_METHOD"] = "GET"
        server_environ = self.server.environ
        for key in ("SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme"):
            environ[key] = server_environ[key]
        environ["SCRIPT_NAME"] = ""
        route = websocket_route(self.server.application, environ)
        if route is None or route[0] not in ADOPTED_ENDPOINTS:
            self._fall_back()  # another websocket route, or none (pywsgi answers 404/400)
            return
        environ["SERVER_PROTOCOL"] = f"HTTP/{parser.get_http_version()}"
        hub = state.hub
        refusal = handshake_error(environ)
        user = None
        if refusal is None:
            refusal = state.gate.origin_error(environ)
        if refusal is None and state.gate.authorize is not None:
            refusal, user = state.gate.authenticate(self._full_environ(path, query))
        json = route[0] == JSON_ENDPOINT
        room = room_id(route[1].get("name", ""))
        if refusal is None:
            refusal = capacity_error(hub, None if json else room)
        if refusal is not None:
            self._refuse(refusal, environ)
            return
        self._accept(environ["HTTP_SEC_WEBSOCKET_KEY"], room,
                     hub.negotiate(environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS")), user, json)

    def _accept(self, key: str, room: str, deflate: PerMessageDeflate | None,
                user: str | None = None, json: bool = False) -> None:
        extension = (b"Sec-WebSocket-Extensions: %s\r\n" % deflate.response.encode()
                     if deflate is not None else b"")
        response = _RESPONSE_101 % (accept_key(key.encode("latin-1")).encode(), extension)
        if not self.plain:
            self.tls.write(response)
            response = self.tls_out.read()
        if not self._send(response):
            return
        reader = self.reader
        self._finish(keep_reader=True)
        first = self.data[self.upgrade_at:] if self.upgrade_at >= 0 else b""
        hub = self.server.chat.hub
        bits = deflate.window_bits if deflate is not None else None
        cls = connection_class(json, not self.plain)
        if self.plain:
            connection = cls(self.sock, hub, room, hub.max_message_size, reader, bits, user)
        else:
            connection = cls(self.sock, hub, room, hub.max_message_size, reader, bits, user,
                             tls=self.tls, tls_in=self.tls_in, tls_out=self.tls_out)
        connection.start(first)

    def _refuse(self, refusal: Refusal, environ: dict) -> None:
        """The same answer as ChatWebSocketHandler's, then close."""
        state = self.server.chat
        # behind a trusted proxy, the client it names (CHAT_TRUSTED_PROXIES)
        client = client_address(_peer(self.address), environ.get("HTTP_X_FORWARDED_FOR"),
                                state.gate.trusted_proxies)
        state.hub.refuse(refusal.reason, f"{refusal.message}, from {client}")
        body = refusal.message.encode("utf-8", "replace") + b"\n"
        head = [f"HTTP/1.1 {refusal.status} {responses.get(refusal.status, 'Refused')}",
                "Content-Type: text/plain", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in refusal.headers]
        answer = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        if not self.plain:
            self.tls.write(answer)
            answer = self.tls_out.read()
        if self._send(answer):
            self._close()

    def _full_environ(self, path: bytes, query: bytes) -> dict:
        """A WSGI environ as pywsgi would build it, for the app's ``authorize`` hook (only
        when one is set: it and the Flask request context it needs are the hook's cost)."""
        server = self.server
        environ = server.get_environ()
        environ.update({
            "REQUEST_METHOD": "GET", "PATH_INFO": path.decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"), "RAW_URI": self.url.decode("latin-1"),
            "SERVER_PROTOCOL": f"HTTP/{self.parser.get_http_version()}",
            "REMOTE_ADDR": self.address[0] if isinstance(self.address, tuple) else "",
            "REMOTE_PORT": str(self.address[1]) if isinstance(self.address, tuple) else "",
            "wsgi.input": io.BytesIO(), "wsgi.input_terminated": True,
        })
        for name, value in self.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            if "_" in name.decode("latin-1"):
                continue  # as pywsgi: a name with "_" could pass for one with "-"
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            text = value.decode("latin-1").strip()
            environ[key] = environ[key] + "," + text if key in environ else text
        return environ

    def _fall_back(self) -> None:
        """Hand the socket and what was read to pywsgi, under what is left of the deadline."""
        self._finish()
        sock, data = self.sock, self.data
        try:
            fd = sock.detach()
            gsock = GeventSocket(sock.family, socket.SOCK_STREAM, fileno=fd)
            if not self.plain:
                gsock = TlsStream(gsock, self.tls, self.tls_in, self.tls_out)
        except OSError:
            return
        self.server.fall_back(gsock, self.address, data, self.deadline)

    def _expired(self) -> None:
        # The deadline is for a slow client, not a slow server. After the loop was held up
        # past it (a busy worker on a loaded machine: 63 workers and 53 load processes on
        # two cores refused 250 clients of a million this way), libev runs this timer
        # before the read watcher of a request that came in time: read what is there first.
        self._on_readable()
        if self.timer is None:  # answered, refused, handed to pywsgi or closed meanwhile
            return
        state = self.server.chat
        if state is not None:
            state.hub.refuse("handshake_timeout", f"from {_peer(self.address)}")
        self._close()

    def _finish(self, keep_reader: bool = False) -> None:
        """Stop the deadline (and the read watcher unless the connection keeps it) and let
        go of the parser and the watchers. They and this object refer to each other (the
        parser calls back, the watchers' callbacks are its methods): without this every
        handshake left 13 objects that only the cycle collector frees (gc.collect() after
        200 handshakes found 2,600), memory held and traversed until it runs."""
        if self.timer is None:
            return
        self.timer.stop()
        if not keep_reader:
            self.reader.stop()
            self.reader.close()
        self.timer = self.reader = self.parser = None

    def _close(self) -> None:
        self._finish()
        sock = self.sock
        try:
            sock.recv(_RECV)  # what the client sent on: a close with it unread sends RST
        except OSError:
            pass
        sock.close()
