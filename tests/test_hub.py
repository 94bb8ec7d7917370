"""The hub in-process, over real socket pairs: encode once, coalesce, never block."""

from __future__ import annotations

import socket

import gevent
import pytest
from gevent.event import Event

from chat.connection import Connection
from chat.hub import Backplane, Hub
from chat.protocol import encode_text


class CountingSocket(socket.socket):
    """A real socket that counts its send() calls."""

    sends = 0

    def send(self, data, *flags):
        self.sends += 1
        return super().send(data, *flags)


def pair(hub: Hub, room: str = "") -> tuple[Connection, socket.socket]:
    """A started Connection on one end of a socket pair; the other end plays the client."""
    ours, theirs = socket.socketpair()
    server_side = CountingSocket(fileno=ours.detach())
    connection = Connection(server_side, hub, room)
    connection.start()
    theirs.settimeout(5)
    return connection, theirs


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def assert_nothing_to_read(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(100)


@pytest.fixture
def hub() -> Hub:
    return Hub(max_backlog=64 * 1024)


def test_a_burst_published_in_one_iteration_is_one_send_per_client(hub):
    clients = [pair(hub) for _ in range(5)]
    for i in range(10):
        hub.publish(f"message {i}")
    gevent.sleep(0)  # one loop iteration: the flush callback runs
    expected = b"".join(encode_text(f"message {i}") for i in range(10))
    for connection, client in clients:
        assert receive_exactly(client, len(expected)) == expected
        assert connection.sock.sends == 1
    assert hub.deliveries == 50


def test_publish_returns_before_anything_is_sent(hub):
    connection, client = pair(hub)
    hub.publish("later")
    assert connection.sock.sends == 0
    gevent.sleep(0)
    assert connection.sock.sends == 1


def test_rooms_are_isolated(hub):
    (_, in_a), (_, in_b) = pair(hub, "a"), pair(hub, "b")
    hub.publish("for a", "a")
    gevent.sleep(0)
    assert receive_exactly(in_a, len(encode_text("for a"))) == encode_text("for a")
    assert_nothing_to_read(in_b)


def test_a_client_that_stops_reading_is_closed_and_the_others_get_everything(hub):
    slow_connection, slow = pair(hub)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    fast_connection, fast = pair(hub)
    message = "x" * 8000
    frame = encode_text(message)
    received = b""
    for _ in range(200):  # far more than the kernel buffers plus the 64 KiB backlog
        hub.publish(message)
        gevent.sleep(0)
        received += receive_exactly(fast, len(frame))
    assert received == frame * 200
    assert hub.slow_consumers_closed == 1
    assert not slow_connection.open
    assert fast_connection.open
    assert hub.connections == 1


def test_a_slow_consumer_backlog_stays_bounded(hub):
    slow_connection, slow = pair(hub)
    for _ in range(100):
        hub.publish("y" * 8000)
        gevent.sleep(0)
        backlog = slow_connection._backlog_size
        assert backlog <= hub.max_backlog + 8000 + 64, backlog


class StoredHistory(Backplane):
    """A backplane that keeps history elsewhere and answers its read when told to, so a
    test can put live messages exactly where the read is slow (Redis, in production)."""

    stores_history = True

    def __init__(self, stored: list[tuple[bytes, str]]) -> None:
        self.stored = stored
        self.answer = Event()

    def load_history(self, room, count):
        self.answer.wait(5)
        return self.stored[-count:]


def frames(*texts: str) -> bytes:
    return b"".join(encode_text(text) for text in texts)


def message_id(number: int) -> bytes:
    return number.to_bytes(24, "big")


def test_a_joiner_gets_stored_and_live_messages_once_whichever_arrives_first():
    store = StoredHistory([(message_id(i), f"m{i}") for i in range(5)])
    hub = Hub(history=100, backplane=store)
    hub.deliver("m2", "", message_id(2))  # heard live before anyone joined: the store has it
    gevent.sleep(0)
    _, joiner = pair(hub)  # waits for the store's answer
    hub.deliver("m3", "", message_id(3))  # live while the read is on its way, stored too
    gevent.sleep(0)
    store.answer.set()
    gevent.sleep(0.01)
    hub.deliver("m4", "", message_id(4))  # the late live copy of a stored one: skipped
    hub.deliver("m5", "", message_id(5))
    gevent.sleep(0)
    expected = frames("m0", "m1", "m2", "m3", "m4", "m5")
    assert receive_exactly(joiner, len(expected)) == expected
    assert_nothing_to_read(joiner)


def test_history_in_memory_keeps_the_newest_frames_of_each_room():
    hub = Hub(history=3)
    for i in range(5):
        hub.publish(f"a{i}", "a")
        hub.publish(f"b{i}", "b")
    gevent.sleep(0)
    _, joiner = pair(hub, "a")
    expected = frames("a2", "a3", "a4")
    assert receive_exactly(joiner, len(expected)) == expected


def test_a_message_from_outside_greenchat_has_no_id_and_is_never_skipped():
    store = StoredHistory([(None, "foreign old"), (message_id(1), "m1")])
    hub = Hub(history=100, backplane=store)
    _, joiner = pair(hub)
    store.answer.set()
    gevent.sleep(0.01)
    hub.deliver("foreign new", "", None)  # redis-cli PUBLISH: no envelope, no id
    gevent.sleep(0)
    expected = frames("foreign old", "m1", "foreign new")
    assert receive_exactly(joiner, len(expected)) == expected


class UnreachableOnce(StoredHistory):
    """A store whose first read fails, as Redis does while it restarts."""

    def load_history(self, room, count):
        if not self.answer.is_set():
            self.answer.set()
            raise ConnectionError("Redis is restarting")
        return super().load_history(room, count)


def test_a_failed_history_read_is_tried_again_at_the_next_join():
    store = UnreachableOnce([(message_id(1), "before the outage")])
    hub = Hub(history=100, backplane=store)
    first_connection, first = pair(hub)
    gevent.sleep(0.01)
    assert first_connection in hub.rooms[""]  # let in without history
    _, second = pair(hub)
    gevent.sleep(0.01)
    assert receive_exactly(second, len(frames("before the outage"))) == frames("before the outage")
    assert_nothing_to_read(first)


def test_rooms_read_from_the_store_are_forgotten_past_the_bound_once_empty(monkeypatch):
    monkeypatch.setattr("chat.hub.MAX_HISTORY_ROOMS", 5)
    store = StoredHistory([])
    store.answer.set()
    hub = Hub(history=10, backplane=store)
    for i in range(20):
        connection, _ = pair(hub, f"room {i}")
        gevent.sleep(0.01)
        connection.abort()
    assert hub.stats()["history_rooms"] <= 6


def test_a_client_waiting_for_a_rooms_history_counts_and_is_closed_on_shutdown():
    store = StoredHistory([])  # its answer never comes
    hub = Hub(history=10, backplane=store, max_connections=1)
    _, waiting = pair(hub)
    gevent.sleep(0)
    assert hub.full
    assert hub.close_all() == 1
    header = receive_exactly(waiting, 4)
    assert header[0] == 0x88 and header[2:] == (1001).to_bytes(2, "big")  # a close, 1001
