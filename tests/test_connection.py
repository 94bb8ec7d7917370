"""A real server and raw clients: what a client sees on the wire in each situation."""

from __future__ import annotations

import base64
import os
import signal
import socket
import sys
import time

import pytest

from chat.protocol import Opcode, encode_client_frame
from helpers import ROOT, greenchat_argv
from raw_clients import HANDSHAKE, connect, masked_frame, read_frame, read_response_head


def read_until_closed(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every frame until the server closes TCP (bounded by the socket timeout)."""
    frames = []
    while True:
        try:
            frames.append(read_frame(sock))
        except ConnectionError:
            return frames


def close_code(frame: tuple[int, bytes]) -> int:
    opcode, payload = frame
    assert opcode == 0x8, f"expected a close frame, got opcode {opcode:#x}"
    return int.from_bytes(payload[:2], "big")


def test_a_frame_sent_right_behind_the_handshake_is_not_lost(greenchat):
    sock = socket.create_connection(("127.0.0.1", greenchat.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    request = HANDSHAKE.format(path="/", port=greenchat.port, key=key).encode()
    sock.sendall(request + masked_frame(b"eager"))  # one write: pywsgi buffers both
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0]
    assert read_frame(sock) == (0x1, b"eager")
    sock.close()


def test_an_unmasked_frame_gets_1002_and_others_carry_on(greenchat):
    bad, good = connect(greenchat.port), connect(greenchat.port)
    bad.sendall(b"\x81\x02hi")  # unmasked: clients must mask
    frames = read_until_closed(bad)
    assert close_code(frames[-1]) == 1002
    good.sendall(masked_frame(b"still here"))
    assert read_frame(good) == (0x1, b"still here")
    assert greenchat.wait_stats(lambda s: s["protocol_errors"] == 1)["connections"] == 1


def test_what_a_client_sent_before_a_bad_frame_or_its_close_still_reaches_it(greenchat):
    failing, closing = connect(greenchat.port), connect(greenchat.port)
    greenchat.wait_stats(lambda s: s["connections"] == 2)
    # One write each: the valid message and what ends the connection arrive together.
    failing.sendall(masked_frame(b"then a bad frame") + b"\x81\x02hi")
    frames = read_until_closed(failing)
    assert frames[0] == (0x1, b"then a bad frame") and close_code(frames[-1]) == 1002
    closing.sendall(masked_frame(b"then a close") + masked_frame(b"\x03\xe8", opcode=0x8))
    frames = read_until_closed(closing)
    assert (0x1, b"then a close") in frames[:-1] and close_code(frames[-1]) == 1000


def test_invalid_utf8_gets_1007(greenchat):
    sock = connect(greenchat.port)
    sock.sendall(masked_frame(b"\xff\xfe"))
    assert close_code(read_until_closed(sock)[-1]) == 1007


def test_a_message_over_the_size_limit_gets_1009(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_MAX_MESSAGE_SIZE": "100"})
    sock = connect(server.port)
    sock.sendall(masked_frame(b"z" * 101))
    assert close_code(read_until_closed(sock)[-1]) == 1009


def test_a_client_close_is_answered_and_the_socket_closed(greenchat):
    sock = connect(greenchat.port)
    sock.sendall(masked_frame((1000).to_bytes(2, "big") + b"bye", opcode=0x8))
    frames = read_until_closed(sock)
    assert [close_code(f) for f in frames] == [1000]
    greenchat.wait_stats(lambda s: s["connections"] == 0)


def test_a_ping_gets_a_pong_with_its_payload(greenchat):
    sock = connect(greenchat.port)
    sock.sendall(masked_frame(b"are you there", opcode=0x9))
    assert read_frame(sock) == (0xA, b"are you there")


@pytest.mark.slow
def test_a_client_that_never_reads_is_closed_with_1008_and_the_stream_stays_valid(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_MAX_BACKLOG": "65536",
                                                 "CHAT_MAX_MESSAGE_SIZE": "32768"})
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(10)
    slow.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    slow.sendall(HANDSHAKE.format(path="/", port=server.port, key=key).encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += slow.recv(1)
    fast = connect(server.port)
    payload = b"m" * 16000
    sent = 0
    # The fast client sends and reads its own echo; the slow one reads nothing. The
    # kernel buffers a few MB for the slow one before our backlog starts to fill.
    while server.stats()["slow_consumers_closed"] == 0 and sent < 5000:
        fast.sendall(masked_frame(payload) * 10)
        for _ in range(10):
            assert read_frame(fast) == (0x1, payload)
        sent += 10
    assert server.stats()["slow_consumers_closed"] == 1, f"not closed after {sent} messages"
    frames = read_until_closed(slow)  # what the kernel held, then the close frame
    assert all(frame == (0x1, payload) for frame in frames[:-1])
    assert close_code(frames[-1]) == 1008
    assert server.stats()["connections"] == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_server_sends_every_client_1001(start_server, sig):
    server = start_server(greenchat_argv())
    clients = [connect(server.port) for _ in range(3)]
    server.wait_stats(lambda s: s["connections"] == 3)
    os.kill(server.pid, sig)
    for sock in clients:
        assert close_code(read_until_closed(sock)[-1]) == 1001
    assert server.proc.wait(15) == 0


@pytest.mark.parametrize("path, status", [("/nowhere", b"404"), ("/stats", b"400")])
def test_an_upgrade_to_a_path_without_a_websocket_route_gets_4xx_not_101(greenchat, path,
                                                                          status):
    with pytest.raises(ConnectionError, match=f"handshake refused: b'HTTP/1.1 {status.decode()}"):
        connect(greenchat.port, path=path)


KEY_LINE = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
VERSION_LINE = "Sec-WebSocket-Version: 13\r\n"


@pytest.mark.parametrize("old, new, status", [
    (VERSION_LINE, "", "426"),  # no version
    (VERSION_LINE, "Sec-WebSocket-Version: 99\r\n", "400"),  # unsupported version
    (KEY_LINE, "", "400"),  # no key
    (KEY_LINE, "Sec-WebSocket-Key: short\r\n", "400"),  # key is not 16 bytes
])
def test_a_bad_handshake_gets_4xx(greenchat, old, new, status):
    request = HANDSHAKE.format(path="/", port=greenchat.port, key="dGhlIHNhbXBsZSBub25jZQ==")
    assert old in request
    sock = socket.create_connection(("127.0.0.1", greenchat.port), timeout=10)
    sock.sendall(request.replace(old, new).encode())
    response = sock.recv(4096)
    assert response.startswith(f"HTTP/1.1 {status}".encode()), response


def test_a_full_server_refuses_with_503_counts_it_and_takes_clients_again_later(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_MAX_CONNECTIONS": "3"})
    clients = [connect(server.port) for _ in range(3)]
    with pytest.raises(ConnectionError, match="HTTP/1.1 503"):
        connect(server.port)
    assert server.stats()["refused"] == {"full": 1}
    clients.pop().close()
    server.wait_stats(lambda s: s["connections"] == 2)
    connect(server.port).close()


@pytest.mark.slow
def test_a_full_server_under_the_stock_worker_closes_with_1013(start_server):
    import sys

    server = start_server([sys.executable, "-m", "gunicorn", "-k",
                           "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                           "--bind", "127.0.0.1:0", "--no-control-socket", "chat.wsgi:app"],
                          env={"CHAT_MAX_CONNECTIONS": "1"})
    first = connect(server.port)
    second = connect(server.port)  # the stock handler answers 101 before the app runs
    assert close_code(read_until_closed(second)[-1]) == 1013
    assert server.stats()["refused"] == {"full": 1}
    first.close()


@pytest.mark.slow
def test_a_client_over_its_rate_limit_is_closed_with_1008_and_counted(start_server):
    server = start_server(greenchat_argv(),
                          env={"CHAT_RATE_LIMIT": "1", "CHAT_RATE_BURST": "5"})
    flooder, bystander = connect(server.port), connect(server.port)
    flooder.sendall(b"".join(masked_frame(b"flood %d" % i) for i in range(20)))  # one write
    frames = read_until_closed(flooder)  # its close goes out before the flush of its burst
    assert len(frames) == 1 and close_code(frames[0]) == 1008
    burst = [(0x1, b"flood %d" % i) for i in range(5)]  # accepted, then no more
    assert [read_frame(bystander) for _ in range(5)] == burst
    bystander.sendall(masked_frame(b"after"))
    assert read_frame(bystander) == (0x1, b"after")  # the others are unaffected
    stats = server.stats()
    assert stats["rate_limited"] == 1 and stats["connections"] == 1


def test_in_drop_mode_messages_over_the_rate_are_dropped_and_the_client_stays(start_server):
    server = start_server(greenchat_argv(), env={
        "CHAT_RATE_LIMIT": "2", "CHAT_RATE_BURST": "3", "CHAT_RATE_LIMIT_ACTION": "drop"})
    client = connect(server.port)
    client.sendall(b"".join(masked_frame(b"m%d" % i) for i in range(10)))
    assert [read_frame(client) for _ in range(3)] == [(0x1, b"m0"), (0x1, b"m1"), (0x1, b"m2")]
    server.wait_stats(lambda s: s["rate_limited"] == 7)
    time.sleep(0.6)  # refills at least one token at 2/s
    client.sendall(masked_frame(b"later"))
    assert read_frame(client) == (0x1, b"later")
    assert server.stats()["connections"] == 1


def test_a_silent_peer_is_pinged_then_dropped_and_one_that_answers_stays(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_PING_INTERVAL": "0.3"})
    dead, alive = connect(server.port), connect(server.port)
    pongs = 0
    while pongs < 3:  # each ping comes after ~2 silent intervals; bounded by the timeout
        opcode, payload = read_frame(alive)
        assert opcode == 0x9, f"expected a ping, got {opcode:#x}"
        alive.sendall(masked_frame(payload, opcode=0xA))
        pongs += 1
    stats = server.wait_stats(lambda s: s["idle_dropped"] == 1)
    assert stats["connections"] == 1
    frames = read_until_closed(dead)  # the peer that never answered: a ping, then EOF
    assert frames and frames[0][0] == 0x9
    alive.sendall(masked_frame(b"still here"))
    assert read_frame(alive) == (0x1, b"still here")


# -- one client never hurts another ----------------------------------------------------


def client_frame(payload: bytes, opcode: int = Opcode.TEXT) -> bytes:
    """A masked client frame of any length, final."""
    return encode_client_frame(opcode, payload)


CLOSE_1000 = masked_frame((1000).to_bytes(2, "big"), opcode=0x8)


def assert_the_room_still_works(server, others: list[socket.socket]) -> None:
    """Every other client still gets every broadcast, the hostile one is gone, and the
    server logged no traceback."""
    server.wait_stats(lambda s: s["connections"] == len(others))
    for i in range(3):
        others[i % len(others)].sendall(masked_frame(b"after %d" % i))
        for sock in others:
            assert read_frame(sock) == (0x1, b"after %d" % i)
    assert "Traceback" not in server.output, server.output


def test_a_client_over_its_rate_that_closes_in_the_same_segment_leaves_no_zombie(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_RATE_LIMIT": "1", "CHAT_RATE_BURST": "2"})
    others = [connect(server.port) for _ in range(5)]
    hostile = connect(server.port)
    server.wait_stats(lambda s: s["connections"] == 6)
    hostile.sendall(b"".join(masked_frame(b"x%d" % i) for i in range(3)) + CLOSE_1000)
    frames = read_until_closed(hostile)
    assert frames and frames[-1][0] == 0x8  # a close frame, whichever close came first
    for sock in others:  # the two messages within its burst
        assert [read_frame(sock) for _ in range(2)] == [(0x1, b"x0"), (0x1, b"x1")]
    assert_the_room_still_works(server, others)


def test_a_backlogged_client_that_closes_in_the_same_segment_leaves_no_zombie(start_server):
    server = start_server(greenchat_argv())
    others = [connect(server.port) for _ in range(5)]
    hostile = socket.socket()
    hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, holds little
    hostile.settimeout(10)
    hostile.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    hostile.sendall(HANDSHAKE.format(path="/", port=server.port, key=key).encode())
    assert b" 101 " in read_response_head(hostile)
    server.wait_stats(lambda s: s["connections"] == 6)
    big = b"b" * (512 * 1024)
    hostile.sendall(client_frame(big))  # its own echo leaves it a backlog
    for sock in others:
        assert read_frame(sock) == (0x1, big)
    hostile.sendall(masked_frame(b"and goodbye") + CLOSE_1000)
    for sock in others:
        assert read_frame(sock) == (0x1, b"and goodbye")
    assert_the_room_still_works(server, others)
    hostile.close()


def test_an_exception_in_a_custom_handler_closes_that_client_with_1011_only(start_server):
    server = start_server([sys.executable, str(ROOT / "tests" / "faulty_app.py"), "0"])
    others = [connect(server.port) for _ in range(3)]
    faulty = connect(server.port)
    server.wait_stats(lambda s: s["connections"] == 4)
    faulty.sendall(masked_frame(b"boom"))  # the app's on_message raises for this one
    assert close_code(read_until_closed(faulty)[-1]) == 1011
    server.wait_stats(lambda s: s["connections"] == 3)
    for i in range(3):
        others[i].sendall(masked_frame(b"fine %d" % i))
        for sock in others:
            assert read_frame(sock) == (0x1, b"fine %d" % i)
    assert server.output.count("Traceback") == 1  # the app's bug, logged once


def test_a_new_room_past_the_rooms_limit_gets_503_and_existing_rooms_still_take_clients(
        start_server):
    server = start_server(greenchat_argv(), env={"CHAT_MAX_ROOMS": "2"})
    first, second = connect(server.port, "/rooms/a"), connect(server.port, "/rooms/b")
    with pytest.raises(ConnectionError, match="HTTP/1.1 503"):
        connect(server.port, "/rooms/c")
    again = connect(server.port, "/rooms/a")
    again.sendall(masked_frame(b"in a"))
    assert read_frame(first) == (0x1, b"in a")
    stats = server.stats()
    assert stats["refused"] == {"rooms": 1} and stats["rooms"] == 2
    second.close()
    server.wait_stats(lambda s: s["rooms"] == 1)
    connect(server.port, "/rooms/c").close()  # a room freed is a room available
