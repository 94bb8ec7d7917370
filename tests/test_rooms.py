"""Named rooms: isolation, presence, history at the join seam, and the publish API, in one
process and across processes sharing Redis."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import ROOT, greenchat_argv
from raw_clients import connect, masked_frame
from test_backplane import clients_on_both_workers, nothing_more, start_two_workers, texts


def send_all(sock: socket.socket, messages: list[str]) -> None:
    sock.sendall(b"".join(masked_frame(m.encode()) for m in messages))


def reset(sock: socket.socket) -> None:
    """Close abruptly: an RST, no close frame."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_json(server, path: str, expected: dict, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := server.get_json(path)) != expected:
        assert time.monotonic() < deadline, f"{path} is {seen}, expected {expected}"
        time.sleep(0.05)


def post(server, path: str, body: bytes, token: str | None = None) -> int:
    request = urllib.request.Request(server.url + path, data=body, method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_message_in_a_room_reaches_its_members_only(greenchat):
    a1, a2 = connect(greenchat.port, "/rooms/a"), connect(greenchat.port, "/rooms/a")
    b, lobby = connect(greenchat.port, "/rooms/b"), connect(greenchat.port, "/")
    greenchat.wait_stats(lambda s: s["connections"] == 4)
    send_all(a1, ["for room a"])
    assert texts(a1, 1) == texts(a2, 1) == ["for room a"]
    assert nothing_more(b) and nothing_more(lobby)


def test_the_room_named_lobby_is_the_root_endpoint(greenchat):
    named, root = connect(greenchat.port, "/rooms/lobby"), connect(greenchat.port, "/")
    greenchat.wait_stats(lambda s: s["connections"] == 2)
    send_all(root, ["from /"])
    assert texts(named, 1) == texts(root, 1) == ["from /"]
    send_all(named, ["from /rooms/lobby"])
    assert texts(named, 1) == texts(root, 1) == ["from /rooms/lobby"]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/rooms/", "/rooms/two%20words", "/rooms/" + "x" * 65,
                                  "/rooms/a/b", "/rooms/caf%C3%A9"])
def test_a_bad_room_name_gets_404_before_any_upgrade(greenchat, path):
    with pytest.raises(ConnectionError, match="HTTP/1.1 404"):
        connect(greenchat.port, path)
    assert greenchat.stats()["connections"] == 0


def test_presence_follows_joins_clean_closes_and_resets(greenchat):
    members = [connect(greenchat.port, "/rooms/general") for _ in range(3)]
    lobby = connect(greenchat.port, "/")
    wait_json(greenchat, "/rooms", {"rooms": {"general": 3, "lobby": 1}, "total": 4})
    assert greenchat.get_json("/rooms/general") == {"room": "general", "members": 3}
    assert greenchat.get_json("/rooms/nobody-here") == {"room": "nobody-here", "members": 0}

    members[0].sendall(masked_frame(b"\x03\xe8", opcode=0x8))  # a clean close, 1000
    reset(members[1])
    wait_json(greenchat, "/rooms/general", {"room": "general", "members": 1})
    lobby.close()
    wait_json(greenchat, "/rooms", {"rooms": {"general": 1}, "total": 1})


@pytest.mark.slow
def test_presence_counts_the_members_of_every_worker(start_server, redis_server):
    server = start_two_workers(start_server, redis_server.url)
    clients = clients_on_both_workers(server)
    in_room = [connect(server.port, "/rooms/team") for _ in range(7)]
    expected = {"rooms": {"lobby": len(clients), "team": 7}, "total": len(clients) + 7}
    # Each request reaches one worker or the other: both must answer the global count.
    for _ in range(6):
        wait_json(server, "/rooms", expected)
    for sock in in_room[:4]:
        reset(sock)
    for _ in range(6):
        wait_json(server, "/rooms/team", {"room": "team", "members": 3})


def burst_with_a_joiner(sender_port: int, joiner_port: int, path: str, before: int = 1000,
                        after: int = 500, most: int = 4000) -> tuple[list[str], socket.socket]:
    """Send to ``path`` in a steady stream, have a client join it after ``before``
    messages, and go on for ``after`` more (at most ``most`` in all)."""
    sender = connect(sender_port, path)
    messages: list[str] = []
    joined = threading.Event()

    def send() -> None:
        remaining = after
        while remaining > 0 and len(messages) < most:
            batch = [f"message {len(messages) + i}" for i in range(10)]
            messages.extend(batch)
            send_all(sender, batch)
            if joined.is_set():
                remaining -= len(batch)
            time.sleep(0.0005)

    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 10
    while len(messages) < before and time.monotonic() < deadline:
        time.sleep(0.001)
    joiner = connect(joiner_port, path)
    joined.set()
    thread.join(30)
    assert not thread.is_alive()
    assert texts(sender, len(messages)) == messages  # the sender's own echo, drained
    return messages, joiner


def test_a_joiner_mid_burst_gets_every_message_once_in_order_from_history_then_live(
        start_server):
    server = start_server(greenchat_argv(), env={"CHAT_HISTORY": "5000"})
    messages, joiner = burst_with_a_joiner(server.port, server.port, "/rooms/seam")
    assert texts(joiner, len(messages)) == messages
    assert nothing_more(joiner)


def test_history_keeps_the_newest_messages_of_each_room_only(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_HISTORY": "5"})
    sender = connect(server.port, "/rooms/short")
    send_all(sender, [f"old {i}" for i in range(20)])
    texts(sender, 20)
    send_all(connect(server.port, "/"), ["lobby talk"])
    joiner = connect(server.port, "/rooms/short")
    assert texts(joiner, 5) == [f"old {i}" for i in range(15, 20)]
    assert nothing_more(joiner)


def test_without_history_a_joiner_hears_only_what_comes_after_it(greenchat):
    sender = connect(greenchat.port, "/rooms/quiet")
    send_all(sender, ["before"])
    texts(sender, 1)
    joiner = connect(greenchat.port, "/rooms/quiet")
    greenchat.wait_stats(lambda s: s["connections"] == 2)
    send_all(sender, ["after"])
    assert texts(joiner, 1) == ["after"]


@pytest.mark.slow
def test_history_in_redis_outlives_the_server_and_is_shared_by_every_server(
        start_server, redis_server):
    env = {"CHAT_REDIS_URL": redis_server.url, "CHAT_HISTORY": "50"}
    first = start_server(greenchat_argv(), env=env)
    sender = connect(first.port, "/rooms/kept")
    send_all(sender, ["one", "two", "three"])
    assert texts(sender, 3) == ["one", "two", "three"]
    first.wait_stats(lambda s: s["backplane_connected"])
    second = start_server(greenchat_argv(), env=env)
    assert texts(connect(second.port, "/rooms/kept"), 3) == ["one", "two", "three"]
    sender.close()
    first.stop()

    restarted = start_server(greenchat_argv(), env=env)
    restarted.wait_stats(lambda s: s["backplane_connected"])
    # Said while nobody is in the room on the restarted server: it hears nothing of it
    # (it subscribes rooms with members only), and the stream has it.
    # (The speaker stays open: closed with its history unread, it would send a reset,
    # which can make the kernel drop "four" before the server reads it.)
    speaker = connect(second.port, "/rooms/kept")
    send_all(speaker, ["four"])
    second.wait_stats(lambda s: s["backplane_published"] == 1)
    assert restarted.stats()["backplane_received"] == 0
    joiner = connect(restarted.port, "/rooms/kept")
    assert texts(joiner, 4) == ["one", "two", "three", "four"]
    assert nothing_more(joiner)
    assert nothing_more(connect(restarted.port, "/rooms/other"))


@pytest.mark.slow
def test_a_joiner_on_another_server_mid_burst_gets_every_message_once_in_order(
        start_server, redis_server):
    env = {"CHAT_REDIS_URL": redis_server.url, "CHAT_HISTORY": "5000"}
    first, second = start_server(greenchat_argv(), env=env), start_server(greenchat_argv(), env=env)
    # Let the second server subscribe first, or its joiner would only have the stream.
    warm = connect(second.port, "/")
    second.wait_stats(lambda s: s["backplane_connected"])
    messages, joiner = burst_with_a_joiner(first.port, second.port, "/rooms/seam")
    assert texts(joiner, len(messages)) == messages
    assert nothing_more(joiner) and nothing_more(warm)


def test_the_publish_api_is_off_without_a_token(greenchat):
    assert post(greenchat, "/rooms/a/messages", b"hello", token="") == 404


def test_the_publish_api_checks_the_token_size_and_encoding_then_reaches_the_room(
        start_server):
    server = start_server(greenchat_argv(), env={"CHAT_PUBLISH_TOKEN": "s3cret",
                                                 "CHAT_MAX_MESSAGE_SIZE": "1000"})
    member, outsider = connect(server.port, "/rooms/news"), connect(server.port, "/")
    server.wait_stats(lambda s: s["connections"] == 2)
    assert post(server, "/rooms/news/messages", b"no token") == 401
    assert post(server, "/rooms/news/messages", b"wrong", token="s3cre") == 401
    assert post(server, "/rooms/news/messages", b"x" * 1001, token="s3cret") == 413
    assert post(server, "/rooms/news/messages", b"\xff\xfe", token="s3cret") == 400
    assert post(server, "/rooms/bad%20name/messages", b"hi", token="s3cret") == 404
    assert nothing_more(member)
    assert post(server, "/rooms/news/messages", "extra: héllo".encode(), token="s3cret") == 204
    assert texts(member, 1) == ["extra: héllo"]
    assert nothing_more(outsider)
    assert post(server, "/rooms/lobby/messages", b"to everyone on /", token="s3cret") == 204
    assert texts(outsider, 1) == ["to everyone on /"]
    assert nothing_more(member)


def test_another_process_publishes_to_a_room_and_its_history_through_redis(
        start_server, redis_server):
    server = start_server(greenchat_argv(), env={"CHAT_REDIS_URL": redis_server.url,
                                                 "CHAT_HISTORY": "10"})
    member = connect(server.port, "/rooms/ops")
    server.wait_stats(lambda s: s["backplane_connected"])
    script = ("import sys; from chat.backplane import publish; "
              "publish(sys.argv[1], 'deploy done', 'ops', history=10)")
    subprocess.run([sys.executable, "-c", script, redis_server.url], cwd=ROOT, check=True,
                   timeout=30)
    assert texts(member, 1) == ["deploy done"]
    late = connect(server.port, "/rooms/ops")
    assert texts(late, 1) == ["deploy done"]
    assert nothing_more(late)


def notices(sock: socket.socket, wait: float) -> list[dict]:
    """Every presence notice ``sock`` receives within ``wait`` seconds."""
    import json

    from raw_clients import read_frame

    received = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            opcode, payload = read_frame(sock)
        except (TimeoutError, socket.timeout):
            break
        assert opcode == 0x1
        received.append(json.loads(payload)["presence"])
    return received


@pytest.mark.slow
def test_presence_notices_tell_a_room_its_count_once_a_second_at_most(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_PRESENCE_NOTICES": "true"})
    first, lobby = connect(server.port, "/rooms/p"), connect(server.port, "/")
    assert notices(first, 2.5) == [{"room": "p", "members": 1}]
    # A reconnect storm: 40 joins and leaves within about a second, then 3 members stay.
    started = time.monotonic()
    for _ in range(40):
        reset(connect(server.port, "/rooms/p"))
    stay = [connect(server.port, "/rooms/p") for _ in range(2)]
    told = notices(first, 3.0)
    elapsed = time.monotonic() - started
    assert told and told[-1] == {"room": "p", "members": 3}
    assert len(told) <= elapsed + 1, f"{len(told)} notices in {elapsed:.1f} s: {told}"
    assert notices(stay[0], 0.1)[-1] == {"room": "p", "members": 3}
    assert nothing_more(lobby), "the lobby got a presence notice"
