"""The shared broadcast list: rooms of connections, and a publish that never blocks.

``publish`` encodes a message once and appends the frame to its room's pending list;
one callback at the end of the current gevent loop iteration joins every frame pending
for a room and hands the same bytes to each member's non-blocking ``send_bytes``. So a
burst of messages costs one ``send`` per client instead of one per message (coalescing,
measured in docs/design.md: a 10-message burst to 18k clients drops from ~1.5 s of
CPU to ~0.3 s), and one client's full socket never delays the others.

Every client receives every message of a room in the order ``publish`` was called.

Two kinds of members: plain clients (``/``, ``/rooms/<name>``; ``rooms``) get a message
as its own frame; clients of the JSON endpoint (``subscribers``, any number of rooms
each, see ``chat.multiroom``) get it wrapped in an event naming its room and id, made
once per room and flush only while the room has such members. Both kinds meet in the
same rooms; a user's key (``@<user>``) is a room whose members are that identity's
connections. Why they are kept apart: docs/design.md.

permessage-deflate (``CHAT_DEFLATE``): a member whose codec agreed to it (``codec.deflate``,
its window bits) gets the flush's compressed twin, made once per room, flush and window
size however many members want it (no context takeover: it depends on the message
alone). While no client agreed, the flush's loop is the plain one; a connection keeps no
zlib object. History and presence notices go out plain, which RFC 7692 allows.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
import sys
import time
from collections import OrderedDict, deque
from typing import Callable

import gevent
from gevent.event import Event

from .multiroom import (USER_PREFIX, Request, RequestError, event, message_event, parse_id,
                        parse_request, room_label, user_key)
from .protocol import (BinaryMessage, Opcode, PerMessageDeflate, TextMessage, compress_frame,
                       encode_frame, encode_text, frame_message, negotiate_deflate)
from .system import read_rss_bytes

__all__ = ["Hub", "Backplane", "Deliver", "Report", "AuthorizeJoin", "FANOUT_BUCKETS"]

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the broadcast fan-out time histogram: one flush, i.e. handing
# one room's pending frames to every member's socket.
FANOUT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
# A refusal reason is logged when first seen, then at most once per this many seconds
# with the count since: an attack must not become a log storm.
REFUSAL_LOG_INTERVAL = 60.0
# Clients checked by the idle sweep between two yields to the event loop.
SWEEP_BATCH = 1000
# Rooms whose history one process keeps in memory; beyond it the least recently used
# room without members forgets its history (kept in Redis when Redis is on).
MAX_HISTORY_ROOMS = 10_000
# How long a message read from the stored history may still arrive live (its pub/sub
# copy in flight); most were heard long before, so their ids are not kept for ever.
UNSEEN_WINDOW = 10.0
# Presence notices (``CHAT_PRESENCE_NOTICES``) go out at most this often per room, so a
# reconnect storm is one notice a second, not one per join.
PRESENCE_NOTICE_INTERVAL = 1.0

MessageHandler = Callable[["Connection", "TextMessage | BinaryMessage"], None]  # noqa: F821
# What a backplane is given to reach the hub (see Backplane.start): two callables, so it
# never depends on the Hub class (python-socketio's managers know their server the same
# way, through what the server hands them).
Deliver = Callable[[str | bytes, str, bytes | None], None]
Report = Callable[[], dict]
# ``Chat(authorize_join=...)``: (the client's identity or None, the room's name) -> allowed.
AuthorizeJoin = Callable[[str | None, str], bool]

def _encode(message: str | bytes) -> bytes:
    """A text frame for ``str``, a binary frame for ``bytes``."""
    if isinstance(message, str):
        return encode_text(message)
    return encode_frame(Opcode.BINARY, message)


def broadcast_message(connection, event) -> None:
    """The default message handler: what a client sends goes to everyone in its room."""
    connection.hub.publish(event.text if type(event) is TextMessage else event.data,
                           connection.room)


def _send_mixed(members: list, frames: list[bytes], data: bytes) -> int:
    """One flush of a room to members some of whom agreed to permessage-deflate: ``data``
    (the ``frames`` joined) to the others, the compressed twin to them, made at the first
    member that wants it with each window size. Returns the bytes handed to sockets.

    A plain member costs one attribute read and a test more than the plain loop (~25 ns,
    a compressing one ~95 ns, against ~15 us for a delivery: ``bench/flush_loop.py``,
    BENCHMARKS.md)."""
    twins: dict[int, list] = {}  # window bits -> [compressed frames, members sent them]
    for connection in members:
        bits = connection.codec.deflate
        if bits is None:
            connection.send_bytes(data)
        else:
            twin = twins.get(bits)
            if twin is None:
                twin = twins[bits] = [
                    compress_frame(data, bits) if len(frames) == 1 else
                    b"".join([compress_frame(frame, bits) for frame in frames]), 0]
            twin[1] += 1
            connection.send_bytes(twin[0])
    compressed = sum(count for _, count in twins.values())
    return (len(data) * (len(members) - compressed)
            + sum(len(twin) * count for twin, count in twins.values()))


class Backplane:
    """What carries messages between processes, as the hub sees it; this base is the
    in-memory default (one process: the hub's own delivery is all there is to do).

    ``chat.backplane.RedisBackplane`` is the real one. It knows the hub only through the
    two callables ``start`` hands it: ``deliver(message, room, msg_id)`` for a message
    from another process, and ``report()``, this process's figures and presence.
    """

    name = "memory"
    # True when rooms' history is kept outside the process (``load_history`` reads it).
    stores_history = False

    def start(self, deliver: Deliver, report: Report) -> None:
        """Begin delivering other processes' messages through ``deliver``."""

    def watch(self, room: str) -> None:
        """This process now has a member in ``room`` (or a client waiting for its
        history): from now on it needs the room's messages from the other processes."""

    def unwatch(self, room: str) -> None:
        """This process has nobody left in ``room``: it no longer needs its messages."""

    def publish(self, message: str | bytes, room: str = "") -> bytes | None:
        """Send a message published here to the other processes; never blocks.

        Returns the message's id when the backplane gives ids (for history), else None.
        """
        return None

    def load_history(self, room: str, count: int) -> list[tuple[bytes | None, str | bytes]]:
        """A room's last ``count`` stored messages, oldest first, as (id, message)."""
        return []

    def stop(self) -> None:
        """Stop listening and publishing."""

    def stats(self) -> dict:
        return {"backplane": self.name}

    def describe(self) -> str:
        """One phrase for the start-up log line."""
        return self.name

    def cluster_stats(self) -> dict | None:
        """Totals over every process sharing this backplane; None when there is only us."""
        return None

    def presence(self, local: dict[str, int]) -> dict[str, int]:
        """Members per room over every process, given this process's own counts."""
        return local

    def worker_reports(self) -> list[dict]:
        """Every live server process's report (with a ``reported`` time) as a background
        loop last read them, for /metrics. Empty here: one process, whose caller has its
        own figures live."""
        return []


class RoomHistory:
    """One room's recent messages as (id, frame), oldest first, within a count and a
    byte budget (``CHAT_HISTORY`` and ``CHAT_HISTORY_BYTES``).

    The frames are the ones the room's flush sent, shared with the members' outboxes
    and with every joiner's: keeping them costs their size once.
    """

    __slots__ = ("entries", "size", "max_count", "max_bytes")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.entries: deque[tuple[bytes | None, bytes]] = deque()
        self.size = 0  # bytes of the frames held
        self.max_count = max_count
        self.max_bytes = max_bytes

    def extend(self, pairs) -> None:
        """Add (id, frame) pairs, newest last; a frame over the byte budget is not kept."""
        entries = self.entries
        for msg_id, frame in pairs:
            if len(frame) <= self.max_bytes:
                entries.append((msg_id, frame))
                self.size += len(frame)
        while len(entries) > self.max_count or self.size > self.max_bytes:
            self.drop_oldest()

    def drop_oldest(self) -> None:
        _, frame = self.entries.popleft()
        self.size -= len(frame)

    def frames(self) -> list[bytes]:
        return [frame for _, frame in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)


class Hub:
    """Rooms (name -> set of open connections) and the counters ``/stats`` reports.

    One hub per Flask app (``chat.views.hub_of(app)``); it knows nothing of Flask.
    Everything runs in the gevent hub's thread, so there is no locking.
    """

    def __init__(self, *, max_backlog: int = 4 << 20, close_timeout: float = 5.0,
                 max_message_size: int = 1 << 20, deflate: bool = True,
                 max_connections: int = 1 << 30,
                 on_message: MessageHandler = broadcast_message,
                 backplane: Backplane | None = None,
                 send_buffer: int = 0,
                 rate_limit: float = 0.0, rate_burst: int = 20, rate_limit_action: str = "close",
                 ping_interval: float = 0.0,
                 history: int = 0, history_bytes: int = 1 << 20,
                 history_total_bytes: int = 64 << 20, max_rooms: int = 10_000,
                 presence_notices: bool = False, presence_users: bool = False,
                 max_rooms_per_connection: int = 100,
                 authorize_join: AuthorizeJoin | None = None) -> None:
        # Plain clients (``/``, ``/rooms/<name>``) by room: what the plain flush loop
        # sends to, left exactly as it was before the JSON endpoint (docs/design.md).
        self.rooms: dict[str, set] = {}
        # Clients of the JSON endpoint by room key (rooms, and users' keys ``@<user>``):
        # a room's messages reach them as JSON events, encoded once per flush. Each
        # room's members are the keys of a dict, not a set: a set grows 4x at a time
        # and costs 64-105 bytes a member at 2,000-5,000 members, a dict 59-74
        # (bench/json_memory.py: 112 bytes per client and room with sets, BENCHMARKS.md).
        self.subscribers: dict[str, dict] = {}
        # Plain clients with an identity, by their user's key: a message to the user
        # reaches them as its bare text.
        self.users: dict[str, dict] = {}
        # Every open JSON client, in rooms or not: counted, swept and closed like the rest.
        self.clients: dict = {}
        self.max_rooms_per_connection = max_rooms_per_connection
        self.authorize_join = authorize_join
        self.presence_users = presence_users
        self.max_backlog = max_backlog
        self.close_timeout = close_timeout
        self.max_message_size = max_message_size
        # Accept permessage-deflate offers (CHAT_DEFLATE); see negotiate().
        self.deflate = deflate
        # Open connections that agreed to it: /stats, and whether flush checks each member.
        self.deflate_connections = 0
        self.max_connections = max_connections
        # SO_SNDBUF of every client socket (0: the kernel's autotuning, up to tcp_wmem's max).
        self.send_buffer = send_buffer
        # Token bucket per client: ``rate_limit`` messages/s sustained, ``rate_burst`` at once.
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst
        self.rate_limit_drops = rate_limit_action == "drop"
        self.ping_interval = ping_interval
        self._sweeper = None
        self.presence_notices = presence_notices
        self._joined_rooms: set[str] = set()  # rooms joined since the last presence notices
        # History: the last ``history`` frames of each room as (message id, frame), taken
        # at flush time, so a joiner gets everything before its join from here and
        # everything after it live: no duplicate, no gap (see join).
        self.history_size = history
        self.history_bytes = history_bytes  # per room
        self.history_total_bytes = history_total_bytes  # all rooms of this process
        self._history: OrderedDict[str, RoomHistory] = OrderedDict()  # least recent first
        self._history_size = 0  # bytes in all of self._history
        # Rooms with members (or clients waiting for their history) this process holds.
        self.max_rooms = max_rooms
        self._pending_ids: dict[str, list] = {}
        # room -> clients waiting for its stored history: a plain connection, or a JSON
        # one's (connection, since, ref); and the event set when they are let in.
        self._loading: dict[str, list] = {}
        self._loaded: dict[str, Event] = {}
        # Users' keys among ``_watched`` (the rest are rooms, counted by CHAT_MAX_ROOMS).
        self._watched_users = 0
        # Message ids of this process when the backplane gives none (the in-memory one,
        # or a message from outside greenchat): a random origin (drawn again in start(),
        # after any fork) and a sequence, as the Redis backplane's.
        self._origin = os.urandom(16)
        self._sequence = 0
        # Rooms the backplane was told this process needs (``Backplane.watch``).
        self._watched: set[str] = set()
        # room -> (ids read from the store whose live copy may still come, until when)
        self._unseen: dict[str, tuple[set, float]] = {}
        self.connections = 0
        self.refused: dict[str, int] = {}
        self._refusal_logged: dict[str, tuple[float, int]] = {}  # reason -> (when, count then)
        self.on_message = on_message
        self.backplane = backplane or Backplane()
        self._backplane_started = False
        self._pending: dict[str, list[bytes]] = {}
        self._flush_scheduled = False
        self.started = time.time()
        self.handshakes = 0
        self.messages_received = 0
        self.messages_published = 0
        self.deliveries = 0
        self.bytes_out = 0
        self.slow_consumers_closed = 0
        self.protocol_errors = 0
        self.rate_limited = 0
        self.pings_sent = 0
        self.idle_dropped = 0
        # Connections dropped for an error nobody planned for (ours, or the application's
        # message handler raising): each is closed alone, counted here and logged rarely.
        self.internal_errors = 0
        # When each background loop last finished a round (time.monotonic()), so /stats
        # shows they still tick.
        self.heartbeats: dict[str, float] = {}
        # Non-cumulative counts per FANOUT_BUCKETS bound, the last one for "+Inf".
        self.fanout_counts = [0] * (len(FANOUT_BUCKETS) + 1)
        self.fanout_sum = 0.0
        # RSS when a client last joined an empty process (0 before the first): the
        # interpreter, the app and the serving path, without clients. The dashboard's
        # memory per connection is the RSS above it.
        self.idle_rss_bytes = 0

    @property
    def loop(self):
        """The running gevent loop (looked up, not stored: an app may be created before a fork)."""
        return gevent.get_hub().loop

    def start(self) -> None:
        """Start the backplane's greenlets; done on first use, inside the serving process
        (an app may be created before gunicorn forks its workers)."""
        if not self._backplane_started:
            self._backplane_started = True
            self._origin = os.urandom(16)
            self.backplane.start(self.deliver, self.report)
            if self.ping_interval:
                self._sweeper = gevent.spawn(self._sweep_loop)
            if self.presence_notices:
                gevent.spawn(self._presence_loop)

    @property
    def full(self) -> bool:
        """True when this process holds ``max_connections`` clients (those waiting for a
        room's history included): refuse new ones."""
        # (JSON clients waiting for a room are counted already: they are connected)
        waiting = sum(1 for clients in self._loading.values() for waiting in clients
                      if type(waiting) is not tuple) if self._loading else 0
        return self.connections + waiting >= self.max_connections

    def room_limit_reached(self, room: str) -> bool:
        """True when joining ``room`` would open one room too many (``CHAT_MAX_ROOMS``)."""
        if room in self.rooms or room in self._loading or room in self.subscribers:
            return False
        return len(self._watched) - self._watched_users >= self.max_rooms

    def join(self, connection) -> None:
        """Add an open connection to its room (``connection.room``), after sending it the
        room's history when there is one.

        History and membership change together, between two flushes: what was flushed
        before is in the history, what is pending or comes later reaches the new member
        live. When the backplane stores history (Redis) and this process has not read a
        room's yet, the joiner waits for that read (see ``_load_history``).
        """
        self.start()
        if self.history_size:
            room = connection.room
            if room in self._loading:
                self._loading[room].append(connection)
                return
            history = self._history.get(room)
            if history is None and self.backplane.stores_history:
                self._begin_loading(room)
                self._loading[room].append(connection)
                return
            if history:
                self._history.move_to_end(room)
                # The room's own frames, by reference: 20 joiners of a room with 10 MB of
                # history share those 10 MB instead of holding a copy each.
                connection.send_frames(history.frames())
        if connection.open:
            self._add(connection)

    def _begin_loading(self, room: str) -> Event:
        """Start reading a room's stored history; joiners wait in ``_loading[room]``."""
        self._room_opened(room)
        self._loading[room] = []
        loaded = self._loaded[room] = Event()
        self._new_history(room)  # collects live ones until the read is back
        gevent.spawn(self._load_history, room)
        return loaded

    def negotiate(self, offers: str | None) -> PerMessageDeflate | None:
        """The answer to a client's Sec-WebSocket-Extensions: the permessage-deflate
        agreement (its 101 header and window bits), or None (off, or nothing we accept).
        Both upgrade paths (``chat.upgrade``, ``chat.handler``) ask here."""
        return negotiate_deflate(offers) if self.deflate and offers else None

    def _add(self, connection) -> None:
        if not self.connections:
            self.idle_rss_bytes = read_rss_bytes()
        members = self.rooms.get(connection.room)
        if members is None:
            self._room_opened(connection.room)
            members = self.rooms[connection.room] = set()
        members.add(connection)
        self.connections += 1
        if connection.codec.deflate is not None:
            self.deflate_connections += 1
        self.handshakes += 1
        if self.presence_notices:
            self._joined_rooms.add(connection.room)
        if connection.user is not None:
            self._add_to(self.users, user_key(connection.user), connection)

    def leave(self, connection) -> None:
        members = self.rooms.get(connection.room)
        if members is not None and connection in members:
            members.remove(connection)
            self.connections -= 1
            if connection.codec.deflate is not None:
                self.deflate_connections -= 1
            if not members and connection.room:  # keep the lobby, drop empty named rooms
                del self.rooms[connection.room]
                self._room_closed(connection.room)
            if connection.user is not None:
                self._remove_from(self.users, user_key(connection.user), connection)

    def _add_to(self, where: dict[str, dict], key: str, connection) -> str:
        """Add ``connection`` to ``where[key]`` (``subscribers`` or ``users``); returns the
        key object the hub keeps, so every client's tuple of rooms shares it."""
        members = where.get(key)
        if members is None:
            key = sys.intern(key)
            self._room_opened(key)
            members = where[key] = {}
        members[connection] = None
        return key

    def _remove_from(self, where: dict[str, dict], key: str, connection) -> None:
        members = where.get(key)
        if members is not None:
            members.pop(connection, None)
            if not members:
                del where[key]
                self._room_closed(key)

    # -- the JSON endpoint ----------------------------------------------------------

    def attach(self, connection) -> None:
        """A JSON client enters, in no room yet (its user's key if it has an identity)."""
        self.start()
        if not self.connections:
            self.idle_rss_bytes = read_rss_bytes()
        self.clients[connection] = None
        self.connections += 1
        if connection.codec.deflate is not None:
            self.deflate_connections += 1
        self.handshakes += 1
        if connection.user is not None:
            self._add_to(self.subscribers, user_key(connection.user), connection)

    def detach(self, connection) -> None:
        """A JSON client leaves: out of every room (and its user's key)."""
        if connection not in self.clients:
            return
        del self.clients[connection]
        self.connections -= 1
        if connection.codec.deflate is not None:
            self.deflate_connections -= 1
        for room in connection.rooms:
            self._remove_from(self.subscribers, room, connection)
        connection.rooms = ()
        if connection.user is not None:
            self._remove_from(self.subscribers, user_key(connection.user), connection)

    def handle_request(self, connection, message: TextMessage | BinaryMessage) -> None:
        """Act on one frame of a JSON client, in its message greenlet (the join hook may
        block); a request that cannot be served is answered with an error event."""
        try:
            if type(message) is not TextMessage:
                raise RequestError("bad_json", "requests are JSON text frames")
            request = parse_request(message.text)
            if request.op == "send":
                self._check_member(connection, request)
                self.publish(request.text, request.room)
            elif request.op == "join":
                self._join_request(connection, request)
            else:
                self._check_member(connection, request)
                connection.rooms = tuple(room for room in connection.rooms
                                         if room != request.room)
                self._remove_from(self.subscribers, request.room, connection)
                connection.send_bytes(encode_text(
                    event("left", request.ref, room=room_label(request.room))))
        except RequestError as error:
            connection.send_bytes(encode_text(error.event()))

    @staticmethod
    def _check_member(connection, request: Request) -> None:
        if request.room not in connection.rooms:
            raise RequestError("not_member", f"not in room {room_label(request.room)!r}",
                               request.ref)

    def _join_request(self, connection, request: Request) -> None:
        room, ref = request.room, request.ref
        if room in connection.rooms:  # nothing missed since it joined: nothing replayed
            connection.send_bytes(encode_text(event("joined", ref, room=room_label(room))))
            return
        if self.authorize_join is not None:
            allowed = self.authorize_join(connection.user, room_label(room))  # may block
            if not connection.open:
                return
            if not allowed:
                raise RequestError("forbidden", f"not allowed in room {room_label(room)!r}", ref)
        if len(connection.rooms) >= self.max_rooms_per_connection:
            raise RequestError("room_limit", f"at most {self.max_rooms_per_connection} rooms "
                               "per connection", ref)
        if self.room_limit_reached(room):
            raise RequestError("room_limit", "this server holds as many rooms as it may", ref)
        self.join_room(connection, room, request.since, ref)

    def join_room(self, connection, room: str, since: str | None = None,
                  ref: str | int | None = None) -> None:
        """Add a JSON client to a room: ``joined``, then the room's history after the
        message ``since`` (all of it when ``since`` is not in it), then live messages.

        As atomic as :meth:`join`: history and membership change between two flushes.
        When the room's stored history must be read first, the client waits with the
        plain joiners (``_load_history`` lets it in) and this returns once it is in, so
        its next request finds it a member.
        """
        self.start()
        room = sys.intern(room)
        if self.history_size:
            loaded = self._loaded.get(room)
            if loaded is None and room not in self._history and self.backplane.stores_history:
                loaded = self._begin_loading(room)
            if loaded is not None:
                self._loading[room].append((connection, since, ref))
                loaded.wait()
                return
        self._enter_room(connection, room, since, ref)

    def _enter_room(self, connection, room: str, since: str | None,
                    ref: str | int | None) -> None:
        """The atomic part of :meth:`join_room` (nothing here yields)."""
        history = self._history.get(room) if self.history_size else None
        entries = list(history) if history else []
        fields: dict = {"room": room_label(room)}
        if since is not None:
            since_id = parse_id(since)
            at = next((i for i, (msg_id, _) in enumerate(entries)
                       if since_id is not None and msg_id == since_id), None)
            fields["recovered"] = at is not None
            if at is not None:
                entries = entries[at + 1:]
        frames = [encode_text(event("joined", ref, **fields))]
        if history:
            self._history.move_to_end(room)
            frames += self._json_frames(room, entries)
        connection.send_bytes(frames[0] if len(frames) == 1 else b"".join(frames))
        if not connection.open:
            return  # (its history did not fit in its backlog)
        room = self._add_to(self.subscribers, room, connection)
        connection.rooms += (room,)
        if self.presence_notices:
            self._joined_rooms.add(room)

    def _json_frames(self, room: str, pairs) -> list[bytes]:
        """Message events of room key ``room`` for (id, plain frame) pairs, one frame each;
        a message without an id (from outside greenchat) is given one here."""
        return [encode_text(message_event(room, msg_id if msg_id is not None else self._new_id(),
                                          frame_message(frame)))
                for msg_id, frame in pairs]

    def _new_id(self) -> bytes:
        self._sequence += 1
        return self._origin + self._sequence.to_bytes(8, "big")

    def _room_opened(self, room: str) -> None:
        """``room`` has a local member, or a joiner waiting for its history: tell the
        backplane once, so it brings the room's messages from now on. A user's key
        (``@<user>``) is a room like any other here."""
        if room not in self._watched:
            self._watched.add(room)
            if room[:1] == USER_PREFIX:
                self._watched_users += 1
            self.backplane.watch(room)

    def _room_closed(self, room: str) -> None:
        """Tell the backplane once that nobody here is in ``room`` or waiting for it.

        From then on this process hears nothing of the room, so a history it kept from
        a store would miss what is said meanwhile: it is forgotten and read again at the
        next join."""
        if (room in self._watched and room not in self.rooms and room not in self._loading
                and room not in self.subscribers and room not in self.users):
            self._watched.discard(room)
            if room[:1] == USER_PREFIX:
                self._watched_users -= 1
            self.backplane.unwatch(room)
            if self.backplane.stores_history:
                self._forget(room)

    def presence(self, everywhere: bool = False) -> dict[str, int]:
        """Members per room (rooms with at least one): in this process, or with
        ``everywhere`` in every process sharing the backplane (the others' counts are as
        old as their last report)."""
        local = {room: len(members) for room, members in self.rooms.items() if members}
        for room, members in self.subscribers.items():
            if room[:1] != USER_PREFIX:  # a user's key is no room to operators
                local[room] = local.get(room, 0) + len(members)
        return self.backplane.presence(local) if everywhere else local

    def report(self) -> dict:
        """This process's figures and presence, which the backplane shares with the others
        (with ``presence_users``, its members' identities per room too)."""
        report = {**self.stats(), "presence": self.presence()}
        if self.presence_users:
            report["hub"] = self._origin.hex()
            report["presence_users"] = {room: users for room in report["presence"]
                                        if (users := self.users_in(room))}
        return report

    def _presence_loop(self) -> None:
        """Tell each named room's members how many they are, when that changed or someone
        joined, at most once per ``PRESENCE_NOTICE_INTERVAL``.

        A notice is a text message ``{"presence": {"room": "general", "members": 5}}``
        (global counts with Redis). It goes to named rooms only, never to the lobby
        (whose clients expect chat text only, as in 2015), and never into history.
        JSON clients get ``{"type": "presence", "room": ..., "members": N}`` for every
        room they are in, the lobby too (with ``"users"``, the members' identities in
        every process, when ``CHAT_PRESENCE_USERS`` is on).
        """
        sent: dict[str, tuple] = {}  # room -> (count, identities) last told to its members
        while True:
            gevent.sleep(PRESENCE_NOTICE_INTERVAL)
            self._guarded("presence", self._send_presence_notices, sent)

    def _send_presence_notices(self, sent: dict[str, tuple]) -> None:
        """One round of the presence loop (see ``_presence_loop``)."""
        counts = self.presence(everywhere=True)
        joined, self._joined_rooms = self._joined_rooms, set()
        local = self.presence()
        for room in [room for room in sent if room not in local]:
            del sent[room]
        for room, members in local.items():
            count = counts.get(room, members)
            subscribers = self.subscribers.get(room)
            users = (self.users_in(room, everywhere=True)
                     if self.presence_users and subscribers else None)
            told = sent.get(room)
            if told == (count, users) and room not in joined:
                continue
            sent[room] = (count, users)
            plain = self.rooms.get(room)
            if room and plain and (told is None or told[0] != count or room in joined):
                notice = json.dumps({"presence": {"room": room, "members": count}},
                                    separators=(",", ":"))
                frame = encode_text(notice)
                for connection in list(plain):
                    connection.send_bytes(frame)
            if subscribers:
                fields: dict = {"room": room_label(room), "members": count}
                if users is not None:
                    fields["users"] = users
                frame = encode_text(event("presence", **fields))
                for connection in list(subscribers):
                    connection.send_bytes(frame)

    def users_in(self, room: str, everywhere: bool = False) -> list[str]:
        """The identities of the members of ``room``, sorted, each once: in this process,
        or with ``everywhere`` in every process sharing the backplane too (as of their
        reports, at most a few seconds old)."""
        members = [*self.rooms.get(room, ()), *self.subscribers.get(room, ())]
        users = {connection.user for connection in members if connection.user is not None}
        if everywhere:
            own = self._origin.hex()
            for report in self.backplane.worker_reports():
                if report.get("hub") != own:
                    users.update(report.get("presence_users", {}).get(room, ()))
        return sorted(users)

    def _load_history(self, room: str) -> None:
        """Read a room's stored history once, merge what arrived live meanwhile, and let
        the waiting clients in.

        Ids make the seam exact. The store's order is the channel's order, so the merge
        is: everything stored, then what arrived live that the read did not include
        (published after it). A stored message whose live copy has not arrived yet is
        skipped when it does (``_unseen``): the joiners have it already. Whatever goes
        wrong, the waiting clients are let in (with what this process has).
        """
        complete = False
        try:
            complete = self._merge_stored_history(room)
        except Exception as error:
            self.fault("history load", error)
        finally:
            for waiting in self._loading.pop(room, ()):
                if type(waiting) is tuple:  # a JSON client: (connection, since, ref)
                    if waiting[0].open:
                        self._enter_room(waiting[0], room, waiting[1], waiting[2])
                elif waiting.open:
                    self.join(waiting)
            self._room_closed(room)  # (unless one of them is in it now)
            if not complete:
                self._forget(room)  # read the store again at the next join
            self._loaded.pop(room).set()

    def _merge_stored_history(self, room: str) -> bool:
        """The read and the merge of ``_load_history``; False when the store was away."""
        try:
            stored = self.backplane.load_history(room, self.history_size)
        except Exception as error:  # Redis away: these joiners get what this process has
            log.warning("could not read the history of room %r: %s", room, error)
            return False
        self.flush()  # what is pending goes to the current members and into ``live``
        live = self._history.get(room) or self._new_history(room)
        # A message from outside greenchat (redis-cli PUBLISH) has no id: never skipped.
        stored_ids = {msg_id for msg_id, _ in stored if msg_id is not None}
        seen = {msg_id for msg_id, _ in live}
        merged = [(msg_id, _encode(message)) for msg_id, message in stored]
        merged += [(msg_id, frame) for msg_id, frame in live if msg_id not in stored_ids]
        self._forget(room)
        self._new_history(room).extend(merged)
        self._history_size += self._history[room].size
        self._trim_history()
        now = time.monotonic()
        for expired in [r for r, (_, until) in self._unseen.items() if until < now]:
            del self._unseen[expired]
        unseen = stored_ids - seen
        if unseen:
            self._unseen[room] = (unseen, now + UNSEEN_WINDOW)
        return True

    def _remember(self, room: str, frames: list[bytes], ids: list) -> None:
        if room[:1] == USER_PREFIX:
            return  # what is sent to a user is not replayed: it joins no room to get it
        history = self._history.get(room)
        if history is None:
            if self.backplane.stores_history:
                return  # the store has them too, and what came before: read it at the join
            history = self._new_history(room)
        before = history.size
        history.extend(zip(ids, frames))
        self._history_size += history.size - before
        self._trim_history()

    def _new_history(self, room: str) -> RoomHistory:
        history = self._history[room] = RoomHistory(self.history_size, self.history_bytes)
        if len(self._history) > MAX_HISTORY_ROOMS:
            self._forget_a_room()  # with Redis, read again from the store at its next join
        return history

    def _forget(self, room: str) -> None:
        history = self._history.pop(room, None)
        if history is not None:
            self._history_size -= history.size
        self._unseen.pop(room, None)

    def _forget_a_room(self) -> bool:
        """Forget the least recently used room's history that nobody is in or waiting for."""
        for room in self._history:  # least recently used first
            if (not self.rooms.get(room) and room not in self._loading
                    and room not in self.subscribers):
                self._forget(room)
                return True
        return False

    def _trim_history(self) -> None:
        """Keep all rooms' history within ``CHAT_HISTORY_TOTAL_BYTES``: rooms nobody is in
        go first, least recently used first; then the oldest messages of the least
        recently used rooms."""
        while self._history_size > self.history_total_bytes:
            if self._forget_a_room():
                continue
            for history in self._history.values():
                if history.entries:
                    before = history.size
                    history.drop_oldest()
                    self._history_size += history.size - before
                    break
            else:  # pragma: no cover - the bytes counted are the bytes held
                break

    def refuse(self, reason: str, detail: str = "") -> None:
        """Count a refused client by reason (full, origin, auth, bad_handshake,
        handshake_timeout, ...); /stats shows them as ``refused``."""
        count = self.refused[reason] = self.refused.get(reason, 0) + 1
        self._log_rarely(reason, count, "refused a client: " + reason, detail)

    def limit_rate(self, detail: str = "") -> None:
        """Count a message over its client's rate limit (dropped, or its client closed)."""
        self.rate_limited += 1
        self._log_rarely("rate_limited", self.rate_limited, "refused a client: rate_limited",
                         detail)

    def fault(self, where: str, error: Exception) -> None:
        """Count an unexpected error that cost one connection (or one round of a loop);
        the first of each kind is logged with its traceback, later ones rarely."""
        self.internal_errors += 1
        self._log_rarely(f"fault:{where}", self.internal_errors,
                         f"unexpected error in the {where}, one connection dropped",
                         f"{type(error).__name__}: {error}", error)

    def _log_rarely(self, key: str, count: int, what: str, detail: str,
                    error: Exception | None = None) -> None:
        """Log at WARNING the first time, then once per REFUSAL_LOG_INTERVAL with how
        many more there were: an attack must not become a log storm."""
        last = self._refusal_logged.get(key)
        now = time.monotonic()
        if last is None:
            log.warning("%s%s", what, f" ({detail})" if detail else "", exc_info=error)
        elif now - last[0] >= REFUSAL_LOG_INTERVAL:
            log.warning("%d more in %.0f s: %s%s", count - last[1], now - last[0], what,
                        f" (latest: {detail})" if detail else "")
        else:
            return
        self._refusal_logged[key] = (now, count)

    # -- dead peers ------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        # At a random point of the first interval, then every interval. gunicorn's
        # workers start together: without it 16 workers' sweeps fell within 1.9 s of a
        # 20 s interval, and pinged every client of the machine at once. One worker's
        # round of 16,000 idle clients held up handshakes 290-450 ms, two in step 750 ms;
        # 63 in step are the likely cause of the million's 8-33 s connect stalls.
        gevent.sleep(random.uniform(0, self.ping_interval))
        while True:
            self._guarded("sweep", self.sweep)
            gevent.sleep(self.ping_interval)

    def _guarded(self, name: str, work: Callable, *args) -> None:
        """Run one round of a background loop; an error ends that round, not the loop."""
        try:
            work(*args)
        except Exception as error:
            self.fault(f"{name} loop", error)
        self.heartbeats[name] = time.monotonic()

    def sweep(self) -> None:
        """One round of the idle check: every client silent for a whole interval is
        pinged; one still silent an interval after its ping is dropped.

        Runs every ``ping_interval`` seconds. Yields to the loop every ``SWEEP_BATCH``
        clients, so a sweep of 20,000 does not stall everyone else's messages.
        """
        connections = [c for members in self.rooms.values() for c in members]
        connections += self.clients
        for index, connection in enumerate(connections):
            if index and index % SWEEP_BATCH == 0:
                gevent.sleep(0)
            connection.check_alive()

    def publish(self, message: str | bytes, room: str = "", user: str | None = None) -> None:
        """Send ``message`` to everyone in ``room``, in every process; never blocks.

        Local clients first, then the backplane carries it to the other processes.
        ``str`` goes out as a text frame, ``bytes`` as a binary frame. With ``user``, it
        goes to every connection of that identity instead (its key, ``@<user>``: JSON
        clients see that as the message's room).
        """
        if user is not None:
            room = user_key(user)
        self.start()
        self.messages_published += 1
        self.deliver(message, room, self.backplane.publish(message, room))

    def deliver(self, message: str | bytes, room: str = "", msg_id: bytes | None = None) -> None:
        """Queue ``message`` for this process's clients in ``room`` only.

        The frame is encoded here, once, whatever the number of receivers; it leaves in
        the flush at the end of this loop iteration, joined with any others queued.
        ``msg_id`` (given by the Redis backplane) keeps history free of duplicates.

        Ids are kept with history, or while the room has JSON clients (they see them),
        from the first such message of a flush on (earlier ones are given ids then).
        Without either in this process the plain path pays two truth tests for it.
        """
        if ((self.history_size or self.subscribers or self._pending_ids)
                and not self._keep_id(room, msg_id)):
            return  # its members got it from the stored history
        frame = _encode(message)
        pending = self._pending.get(room)
        if pending is None:
            self._pending[room] = [frame]
        else:
            pending.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.run_callback(self.flush)

    def _keep_id(self, room: str, msg_id: bytes | None) -> bool:
        """Keep the id of a message ``deliver`` is queueing when it must be kept (see
        there); False for the live copy of a message read from the stored history."""
        ids = self._pending_ids.get(room)
        if ids is None and not self.history_size and room not in self.subscribers:
            return True
        if self.history_size:
            unseen = self._unseen.get(room)
            if unseen is not None and msg_id is not None:
                seen, until = unseen
                if time.monotonic() > until or not seen:
                    del self._unseen[room]
                elif msg_id in seen:
                    seen.discard(msg_id)
                    return False
        if msg_id is None:
            msg_id = self._new_id()
        if ids is None:
            before = self._pending.get(room)
            ids = self._pending_ids[room] = [None] * len(before) if before else []
        ids.append(msg_id)
        return True

    def flush(self) -> None:
        """Send every pending frame of every room: one joined ``send`` per member.

        Runs at the end of each loop iteration; called early when a client starts closing,
        so the echo of what it sent just before its close still reaches it.
        """
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        pending_ids, self._pending_ids = self._pending_ids, {}
        subscribers_of = self.subscribers
        for room, frames in pending.items():
            if self.history_size:
                self._remember(room, frames, pending_ids[room])
            if subscribers_of:
                subscribers = subscribers_of.get(room)
                if subscribers:
                    self._flush_json(room, frames, pending_ids.get(room) or [None] * len(frames),
                                     subscribers)
            members = self.rooms.get(room) or self.users.get(room)
            if not members:
                continue
            started = time.perf_counter()
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            self.deliveries += len(frames) * len(members)
            if self.deflate_connections:
                self.bytes_out += _send_mixed(list(members), frames, data)
            else:
                # A copy: a send can fail and make its connection leave the room mid-loop.
                for connection in list(members):
                    connection.send_bytes(data)
                self.bytes_out += len(data) * len(members)
            took = time.perf_counter() - started
            self.fanout_counts[bisect.bisect_left(FANOUT_BUCKETS, took)] += 1
            self.fanout_sum += took

    def _flush_json(self, room: str, frames: list[bytes], ids: list,
                    subscribers: dict) -> None:
        """The flush of a room to its JSON clients: one message event per frame, made
        once for all of them, the same ``send`` (and compressed twin) logic as plain."""
        started = time.perf_counter()
        events = self._json_frames(room, zip(ids, frames))
        data = events[0] if len(events) == 1 else b"".join(events)
        members = list(subscribers)
        self.deliveries += len(frames) * len(members)
        if self.deflate_connections:
            self.bytes_out += _send_mixed(members, events, data)
        else:
            for connection in members:
                connection.send_bytes(data)
            self.bytes_out += len(data) * len(members)
        took = time.perf_counter() - started
        self.fanout_counts[bisect.bisect_left(FANOUT_BUCKETS, took)] += 1
        self.fanout_sum += took

    def stats(self) -> dict:
        """The figures ``GET /stats`` returns (documented in README.md)."""
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "cpu_s": round(time.process_time(), 3),
            "connections": self.connections,
            "rooms": len(self.rooms) + sum(1 for room in self.subscribers
                                           if room[:1] != USER_PREFIX and room not in self.rooms),
            "json_connections": len(self.clients),
            "history_rooms": len(self._history),  # rooms whose history is held in memory
            "history_bytes": self._history_size,
            "handshakes": self.handshakes,
            "messages_received": self.messages_received,
            "messages_published": self.messages_published,
            "deliveries": self.deliveries,
            "bytes_out": self.bytes_out,
            "max_connections": self.max_connections,
            "refused": dict(self.refused),
            "slow_consumers_closed": self.slow_consumers_closed,
            "protocol_errors": self.protocol_errors,
            "rate_limited": self.rate_limited,
            "pings_sent": self.pings_sent,
            "idle_dropped": self.idle_dropped,
            "internal_errors": self.internal_errors,
            "deflate_connections": self.deflate_connections,
            # Seconds since each background loop last finished a round.
            "loops_age_s": {name: round(time.monotonic() - when, 3)
                            for name, when in self.heartbeats.items()},
            "fanout_seconds": {"le": list(FANOUT_BUCKETS), "counts": list(self.fanout_counts),
                               "sum": round(self.fanout_sum, 6)},
            "rss_bytes": read_rss_bytes(),
            "idle_rss_bytes": self.idle_rss_bytes,
            # libev watchers in use: two per client at most (read, and write while backlogged)
            "active_watchers": self.loop.activecnt,
            **self.backplane.stats(),
        }

    def close_all(self, code: int = 1001, reason: str = "server shutting down") -> int:
        """Send every client a close frame (1001 by default: the server is going away)."""
        connections = [c for members in self.rooms.values() for c in members]
        connections += self.clients
        connections += [c for waiting in self._loading.values() for c in waiting
                        if type(c) is not tuple and c.open]
        for connection in connections:
            connection.close(code, reason)
        return len(connections)
