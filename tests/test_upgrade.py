"""The fast upgrade path (chat/upgrade.py): greenchat's upgrades answered in the accept loop
without a greenlet, everything else handed to pywsgi and Flask as before.

These tests run the server in this process, on gevent's loop, with gevent sockets as
clients, so they can watch which greenlets run (``greenlet.settrace``).
"""

from __future__ import annotations

import gc
import json

import gevent
import gevent.socket
import greenlet
import pytest
from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from chat import Chat, create_app
from chat.handler import ChatWebSocketHandler
from chat.protocol import ClientProtocol, Opcode, accept_key, encode_client_frame, generate_key
from chat.upgrade import UpgradeServer, fast_path_state
from chat.views import hub_of
from raw_clients import compressed_frame, read_response_head

TIMEOUT = 10.0


class Client:
    """A websocket client on a connected socket: a gevent socket (so the server runs while
    it waits) or, in tests/test_tls.py, an ssl socket."""

    def __init__(self, sock, port: int, path: str = "/", extra: str = "") -> None:
        self.sock = sock
        key = generate_key()
        sock.sendall(
            (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"closed during the handshake: {head!r}"
            head += chunk
        self.head, _, rest = head.partition(b"\r\n\r\n")
        self.status = int(self.head.split(b" ", 2)[1])
        if self.status == 101:
            assert f"Sec-WebSocket-Accept: {accept_key(key)}".encode() in self.head
        self.codec = ClientProtocol()
        self.events = self.codec.receive_data(rest) if rest else []

    @classmethod
    def to(cls, port: int, path: str = "/", extra: str = "") -> "Client":
        sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        return cls(sock, port, path, extra)

    def send(self, payload: bytes, opcode: int = Opcode.TEXT) -> None:
        self.sock.sendall(encode_client_frame(opcode, payload))

    def receive(self):
        while not self.events:
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.events += self.codec.receive_data(data)
        return self.events.pop(0)

    def close(self) -> None:
        self.sock.close()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
def serve():
    """Serve a WSGI app on an ephemeral port in this process; stopped, and its greenchat
    clients dropped, at teardown."""
    servers: list[UpgradeServer] = []

    def start(app) -> int:
        server = UpgradeServer(("127.0.0.1", 0), app, handler_class=ChatWebSocketHandler,
                               log=None)
        server.start()
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.stop(timeout=1)
        hub = hub_of(server.application)
        for members in list(hub.rooms.values()) if hub is not None else ():
            for connection in list(members):
                connection.abort()


class GreenletWatch:
    """Which greenlets made while it watches are switched to (those alive before, such as
    the background loops of other tests' hubs in this process, do not count)."""

    def __init__(self) -> None:
        self.others: set = set()

    def __enter__(self) -> "GreenletWatch":
        # Held, not just their ids: an id can be reused by a greenlet made meanwhile.
        # type(), not isinstance(): a dead weakref proxy among the objects raises on the latter
        before = {o for o in gc.get_objects() if issubclass(type(o), greenlet.greenlet)}

        def trace(event, args):
            if event in ("switch", "throw"):
                target = args[1]
                if target not in before:
                    self.others.add(target)

        self._previous = greenlet.settrace(trace)
        return self

    def __exit__(self, *exc) -> None:
        greenlet.settrace(self._previous)


def test_upgrades_pings_and_pongs_run_no_greenlet_and_a_message_runs_one(serve):
    app = create_app()
    port = serve(app)
    hub_of(app).start()  # its idle sweep's greenlet, started once per app
    gevent.sleep(0)
    with GreenletWatch() as watch:
        clients = [Client.to(port, "/" if i % 2 else "/rooms/general") for i in range(10)]
        assert [c.status for c in clients] == [101] * 10
        for client in clients:
            client.send(b"are you there", Opcode.PING)
            client.send(b"unasked", Opcode.PONG)
            assert client.receive().payload == b"are you there"
    assert watch.others == set()  # the handshakes, pings and pongs ran in the hub alone
    hub = hub_of(app)
    assert hub.connections == 10 and hub.handshakes == 10
    assert {room: len(members) for room, members in hub.rooms.items()} == {"": 5, "general": 5}
    with GreenletWatch() as watch:
        clients[0].send(b"hello")  # a message may block in its handler: a greenlet
        assert clients[0].receive().text == "hello"
    assert len(watch.others) == 1
    for client in clients:
        client.close()


def test_with_the_fast_path_off_an_upgrade_runs_through_pywsgi_and_still_chats(serve):
    app = create_app({"CHAT_FAST_PATH": False})
    port = serve(app)
    hub_of(app).start()
    gevent.sleep(0)
    with GreenletWatch() as watch:
        clients = [Client.to(port) for _ in range(2)]
        assert [c.status for c in clients] == [101, 101]
    assert len(watch.others) >= 2  # pywsgi's greenlet for each request
    clients[0].send(b"hello")
    assert [c.receive().text for c in clients] == ["hello", "hello"]
    for client in clients:
        client.close()


def test_a_frame_and_a_ping_in_the_same_segment_as_the_request_are_handled(serve):
    port = serve(create_app())
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    key = generate_key()
    request_head = (f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                    f"\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    sock.sendall(request_head.encode() + encode_client_frame(Opcode.PING, b"p")
                 + encode_client_frame(Opcode.TEXT, b"eager"))
    assert read_response_head(sock).startswith(b"HTTP/1.1 101")
    codec, events = ClientProtocol(), []
    while len(events) < 2:
        events += codec.receive_data(sock.recv(65536))
    assert [type(e).__name__ for e in events] == ["Pong", "TextMessage"]
    assert events[1].text == "eager"
    sock.close()


def test_a_request_that_arrives_a_few_bytes_at_a_time_is_upgraded(serve):
    app = create_app()
    port = serve(app)
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    key = generate_key()
    data = (f"GET /rooms/slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: "
            f"Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    for i in range(0, len(data), 7):
        sock.sendall(data[i:i + 7])
        gevent.sleep(0.001)
    assert read_response_head(sock).startswith(b"HTTP/1.1 101")
    assert hub_of(app).presence() == {"slow": 1}
    sock.close()


def test_plain_http_other_websocket_routes_and_bad_room_names_go_through_flask(serve):
    app = create_app()

    @app.route("/shout", websocket=True)
    def shout():  # the classic blocking style: one message, answered in capitals
        ws = request.environ["wsgi.websocket"]
        ws.send(ws.receive().upper())
        return ""

    port = serve(app)
    status, body = http_get(port, "/stats")
    assert status == 200 and json.loads(body)["connections"] == 0
    shouting = Client.to(port, "/shout")  # gevent-websocket's upgrade, Flask's view
    assert shouting.status == 101
    shouting.send(b"ping me back")
    assert shouting.receive().text == "PING ME BACK"
    assert Client.to(port, "/rooms/" + "a" * 65).status == 404  # Flask's URL map says no
    assert Client.to(port, "/rooms/bad%20name").status == 404
    assert Client.to(port, "/stats").status == 400  # an HTTP-only route
    assert hub_of(app).connections == 0
    shouting.close()


def test_refusals_have_the_gates_answers(serve):
    app = create_app({"CHAT_MAX_CONNECTIONS": 1})
    port = serve(app)
    assert Client.to(port, extra="Origin: https://evil.example\r\n").status == 403
    accepted = Client.to(port, extra="X: y\r\n")
    assert accepted.status == 101  # (the extra header changes nothing)
    full = Client.to(port)
    assert full.status == 503 and b"\r\nRetry-After: 5" in full.head  # CHAT_MAX_CONNECTIONS
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")  # no version
    head = read_response_head(sock)
    assert head.startswith(b"HTTP/1.1 426 ") and b"Sec-WebSocket-Version: 13, 8, 7" in head
    sock.close()
    hub = hub_of(app)
    assert hub.refused == {"origin": 1, "full": 1, "bad_handshake": 1}
    accepted.close()


def test_an_app_behind_middleware_or_mounted_elsewhere_is_served_through_pywsgi(serve):
    wrapped = create_app()
    wrapped.wsgi_app = _passthrough(wrapped.wsgi_app)
    assert fast_path_state(wrapped) is None
    port = serve(wrapped)
    client = Client.to(port)
    assert client.status == 101 and hub_of(wrapped).connections == 1
    client.close()

    outer = Flask("outer")
    chat_app = Flask("mounted")
    Chat(chat_app)
    mounted = DispatcherMiddleware(outer, {"/chat": chat_app})
    assert fast_path_state(mounted) is None
    port = serve(mounted)
    inside = Client.to(port, "/chat/")
    assert inside.status == 101
    inside.send(b"through the view")
    assert inside.receive().text == "through the view"
    assert hub_of(chat_app).connections == 1
    inside.close()
    for connection in list(hub_of(chat_app).rooms[""]):
        connection.abort()


def test_through_pywsgi_greenchats_endpoints_agree_to_deflate_and_other_routes_do_not(serve):
    app = create_app()

    @app.route("/shout", websocket=True)
    def shout():  # gevent-websocket's own WebSocket: no extension
        ws = request.environ["wsgi.websocket"]
        ws.send(ws.receive().upper())
        return ""

    app.wsgi_app = _passthrough(app.wsgi_app)  # every request through the handler
    port = serve(app)
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    deflating = Client.to(port, "/rooms/general", extra=offer)
    plain = Client.to(port, "/rooms/general")
    shouting = Client.to(port, "/shout", extra=offer)
    assert [deflating.status, plain.status, shouting.status] == [101] * 3
    assert (b"\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
            b"client_no_context_takeover" in deflating.head)
    assert b"Sec-WebSocket-Extensions" not in plain.head + shouting.head
    assert hub_of(app).deflate_connections == 1

    message = "said once, compressed, " * 300
    deflating.codec.deflate = 15  # what the 101 agreed to
    deflating.sock.sendall(compressed_frame(message))
    raw, events = b"", []
    while not events:
        chunk = deflating.sock.recv(65536)
        assert chunk, "the server closed the connection"
        raw += chunk
        events += deflating.codec.receive_data(chunk)
    assert raw[0] == 0xC1 and len(raw) < len(message) // 10  # FIN, RSV1, text
    assert events[0].text == message
    assert plain.receive().text == message  # plain: its codec would refuse RSV1
    shouting.send(b"no extension here")
    assert shouting.receive().text == "NO EXTENSION HERE"
    for client in (deflating, plain, shouting):
        client.close()


def _passthrough(wsgi_app):
    def middleware(environ, start_response):
        return wsgi_app(environ, start_response)
    return middleware


def test_a_handshake_leaves_nothing_for_the_cycle_collector(serve):
    """The parser and the watchers call back into the handshake; those cycles are broken
    when it ends, so its memory is freed at once (13 objects per handshake were left to
    the cycle collector before)."""
    port = serve(create_app())
    clients = [Client.to(port) for _ in range(20)]  # warm: caches, the hub's loops
    gc.collect()
    gc.disable()
    try:
        clients += [Client.to(port) for _ in range(100)]
        assert all(client.status == 101 for client in clients)
        left = gc.collect()
    finally:
        gc.enable()
    assert left < 100, f"{left} objects in reference cycles after 100 handshakes"
    for client in clients:
        client.close()


def test_pywsgi_gets_every_byte_already_read_pipelined_requests_and_bodies(serve):
    """What the fast path read before handing a connection over (a body in the same
    segment as its head, a second request behind the first) reaches pywsgi intact."""
    app = create_app({"CHAT_PUBLISH_TOKEN": "secret"})
    port = serve(app)
    listener = Client.to(port, "/rooms/news")
    body = "published through the replayed bytes"
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall((f"POST /rooms/news/messages HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer secret\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                  "GET /rooms/news HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 204 ")
    assert answer.count(b"HTTP/1.1 ") == 2 and b'"members":1' in answer
    assert listener.receive().text == body
    listener.close()
