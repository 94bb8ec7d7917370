"""wss:// and https:// under `greenchat serve --certfile/--keyfile` and
`gunicorn -c gunicorn.conf.py --certfile/--keyfile`, with real TLS clients: a raw
``ssl`` socket and the ``websockets`` library. The certificate is self-signed, made by
``openssl`` for each test session (the ``certificate`` fixture, in conftest.py)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import websockets.asyncio.client

from chat.protocol import (CloseReceived, Opcode, Pong, TextMessage, encode_client_close,
                           generate_key, handshake_request)
from helpers import ROOT, greenchat_argv
from test_upgrade import Client

HTTPS_LINE = re.compile(r"[Ll]istening (?:on|at:) https://[^\s:]+:(\d+)")
TIMEOUT = 10.0


def client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


COMMANDS = {
    "greenchat serve": lambda cert, key: greenchat_argv("--certfile", str(cert),
                                                        "--keyfile", str(key)),
    "gunicorn -c gunicorn.conf.py": lambda cert, key: [
        sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
        "--bind", "127.0.0.1:0", "--certfile", str(cert), "--keyfile", str(key)],
}


def wait_https_port(server, timeout: float = 30.0) -> int:
    """The port of the https:// start line (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = HTTPS_LINE.search(server.output)
        if match:
            return int(match.group(1))
        if server.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no https:// start line:\n{server.output}")


def stats(port: int, cert: Path) -> dict:
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/stats", timeout=TIMEOUT,
                                context=client_context(cert)) as response:
        return json.loads(response.read())


def wait_stats(port: int, cert: Path, predicate, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        last = stats(port, cert)
        if predicate(last) or time.monotonic() > deadline:
            assert predicate(last), f"last /stats: {last}"
            return last
        time.sleep(0.05)


def tls_client(port: int, cert: Path, path: str = "/") -> Client:
    """A raw websocket client over a blocking ssl socket."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock = client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1")
    client = Client(sock, port, path)
    assert client.status == 101, client.head
    return client


@pytest.mark.parametrize("command", [
    "greenchat serve",
    pytest.param("gunicorn -c gunicorn.conf.py", marks=pytest.mark.slow),  # ~3 s with its stop
])
def test_wss_clients_chat_and_https_answers_under_both_commands(start_server, certificate,
                                                                command):
    cert, key = certificate
    server = start_server(COMMANDS[command](cert, key), ready=False)
    port = wait_https_port(server)
    wait_stats(port, cert, lambda s: True)  # https to Flask, through pywsgi
    assert re.search(r"greenchat (listening on|worker 1 ready on) https://127\.0\.0\.1:"
                     rf"{port}\b", server.output), server.output
    first, second = tls_client(port, cert), tls_client(port, cert, "/rooms/lobby")
    wait_stats(port, cert, lambda s: s["connections"] == 2)
    first.send(b"over TLS")
    assert first.receive() == TextMessage("over TLS")
    assert second.receive() == TextMessage("over TLS")
    second.send(b"still there?", Opcode.PING)
    assert second.receive() == Pong(b"still there?")
    big = b"b" * 200_000  # many TLS records each way
    second.send(big, Opcode.BINARY)
    assert first.receive().data == big and second.receive().data == big

    async def with_websockets() -> str:
        async with websockets.asyncio.client.connect(
                f"wss://127.0.0.1:{port}/rooms/other", ssl=client_context(cert),
                compression=None, open_timeout=TIMEOUT) as ws:
            await ws.send("from websockets")
            return await asyncio.wait_for(ws.recv(), TIMEOUT)

    assert asyncio.run(with_websockets()) == "from websockets"
    first.sock.sendall(encode_client_close(1000))
    assert isinstance(first.receive(), CloseReceived)
    after = wait_stats(port, cert, lambda s: s["connections"] == 1)
    assert after["messages_received"] == 3 and after["handshakes"] == 3
    assert "Traceback" not in server.output


def test_a_client_that_does_not_speak_tls_is_refused_and_counted(start_server, certificate):
    cert, key = certificate
    server = start_server(COMMANDS["greenchat serve"](cert, key), ready=False)
    port = wait_https_port(server)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as plain:
        plain.sendall(handshake_request(f"127.0.0.1:{port}", "/", generate_key()))
        assert plain.recv(4096)[:1] != b"H"  # a TLS alert or nothing, never HTTP
    wait_stats(port, cert, lambda s: s["refused"].get("tls_handshake") == 1)
    client = tls_client(port, cert)  # the server is still fine
    client.send(b"hi")
    assert client.receive() == TextMessage("hi")


def test_a_certificate_that_cannot_be_loaded_stops_greenchat_serve_with_one_line(tmp_path):
    missing = tmp_path / "missing.pem"
    result = subprocess.run(greenchat_argv("--certfile", str(missing)), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith(f"greenchat: cannot load the TLS certificate {missing}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_stock_worker_closes_a_wss_client_with_1011_and_says_why(start_server, certificate):
    """Its TLS socket cannot be taken over: a close with the reason, not a silent 101."""
    cert, key = certificate
    server = start_server([sys.executable, "-m", "gunicorn", "-k",
                           "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                           "--bind", "127.0.0.1:0", "--no-control-socket", "--certfile",
                           str(cert), "--keyfile", str(key), "chat.wsgi:app"], ready=False)
    port = wait_https_port(server)
    client = tls_client(port, cert)
    closing = client.receive()
    assert isinstance(closing, CloseReceived) and closing.code == 1011
    assert "greenchat's worker" in closing.reason
    assert stats(port, cert)["refused"] == {"tls_stock_worker": 1}


def test_a_tls_client_that_never_reads_gets_every_queued_record_then_1008(start_server,
                                                                           certificate):
    """Over TLS a slow consumer's backlog cannot be dropped (the records are numbered):
    it is sent whole, then the close frame, and the stream decrypts to the end."""
    cert, key = certificate
    server = start_server(COMMANDS["greenchat serve"](cert, key), ready=False,
                          env={"CHAT_MAX_BACKLOG": "65536", "CHAT_MAX_MESSAGE_SIZE": "32768",
                               "CHAT_CLOSE_TIMEOUT": "30"})
    port = wait_https_port(server)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(TIMEOUT)
    raw.connect(("127.0.0.1", port))
    slow = Client(client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1"), port)
    fast = tls_client(port, cert)
    wait_stats(port, cert, lambda s: s["connections"] == 2)
    payload = b"m" * 16000
    sent = 0
    while stats(port, cert)["slow_consumers_closed"] == 0 and sent < 3000:
        for _ in range(10):
            fast.send(payload)
        for _ in range(10):
            assert fast.receive() == TextMessage(payload.decode())
        sent += 10
    assert stats(port, cert)["slow_consumers_closed"] == 1, f"not closed after {sent}"
    received = []
    while not isinstance(event := slow.receive(), CloseReceived):
        received.append(event)
    assert event.code == 1008
    assert received and all(e == TextMessage(payload.decode()) for e in received)
    assert wait_stats(port, cert, lambda s: s["connections"] == 1)["protocol_errors"] == 0


def test_a_json_client_over_wss_joins_and_meets_a_plain_one(start_server, certificate):
    cert, key = certificate
    server = start_server(COMMANDS["greenchat serve"](cert, key), ready=False)
    port = wait_https_port(server)
    multi, plain = tls_client(port, cert, "/ws"), tls_client(port, cert, "/rooms/secure")
    multi.send(json.dumps({"op": "join", "room": "secure"}).encode())
    assert json.loads(multi.receive().text) == {"type": "joined", "room": "secure"}
    text = "x" * 100_000  # many TLS records
    multi.send(json.dumps({"op": "send", "room": "secure", "text": text}).encode())
    assert plain.receive() == TextMessage(text)
    event = json.loads(multi.receive().text)
    assert (event["type"], event["room"], event["text"]) == ("message", "secure", text)
