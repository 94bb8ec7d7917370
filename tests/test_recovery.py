"""Users and recovery end to end: `greenchat serve` processes sharing a real Redis.

A JSON client that drops, misses messages and comes back with the last id it saw gets
exactly what it missed from the room's history, then live ones; one whose id fell out
of the history is told so. A message to a user reaches every connection of that
identity, on every server, plain or JSON.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time

import pytest

from chat.backplane import publish
from helpers import ROOT, greenchat_argv
from raw_clients import connect, masked_frame, read_frame
from test_rooms import post


class JsonClient:
    """A blocking client of the JSON endpoint (the test process runs no gevent loop)."""

    def __init__(self, port: int, path: str = "/ws") -> None:
        self.sock = connect(port, path)

    def send(self, body: dict) -> None:
        self.sock.sendall(masked_frame(json.dumps(body).encode()))

    def events(self, count: int, timeout: float = 10.0) -> list[dict]:
        self.sock.settimeout(timeout)
        received = []
        for _ in range(count):
            opcode, payload = read_frame(self.sock)
            assert opcode == 0x1, (opcode, payload)
            received.append(json.loads(payload))
        return received

    def join(self, room: str, since: str | None = None, history: int = 0) -> list[dict]:
        """Join; returns ``joined`` and the ``history`` messages replayed after it."""
        self.send({"op": "join", "room": room, **({"since": since} if since else {})})
        return self.events(1 + history)

    def nothing_more(self, wait: float = 0.3) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, socket.timeout):
            return True

    def close(self) -> None:
        self.sock.close()


def texts(events: list[dict]) -> list[str]:
    return [event["text"] for event in events]


def start_servers(start_server, redis_url: str, count: int, argv: list[str] | None = None,
                  **settings: str) -> list:
    env = {"CHAT_REDIS_URL": redis_url, **settings}
    servers = [start_server(argv or greenchat_argv(), env=env) for _ in range(count)]
    for server in servers:
        server.wait_stats(lambda s: s["backplane_connected"])
    return servers


@pytest.mark.slow
def test_a_client_back_with_its_last_id_gets_exactly_what_it_missed_then_live_ones(
        start_server, redis_server):
    first, second = start_servers(start_server, redis_server.url, 2, CHAT_HISTORY="50")
    reader = JsonClient(first.port)
    reader.join("general")
    for i in range(3):
        publish(redis_server.url, f"seen {i}", "general", history=50)
    seen = reader.events(3)
    assert texts(seen) == [f"seen {i}" for i in range(3)]
    reader.close()  # gone: what comes now it misses
    first.wait_stats(lambda s: s["connections"] == 0)
    for i in range(7):
        publish(redis_server.url, f"missed {i}", "general", history=50)
    back = JsonClient(second.port)  # another server, as after a deploy
    joined, *missed = back.join("general", since=seen[-1]["id"], history=7)
    assert joined == {"type": "joined", "room": "general", "recovered": True}
    assert texts(missed) == [f"missed {i}" for i in range(7)]
    publish(redis_server.url, "live", "general", history=50)
    assert texts(back.events(1)) == ["live"]
    assert back.nothing_more()
    ids = [event["id"] for event in seen + missed]
    assert len(set(ids)) == len(ids)


@pytest.mark.slow
def test_a_client_whose_last_id_fell_out_of_the_history_is_told_and_gets_all_of_it(
        start_server, redis_server):
    (server,) = start_servers(start_server, redis_server.url, 1, CHAT_HISTORY="5")
    reader = JsonClient(server.port)
    reader.join("busy")
    publish(redis_server.url, "old", "busy", history=5)
    (old,) = reader.events(1)
    reader.close()
    for i in range(8):
        publish(redis_server.url, f"new {i}", "busy", history=5)
    back = JsonClient(server.port)
    joined, *history = back.join("busy", since=old["id"], history=5)
    assert joined == {"type": "joined", "room": "busy", "recovered": False}
    assert texts(history) == [f"new {i}" for i in range(3, 8)]
    assert back.nothing_more()


@pytest.mark.slow
def test_a_message_to_a_user_reaches_each_of_its_connections_on_every_server(
        start_server, redis_server):
    argv = [sys.executable, str(ROOT / "tests" / "auth_app.py")]
    first, second = start_servers(start_server, redis_server.url, 2, argv,
                                  CHAT_PUBLISH_TOKEN="s3cret")
    alice_json = JsonClient(first.port, "/ws?token=letmein&user=alice")
    alice_plain = connect(second.port, "/rooms/general?token=letmein&user=alice")
    bob = JsonClient(second.port, "/ws?token=letmein&user=bob")
    first.wait_stats(lambda s: s["cluster"]["connections"] == 3)
    assert post(first, "/users/alice/messages", b"no token") == 401
    assert post(first, "/users/alice/messages", "for alice".encode(), token="s3cret") == 204
    (event,) = alice_json.events(1)
    assert (event["room"], event["text"]) == ("@alice", "for alice")
    alice_plain.settimeout(10)
    assert read_frame(alice_plain) == (0x1, b"for alice")
    assert bob.nothing_more()
    assert first.get_json("/rooms") == {"rooms": {"general": 1}, "total": 1}


def publish_steadily(port: int, room: str, count: int, interval: float,
                     done: threading.Event) -> threading.Thread:
    """A plain client of ``port`` saying ``m0``... ``m<count-1>`` in ``room``, one every
    ``interval`` s, in a thread (its echoes are left unread: a few KB)."""
    sock = connect(port, f"/rooms/{room}")

    def run() -> None:
        try:
            for i in range(count):
                sock.sendall(masked_frame(f"m{i}".encode()))
                time.sleep(interval)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def read_messages(client: JsonClient, into: list[dict], until: int, timeout: float) -> None:
    """Append ``message`` events to ``into`` until it holds ``until`` of them, the server
    goes away (a close frame, EOF, a reset) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while len(into) < until and (left := deadline - time.monotonic()) > 0:
        client.sock.settimeout(left)
        try:
            opcode, payload = read_frame(client.sock)
        except (ConnectionError, OSError):
            return
        if opcode == 0x8:
            return
        event = json.loads(payload)
        assert event["type"] == "message", event
        into.append(event)


@pytest.mark.slow
def test_a_reader_whose_server_is_stopped_then_killed_mid_publishing_misses_nothing(
        start_server, redis_server):
    """The issue's restart test: while another server's client publishes, the reader's
    server gets SIGTERM, then its replacement kill -9; each time the reader comes back
    to a new server with its last id. Within the history: 0 lost, 0 duplicated."""
    settings = {"CHAT_HISTORY": "1000"}
    publisher_server, server = start_servers(start_server, redis_server.url, 2, **settings)
    reader = JsonClient(server.port)
    reader.join("general")
    done = threading.Event()
    count = 300
    publish_steadily(publisher_server.port, "general", count, 0.01, done)
    received: list[dict] = []
    joins = []
    for stop_with in (signal.SIGTERM, signal.SIGKILL):
        read_messages(reader, received, len(received) + 50, timeout=20)
        server.stop(stop_with)
        read_messages(reader, received, count, timeout=5)  # what was sent before the end
        reader.close()
        (server,) = start_servers(start_server, redis_server.url, 1, **settings)
        reader = JsonClient(server.port)
        reader.send({"op": "join", "room": "general", "since": received[-1]["id"]})
        joins.append(reader.events(1)[0])
    assert joins == [{"type": "joined", "room": "general", "recovered": True}] * 2
    read_messages(reader, received, count, timeout=30)
    assert done.wait(10)
    texts_received = texts(received)
    lost = set(f"m{i}" for i in range(count)) - set(texts_received)
    duplicated = len(texts_received) - len(set(texts_received))
    assert (len(lost), duplicated) == (0, 0), (sorted(lost), duplicated)
    assert texts_received == [f"m{i}" for i in range(count)]
    assert reader.nothing_more()


@pytest.mark.slow
def test_presence_lists_the_identities_of_a_rooms_members_on_every_server(
        start_server, redis_server):
    argv = [sys.executable, str(ROOT / "tests" / "auth_app.py")]
    first, second = start_servers(start_server, redis_server.url, 2, argv,
                                  CHAT_PRESENCE_NOTICES="true", CHAT_PRESENCE_USERS="true")
    alice = JsonClient(first.port, "/ws?token=letmein&user=alice")
    alice.join("general")
    bob = connect(second.port, "/rooms/general?token=letmein&user=bob")
    anonymous = connect(second.port, "/rooms/general?token=letmein")
    deadline = time.monotonic() + 15
    last = None
    while last != {"type": "presence", "room": "general", "members": 3,
                   "users": ["alice", "bob"]}:
        assert time.monotonic() < deadline, f"last presence event: {last}"
        (last,) = alice.events(1, timeout=deadline - time.monotonic())
    bob.close()
    anonymous.close()
