"""Messages across processes and hosts through a real Redis: every client of every worker
gets every message once, in each sender's order; Redis outages cost no local delivery."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import pytest
import redis

from chat.backplane import (ORIGIN_SIZE, CopyFilter, RedisBackplane, decode_envelope,
                            encode_envelope, history_key, publish, room_channel)
from helpers import ROOT, RedisServer, greenchat_argv
from raw_clients import connect, masked_frame, read_frame
from tcp_proxy import TcpProxy

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


def logged_once(server, text: str, timeout: float = 10.0) -> bool:
    """Wait for a line of the server's output holding ``text`` (bounded); true when
    there is exactly one, else fail with the output."""
    deadline = time.monotonic() + timeout
    while text not in server.output:
        assert time.monotonic() < deadline, f"no {text!r} in the output:\n{server.output}"
        time.sleep(0.05)
    lines = [line for line in server.lines if text in line]
    assert len(lines) == 1, f"{len(lines)} lines hold {text!r}:\n{server.output}"
    return True


def start_greenchat(start_server, redis_url: str, **settings: str):
    """One `greenchat serve` on the Redis at ``redis_url``, with more ``CHAT_*`` settings."""
    return start_server(greenchat_argv(), env={"CHAT_REDIS_URL": redis_url, **settings})


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
    assert "Redis backplane lost" in server.output
    assert "Redis backplane recovered" in server.output


# -- failures: a Redis that stops answering, copies, bounds ---------------------------


def origin_id(origin: bytes, sequence: int) -> bytes:
    return origin + sequence.to_bytes(8, "big")


def test_a_copy_of_a_delivered_message_is_known_by_its_origin_and_sequence():
    copies = CopyFilter()
    first, second = os.urandom(ORIGIN_SIZE), os.urandom(ORIGIN_SIZE)
    assert [copies.seen(origin_id(first, n)) for n in (1, 2, 3)] == [False] * 3
    # The batch of 2 and 3 sent again, interleaved with another origin's messages.
    assert copies.seen(origin_id(second, 7)) is False
    assert [copies.seen(origin_id(first, n)) for n in (2, 3)] == [True, True]
    assert copies.seen(origin_id(second, 7)) is True
    # A gap (messages lost while a subscription was down) is not a copy.
    assert copies.seen(origin_id(first, 9)) is False
    assert copies.seen(origin_id(first, 4)) is True


def test_one_off_ids_from_outside_are_never_copies_and_take_no_room():
    copies = CopyFilter()
    one_off = os.urandom(ORIGIN_SIZE) + bytes(8)
    assert copies.seen(one_off) is False and copies.seen(one_off) is False
    assert not copies.highest


def test_the_filter_forgets_the_origin_heard_least_recently_beyond_its_bound():
    copies = CopyFilter(max_origins=2)
    a, b, c = (os.urandom(ORIGIN_SIZE) for _ in range(3))
    copies.seen(origin_id(a, 1))
    copies.seen(origin_id(b, 1))
    copies.seen(origin_id(a, 2))  # a heard again: b is now the oldest
    copies.seen(origin_id(c, 1))
    assert set(copies.highest) == {a, c}
    assert copies.seen(origin_id(a, 2)) is True
    assert copies.seen(origin_id(b, 1)) is False  # forgotten: taken as new


def get_within(server, path: str, timeout: float = 10.0) -> str:
    """GET ``path``; a server that takes longer than a generous ``timeout`` fails the test."""
    status, body = server.get(path, timeout=timeout)
    assert status == 200, (path, status, body)
    return body


@pytest.mark.slow
def test_a_stopped_workers_report_leaves_though_its_field_never_changes_again(redis_server):
    """Each worker decodes only the report fields written since it last read (reading all
    of them every second grew with the square of the workers); a field nobody writes
    again, a stopped worker's, must still drop out of the figures and of Redis."""
    backplane = RedisBackplane(redis_server.url, channel="reports-test")
    backplane.REPORT_STALE = 2.0
    client = redis.Redis.from_url(redis_server.url)
    key = "reports-test:workers"

    def write(worker: str, pid: int, reported: float) -> None:
        client.hset(key, f"{worker}:0", json.dumps(
            {"pid": pid, "worker": worker, "reported": reported, "connections": pid}))

    write("stays", 2, time.time())
    write("stops", 3, time.time() - 0.5)  # 1.5 s from stale: the first read is well within
    client.hset(key, "not-ours", "{not json")
    backplane._exchange_reports({"pid": 1, "connections": 1})
    first = backplane.cluster_stats()
    assert (first["workers"], first["connections"]) == (3, 6)
    assert not client.hexists(key, "not-ours")

    time.sleep(1.6)  # "stops" is now older than REPORT_STALE; "stays" writes again
    write("stays", 2, time.time())
    backplane._exchange_reports({"pid": 1, "connections": 1})
    second = backplane.cluster_stats()
    assert (second["workers"], second["connections"]) == (2, 3)
    assert [worker["pid"] for worker in second["per_worker"]] == [1, 2]
    assert not client.hexists(key, "stops:0")
    client.close()


def test_reports_read_undecoded_give_every_workers_figures_and_skip_a_broken_one(redis_server):
    """A worker reads everyone's reports every second or two but decodes them only when
    the figures are asked for; what it answers then is what each worker wrote."""
    reader = RedisBackplane(redis_server.url, channel="lazy-test")
    writer = RedisBackplane(redis_server.url, channel="lazy-test")
    writer._exchange_reports({"pid": 2, "connections": 5, "deliveries": 7}, read=False)
    client = redis.Redis.from_url(redis_server.url)
    # the head of one of ours, a body that is not JSON: left out, the others unharmed
    client.hset("lazy-test:workers", "ab:0",
                b'{"reported": %.6f, "worker": "ab", "pid": 3, oops' % time.time())
    reader._exchange_reports({"pid": 1, "connections": 1, "deliveries": 0})
    stats = reader.cluster_stats()
    assert (stats["workers"], stats["connections"], stats["deliveries"]) == (2, 6, 7)
    assert [worker["pid"] for worker in stats["per_worker"]] == [1, 2]
    assert [report["pid"] for report in reader.worker_reports()] == [1, 2]
    client.close()


def test_a_redis_that_stops_answering_is_noticed_logged_once_and_rejoined_when_it_answers(
        start_server, redis_server):
    with TcpProxy(redis_server.port) as proxy:
        frozen_side = start_greenchat(start_server, proxy.url(), CHAT_REDIS_TIMEOUT="2")
        other = start_greenchat(start_server, redis_server.url)
        # Waits 30 s for Redis: whatever it answers while Redis is frozen comes from memory.
        patient = start_greenchat(start_server, proxy.url(), CHAT_REDIS_TIMEOUT="30")
        a, b, _ = connect(frozen_side.port), connect(other.port), connect(patient.port)
        for server in (frozen_side, other, patient):
            server.wait_stats(lambda s: s["backplane_connected"]
                              and s["cluster"]["connections"] == 3)
        a.sendall(masked_frame(b"before"))
        assert texts(a, 1) == ["before"] and texts(b, 1) == ["before"]
        frozen_side.wait_stats(lambda s: s["backplane_pending"] == 0)  # Redis answered

        proxy.freeze()
        # Operators' pages answer at once from the reports last read, and say how old.
        deadline = time.monotonic() + 20
        while True:
            cluster = json.loads(get_within(patient, "/stats"))["cluster"]
            rooms = json.loads(get_within(patient, "/rooms"))
            assert "greenchat_connections" in get_within(patient, "/metrics")
            assert cluster["workers"] == 3 and rooms["total"] == 3
            if cluster["age_s"] > 3:  # its report loop is stuck in a round on frozen Redis
                break
            assert time.monotonic() < deadline, f"the reports were read again: {cluster}"
            time.sleep(0.2)

        lost = frozen_side.wait_stats(lambda s: not s["backplane_connected"], timeout=30)
        assert lost["cluster"]["error"].startswith("Redis unavailable")
        assert logged_once(frozen_side, "Redis backplane lost")
        proxy.thaw()
        frozen_side.wait_stats(lambda s: s["backplane_connected"], timeout=30)
        assert logged_once(frozen_side, "Redis backplane recovered")
        assert logged_once(frozen_side, "Redis backplane lost")

        b.sendall(masked_frame(b"after"))
        assert texts(a, 1) == ["after"] and texts(b, 1) == ["after"]
        a.sendall(masked_frame(b"and back"))
        assert texts(b, 1) == ["and back"]


@pytest.mark.slow
def test_servers_whose_redis_froze_move_to_its_replacement(start_server, redis_server):
    with TcpProxy(redis_server.port) as proxy:
        servers = [start_greenchat(start_server, proxy.url(), CHAT_REDIS_TIMEOUT="2")
                   for _ in range(2)]
        a, b = (connect(server.port) for server in servers)
        for server in servers:
            server.wait_stats(lambda s: s["backplane_connected"])
        proxy.freeze()
        for server in servers:
            server.wait_stats(lambda s: not s["backplane_connected"], timeout=30)
        replacement = RedisServer()
        try:
            proxy.switch(replacement.port)  # the frozen one's connections stay hung
            for server in servers:
                server.wait_stats(lambda s: s["backplane_connected"], timeout=30)
                assert logged_once(server, "Redis backplane recovered")
            a.sendall(masked_frame(b"through the new Redis"))
            assert texts(b, 1) == ["through the new Redis"]
            b.sendall(masked_frame(b"both ways"))
            assert texts(a, 2) == ["through the new Redis", "both ways"]
        finally:
            replacement.stop()


@pytest.mark.slow
def test_a_batch_whose_answer_comes_too_late_is_delivered_and_kept_in_history_once(
        start_server, redis_server):
    history = {"CHAT_HISTORY": "10"}
    with TcpProxy(redis_server.port) as proxy:
        slow_side = start_greenchat(start_server, proxy.url(), CHAT_REDIS_TIMEOUT="2", **history)
        other = start_greenchat(start_server, redis_server.url, **history)
        a, b = connect(slow_side.port, "/rooms/dup"), connect(other.port, "/rooms/dup")
        for server in (slow_side, other):
            server.wait_stats(lambda s: s["backplane_connected"])
        a.sendall(masked_frame(b"before"))
        assert texts(b, 1) == ["before"]
        slow_side.wait_stats(lambda s: s["backplane_pending"] == 0)  # Redis answered

        proxy.hold_replies()  # Redis applies what it gets; its answers wait
        a.sendall(masked_frame(b"once"))
        assert texts(b, 1) == ["once"]  # applied
        slow_side.wait_stats(lambda s: s["backplane_publish_failures"] >= 1)  # timed out
        proxy.release_replies()  # the batch goes again, and Redis applies it again
        a.sendall(masked_frame(b"after"))
        assert texts(b, 1) == ["after"]
        assert nothing_more(b)
        assert other.stats()["backplane_duplicates"] == 1
        stream = redis.Redis.from_url(redis_server.url).xrange(history_key("greenchat", "dup"))
        assert len(stream) == 4  # the copy is in Redis; the readers below skip it

        expected = ["before", "once", "after"]
        assert texts(connect(other.port, "/rooms/dup"), 3) == expected  # its memory
        fresh = start_greenchat(start_server, redis_server.url, **history)
        joiner = connect(fresh.port, "/rooms/dup")  # reads the stream
        assert texts(joiner, 3) == expected
        assert nothing_more(joiner)


def test_what_waits_for_redis_is_bounded_in_bytes_and_the_excess_counted(start_server,
                                                                         redis_server):
    server = start_greenchat(start_server, redis_server.url, CHAT_REDIS_QUEUE_BYTES="100000")
    sender = connect(server.port)
    server.wait_stats(lambda s: s["backplane_connected"])
    redis_server.stop()
    server.wait_stats(lambda s: not s["backplane_connected"])
    message = b"x" * 30_000
    for _ in range(10):
        sender.sendall(masked_frame(message))
    stats = server.wait_stats(lambda s: s["messages_published"] == 10)
    assert stats["backplane_pending"] == 3 and stats["backplane_dropped"] == 7
    assert 90_000 < stats["backplane_pending_bytes"] <= 100_000
    assert texts(sender, 10) == [message.decode()] * 10  # local delivery lost nothing

    redis_server.restart()
    stats = server.wait_stats(lambda s: s["backplane_pending"] == 0, timeout=30)
    assert stats["backplane_published"] == 3 and stats["backplane_pending_bytes"] == 0


@pytest.mark.slow
def test_a_rooms_history_expires_from_redis_when_the_room_goes_quiet(start_server,
                                                                     redis_server):
    settings = {"CHAT_HISTORY": "10", "CHAT_HISTORY_TTL": "1"}
    server = start_greenchat(start_server, redis_server.url, **settings)
    member = connect(server.port, "/rooms/quiet")
    server.wait_stats(lambda s: s["backplane_connected"])
    member.sendall(masked_frame(b"soon forgotten"))
    assert texts(member, 1) == ["soon forgotten"]
    client = redis.Redis.from_url(redis_server.url)
    key = history_key("greenchat", "quiet")
    server.wait_stats(lambda s: s["backplane_published"] == 1)
    expiry = client.pttl(key)  # -1: no expiry; -2: gone already (a slow machine)
    assert expiry == -2 or 0 < expiry <= 1000, expiry
    deadline = time.monotonic() + 10
    while client.exists(key):
        assert time.monotonic() < deadline, "the stream did not expire"
        time.sleep(0.1)
    joiner = connect(start_greenchat(start_server, redis_server.url, **settings).port,
                     "/rooms/quiet")
    assert nothing_more(joiner, wait=1.0), "a joiner got an expired history"
    # A message from outside the servers sets the expiry too.
    publish(redis_server.url, "from outside", "quiet", history=10, history_ttl=60)
    assert texts(joiner, 1) == ["from outside"]
    assert 0 < client.pttl(key) <= 60_000


# -- interest: a channel per room, subscribed while the process has a member there ----


def test_rooms_channel_and_history_share_a_cluster_hash_tag_whatever_the_room_name():
    for room in ("", "general", "@alice", "a{b}c", "}{", "%7B"):
        channel, stream = room_channel("greenchat", room), history_key("greenchat", room)
        tag = channel[channel.index("{") + 1:channel.index("}")]
        assert tag and stream[stream.index("{") + 1:stream.index("}")] == tag
    names = ("", "lobby", "a{b}c", "a%7Bb%7Dc", "}{", "%7D%7B")
    assert len({room_channel("greenchat", room) for room in names}) == len(names)
    # A channel setting with braces gives no tag of its own to its rooms' keys.
    assert room_channel("chat{1}", "x").index("{") == room_channel("chat{1}", "x").index("{#")


def published_through(server, count: int) -> None:
    """Wait until ``server``'s backplane has published ``count`` messages (Redis took them)."""
    server.wait_stats(lambda s: s["backplane_published"] == count)


def test_a_process_hears_only_the_rooms_it_has_members_in_and_starts_when_one_joins(
        start_server, redis_server):
    speaker_side = start_greenchat(start_server, redis_server.url)
    listener_side = start_greenchat(start_server, redis_server.url)
    speakers = {room: connect(speaker_side.port, f"/rooms/{room}") for room in ("busy", "shared")}
    shared = connect(listener_side.port, "/rooms/shared")
    listener_side.wait_stats(lambda s: s["backplane_rooms"] == 1)
    speaker_side.wait_stats(lambda s: s["backplane_rooms"] == 2)

    for number in range(5):
        speakers["busy"].sendall(masked_frame(f"busy {number}".encode()))
    speakers["shared"].sendall(masked_frame(b"marker"))
    # One publisher, one Redis connection, one order: once the marker is in, all is.
    assert texts(shared, 1) == ["marker"]
    assert listener_side.stats()["backplane_received"] == 1

    joiner = connect(listener_side.port, "/rooms/busy")
    listener_side.wait_stats(lambda s: s["backplane_rooms"] == 2)
    speakers["busy"].sendall(masked_frame(b"now heard"))
    assert texts(joiner, 1) == ["now heard"]
    assert listener_side.stats()["backplane_received"] == 2

    joiner.close()  # the last member leaves: the process stops hearing the room
    listener_side.wait_stats(lambda s: s["backplane_rooms"] == 1 and s["connections"] == 1)
    speakers["busy"].sendall(masked_frame(b"not heard"))
    speakers["shared"].sendall(masked_frame(b"second marker"))
    assert texts(shared, 1) == ["second marker"]
    assert listener_side.stats()["backplane_received"] == 3


def test_outside_publishers_reach_the_lobby_on_the_base_channel_and_rooms_on_theirs(
        start_server, redis_server):
    server = start_greenchat(start_server, redis_server.url)
    lobby, room = connect(server.port, "/"), connect(server.port, "/rooms/ops")
    server.wait_stats(lambda s: s["backplane_rooms"] == 2)
    client = redis.Redis.from_url(redis_server.url)
    client.publish("greenchat", "to everyone")  # README's redis-cli line
    publish(redis_server.url, "to ops", "ops")
    client.publish(room_channel("greenchat", "ops"), "plain text on the room's channel")
    assert texts(lobby, 1) == ["to everyone"]
    assert texts(room, 2) == ["to ops", "plain text on the room's channel"]
    assert nothing_more(lobby)


def publish_numbers(url: str, room: str, stop: threading.Event, limit: int = 20_000) -> list[int]:
    """Publish 1, 2, 3... to ``room`` (with history) from outside the servers, in order,
    until ``stop`` is set (or ``limit``); returns what was published."""
    sent: list[int] = []
    client = redis.Redis.from_url(url)
    while not stop.is_set() and len(sent) < limit:
        number = len(sent) + 1
        envelope = encode_envelope(os.urandom(ORIGIN_SIZE) + bytes(8), room, str(number))
        pipe = client.pipeline(transaction=True)
        pipe.xadd(history_key("greenchat", room), {"m": envelope}, maxlen=100_000)
        pipe.publish(room_channel("greenchat", room), envelope)
        pipe.execute()
        sent.append(number)
    client.close()
    return sent


def test_joiners_amid_a_stream_of_messages_get_each_once_with_no_gap_even_rejoining_at_once(
        start_server, redis_server):
    server = start_greenchat(start_server, redis_server.url, CHAT_HISTORY="100000")
    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(
        publish_numbers(redis_server.url, "stream", stop)))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        for join in range(30):
            # Alone in the room: each join subscribes its channel and reads its history,
            # each close unsubscribes it; the next join comes at once (churn).
            joiner = connect(server.port, "/rooms/stream")
            joiner.settimeout(10)
            numbers: list[int] = []
            while len(numbers) < 50 or numbers[-1] < 20:  # history, then live ones
                opcode, payload = read_frame(joiner)
                numbers.append(int(payload))
            assert numbers == list(range(1, len(numbers) + 1)), f"join {join}: {numbers}"
            joiner.close()
            assert time.monotonic() < deadline
    finally:
        stop.set()
        thread.join(10)
    assert result and len(result[0]) > 50


def test_after_a_redis_restart_every_watched_room_is_subscribed_again(start_server,
                                                                      redis_server):
    server = start_greenchat(start_server, redis_server.url)
    members = [connect(server.port, f"/rooms/r{number}") for number in range(3)]
    server.wait_stats(lambda s: s["backplane_rooms"] == 3)
    redis_server.restart()
    server.wait_stats(lambda s: s["backplane_reconnects"] == 1 and s["backplane_rooms"] == 3,
                      timeout=30)
    for number, member in enumerate(members):
        publish(redis_server.url, f"after the restart {number}", f"r{number}")
        assert texts(member, 1) == [f"after the restart {number}"]


def test_a_joiner_while_the_subscription_is_down_gets_history_then_live_with_no_gap(
        start_server, redis_server):
    server = start_greenchat(start_server, redis_server.url, CHAT_HISTORY="100000")
    connect(server.port, "/")  # starts the backplane
    server.wait_stats(lambda s: s["backplane_connected"])
    redis_server.stop()
    server.wait_stats(lambda s: not s["backplane_connected"])
    time.sleep(2)  # the subscriber's retry delay grows past a second
    redis_server.restart()
    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(
        publish_numbers(redis_server.url, "stream", stop)))
    thread.start()
    try:
        # The commands' connection is back at once, the subscription after its delay:
        # the history read must wait for the room's subscription, or what is published
        # in between reaches neither the stream read nor the joiner live.
        joiner = connect(server.port, "/rooms/stream")
        assert not server.stats()["backplane_connected"], "the subscription came back too soon"
        joiner.settimeout(10)
        numbers: list[int] = []
        while len(numbers) < 50 or not server.stats()["backplane_connected"]:
            opcode, payload = read_frame(joiner)
            numbers.append(int(payload))
            assert len(numbers) < 20_000
        for _ in range(50):  # live ones, after the subscription is back
            numbers.append(int(read_frame(joiner)[1]))
    finally:
        stop.set()
        thread.join(10)
    assert numbers == list(range(1, len(numbers) + 1))
