"""The hub in-process, over real socket pairs: encode once, coalesce, never block."""

from __future__ import annotations

import random
import socket
import string
import subprocess
import sys
import textwrap

import gevent
import pytest
from gevent.event import Event

from chat.connection import Connection
from chat.hub import Backplane, Hub
from chat.protocol import ClientProtocol, Opcode, compress_frame, encode_client_frame, encode_text


class CountingSocket(socket.socket):
    """A real socket that counts its send() calls."""

    sends = 0

    def send(self, data, *flags):
        self.sends += 1
        return super().send(data, *flags)


def pair(hub: Hub, room: str = "", deflate: int | None = None) -> tuple[Connection, socket.socket]:
    """A started Connection on one end of a socket pair; the other end plays the client
    (one that agreed to permessage-deflate with these window bits, if ``deflate``)."""
    ours, theirs = socket.socketpair()
    server_side = CountingSocket(fileno=ours.detach())
    connection = Connection(server_side, hub, room, deflate=deflate)
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


def test_a_flush_sends_each_member_the_plain_frames_or_the_twin_compressed_for_its_window(hub):
    (_, plain), *wide = [pair(hub, deflate=bits) for bits in (None, 15, 15)]
    _, narrow = pair(hub, deflate=10)
    assert hub.deflate_connections == 3
    block = "".join(random.Random(5).choices(string.ascii_lowercase, k=1500))
    messages = [f"{i}: {block * 2}" for i in range(3)] + ["hi"]  # "hi" does not shrink
    for message in messages:
        hub.publish(message)
    gevent.sleep(0)
    expected = b"".join(encode_text(message) for message in messages)
    assert receive_exactly(plain, len(expected)) == expected
    twin = {bits: b"".join(compress_frame(encode_text(message), bits) for message in messages)
            for bits in (15, 10)}
    assert twin[15] != twin[10] and len(twin[15]) < len(expected) * 2 // 3
    for connection, client in wide:
        assert receive_exactly(client, len(twin[15])) == twin[15]
        assert connection.sock.sends == 1  # still one send per client per flush
    assert receive_exactly(narrow, len(twin[10])) == twin[10]
    read = ClientProtocol(deflate=15).receive_data(twin[15])
    assert [event.text for event in read] == messages
    assert hub.deliveries == 16
    assert hub.bytes_out == len(expected) + 2 * len(twin[15]) + len(twin[10])
    wide[0][0].abort()
    assert hub.deflate_connections == 2


def test_the_compressed_twin_is_one_bytes_object_however_many_members_want_it():
    hub = Hub(max_backlog=8 << 20, max_message_size=4 << 20)
    clients = [tcp_pair(hub, server_sndbuf=4096, client_rcvbuf=4096, deflate=15)
               for _ in range(3)]
    hub.publish("".join(random.Random(3).choices(string.ascii_letters, k=1 << 20)))
    gevent.sleep(0)
    queued = [connection._outbox.frames[-1] for connection, _ in clients]
    assert queued[0][0] == 0x80 | 0x40 | 0x1  # FIN, RSV1 (compressed), text
    assert all(frame is queued[0] for frame in queued)


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
        outbox = slow_connection._outbox
        backlog = outbox.size if outbox is not None else 0
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


# -- one client never hurts another ----------------------------------------------------


def tcp_pair(hub: Hub, room: str = "", server_sndbuf: int = 0, client_rcvbuf: int = 0,
             deflate: int | None = None) -> tuple[Connection, socket.socket]:
    """A started Connection on a real loopback TCP connection; small buffers on request,
    so a backlog appears after a few KB instead of a few MB."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if client_rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        client.connect(listener.getsockname())
        server_side, _ = listener.accept()
    if server_sndbuf:
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    connection = Connection(server_side, hub, room, hub.max_message_size, deflate=deflate)
    connection.start()
    client.settimeout(5)
    return connection, client


def test_small_frames_leave_at_once_without_waiting_for_the_clients_ack():
    """Found by tests/test_chaos.py, whose readers waited a median 42.8 ms per step for
    what they were owed, 1.6 ms with TCP_NODELAY on the server's sockets (seed 9, 150
    steps): a joiner's history goes out as one send per frame, and two broadcasts to one
    client in consecutive loop iterations are two sends. With Nagle on, each small send
    behind unacknowledged data waits for the peer's ACK, which Linux delays up to 40 ms."""
    hub = Hub(history=8)
    connection, _ = tcp_pair(hub)
    assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def client_frame(payload: bytes, opcode: int = Opcode.TEXT) -> bytes:
    """A masked client frame of any length, final."""
    return encode_client_frame(opcode, payload)


CLOSE = client_frame((1000).to_bytes(2, "big"), opcode=0x8)


def wait_until(condition, timeout: float = 5.0) -> None:
    """Let the gevent loop run until ``condition()`` holds (bounded)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        gevent.sleep(0.01)
    raise AssertionError("condition not met in time")


def receive_while_the_loop_runs(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    """Read ``size`` bytes without blocking the gevent loop (the sweep and presence
    loops must run while the test waits for what they send)."""
    data = b""
    sock.setblocking(False)
    try:
        for _ in range(int(timeout / 0.01)):
            try:
                data += sock.recv(size - len(data))
            except BlockingIOError:
                gevent.sleep(0.01)
            if len(data) == size:
                return data
    finally:
        sock.settimeout(5)
    raise AssertionError(f"got {data!r} of {size} bytes in time")


def assert_everyone_gets(hub: Hub, clients: list[socket.socket], text: str) -> None:
    hub.publish(text)
    gevent.sleep(0)
    for client in clients:
        assert receive_exactly(client, len(encode_text(text))) == encode_text(text)


def test_a_backlogged_client_that_closes_in_the_same_segment_leaves_the_room_working():
    hub = Hub(max_backlog=50_000)
    others = [pair(hub)[1] for _ in range(5)]
    hostile_connection, hostile = tcp_pair(hub, server_sndbuf=4096, client_rcvbuf=4096)
    hostile.sendall(client_frame(b"b" * 100_000))  # its own echo leaves it a backlog
    wait_until(lambda: hub.messages_received == 1)
    for client in others:
        assert receive_exactly(client, 100_010)[10:] == b"b" * 100_000
    hostile.sendall(client_frame(b"and goodbye") + CLOSE)  # one segment
    wait_until(lambda: not hostile_connection.open)
    assert hostile_connection not in hub.rooms[""] and hub.connections == 5
    assert_everyone_gets(hub, others, "after")


def test_a_client_over_its_rate_that_closes_in_the_same_segment_leaves_the_room_working():
    hub = Hub(rate_limit=1.0, rate_burst=2)
    others = [pair(hub)[1] for _ in range(5)]
    hostile_connection, hostile = tcp_pair(hub)
    hostile.sendall(b"".join(client_frame(b"x%d" % i) for i in range(3)) + CLOSE)
    wait_until(lambda: not hostile_connection.open)
    for client in others:
        assert receive_exactly(client, 2 * 4) == encode_text("x0") + encode_text("x1")
    assert hostile_connection not in hub.rooms[""]
    assert_everyone_gets(hub, others, "after")


class BrokenSocket(socket.socket):
    """A socket whose send fails in a way nobody planned for (not an OSError)."""

    def send(self, data, *flags):
        raise RuntimeError("unexpected failure in send")

    def sendmsg(self, buffers, *args):
        raise RuntimeError("unexpected failure in sendmsg")


def broken_pair(hub: Hub, room: str = "") -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    connection = Connection(BrokenSocket(fileno=ours.detach()), hub, room)
    connection.start()
    return connection, theirs


def test_a_connection_that_fails_in_a_flush_is_dropped_and_the_others_still_get_it():
    hub = Hub()
    before = [pair(hub)[1] for _ in range(3)]
    broken, _ = broken_pair(hub)
    after = [pair(hub)[1] for _ in range(3)]
    for round_ in range(2):
        assert_everyone_gets(hub, before + after, f"round {round_}")
    assert not broken.open and hub.connections == 6
    assert hub.internal_errors == 1


def test_a_connection_that_fails_in_a_sweep_does_not_stop_the_sweep():
    hub = Hub(ping_interval=0.05)
    broken, _ = broken_pair(hub)
    clients = [pair(hub)[1] for _ in range(3)]
    wait_until(lambda: not broken.open)
    for _ in range(2):  # every other client is still pinged, sweep after sweep
        for client in clients:
            assert receive_while_the_loop_runs(client, 2) == b"\x89\x00"
            client.sendall(client_frame(b"", opcode=0xA))  # a pong: still alive
    assert hub.internal_errors == 1


def test_a_connection_that_fails_in_a_presence_notice_does_not_stop_the_notices():
    hub = Hub(presence_notices=True)
    clients = [pair(hub, "general")[1] for _ in range(2)]
    broken, _ = broken_pair(hub, "general")
    wait_until(lambda: not broken.open, timeout=3)  # it failed at the first notice
    for members in (3, 2):  # the first round's count, then the next without it
        notice = encode_text('{"presence":{"room":"general","members":%d}}' % members)
        for client in clients:
            assert receive_while_the_loop_runs(client, len(notice)) == notice
    newcomer = pair(hub, "general")  # a join: the loop goes on, and the next notice says 3
    notice = encode_text('{"presence":{"room":"general","members":3}}')
    for client in clients:
        assert receive_while_the_loop_runs(client, len(notice)) == notice
    assert newcomer[0].open


def test_a_connection_that_fails_at_shutdown_does_not_keep_the_others_from_their_1001():
    hub = Hub()
    before = [pair(hub)[1] for _ in range(2)]
    broken_pair(hub)
    after = [pair(hub)[1] for _ in range(2)]
    hub.close_all()
    for client in before + after:
        header = receive_exactly(client, 4)
        assert header[0] == 0x88 and header[2:] == (1001).to_bytes(2, "big")


def test_an_exception_in_the_message_handler_closes_that_client_with_1011_only():
    def on_message(connection, event):
        if event.text == "boom":
            raise ValueError("the application's bug")
        connection.hub.publish(event.text)

    hub = Hub(on_message=on_message)
    others = [pair(hub)[1] for _ in range(3)]
    faulty_connection, faulty = tcp_pair(hub)
    faulty.sendall(client_frame(b"boom"))
    wait_until(lambda: not faulty_connection.open)
    header = receive_exactly(faulty, 4)
    assert header[0] == 0x88 and header[2:] == (1011).to_bytes(2, "big")
    assert_everyone_gets(hub, others, "still fine")
    assert hub.internal_errors == 1


def test_a_client_gone_before_its_rooms_history_is_sent_is_dropped_and_the_process_lives():
    """Found by tests/test_chaos.py (an RST right after the 101, in a room with history):
    the read watcher was started on the closed socket and libev aborted the process. In a
    child process, because what fails here is the process itself (SIGABRT)."""
    script = textwrap.dedent("""
        import socket
        import gevent
        from chat.connection import Connection
        from chat.hub import Hub

        hub = Hub(history=5)
        hub.publish("before the join")
        gevent.sleep(0)
        ours, theirs = socket.socketpair()
        theirs.close()  # gone: sending it the room's history fails
        Connection(socket.socket(fileno=ours.detach()), hub).start()
        gevent.sleep(0.05)
        print(hub.connections, hub.internal_errors)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == 0, child.stderr[-400:]
    assert child.stdout.split() == ["0", "0"]


def test_a_client_that_reads_everything_is_not_closed_by_one_message_of_the_largest_size():
    """Found while choosing the chaos run's settings (tests/chaos.py): with a 256 KiB
    backlog bound for 1 MiB messages, a client whose kernel send buffer was under ~768 KiB
    got 1008 "slow consumer" for one message of the largest size, though it read at once.
    Loopback hides it (the send buffer grows to ~4 MB); a fresh connection over a real
    network starts with ~46 KB. The defaults now keep one message within the bound."""
    hub = Hub(send_buffer=64 * 1024)  # every other setting is the default
    connection, client = tcp_pair(hub)
    message = "m" * hub.max_message_size
    hub.publish(message)
    frame = encode_text(message)
    assert receive_while_the_loop_runs(client, len(frame)) == frame
    assert connection.open and hub.slow_consumers_closed == 0


def stalled_clients(hub: Hub, count: int) -> list[tuple[Connection, socket.socket]]:
    """Clients whose kernel buffers are already full: everything more is queued by us."""
    clients = [tcp_pair(hub, server_sndbuf=4096, client_rcvbuf=4096) for _ in range(count)]
    filler = "f" * 2000
    for _ in range(40):  # far more than the few KB both kernels hold
        hub.publish(filler)
        gevent.sleep(0)
    assert all(connection._outbox is not None for connection, _ in clients)
    return clients


def test_one_big_message_to_many_stalled_clients_is_held_once_not_per_client():
    import tracemalloc

    size, count = 1 << 20, 100
    hub = Hub(max_backlog=4 * size)
    clients = stalled_clients(hub, count)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        hub.publish("m" * size)
        gevent.sleep(0)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert all(connection.open for connection, _ in clients)
    # The text, its frame, and a few hundred bytes per client; 100 copies would be 100 MB.
    assert grown < 3 * size + count * 1000, grown


def test_joiners_of_a_room_with_a_big_history_share_its_frames():
    import tracemalloc

    hub = Hub(history=10, history_bytes=12 << 20, max_backlog=16 << 20)
    for i in range(10):
        hub.publish(str(i) * (1 << 20))
        gevent.sleep(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        joiners = [tcp_pair(hub, server_sndbuf=4096, client_rcvbuf=4096) for _ in range(20)]
        gevent.sleep(0)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert all(connection._outbox is not None for connection, _ in joiners)
    # 20 joiners x 10 MB of history: a copy each would be 200 MB.
    assert grown < 20 * 20_000, grown


def test_every_client_socket_gets_the_configured_kernel_send_buffer():
    hub = Hub(send_buffer=65536)
    connection, _ = tcp_pair(hub)
    assert connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536  # Linux doubles it


def test_history_keeps_the_newest_messages_that_fit_the_rooms_byte_budget():
    hub = Hub(history=100, history_bytes=10_000)
    for i in range(30):
        hub.publish(f"{i:04d}" + "h" * 996, "r")  # 1,000 characters: 1,004-byte frames
        gevent.sleep(0)
    hub.publish("too big to keep " * 1000, "r")
    gevent.sleep(0)
    _, joiner = pair(hub, "r")
    expected = b"".join(encode_text(f"{i:04d}" + "h" * 996) for i in range(21, 30))
    assert receive_exactly(joiner, len(expected)) == expected
    assert_nothing_to_read(joiner)


def test_history_of_all_rooms_stays_within_the_process_budget_keeping_rooms_in_use():
    hub = Hub(history=100, history_bytes=10_000, history_total_bytes=30_000)
    member, _ = pair(hub, "in use")
    for room in ["in use", *(f"quiet {i}" for i in range(9))]:
        for i in range(8):
            hub.publish("x" * 996, room)
        gevent.sleep(0)
    stats = hub.stats()
    assert stats["history_bytes"] <= 30_000 and stats["history_rooms"] <= 3
    _, joiner = pair(hub, "in use")  # the room with a member kept all of its history
    assert receive_exactly(joiner, 8 * 1000) == encode_text("x" * 996) * 8
    assert member.open


def test_the_idle_rss_is_taken_when_a_client_joins_an_empty_hub_and_only_then(hub):
    assert hub.stats()["idle_rss_bytes"] == 0  # no client yet
    first, first_client = pair(hub)
    baseline = hub.stats()["idle_rss_bytes"]
    assert baseline > 0
    ballast = b"x" * (64 << 20)  # 64 MB more RSS while clients are there
    second, second_client = pair(hub)
    assert hub.stats()["idle_rss_bytes"] == baseline  # the hub was not empty
    for connection, client in ((first, first_client), (second, second_client)):
        connection.abort()
        client.close()
    third, third_client = pair(hub)  # empty again: what the process holds now is idle
    assert hub.stats()["idle_rss_bytes"] >= baseline + (60 << 20)
    third.abort()
    third_client.close()
    del ballast


class Interest(StoredHistory):
    """A stored-history backplane that records what the hub tells it it needs."""

    def __init__(self) -> None:
        super().__init__([])
        self.answer.set()
        self.calls: list[tuple[str, str]] = []

    def watch(self, room):
        self.calls.append(("watch", room))

    def unwatch(self, room):
        self.calls.append(("unwatch", room))


def test_the_backplane_is_told_once_when_a_room_gains_its_first_member_and_loses_its_last():
    interest = Interest()
    hub = Hub(history=10, backplane=interest)
    first, first_client = pair(hub, "a")  # waits for the room's stored history
    second, _ = pair(hub, "a")
    gevent.sleep(0.01)
    assert interest.calls == [("watch", "a")]
    hub.publish("kept", "a")
    gevent.sleep(0)
    first.abort()
    second.abort()
    assert interest.calls == [("watch", "a"), ("unwatch", "a")]
    assert "a" not in hub._history  # missed from now on: read from the store again
    lobby, _ = pair(hub)
    gevent.sleep(0.01)
    lobby.abort()
    assert interest.calls[2:] == [("watch", "")]  # the lobby is always needed once used


def test_a_room_whose_joiners_all_left_while_its_history_loaded_is_unwatched():
    interest = Interest()
    interest.answer.clear()
    hub = Hub(history=10, backplane=interest)
    waiting, _ = pair(hub, "a")
    waiting.abort()
    interest.answer.set()
    gevent.sleep(0.01)
    assert interest.calls == [("watch", "a"), ("unwatch", "a")]
