"""The backplane on a real Redis Cluster (3 masters started by the tests): rooms spread
over the shards with sharded pub/sub, each room's history on its room's shard, and a
shard that dies and comes back costing no worker and no local delivery."""

from __future__ import annotations

import socket
import time

import pytest
import redis

from chat.backplane import history_key, publish, room_channel
from helpers import greenchat_argv
from raw_clients import connect, masked_frame, read_frame
from test_backplane import nothing_more, texts

SETTINGS = {"CHAT_REDIS_CLUSTER": "true", "CHAT_HISTORY": "20", "CHAT_REDIS_TIMEOUT": "2"}


def rooms_on_every_shard(cluster) -> dict[int, str]:
    """A room name per master (port), found by the slot of its channel."""
    rooms: dict[int, str] = {}
    for number in range(200):
        room = f"room{number}"
        port = cluster.port_of_slot(redis.crc.key_slot(room_channel("greenchat", room).encode()))
        rooms.setdefault(port, room)
        if len(rooms) == len(cluster.ports):
            return rooms
    raise AssertionError(f"200 rooms all hashed to {set(rooms)}")


def start_pair(start_server, cluster):
    env = {"CHAT_REDIS_URL": cluster.url, **SETTINGS}
    return [start_server(greenchat_argv(), env=env) for _ in range(2)]


def test_two_servers_exchange_messages_and_history_in_rooms_on_every_shard(
        start_server, redis_cluster):
    rooms = rooms_on_every_shard(redis_cluster)
    first, second = start_pair(start_server, redis_cluster)
    senders = {room: connect(first.port, f"/rooms/{room}") for room in rooms.values()}
    members = {room: connect(second.port, f"/rooms/{room}") for room in rooms.values()}
    for server in (first, second):
        server.wait_stats(lambda s: s["backplane_rooms"] == 3 and s["backplane_connected"])
    for room, sender in senders.items():
        sender.sendall(masked_frame(f"to {room}".encode()))
    for room, member in members.items():
        assert texts(member, 1) == [f"to {room}"]
    for port, room in rooms.items():  # each room's history lives on its own shard
        with redis.Redis(port=port) as node:
            assert node.xlen(history_key("greenchat", room)) == 1
    # A joiner on a server with no member there reads the room's history from its shard.
    third = start_server(greenchat_argv(), env={"CHAT_REDIS_URL": redis_cluster.url, **SETTINGS})
    for room in rooms.values():
        joiner = connect(third.port, f"/rooms/{room}")
        assert texts(joiner, 1) == [f"to {room}"]
        assert nothing_more(joiner)
    # Publishers from outside: sharded to a room, plain PUBLISH on the base channel.
    room = next(iter(rooms.values()))
    publish(redis_cluster.url, "from outside", room, cluster=True, history=20)
    lobby = connect(second.port, "/")
    second.wait_stats(lambda s: s["backplane_rooms"] == 4)
    with redis.Redis(port=redis_cluster.ports[1]) as node:
        node.publish("greenchat", "to the lobby")
    assert texts(members[room], 1) == ["from outside"]
    assert texts(lobby, 1) == ["to the lobby"]


def test_a_burst_alternating_between_two_rooms_of_one_shard_arrives_whole_and_in_order(
        start_server, redis_cluster):
    port = redis_cluster.ports[0]
    same_shard = [room for room in (f"pair{number}" for number in range(300))
                  if redis_cluster.port_of_slot(redis.crc.key_slot(
                      room_channel("greenchat", room).encode())) == port][:2]
    first, second = start_pair(start_server, redis_cluster)
    senders = [connect(first.port, f"/rooms/{room}") for room in same_shard]
    members = [connect(second.port, f"/rooms/{room}") for room in same_shard]
    for server in (first, second):
        server.wait_stats(lambda s: s["backplane_rooms"] == 2 and s["backplane_connected"])
    # The shard holds writes for a while: what the first server publishes meanwhile
    # waits, in the order it came, X, Y, X, Y..., and goes out as one batch.
    with redis.Redis(port=port) as node:
        node.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
    for number in range(20):
        for index, sender in enumerate(senders):
            sender.sendall(masked_frame(f"{index}:{number}".encode()))
            time.sleep(0.005)
    first.wait_stats(lambda s: s["backplane_pending"] > 10)
    for index, member in enumerate(members):
        assert texts(member, 20) == [f"{index}:{number}" for number in range(20)]
        assert nothing_more(member)
    assert second.stats()["backplane_duplicates"] == 0


@pytest.mark.slow
def test_a_killed_shard_costs_no_worker_nor_local_delivery_and_its_rooms_come_back(
        start_server, redis_cluster):
    rooms = rooms_on_every_shard(redis_cluster)
    first, second = start_pair(start_server, redis_cluster)
    pids = [server.stats()["pid"] for server in (first, second)]
    victim_port = redis_cluster.ports[1]
    room = rooms[victim_port]
    speaker, neighbour = (connect(first.port, f"/rooms/{room}") for _ in range(2))
    remote = connect(second.port, f"/rooms/{room}")
    for server in (first, second):
        server.wait_stats(lambda s: s["backplane_rooms"] == 1 and s["backplane_connected"])
    speaker.sendall(masked_frame(b"before"))
    assert texts(remote, 1) == ["before"] and texts(neighbour, 1) == ["before"]

    redis_cluster.kill(victim_port)
    for server in (first, second):
        server.wait_stats(lambda s: not s["backplane_connected"], timeout=15)
    for number in range(5):  # local delivery goes on, /stats answers at once
        speaker.sendall(masked_frame(f"during {number}".encode()))
        assert texts(neighbour, 1) == [f"during {number}"]
        assert first.stats()["pid"] == pids[0]

    redis_cluster.start(victim_port)  # with its nodes.conf: the same node, the same slots
    redis_cluster.wait_ok()
    for server in (first, second):
        server.wait_stats(lambda s: s["backplane_connected"] and s["backplane_rooms"] == 1,
                          timeout=30)
    deadline = time.monotonic() + 30
    heard = []
    for attempt in range(300):  # any of them counts: the first may still be waiting to go
        speaker.sendall(masked_frame(f"after {attempt}".encode()))
        assert texts(neighbour, 1) == [f"after {attempt}"]
        remote.settimeout(0.1)
        try:
            while True:
                heard.append(read_frame(remote)[1].decode())
        except (TimeoutError, socket.timeout):
            pass
        if any(text.startswith("after") for text in heard):
            break
        assert time.monotonic() < deadline, f"nothing came back across: {heard}"
    assert [server.stats()["pid"] for server in (first, second)] == pids
    assert "Redis backplane recovered" in first.output and "Redis backplane recovered" in second.output
