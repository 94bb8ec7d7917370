"""permessage-deflate end to end: real `greenchat serve` processes, raw sockets and the
`websockets` library as clients.

A client that offers the extension gets it in the 101, may send compressed messages,
and receives a room's broadcasts compressed (RSV1 set) when that makes them smaller; a
client in the same room that did not offer it gets the same messages plain. The codec's
side (inflating, bombs, RSV rules) is tests/test_protocol.py's.
"""

from __future__ import annotations

import random
import socket
import sys

import pytest
from websockets.sync.client import connect as websockets_connect

from chat.protocol import (ClientProtocol, Opcode, TextMessage, accept_key, encode_client_frame,
                           generate_key, handshake_request)
from helpers import ROOT, greenchat_argv, inflate_through_window
from raw_clients import compressed_frame, read_raw_frame, read_response_head

OFFER = "permessage-deflate; client_max_window_bits"
AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
RSV1 = 0x40
TIMEOUT = 10.0
# Large and repetitive: deflates to a few per cent of its size.
GUNICORN = [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0"]
# Who answers the 101 under each command, and whether it agrees to compress.
SERVERS = {
    "greenchat serve": (greenchat_argv(), True),
    "gunicorn -c gunicorn.conf.py": ([*GUNICORN, "-c", str(ROOT / "gunicorn.conf.py")], True),
    # gevent-websocket writes the 101 and knows no extension: the offer is ignored.
    "gunicorn -k GeventWebSocketWorker": ([*GUNICORN, "--no-control-socket", "-k",
                                           "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                                           "chat.wsgi:app"], False),
}
MESSAGE = '{"user": "ada", "text": "' + "the quick brown fox jumps over the lazy dog " * 400 + '"}'


def open_websocket(port: int, path: str = "/", offer: str | None = None) -> tuple[socket.socket, bytes]:
    """A raw websocket (blocking, with a timeout) and its 101's head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    key = generate_key()
    request = handshake_request(f"127.0.0.1:{port}", path, key)
    if offer is not None:
        request = request[:-2] + f"Sec-WebSocket-Extensions: {offer}\r\n\r\n".encode()
    sock.sendall(request)
    head = read_response_head(sock)
    assert head.startswith(b"HTTP/1.1 101 ") and accept_key(key).encode() in head, head
    return sock, head


def extension_header(head: bytes) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "sec-websocket-extensions":
            return value.strip()
    return None


def decoded_text(frame: bytes, deflate: int | None) -> str:
    """The frame's message as a client with (or without) the agreement reads it."""
    (event,) = ClientProtocol(max_message_size=1 << 20, deflate=deflate).receive_data(frame)
    assert type(event) is TextMessage, event
    return event.text


def test_a_compressing_client_and_a_plain_one_in_one_room_get_the_same_message_each_its_way(
        greenchat):
    deflating, deflating_head = open_websocket(greenchat.port, "/rooms/general", OFFER)
    plain, plain_head = open_websocket(greenchat.port, "/rooms/general")
    assert extension_header(deflating_head) == AGREED
    assert extension_header(plain_head) is None
    greenchat.wait_stats(lambda s: s["connections"] == 2 and s["deflate_connections"] == 1)

    sent = compressed_frame(MESSAGE)
    assert len(sent) < len(MESSAGE) // 10
    deflating.sendall(sent)

    compressed = read_raw_frame(deflating)
    assert compressed[0] == 0x80 | RSV1 | Opcode.TEXT
    assert len(compressed) < len(MESSAGE) // 10
    assert decoded_text(compressed, deflate=15) == MESSAGE
    uncompressed = read_raw_frame(plain)
    assert uncompressed[0] == 0x80 | Opcode.TEXT
    assert decoded_text(uncompressed, deflate=None) == MESSAGE

    # A short message does not shrink: it goes out plain to both, which RFC 7692 allows.
    plain.sendall(encode_client_frame(Opcode.TEXT, b"hi"))
    for sock in (deflating, plain):
        assert read_raw_frame(sock) == b"\x81\x02hi"
    stats = greenchat.stats()
    assert stats["messages_received"] == 2 and stats["protocol_errors"] == 0
    deflating.close()
    plain.close()
    greenchat.wait_stats(lambda s: s["connections"] == 0 and s["deflate_connections"] == 0)


def test_the_websockets_library_agrees_to_deflate_and_its_messages_come_back_whole(greenchat):
    with websockets_connect(greenchat.ws_url, open_timeout=TIMEOUT) as client, \
            websockets_connect(greenchat.ws_url, compression=None, open_timeout=TIMEOUT) as other:
        assert client.response.headers["Sec-WebSocket-Extensions"] == AGREED
        assert "Sec-WebSocket-Extensions" not in other.response.headers
        greenchat.wait_stats(lambda s: s["deflate_connections"] == 1)
        for text in (MESSAGE, "short", "é" * 5000):
            client.send(text)
            assert client.recv(timeout=TIMEOUT) == text
            assert other.recv(timeout=TIMEOUT) == text
        binary = bytes(range(256)) * 64
        client.send(binary)
        assert client.recv(timeout=TIMEOUT) == binary
        assert other.recv(timeout=TIMEOUT) == binary
    assert greenchat.stats()["protocol_errors"] == 0


# gunicorn's stop takes ~1.5 s: those two are slow.
@pytest.mark.parametrize("server_name", [
    name if name == "greenchat serve" else pytest.param(name, marks=pytest.mark.slow)
    for name in SERVERS])
def test_each_command_agrees_to_deflate_unless_gevent_websocket_writes_the_101(
        start_server, server_name):
    argv, compresses = SERVERS[server_name]
    server = start_server(argv)
    with websockets_connect(server.ws_url, open_timeout=TIMEOUT) as client:
        agreed = client.response.headers.get("Sec-WebSocket-Extensions")
        assert agreed == (AGREED if compresses else None)
        client.send(MESSAGE)  # compressed when agreed
        assert client.recv(timeout=TIMEOUT) == MESSAGE
        assert server.stats()["deflate_connections"] == (1 if compresses else 0)


@pytest.mark.parametrize("offer", [
    "permessage-deflate; server_max_window_bits=10",
    "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=10",
])
def test_a_smaller_window_asked_for_is_the_window_broadcasts_are_compressed_with(greenchat, offer):
    sock, head = open_websocket(greenchat.port, "/", offer)
    assert extension_header(head) == AGREED + "; server_max_window_bits=10"
    # 2,000 letters repeated: with a 32 KiB window the copies refer 2,000 bytes back.
    block = "".join(random.Random(7).choices("abcdefghijklmnopqrstuvwxyz ", k=2000))
    sock.sendall(encode_client_frame(Opcode.TEXT, (block * 4).encode()))  # plain is allowed
    frame = read_raw_frame(sock)
    assert frame[0] == 0x80 | RSV1 | Opcode.TEXT and frame[1] == 126
    assert inflate_through_window(frame[4:], 10).decode() == block * 4
    sock.close()


def test_with_chat_deflate_off_the_101_has_no_extension_and_rsv1_is_a_protocol_error(
        start_server):
    server = start_server(greenchat_argv(), env={"CHAT_DEFLATE": "false"})
    sock, head = open_websocket(server.port, "/", OFFER)
    assert extension_header(head) is None
    sock.sendall(compressed_frame(MESSAGE))
    close = read_raw_frame(sock)
    assert close[0] == 0x88 and close[2:4] == (1002).to_bytes(2, "big")
    sock.close()
    assert server.stats()["deflate_connections"] == 0
