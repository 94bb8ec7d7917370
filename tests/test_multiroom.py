"""The JSON endpoint's clients in the hub, in-process over real socket pairs: many rooms
on one socket, ids, errors that keep the connection, recovery from history, users."""

from __future__ import annotations

import base64
import json
import socket
import time

import gevent
import pytest

from chat.connection import Connection, JsonConnection
from chat.hub import Backplane, Hub
from chat.multiroom import (ERROR_CODES, RequestError, format_id, message_event, parse_id,
                            parse_request)
from chat.protocol import (ClientProtocol, CloseReceived, Opcode, TextMessage,
                           encode_client_frame, encode_text)


class Peer:
    """The client end of a JSON connection: sends requests, reads events (bounded)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.codec = ClientProtocol()
        self.events: list = []

    def send(self, request: dict | str) -> None:
        text = request if isinstance(request, str) else json.dumps(request)
        self.sock.sendall(encode_client_frame(Opcode.TEXT, text.encode()))

    def receive(self, count: int, timeout: float = 5.0) -> list[dict]:
        """The next ``count`` events (JSON objects); fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            assert time.monotonic() < deadline, f"got {self.events}, wanted {count}"
            gevent.sleep(0.002)  # the hub runs in this process: let it work
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            assert data, "connection closed"
            for event in self.codec.receive_data(data):
                if isinstance(event, TextMessage):
                    self.events.append(json.loads(event.text))
                elif isinstance(event, CloseReceived):
                    self.events.append({"closed": event.code})
        got, self.events = self.events[:count], self.events[count:]
        return got

    def request(self, request: dict | str, count: int = 1) -> list[dict]:
        self.send(request)
        return self.receive(count)

    def assert_nothing_more(self) -> None:
        gevent.sleep(0.02)
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            data = b""
        assert not self.events and not data, (self.events, data)


def json_pair(hub: Hub, user: str | None = None) -> tuple[JsonConnection, Peer]:
    ours, theirs = socket.socketpair()
    connection = JsonConnection(ours, hub, user=user)
    connection.start()
    theirs.setblocking(False)
    return connection, Peer(theirs)


def plain_pair(hub: Hub, room: str = "", user: str | None = None) -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    connection = Connection(ours, hub, room, user=user)
    connection.start()
    theirs.setblocking(False)
    return connection, theirs


def plain_texts(sock: socket.socket, count: int, timeout: float = 5.0) -> list[str]:
    codec, texts = ClientProtocol(), []
    deadline = time.monotonic() + timeout
    while len(texts) < count:
        assert time.monotonic() < deadline, texts
        gevent.sleep(0.002)
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        texts += [event.text for event in codec.receive_data(data) if isinstance(event, TextMessage)]
    return texts


def messages(events: list[dict]) -> list[tuple[str, str]]:
    return [(event["room"], event["text"]) for event in events]


@pytest.fixture
def hub() -> Hub:
    return Hub(max_backlog=256 * 1024)


def test_one_json_client_is_in_several_rooms_and_each_message_names_its_room_and_id(hub):
    _, peer = json_pair(hub)
    assert peer.request({"op": "join", "room": "a", "ref": 1}) == [
        {"type": "joined", "room": "a", "ref": 1}]
    assert peer.request({"op": "join", "room": "lobby", "ref": "two"}) == [
        {"type": "joined", "room": "lobby", "ref": "two"}]
    hub.publish("to a", "a")
    hub.publish("to the lobby")
    hub.publish("to b", "b")
    events = peer.receive(2)
    assert messages(events) == [("a", "to a"), ("lobby", "to the lobby")]
    assert len({event["id"] for event in events}) == 2
    assert all(parse_id(event["id"]) is not None for event in events)
    peer.assert_nothing_more()


def test_plain_and_json_clients_meet_in_the_same_room(hub):
    _, plain = plain_pair(hub, "general")
    _, peer = json_pair(hub)
    peer.request({"op": "join", "room": "general"})
    peer.send({"op": "send", "room": "general", "text": "from json"})
    assert plain_texts(plain, 1) == ["from json"]  # the bare text, as on /
    assert messages(peer.receive(1)) == [("general", "from json")]  # its own, like everyone
    plain.sendall(encode_client_frame(Opcode.TEXT, b"from plain"))
    assert messages(peer.receive(1)) == [("general", "from plain")]
    assert plain_texts(plain, 1) == ["from plain"]
    assert hub.presence() == {"general": 2}


def test_a_binary_message_reaches_json_clients_as_base64_data(hub):
    _, peer = json_pair(hub)
    peer.request({"op": "join", "room": "lobby"})
    hub.publish(b"\x00\xffbytes")
    (event,) = peer.receive(1)
    assert base64.b64decode(event["data"]) == b"\x00\xffbytes" and "text" not in event


def test_a_left_room_sends_nothing_more(hub):
    _, peer = json_pair(hub)
    peer.request({"op": "join", "room": "a"})
    assert peer.request({"op": "leave", "room": "a", "ref": 7}) == [
        {"type": "left", "room": "a", "ref": 7}]
    hub.publish("after", "a")
    peer.assert_nothing_more()
    assert hub.presence() == {} and "a" not in hub.subscribers


@pytest.mark.parametrize("request_text, code", [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"op": "shout", "room": "a"}', "unknown_op"),
    ('{"op": "join", "room": "no spaces"}', "bad_room"),
    ('{"op": "join", "room": "@alice"}', "bad_room"),
    ('{"op": "join", "room": "' + "x" * 65 + '"}', "bad_room"),
    ('{"op": "send", "room": "b", "text": "hi"}', "not_member"),
    ('{"op": "leave", "room": "b"}', "not_member"),
    ('{"op": "join"}', "bad_field"),
    ('{"op": "send", "room": "a", "text": 5}', "bad_field"),
    ('{"op": "join", "room": "a", "since": 12}', "bad_field"),
    ('{"op": "join", "room": "a", "ref": {"x": 1}}', "bad_field"),
])
def test_a_bad_request_gets_an_error_event_and_the_connection_stays(hub, request_text, code):
    connection, peer = json_pair(hub)
    (error,) = peer.request(request_text)
    assert error["type"] == "error" and error["error"] == code and error["message"]
    assert code in ERROR_CODES
    assert connection.open
    assert peer.request({"op": "join", "room": "c", "ref": 3}) == [
        {"type": "joined", "room": "c", "ref": 3}]


def test_an_error_echoes_the_requests_ref(hub):
    _, peer = json_pair(hub)
    (error,) = peer.request({"op": "send", "room": "nowhere", "text": "x", "ref": "r1"})
    assert error == {"type": "error", "error": "not_member", "message": "not in room 'nowhere'",
                     "ref": "r1"}


def test_a_binary_frame_is_no_request(hub):
    _, peer = json_pair(hub)
    peer.sock.sendall(encode_client_frame(Opcode.BINARY, b"{}"))
    (error,) = peer.receive(1)
    assert error["error"] == "bad_json"


def test_rooms_per_connection_and_per_process_are_limited_with_an_error():
    hub = Hub(max_rooms_per_connection=2, max_rooms=3)
    connection, peer = json_pair(hub)
    peer.request({"op": "join", "room": "a"})
    peer.request({"op": "join", "room": "b"})
    (error,) = peer.request({"op": "join", "room": "c"})
    assert error["error"] == "room_limit" and connection.rooms == ("a", "b")
    _, other = json_pair(hub)
    other.request({"op": "join", "room": "c"})  # the third room of the process
    (error,) = other.request({"op": "join", "room": "d"})
    assert error["error"] == "room_limit" and "server" in error["message"]
    assert other.request({"op": "join", "room": "a"})[0]["type"] == "joined"  # an open one


def test_the_join_hook_decides_each_join_with_the_clients_identity():
    asked = []

    def authorize_join(user, room):
        asked.append((user, room))
        gevent.sleep(0.01)  # it may block (a database), in the client's own greenlet
        return room != "secret"

    hub = Hub(authorize_join=authorize_join)
    _, peer = json_pair(hub, user="alice")
    (error,) = peer.request({"op": "join", "room": "secret", "ref": 1})
    assert error["error"] == "forbidden" and error["ref"] == 1
    assert peer.request({"op": "join", "room": "lobby"})[0]["type"] == "joined"
    assert asked == [("alice", "secret"), ("alice", "lobby")]


def stalled_json_member(hub: Hub, room: str) -> tuple[JsonConnection, socket.socket]:
    """A JSON client in ``room`` on loopback TCP with small buffers that reads nothing
    more, so what the hub sends it stays in its outbox, where a test can look."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        server_side, _ = listener.accept()
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    connection = JsonConnection(server_side, hub)
    connection.start()
    hub.join_room(connection, room)
    return connection, client


def test_a_broadcast_is_encoded_once_for_every_json_member():
    hub = Hub(max_backlog=8 << 20)
    members = [stalled_json_member(hub, "a") for _ in range(3)]
    hub.publish("x" * (1 << 20), "a")
    gevent.sleep(0)
    queued = [connection._outbox.frames[-1] for connection, _ in members]
    assert json.loads(ClientProtocol(max_message_size=2 << 20).receive_data(queued[0])[0].text
                      )["room"] == "a"
    assert queued[0] is queued[1] is queued[2]


def test_a_joiner_gets_history_then_live_messages_with_neither_gap_nor_duplicate():
    hub = Hub(history=100)
    for i in range(5):
        hub.publish(f"m{i}", "a")
    gevent.sleep(0)
    _, peer = json_pair(hub)
    hub.publish("m5", "a")  # pending when the join comes: live, not history
    peer.send({"op": "join", "room": "a"})
    events = peer.receive(7)
    assert events[0] == {"type": "joined", "room": "a"}
    assert [event["text"] for event in events[1:]] == [f"m{i}" for i in range(6)]
    hub.publish("m6", "a")
    assert [event["text"] for event in peer.receive(1)] == ["m6"]
    peer.assert_nothing_more()


def test_a_rejoin_with_since_gets_exactly_what_was_missed():
    hub = Hub(history=100)
    _, peer = json_pair(hub)
    peer.request({"op": "join", "room": "a"})
    for i in range(3):
        hub.publish(f"seen {i}", "a")
    last_seen = peer.receive(3)[-1]["id"]
    peer.request({"op": "leave", "room": "a"})
    for i in range(4):
        hub.publish(f"missed {i}", "a")
    gevent.sleep(0)
    events = peer.request({"op": "join", "room": "a", "since": last_seen}, count=5)
    assert events[0] == {"type": "joined", "room": "a", "recovered": True}
    assert [event["text"] for event in events[1:]] == [f"missed {i}" for i in range(4)]
    peer.assert_nothing_more()


def test_an_id_older_than_the_history_is_not_recovered_and_the_whole_history_is_sent():
    hub = Hub(history=3)
    _, peer = json_pair(hub)
    peer.request({"op": "join", "room": "a"})
    hub.publish("first", "a")
    first_id = peer.receive(1)[0]["id"]
    for i in range(5):
        hub.publish(f"later {i}", "a")
    peer.receive(5)
    peer.request({"op": "leave", "room": "a"})
    events = peer.request({"op": "join", "room": "a", "since": first_id}, count=4)
    assert events[0] == {"type": "joined", "room": "a", "recovered": False}
    assert [event["text"] for event in events[1:]] == ["later 2", "later 3", "later 4"]
    (unknown,) = peer.request({"op": "join", "room": "b", "since": "not an id"})
    assert unknown == {"type": "joined", "room": "b", "recovered": False}


def test_without_history_a_since_is_never_recovered(hub):
    _, peer = json_pair(hub)
    hub.publish("gone", "a")
    gevent.sleep(0)
    assert peer.request({"op": "join", "room": "a", "since": format_id(bytes(24))}) == [
        {"type": "joined", "room": "a", "recovered": False}]


class StoredHistory(Backplane):
    """A backplane keeping history elsewhere that answers its read when told to, and
    records what the hub says it needs."""

    stores_history = True

    def __init__(self, stored: list) -> None:
        self.stored = stored
        self.answer = gevent.event.Event()
        self.calls: list[tuple[str, str]] = []

    def load_history(self, room, count):
        self.answer.wait(5)
        return self.stored[-count:]

    def watch(self, room):
        self.calls.append(("watch", room))

    def unwatch(self, room):
        self.calls.append(("unwatch", room))


def message_id(number: int) -> bytes:
    return number.to_bytes(24, "big")


def test_a_json_joiner_waits_for_the_stored_history_and_misses_nothing_said_meanwhile():
    store = StoredHistory([(message_id(i), f"m{i}") for i in range(1, 4)])
    hub = Hub(history=100, backplane=store)
    _, peer = json_pair(hub)
    peer.send({"op": "join", "room": "a", "since": format_id(message_id(1)), "ref": 1})
    peer.send({"op": "send", "room": "a", "text": "mine"})  # served once it is in
    gevent.sleep(0.01)
    hub.deliver("m4", "a", message_id(4))  # live while the read is on its way
    gevent.sleep(0.01)
    store.answer.set()
    events = peer.receive(5)
    assert events[0] == {"type": "joined", "room": "a", "recovered": True, "ref": 1}
    assert [event["text"] for event in events[1:]] == ["m2", "m3", "m4", "mine"]
    assert [parse_id(event["id"]) for event in events[1:4]] == [message_id(i) for i in (2, 3, 4)]
    assert store.calls == [("watch", "a")]
    peer.assert_nothing_more()


def test_a_json_client_counts_as_one_connection_and_leaves_every_room_when_it_closes():
    store = StoredHistory([])
    store.answer.set()
    hub = Hub(backplane=store)
    connection, peer = json_pair(hub, user="alice")
    for room in ("a", "b"):
        peer.request({"op": "join", "room": room})
    assert hub.connections == 1 and hub.stats()["rooms"] == 2
    assert hub.presence() == {"a": 1, "b": 1}  # a user's key is no room to operators
    connection.abort()
    assert hub.connections == 0 and hub.subscribers == {} and hub.clients == {}
    assert sorted(store.calls) == sorted([("watch", "@alice"), ("watch", "a"), ("watch", "b"),
                                          ("unwatch", "a"), ("unwatch", "b"),
                                          ("unwatch", "@alice")])


def test_close_all_and_the_idle_sweep_reach_json_clients():
    hub = Hub()
    connection, peer = json_pair(hub)
    peer.request({"op": "join", "room": "a"})
    hub.sweep()
    hub.sweep()  # silent for two sweeps: pinged
    assert hub.pings_sent == 1
    assert hub.close_all() == 1
    assert peer.receive(1) == [{"closed": 1001}]
    assert not connection.open


def test_a_message_to_a_user_reaches_every_connection_it_has_plain_or_json():
    hub = Hub()
    _, alice_json = json_pair(hub, user="alice")
    _, alice_plain = plain_pair(hub, "general", user="alice")
    _, bob = json_pair(hub, user="bob")
    hub.publish("psst", user="alice")
    assert messages(alice_json.receive(1)) == [("@alice", "psst")]
    assert plain_texts(alice_plain, 1) == ["psst"]
    bob.assert_nothing_more()
    assert hub.presence() == {"general": 1}
    assert hub.users_in("general") == ["alice"]


def test_a_users_messages_are_not_kept_in_history():
    hub = Hub(history=10)
    json_pair(hub, user="alice")
    hub.publish("private", user="alice")
    gevent.sleep(0)
    assert "@alice" not in hub._history


def test_presence_notices_tell_json_clients_their_rooms_counts_and_optionally_who():
    hub = Hub(presence_notices=True, presence_users=True)
    _, alice = json_pair(hub, user="alice")
    _, plain = plain_pair(hub, "a", user="bob")
    alice.request({"op": "join", "room": "a"})
    hub._send_presence_notices({})
    assert alice.receive(1) == [{"type": "presence", "room": "a", "members": 2,
                                 "users": ["alice", "bob"]}]
    assert plain_texts(plain, 1) == ['{"presence":{"room":"a","members":2}}']


def test_requests_and_events_are_read_and_written_as_documented():
    request = parse_request('{"op": "join", "room": "lobby", "since": "x", "ref": 9}')
    assert (request.op, request.room, request.since, request.ref) == ("join", "", "x", 9)
    with pytest.raises(RequestError) as raised:
        parse_request('{"op": "join", "room": "a", "ref": "' + "r" * 65 + '"}')
    assert raised.value.code == "bad_field"
    text = message_event("", bytes(range(24)), "héllo \"quoted\"")
    assert json.loads(text) == {"type": "message", "room": "lobby",
                                "id": format_id(bytes(range(24))), "text": "héllo \"quoted\""}
    assert parse_id(format_id(bytes(range(24)))) == bytes(range(24))
    assert encode_text(text)  # one frame each


def test_every_request_counts_against_the_rate_limit():
    hub = Hub(rate_limit=1.0, rate_burst=2, rate_limit_action="drop")
    _, peer = json_pair(hub)
    peer.send({"op": "join", "room": "a", "ref": 1})
    peer.send({"op": "join", "room": "b", "ref": 2})
    peer.send({"op": "join", "room": "c", "ref": 3})  # over the burst: dropped
    assert [event["ref"] for event in peer.receive(2)] == [1, 2]
    peer.assert_nothing_more()
    assert hub.rate_limited == 1


def test_a_json_client_that_stops_reading_is_closed_as_a_slow_consumer_and_leaves_its_rooms():
    hub = Hub(max_backlog=64 * 1024)
    slow, client = stalled_json_member(hub, "a")
    hub.join_room(slow, "b")
    for _ in range(40):
        hub.publish("x" * 8192, "a")
        gevent.sleep(0)
        if not slow.open:
            break
    assert not slow.open and hub.slow_consumers_closed == 1
    assert hub.subscribers == {} and hub.connections == 0
    client.close()
