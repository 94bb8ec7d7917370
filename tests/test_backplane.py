"""Messages across processes and hosts through a real Redis: every client of every worker
gets every message once, in each sender's order; Redis outages cost no local delivery."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import redis

from chat.backplane import decode_envelope, encode_envelope
from helpers import ROOT, greenchat_argv
from raw_clients import connect, masked_frame, read_frame

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
            "--bind", "127.0.0.1:0"]


def texts(sock: socket.socket, count: int, timeout: float = 10.0) -> list[str]:
    """Exactly ``count`` text messages from ``sock``, failing after ``timeout``."""
    sock.settimeout(timeout)
    received = []
    for _ in range(count):
        opcode, payload = read_frame(sock)
        assert opcode == 0x1, f"expected text, got opcode {opcode:#x}"
        received.append(payload.decode())
    return received


def nothing_more(sock: socket.socket, wait: float = 0.3) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, socket.timeout):
        return True


def start_two_workers(start_server, redis_url: str):
    server = start_server(GUNICORN + ["--workers", "2"], env={"CHAT_REDIS_URL": redis_url})
    server.wait_stats(lambda s: s["cluster"]["workers"] == 2)
    return server


def clients_on_both_workers(server, count: int = 30, limit: int = 300) -> list[socket.socket]:
    """Connect until both workers hold clients (the kernel decides who accepts); bounded."""
    clients = [connect(server.port) for _ in range(count)]
    while len(clients) < limit:
        per_worker = server.wait_stats(
            lambda s: s["cluster"]["connections"] == len(clients), timeout=10)["cluster"]["per_worker"]
        if all(worker["connections"] > 0 for worker in per_worker):
            return clients
        clients += [connect(server.port) for _ in range(count)]
    raise AssertionError(f"{limit} clients all landed on one worker: {per_worker}")


def test_an_envelope_round_trips_text_binary_rooms_and_its_id():
    msg_id = os.urandom(24)
    assert decode_envelope(encode_envelope(msg_id, "", "héllo")) == (msg_id, "", "héllo")
    assert decode_envelope(encode_envelope(msg_id, "room 7", b"\x00\xff")) == (
        msg_id, "room 7", b"\x00\xff")


def test_a_plain_message_from_outside_is_lobby_text_without_an_id():
    assert decode_envelope(b"hello from redis-cli") == (None, "", "hello from redis-cli")


@pytest.mark.slow
def test_every_client_of_two_workers_gets_every_message_once_in_sender_order(start_server,
                                                                            redis_server):
    server = start_two_workers(start_server, redis_server.url)
    clients = clients_on_both_workers(server)
    senders = clients[:5]
    for round_number in range(4):
        for index, sender in enumerate(senders):
            sender.sendall(masked_frame(f"sender {index} message {round_number}".encode()))
    expected = {f"sender {i} message {r}" for i in range(5) for r in range(4)}
    for sock in clients:
        received = texts(sock, len(expected))
        assert set(received) == expected and len(received) == len(expected)
        for index in range(5):
            mine = [m for m in received if m.startswith(f"sender {index} ")]
            assert mine == [f"sender {index} message {r}" for r in range(4)]
        assert nothing_more(sock), "a duplicate arrived"
    cluster = server.stats()["cluster"]
    assert cluster["messages_received"] == 20
    assert cluster["deliveries"] == 20 * len(clients)


@pytest.mark.slow
def test_a_publish_from_outside_reaches_the_clients_of_every_worker(start_server, redis_server):
    server = start_two_workers(start_server, redis_server.url)
    clients = clients_on_both_workers(server)
    redis.Redis.from_url(redis_server.url).publish("greenchat", "announcement")
    for sock in clients:
        assert texts(sock, 1) == ["announcement"]


def test_two_independent_servers_sharing_redis_hear_each_other(start_server, redis_server):
    env = {"CHAT_REDIS_URL": redis_server.url}
    first = start_server(greenchat_argv(), env=env)
    second = start_server(greenchat_argv(), env=env)
    a, b = connect(first.port), connect(second.port)
    # The subscription is made when the first client joins: wait until both listen.
    second.wait_stats(lambda s: s["backplane_connected"])
    first.wait_stats(lambda s: s["backplane_connected"])
    a.sendall(masked_frame(b"from the first host"))
    assert texts(b, 1) == ["from the first host"]
    b.sendall(masked_frame(b"from the second host"))
    assert texts(a, 2) == ["from the first host", "from the second host"]


@pytest.mark.slow
def test_a_redis_restart_stops_no_local_delivery_and_cross_worker_delivery_resumes(
        start_server, redis_server):
    server = start_two_workers(start_server, redis_server.url)
    clients = clients_on_both_workers(server)
    pids_before = {w["pid"] for w in server.stats()["cluster"]["per_worker"]}
    redis_server.stop()

    clients[0].sendall(masked_frame(b"during the outage"))
    same_worker, other_worker = [], []
    for sock in clients:
        sock.settimeout(2)
        try:
            assert read_frame(sock) == (0x1, b"during the outage")
            same_worker.append(sock)
        except (TimeoutError, socket.timeout):
            other_worker.append(sock)
    assert clients[0] in same_worker, "local delivery stopped with Redis"
    assert other_worker, "every client got it although Redis was down"

    redis_server.restart()
    deadline = time.monotonic() + 30
    attempt = 0
    while True:
        attempt += 1
        message = f"after the restart {attempt}".encode()
        clients[0].sendall(masked_frame(message))
        for sock in same_worker:
            assert texts(sock, 1) == [message.decode()]
        other_worker[0].settimeout(1)
        try:  # any of the attempts counts: earlier ones may arrive late
            if read_frame(other_worker[0])[1].startswith(b"after the restart"):
                break
        except (TimeoutError, socket.timeout):
            pass
        assert time.monotonic() < deadline, (
            f"cross-worker delivery did not resume in 30 s; server log:\n{server.output}")
    # Both original workers are alive and reporting again.
    stats = server.wait_stats(lambda s: s["cluster"].get("workers") == 2, timeout=15)
    assert {w["pid"] for w in stats["cluster"]["per_worker"]} == pids_before
    assert "Redis backplane listening" in server.output and "recovered" in server.output
