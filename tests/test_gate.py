"""Who may connect: malformed handshakes, slow and silent clients, origins, the auth hook,
and who the client is behind a trusted proxy."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import time
import urllib.request

import pytest

from chat.errors import ConfigError
from chat.gate import Gate, client_address, handshake_error, parse_origins, parse_trusted_proxies
from helpers import ROOT, greenchat_argv
from raw_clients import HANDSHAKE, connect, masked_frame, read_frame, read_response_head

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def environ(**headers: str) -> dict:
    """A valid websocket upgrade request's WSGI environ, with ``headers`` replaced."""
    env = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "chat.example",
           "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
           "HTTP_SEC_WEBSOCKET_KEY": KEY, "HTTP_SEC_WEBSOCKET_VERSION": "13"}
    env.update(headers)
    return {key: value for key, value in env.items() if value is not None}


def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return the response head (b"" if the server just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            return read_response_head(sock)
        except ConnectionError:
            return b""


def upgrade(port: int, extra: str = "", path: str = "/") -> bytes:
    request = HANDSHAKE.format(path=path, port=port, key=KEY)
    return exchange(port, request.replace("\r\n\r\n", f"\r\n{extra}\r\n").encode())


# -- the checks, as pure functions -------------------------------------------------

def test_a_valid_upgrade_request_has_no_handshake_error():
    assert handshake_error(environ()) is None


@pytest.mark.parametrize("headers, status", [
    ({"SERVER_PROTOCOL": "HTTP/1.0"}, 400),
    ({"HTTP_CONNECTION": "keep-alive"}, 400),
    ({"HTTP_SEC_WEBSOCKET_VERSION": None}, 426),
    ({"HTTP_SEC_WEBSOCKET_VERSION": "99"}, 400),
    ({"HTTP_SEC_WEBSOCKET_KEY": None}, 400),
    ({"HTTP_SEC_WEBSOCKET_KEY": "short"}, 400),
    ({"HTTP_SEC_WEBSOCKET_KEY": "!!!!not base64!!!!!!!!!!"}, 400),
])
def test_each_malformed_handshake_has_its_4xx(headers, status):
    refusal = handshake_error(environ(**headers))
    assert refusal is not None and refusal.status == status and refusal.reason == "bad_handshake"


def test_allowed_origins_are_a_normalized_set_and_star_means_any():
    assert parse_origins(" https://A.example/ , http://b.example:8080") == {
        "https://a.example", "http://b.example:8080"}
    assert parse_origins("") == frozenset()
    assert parse_origins("https://a.example,*") is None


@pytest.mark.parametrize("setting, origin, allowed", [
    ("", None, True),  # not a browser
    ("", "http://chat.example", True),  # the server's own page
    ("", "https://evil.example", False),
    ("", "null", False),  # sandboxed iframes and file:// pages
    ("", "NULL ", False),
    ("", "127.0.0.1", True),  # tsung 1.7: no scheme, so no browser sent it
    ("", "chat.example", True),
    ("", "", True),
    ("https://app.example", "127.0.0.1", True),
    ("https://app.example", "null", False),
    ("", "ftp://evil.example", False),  # any scheme is a serialized origin: checked
    ("https://app.example", "https://app.example", True),
    ("https://app.example", "http://chat.example", False),  # a list replaces same-host
    ("*", "https://evil.example", True),
])
def test_the_origin_check(setting, origin, allowed):
    refusal = Gate(None, setting).origin_error(environ(HTTP_ORIGIN=origin))
    assert (refusal is None) == allowed
    if refusal is not None:
        assert (refusal.status, refusal.reason) == (403, "origin")


# -- the client behind a proxy, as a pure function ----------------------------------

TRUSTED = parse_trusted_proxies("127.0.0.1, 10.0.0.0/8, ::1")


@pytest.mark.parametrize("peer, forwarded_for, client", [
    ("127.0.0.1", "203.0.113.9", "203.0.113.9"),  # nginx in front, one hop
    ("127.0.0.1", "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # the client's own header ignored
    ("127.0.0.1", "203.0.113.9, 10.1.2.3", "203.0.113.9"),  # two trusted proxies
    ("127.0.0.1", " 203.0.113.9 ,10.1.2.3 ", "203.0.113.9"),
    ("127.0.0.1", "10.0.0.7, 10.1.2.3", "10.0.0.7"),  # every hop trusted: the left-most
    ("127.0.0.1", "unknown", "127.0.0.1"),  # not an address: the last one known
    ("127.0.0.1", "203.0.113.9, junk, 10.1.2.3", "10.1.2.3"),
    ("127.0.0.1", "203.0.113.9:4711", "127.0.0.1"),  # a port is not an address either
    ("127.0.0.1", "", "127.0.0.1"),
    ("127.0.0.1", None, "127.0.0.1"),  # no header: the peer
    ("198.51.100.4", "203.0.113.9", "198.51.100.4"),  # an untrusted peer's header is a lie
    ("::1", "2001:db8::5", "2001:db8::5"),
    ("::ffff:127.0.0.1", "203.0.113.9", "203.0.113.9"),  # a dual-stack socket's IPv4 peer
    ("", "203.0.113.9", ""),  # no address (a unix socket): not trusted
])
def test_the_client_is_the_right_most_address_that_is_not_a_trusted_proxy(peer, forwarded_for,
                                                                            client):
    assert client_address(peer, forwarded_for, TRUSTED) == client


def test_without_trusted_proxies_x_forwarded_for_is_ignored():
    assert client_address("127.0.0.1", "203.0.113.9", frozenset()) == "127.0.0.1"
    assert Gate(None).trusted_proxies == frozenset()


def test_trusted_proxies_are_addresses_or_networks_and_anything_else_is_refused():
    assert parse_trusted_proxies(" 127.0.0.1 ,192.168.1.7/24,") == {
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("192.168.1.0/24")}
    with pytest.raises(ConfigError, match="CHAT_TRUSTED_PROXIES: 'nginx' is not an IP"):
        parse_trusted_proxies("127.0.0.1,nginx")


# -- a real server -------------------------------------------------------------------

def test_a_page_from_another_site_gets_403_before_the_upgrade_and_is_counted(greenchat):
    assert upgrade(greenchat.port, "Origin: https://evil.example\r\n").startswith(
        b"HTTP/1.1 403")
    own = f"Origin: http://127.0.0.1:{greenchat.port}\r\n"
    assert upgrade(greenchat.port, own).startswith(b"HTTP/1.1 101")
    stats = greenchat.wait_stats(lambda s: s["refused"])
    assert stats["refused"] == {"origin": 1}


def test_tsungs_schemeless_origin_is_let_in_by_the_default_check(greenchat):
    assert upgrade(greenchat.port, "Origin: 127.0.0.1\r\n").startswith(b"HTTP/1.1 101")
    assert upgrade(greenchat.port, "Origin: null\r\n").startswith(b"HTTP/1.1 403")
    assert greenchat.wait_stats(lambda s: s["refused"])["refused"] == {"origin": 1}


def test_a_refusal_names_the_client_a_trusted_proxy_forwarded_and_never_a_spoofed_one(
        start_server):
    server = start_server(greenchat_argv(), env={"CHAT_TRUSTED_PROXIES": "127.0.0.1"})
    # From 127.0.0.7, not a trusted proxy: its X-Forwarded-For is not believed.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                  source_address=("127.0.0.7", 0)) as sock:
        request = HANDSHAKE.format(path="/", port=server.port, key=KEY)
        sock.sendall(request.replace("\r\n\r\n", "\r\nOrigin: https://evil.example\r\n"
                                     "X-Forwarded-For: 203.0.113.66\r\n\r\n").encode())
        assert read_response_head(sock).startswith(b"HTTP/1.1 403")
    # From 127.0.0.1, the trusted proxy: the client is the address it appended.
    request = HANDSHAKE.format(path="/", port=server.port, key=KEY).replace(
        "Version: 13\r\n", "Version: 99\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.9\r\n")
    assert exchange(server.port, request.encode()).startswith(b"HTTP/1.1 400")
    server.wait_stats(lambda s: s["refused"] == {"origin": 1, "bad_handshake": 1})
    lines = [line for line in server.lines if "refused a client" in line]
    assert len(lines) == 2, server.output
    assert "from 127.0.0.7" in lines[0] and "203.0.113.66" not in lines[0]
    assert "from 203.0.113.9" in lines[1] and "6.6.6.6" not in lines[1]


def test_a_bad_trusted_proxies_setting_stops_the_server_in_one_line(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_TRUSTED_PROXIES": "nginx"},
                          ready=False)
    assert server.proc.wait(30) != 0
    assert "CHAT_TRUSTED_PROXIES: 'nginx' is not an IP address" in server.output
    assert "Traceback" not in server.output


def test_configured_origins_are_allowed_and_others_refused(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_ALLOWED_ORIGINS": "https://app.example"})
    assert upgrade(server.port, "Origin: https://app.example\r\n").startswith(b"HTTP/1.1 101")
    assert upgrade(server.port, f"Origin: http://127.0.0.1:{server.port}\r\n").startswith(
        b"HTTP/1.1 403")


def test_the_stock_worker_closes_a_foreign_origin_with_1008(start_server):
    server = start_server([sys.executable, "-m", "gunicorn", "-k",
                           "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                           "--bind", "127.0.0.1:0", "--no-control-socket", "chat.wsgi:app"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        request = HANDSHAKE.format(path="/", port=server.port, key=KEY)
        sock.sendall(request.replace("\r\n\r\n", "\r\nOrigin: https://evil.example\r\n\r\n")
                     .encode())
        assert read_response_head(sock).startswith(b"HTTP/1.1 101")  # sent before the app ran
        opcode, payload = read_frame(sock)
    assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, 1008)
    assert server.stats()["refused"] == {"origin": 1}


@pytest.fixture
def auth_server(start_server):
    return start_server([sys.executable, str(ROOT / "tests" / "auth_app.py")])


def test_the_auth_hook_accepts_a_token_and_refuses_with_its_status(auth_server):
    port = auth_server.port
    assert upgrade(port, path="/?token=letmein").startswith(b"HTTP/1.1 101")
    assert upgrade(port, path="/").startswith(b"HTTP/1.1 401")
    assert upgrade(port, path="/?token=wrong").startswith(b"HTTP/1.1 403")
    assert auth_server.stats()["refused"] == {"auth": 2}


def test_the_auth_hook_can_read_the_flask_session(auth_server):
    with urllib.request.urlopen(auth_server.url + "/login", timeout=10) as response:
        cookie = response.headers["Set-Cookie"].split(";", 1)[0]
    assert upgrade(auth_server.port, f"Cookie: {cookie}\r\n").startswith(b"HTTP/1.1 101")
    assert upgrade(auth_server.port, f"Cookie: {cookie}\r\n",
                   path="/rooms/staff").startswith(b"HTTP/1.1 101")


def test_the_auth_hook_sees_the_room_and_can_refuse_it_alone(auth_server):
    port = auth_server.port
    assert upgrade(port, path="/rooms/staff?token=letmein").startswith(b"HTTP/1.1 403")
    assert upgrade(port, path="/rooms/other?token=letmein").startswith(b"HTTP/1.1 101")


MALFORMED = {
    "missing key": HANDSHAKE.replace(f"Sec-WebSocket-Key: {{key}}\r\n", ""),
    "wrong version": HANDSHAKE.replace("Version: 13", "Version: 12"),
    "no version": HANDSHAKE.replace("Sec-WebSocket-Version: 13\r\n", ""),
    "bad key": HANDSHAKE.replace("{key}", "not-base64-at-all"),
    "POST": HANDSHAKE.replace("GET", "POST"),
    "HTTP/1.0": HANDSHAKE.replace("HTTP/1.1", "HTTP/1.0"),
    "no Connection: Upgrade": HANDSHAKE.replace("Connection: Upgrade", "Connection: close"),
    "huge header": HANDSHAKE.replace("\r\n\r\n", "\r\nX-Big: " + "a" * 70_000 + "\r\n\r\n"),
    "many headers": HANDSHAKE.replace(
        "\r\n\r\n", "\r\n" + "".join(f"X-{i}: {i}\r\n" for i in range(500)) + "\r\n"),
    "huge request line": HANDSHAKE.replace("{path}", "/" + "a" * 20_000),
    "garbage": "\x00\xff\x16\x03\x01 not http at all\r\n\r\n",
    "bad request line": "GET\r\n\r\n",
}


def test_malformed_requests_get_4xx_or_a_closed_socket_never_500_or_a_traceback(greenchat):
    for name, template in MALFORMED.items():
        request = template.format(path="/", port=greenchat.port, key=KEY)
        head = exchange(greenchat.port, request.encode("latin-1"))
        status = head[9:12]
        assert head == b"" or status.startswith(b"4"), f"{name}: {head[:80]!r}"
    # Still serving, and quiet: no traceback, and a log line per refusal reason at most.
    connect(greenchat.port).close()
    stats = greenchat.stats()
    assert sum(stats["refused"].values()) >= len(MALFORMED) - 3  # POST, 1.0, close go to Flask
    assert "Traceback" not in greenchat.output
    assert greenchat.output.count("refused a client") <= len(stats["refused"])


def test_a_silent_client_and_a_slowloris_are_dropped_after_the_handshake_timeout(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_HANDSHAKE_TIMEOUT": "1"})
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    request = HANDSHAKE.format(path="/", port=server.port, key=KEY).encode()
    dropped_after = None
    for index in range(len(request)):  # a byte every 0.2 s would take ~30 s
        try:
            trickle.sendall(request[index:index + 1])
        except OSError:
            dropped_after = index
            break
        time.sleep(0.2)
        trickle.settimeout(0)
        try:
            if trickle.recv(1) == b"":
                dropped_after = index
                break
        except BlockingIOError:
            pass
        except ConnectionResetError:  # closed, and our next byte got a reset back
            dropped_after = index
            break
        trickle.settimeout(10)
    assert dropped_after is not None and dropped_after < len(request) - 1
    assert silent.recv(1) == b""  # closed by the server, no response
    stats = server.wait_stats(lambda s: s["refused"].get("handshake_timeout") == 2)
    assert stats["connections"] == 0


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on ``port``."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[4].split(":")[1], 16)  # rx_queue of a listener: its backlog
    raise AssertionError(f"nothing listens on port {port}")


def test_a_request_sent_in_time_is_answered_though_the_server_was_held_up_past_the_deadline(
        start_server):
    """The handshake deadline is for slow clients. A worker of a loaded machine may be off
    the CPU for longer than that; back on, libev ran the expired timer before the read of
    a request that had come in time, and refused the client (250 clients of a million)."""
    server = start_server(greenchat_argv(), env={"CHAT_HANDSHAKE_TIMEOUT": "1"})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    deadline = time.monotonic() + 10
    while accept_queue(server.port):  # the server has accepted: its deadline runs
        assert time.monotonic() < deadline, "the server never accepted the connection"
        time.sleep(0.01)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        sock.sendall(HANDSHAKE.format(path="/", port=server.port, key=KEY).encode())
        time.sleep(2.0)  # twice the deadline, the server stopped
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert read_response_head(sock).startswith(b"HTTP/1.1 101 ")
    stats = server.wait_stats(lambda s: s["connections"] == 1)
    assert "handshake_timeout" not in stats["refused"]
    # A client that sent nothing is still dropped at the deadline.
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert silent.recv(1) == b""
    assert server.wait_stats(lambda s: s["refused"].get("handshake_timeout") == 1)


@pytest.mark.slow
def test_thousands_of_silent_clients_do_not_stop_new_clients(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_HANDSHAKE_TIMEOUT": "3"})
    silent = []
    try:
        for i in range(3000):
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + i // 1000}", 0))
            sock.connect(("127.0.0.1", server.port))
            silent.append(sock)
        client = connect(server.port)
        client.sendall(masked_frame(b"still here"))
        assert read_frame(client) == (0x1, b"still here")
        stats = server.wait_stats(lambda s: s["refused"].get("handshake_timeout") == 3000,
                                  timeout=60)
        assert stats["connections"] == 1
        for sock in silent[:: 100]:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()


PROMISED_BODIES = (
    b"GET /stats HTTP/1.1\r\nHost: chat\r\nContent-Length: 1000000\r\n\r\n",
    b"GET /stats HTTP/1.1\r\nHost: chat\r\nTransfer-Encoding: chunked\r\n\r\n",
)


@pytest.mark.slow
def test_requests_whose_body_never_comes_are_dropped_within_the_timeout(start_server):
    """Each gets its answer, then the socket: the deadline covers the whole exchange."""
    server = start_server(greenchat_argv(), env={"CHAT_HANDSHAKE_TIMEOUT": "1"})
    hostile = []
    try:
        for i in range(5000):
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + i // 2500}", 0))
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(PROMISED_BODIES[i % 2])
            hostile.append(sock)
        client = connect(server.port)  # a normal client still gets in and chats
        client.sendall(masked_frame(b"still here"))
        assert read_frame(client) == (0x1, b"still here")
        stats = server.wait_stats(lambda s: s["refused"].get("request_timeout") == 5000,
                                  timeout=60)
        assert stats["connections"] == 1
        for sock in hostile:  # each got its answer, then the server closed the socket
            sock.settimeout(10)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 200"), received[:40]
    finally:
        for sock in hostile:
            sock.close()


def test_an_idle_keep_alive_connection_is_closed_and_not_counted_as_refused(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_HANDSHAKE_TIMEOUT": "1"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: chat\r\n\r\n")
        assert read_response_head(sock).startswith(b"HTTP/1.1 200")
        received = b""
        while chunk := sock.recv(65536):  # the body, then the close after the idle timeout
            received += chunk
    assert b"connections" in received
    assert server.stats()["refused"] == {}
