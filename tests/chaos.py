"""A seeded, bounded chaos run against a real ``greenchat serve`` (issue 11).

The codec is fuzzed (tests/test_protocol.py); this does the same one level up, for the
whole running server. It starts ``greenchat serve`` with settings small enough that every
limit triggers (``SETTINGS``), keeps well-behaved readers in three rooms (the lobby ``/``,
``/rooms/<name>`` twice) that read everything, and at each step lets loose one hostile
client chosen at random (``ACTIONS``): partial frames, stalls (and one overrun by bursts
of the largest messages until it is a slow consumer), an RST in mid-frame or right after
the 101, data and close in one segment, floods over the rate limit, maximum-size
messages, slowloris, silent sockets, requests that promise a body, idle keep-alive
connections, room spam past ``CHAT_MAX_ROOMS``, history joins in the middle of a burst,
pings and pongs, eighteen kinds of bad frames (1002, 1007, 1009), eager and pipelined
upgrades, readers leaving and joining. Everything random comes from
one ``random.Random(seed)``: a seed and a step count name a run (the server's timing
still varies from one run to the next).

After every step it checks what a user cares about:

- every well-behaved reader got every message of its room, in order, exactly once (the
  model is below); a new client can still connect, get the room's history and chat;
- ``/stats``: ``internal_errors`` is 0, the sweep and presence loops finished a round in
  the last ``LOOP_AGE_BOUND`` seconds (``loops_age_s``), RSS is under ``RSS_BOUND``;
- the server logged no traceback;
- each hostile client got what the server owes it (the right close code, its answer, its
  socket closed within the timeout), and nothing it must not get.

At the end the connections, the libev watchers (``active_watchers``) and the server's
open file descriptors (/proc/PID/fd) are back to what they were before the first client,
and SIGTERM stops the server with status 0.

What a well-behaved reader can know it should receive
------------------------------------------------------

Every message carries a unique number (its ``uid``), and its whole payload follows from
that number and its size, so a reader tells which message it got and whether it arrived
intact. Each room has a *witness*: a reader that joined before the room's first message
and never leaves, so what it receives is the room's order, the *log*. Then:

- the witness receives every message the server must accept (``MUST``): everything a
  well-behaved client sends (one that stays under the rate limit, answers pings, and
  reads), and what a hostile client sent that the server has no reason to refuse (the
  first ``RATE_BURST`` messages of a flood, what precedes a bad frame or a close in the
  same segment, a partial frame completed within a second, a maximum-size message);
- no reader ever receives a message the server must refuse (``MUST_NOT``): what follows
  a bad frame, a close or an over-size message, a frame cut by an RST or never finished;
  nor a message of another room, nor one twice;
- what else hostile clients sent (``MAY``: past the rate limit, sent just before an RST,
  by a client the server may have dropped as a slow consumer) may or may not be there;
- every reader's messages are one contiguous run of its room's log, so each got all the
  messages of its room since it joined, once, in the room's order (which keeps each
  sender's order: the witness checks that too); a joiner's run starts with the room's
  history, the newest messages before its join that fit ``HISTORY`` and ``HISTORY_BYTES``,
  for a join between the log's length when it connected and its first own message.

Presence notices (``{"presence": ...}``) are not messages: a reader in a named room keeps
the last one, never gets one in the lobby, and at the end, once membership has been still
for a while, every reader's last notice is its room's member count.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import socket
import struct
import time
from collections import Counter, deque
from typing import Callable

from chat.protocol import (BinaryMessage, ClientProtocol, CloseReceived, Opcode, Pong,
                           ProtocolViolation, State, TextMessage, accept_key,
                           encode_client_frame, encode_frame, generate_key, handshake_request)
from helpers import Server, greenchat_argv
from raw_clients import connect, read_response_head

__all__ = ["ACTIONS", "SETTINGS", "Chaos", "ChaosFailure", "run"]

# -- the server's settings: small enough that every limit triggers in seconds ----------

HANDSHAKE_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 1.0
PING_INTERVAL = 1.0
CLOSE_TIMEOUT = 2.0
RATE_LIMIT = 10.0
RATE_BURST = 10
MAX_MESSAGE_SIZE = 8192
# A room's history: its newest HISTORY messages that fit in HISTORY_BYTES of frames (four
# of the largest: both limits trigger).
HISTORY = 8
HISTORY_BYTES = 32 * 1024
MAX_ROOMS = 8
# Rooms with members never lose history to the process's budget (8 x 32 KiB fit in it);
# the rooms room spam leaves behind do, least recently used first.
HISTORY_TOTAL_BYTES = 320 * 1024
SEND_BUFFER = 64 * 1024
# A joiner gets its history at once before it can read a byte, and a message may be of
# the largest size: the backlog holds both (the server refuses to start otherwise), with
# room for the live ones behind them.
MAX_BACKLOG = 128 * 1024
SETTINGS = {
    "CHAT_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT),
    "CHAT_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT),
    "CHAT_PING_INTERVAL": str(PING_INTERVAL),
    "CHAT_CLOSE_TIMEOUT": str(CLOSE_TIMEOUT),
    "CHAT_RATE_LIMIT": str(RATE_LIMIT),
    "CHAT_RATE_BURST": str(RATE_BURST),
    "CHAT_MAX_MESSAGE_SIZE": str(MAX_MESSAGE_SIZE),
    "CHAT_MAX_BACKLOG": str(MAX_BACKLOG),
    "CHAT_HISTORY": str(HISTORY),
    "CHAT_HISTORY_BYTES": str(HISTORY_BYTES),
    "CHAT_HISTORY_TOTAL_BYTES": str(HISTORY_TOTAL_BYTES),
    "CHAT_MAX_ROOMS": str(MAX_ROOMS),
    "CHAT_SEND_BUFFER": str(SEND_BUFFER),
    "CHAT_PRESENCE_NOTICES": "true",
}

# -- the bounds the checks hold the server to ------------------------------------------

# Seconds beyond a timeout the server may take to act on it: a shared 2-core machine
# running the server and this harness can stall either for a while.
MARGIN = 4.0
# The sweep and the presence loop each sleep a second between rounds.
LOOP_AGE_BOUND = 5.0
# What this run may make the server hold: its interpreter (~40 MB), all rooms' history
# (HISTORY_TOTAL_BYTES), the backlogs of its hostile clients (MAX_BACKLOG each, a hundred
# at most: ~13 MB), the frames they share; twice that leaves the allocator its slack.
RSS_BOUND = 128 << 20
# How long the readers may take to get every message of a step.
SETTLE_TIMEOUT = 10.0
# Messages are forgotten this long after they were sent (except a room's last HISTORY):
# no client of ours lives that long, so one that arrives later is a late duplicate.
FORGET_AFTER = 30.0
# Hostile clients alive at once; beyond it the long-lived kinds wait for a later step.
MAX_HOSTILES = 40

READERS_PER_ROOM = 3  # the witness and two more
ROOM_NAMES = ("a", "b")  # the lobby plus /rooms/chaos<seed><name>
# A well-behaved sender stays well under the server's limit (10/s, 10 at once): even if
# the server sees two seconds of its messages at once, they fit in the burst.
SENDER_RATE = 3.0
SENDER_BURST = 4.0

MUST, MAY, MUST_NOT = "must", "may", "must not"

# Weights of the hostile actions; each is a method act_<name> of Chaos.
ACTIONS = {
    "partial_frame": 3,
    "stall": 2,
    "overrun": 1,
    "rst_mid_frame": 2,
    "data_and_close": 2,
    "flood": 2,
    "max_size": 2,
    "slowloris": 1,
    "silent": 1,
    "promised_body": 1,
    "idle_keepalive": 1,
    "room_spam": 1,
    "history_join_burst": 2,
    "control_frames": 2,
    "bad_frame": 3,
    "eager": 1,
    "pipelined_upgrade": 1,
    "rst_after_upgrade": 1,
    "reader_churn": 1,
}

# Multi-byte code points in every text payload, so fragment boundaries cut through them.
_PATTERN = "chaos é ü € 😀 ".encode()
_BINARY_PATTERN = bytes(range(256))


class ChaosFailure(AssertionError):
    """The server did something a user would call a bug; the message says what, where."""


class Message:
    """One message a client of ours sent: who, in which room, and whether it must arrive."""

    __slots__ = ("uid", "sender", "seq", "room", "size", "binary", "status", "sent_at")

    def __init__(self, uid: int, sender: str, seq: int, room: str, size: int, binary: bool,
                 status: str) -> None:
        self.uid = uid
        self.sender = sender
        self.seq = seq  # its place among the sender's messages
        self.room = room  # the room's key in Chaos.rooms (its path), or a spam room's path
        self.size = size
        self.binary = binary
        self.status = status
        self.sent_at = time.monotonic()

    def __repr__(self) -> str:
        kind = "binary" if self.binary else "text"
        return (f"<message {self.uid} #{self.seq} of {self.sender} to {self.room}, {kind} "
                f"{self.size} B, {self.status}>")


def payload(uid: int, size: int, binary: bool) -> bytes:
    """A message's payload, made from its number alone: ``"<uid> "`` then a pattern."""
    head = b"%d " % uid
    size = max(size, len(head))
    pattern = _BINARY_PATTERN if binary else _PATTERN
    body = (pattern * ((size - len(head)) // len(pattern) + 1))[: size - len(head)]
    if not binary:  # a code point cut at the end: drop it, pad with ASCII
        body = body.decode(errors="ignore").encode()
        body += b"." * (size - len(head) - len(body))
    return head + body


def parse_uid(data: bytes) -> int | None:
    head = data[:24].partition(b" ")[0]
    return int(head) if head.isdigit() else None


class Room:
    """One room we read: its witness's log and the readers checked against it."""

    __slots__ = ("path", "name", "log", "base", "index", "must", "last_seq", "witness",
                 "readers", "departed")

    def __init__(self, path: str, name: str | None) -> None:
        self.path = path
        self.name = name  # in presence notices; None for the lobby, which gets none
        self.log: list[int] = []  # the uids the witness received, in order
        self.base = 0  # the log index of log[0] (older entries are forgotten)
        self.index: dict[int, int] = {}  # uid -> log index
        self.must: set[int] = set()  # MUST messages the witness has not received yet
        self.last_seq: dict[str, int] = {}  # sender -> seq of its last message in the log
        self.witness: Reader | None = None
        self.readers: list[Reader] = []  # open readers other than the witness
        self.departed: list[tuple[Reader, int, list[int]]] = []  # (reader, pos, tail) to check

    @property
    def end(self) -> int:
        return self.base + len(self.log)

    def slice(self, start: int, stop: int) -> list[int]:
        return self.log[start - self.base: stop - self.base]


class Peer:
    """A socket of ours the pump reads."""

    __slots__ = ()
    name: str
    sock: socket.socket

    def on_readable(self) -> None:
        raise NotImplementedError


class Reader(Peer):
    """A well-behaved client: reads everything, answers pings, stays under the rate limit,
    and says hello (a message of its own) when it joins, which bounds where its join was."""

    __slots__ = ("chaos", "name", "room", "sock", "codec", "received", "pos", "joined_after",
                 "hello", "seq", "tokens", "refilled", "presence", "leaving", "gone")

    def __init__(self, chaos: Chaos, name: str, room: Room, sock: socket.socket,
                 joined_after: int) -> None:
        self.chaos = chaos
        self.name = name
        self.room = room
        self.sock = sock
        self.codec = ClientProtocol(max_message_size=MAX_MESSAGE_SIZE)
        # Uids received since ``pos``: the log index where the last settle left it (None
        # until its first settle: then its whole stream must be a run of the log).
        self.received: list[int] = []
        self.pos: int | None = None
        self.joined_after = joined_after  # the log's length when it connected
        self.hello: int | None = None
        self.seq = 0
        self.tokens = SENDER_BURST
        self.refilled = time.monotonic()
        self.presence: int | None = None  # members in the last presence notice
        self.leaving = False
        self.gone = False  # the server closed TCP after our close: done

    def __repr__(self) -> str:
        return f"<reader {self.name} in {self.room.path}>"

    def may_send(self) -> bool:
        now = time.monotonic()
        self.tokens = min(SENDER_BURST, self.tokens + (now - self.refilled) * SENDER_RATE)
        self.refilled = now
        return self.tokens >= 1.0 and not self.leaving

    def send(self, size: int, binary: bool = False) -> int:
        """Send one message to the room (MUST: the witness will have to get it)."""
        self.tokens -= 1.0
        self.seq += 1
        uid = self.chaos.new_message(self.name, self.seq, self.room.path, size, binary, MUST)
        self.sock.sendall(self.chaos.frame(Opcode.BINARY if binary else Opcode.TEXT,
                                           payload(uid, size, binary)))
        return uid

    def leave(self) -> None:
        """Start a clean close; the pump reads until the server closes TCP."""
        self.leaving = True
        self.codec.send_close(1000)
        self.sock.sendall(self.codec.data_to_send())

    def on_readable(self) -> None:
        chaos = self.chaos
        try:
            data = self.sock.recv(65536)
        except OSError as error:
            chaos.fail(f"{self}: {error!r} from the server")
        if not data:
            if not (self.leaving and self.codec.state is State.CLOSED):
                chaos.fail(f"{self} was disconnected by the server (codec {self.codec!r})")
            self.gone = True
            chaos.forget_peer(self)
            return
        for event in self.codec.receive_data(data):
            kind = type(event)
            if kind is TextMessage:
                if event.text.startswith('{"presence"'):
                    self.on_presence(event.text)
                else:
                    self.on_message(event.text.encode(), False)
            elif kind is BinaryMessage:
                self.on_message(event.data, True)
            elif kind is CloseReceived:
                if not self.leaving:
                    chaos.fail(f"{self} was closed by the server with {event.code} "
                               f"{event.reason!r}")
            elif kind is ProtocolViolation:
                chaos.fail(f"{self}: the server broke RFC 6455: {event.error}")
        out = self.codec.data_to_send()  # pongs
        if out and not self.leaving:
            self.sock.sendall(out)

    def on_message(self, data: bytes, binary: bool) -> None:
        message = self.chaos.identify(data, binary, self.room.path, self)
        if self is self.room.witness:
            self.chaos.record(self.room, message)
        self.received.append(message.uid)

    def on_presence(self, text: str) -> None:
        notice = json.loads(text)["presence"]
        if self.room.name is None or notice.get("room") != self.room.name:
            self.chaos.fail(f"{self} got a presence notice for another room: {text}")
        members = notice.get("members")
        if not isinstance(members, int) or members < 1:
            self.chaos.fail(f"{self} got a presence notice with no members: {text}")
        self.presence = members


class Hostile(Peer):
    """A client that misbehaves. What it sent at once is sent; the pump reads what the
    server answers, sends what is due later, and checks that the server did what it owes
    before ``deadline`` seconds: closed TCP (``expect_eof``) with a close frame of one of
    ``expect_close``, echoed ``expect_own``, answered the pings ``expect_pongs``, answered
    an HTTP request with ``expect_status`` (b"": not a byte). It ends ``lifetime`` seconds
    after it started, once all that is checked, with a FIN or an RST (``reset``)."""

    __slots__ = ("chaos", "kind", "name", "sock", "room", "codec", "raw", "reads", "retire_at",
                 "expect_eof", "expect_close", "expect_status", "expect_own", "expect_pongs",
                 "deadline", "open_until", "polite", "reset", "later", "seen", "pongs",
                 "close_code", "eof", "done")

    def __init__(self, chaos: Chaos, kind: str, sock: socket.socket, *, room: str | None,
                 websocket: bool = True, reads: bool = True, lifetime: float = 0.3,
                 expect_eof: bool = False, expect_close: tuple[int, ...] = (),
                 expect_status: bytes | None = None, expect_own: tuple[int, ...] = (),
                 expect_pongs: tuple[bytes, ...] = (), deadline: float = MARGIN,
                 open_until: float = 0.0, polite: bool = False, reset: bool = False,
                 later: list[tuple[float, bytes, tuple[int, ...]]] | None = None) -> None:
        now = time.monotonic()
        self.chaos = chaos
        self.kind = kind
        self.name = f"{kind}-{chaos.next_name()}"
        self.sock = sock
        self.room = room
        self.codec = ClientProtocol(max_message_size=1 << 20) if websocket else None
        self.raw = b""  # what a client that never upgraded received
        self.reads = reads
        self.retire_at = now + lifetime
        self.expect_eof = expect_eof
        self.expect_close = expect_close
        self.expect_status = expect_status
        self.expect_own = set(expect_own)
        self.expect_pongs = list(expect_pongs)
        self.deadline = now + deadline  # 0 once what it expected is checked
        self.open_until = now + open_until  # the server must not end it before
        self.polite = polite  # answers the server's close frame
        self.reset = reset
        # (when, bytes, uids of messages these bytes complete: MUST once sent)
        self.later = later or []
        self.seen: set[int] = set()
        self.pongs: list[bytes] = []
        self.close_code: int | None = None
        self.eof = False
        self.done = False

    def __repr__(self) -> str:
        return f"<hostile {self.name} in {self.room}>"

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:  # an RST from the server (it closed with our data unread)
            data = b""
        if not data:
            self.eof = True
            self.chaos.selector.unregister(self.sock)
            if time.monotonic() < self.open_until:
                self.chaos.fail(f"{self} was disconnected while it had to stay open")
            return
        if self.codec is None:
            self.raw += data
            return
        self.on_events(self.codec.receive_data(data))
        out = self.codec.data_to_send()
        if out and self.polite and self.close_code is not None:
            self.send(out)  # our answer to its close frame (pongs are not sent: hostile)

    def on_events(self, events: list) -> None:
        for event in events:
            kind = type(event)
            if kind is TextMessage:
                if not event.text.startswith('{"presence"'):
                    self.on_message(event.text.encode(), False)
            elif kind is BinaryMessage:
                self.on_message(event.data, True)
            elif kind is Pong:
                self.pongs.append(event.payload)
            elif kind is CloseReceived:
                self.close_code = event.code
            elif kind is ProtocolViolation:
                self.chaos.fail(f"{self}: the server broke RFC 6455: {event.error}")

    def on_message(self, data: bytes, binary: bool) -> None:
        message = self.chaos.identify(data, binary, self.room, self)
        if message.uid in self.seen:
            self.chaos.fail(f"{self} got {message} twice")
        self.seen.add(message.uid)

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:  # the server closed it (or reset it) first
            return False

    def tick(self, now: float) -> None:
        """Send what is due, check what the server owed, retire when it is time."""
        while self.later and self.later[0][0] <= now and not self.eof:
            _, data, uids = self.later.pop(0)
            for uid in uids:  # the message is complete once these bytes are out
                self.chaos.promote(uid)
            if not self.send(data) and uids:
                self.chaos.fail(f"{self} could not finish its message")
        if self.eof:
            self.later = []  # a slowloris's remaining bytes, say
        if self.deadline and (self.satisfied() or now >= self.deadline):
            self.check()
            self.deadline = 0.0
        if not self.deadline and not self.later and now >= self.retire_at:
            self.retire()

    def satisfied(self) -> bool:
        return ((self.eof or not self.expect_eof)
                and (not self.expect_close or self.close_code is not None or self.eof)
                and self.expect_own <= self.seen
                and len(self.pongs) >= len(self.expect_pongs)
                and (self.expect_status is None or self.eof or self.raw != b""))

    def check(self) -> None:
        """What the server owed this client (at its deadline, or once all of it came)."""
        fail = self.chaos.fail
        if self.expect_eof and not self.eof:
            fail(f"{self}: the server did not close it within its timeout")
        if self.kind == "overrun" and self.close_code == 1008:
            self.chaos.counts["overrun clients closed with 1008"] += 1
        if self.expect_close and self.close_code not in self.expect_close:
            fail(f"{self}: expected a close frame with {self.expect_close}, got "
                 f"{self.close_code} ({len(self.seen)} messages, eof {self.eof})")
        if self.expect_status is not None and not (
                self.raw.startswith(self.expect_status) if self.expect_status else not self.raw):
            fail(f"{self}: expected {self.expect_status or 'no answer'!r}, got "
                 f"{self.raw[:60]!r}")
        missing = self.expect_own - self.seen
        if missing:
            fail(f"{self}: its own messages {sorted(missing)} never came back to it")
        if self.pongs[: len(self.expect_pongs)] != self.expect_pongs:
            fail(f"{self}: pongs {self.pongs} for pings {self.expect_pongs}")

    def retire(self) -> None:
        """End it our way, if the server has not (a stall is read first to check its stream)."""
        if not self.reads and not self.eof:
            self.drain_stall()
        elif self.reads and not self.eof:
            self.chaos.selector.unregister(self.sock)
        if self.reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.done = True

    def drain_stall(self) -> None:
        """What a client that never read was sent: valid frames of its room's messages,
        then a close frame with 1008 if it was closed as a slow consumer."""
        self.sock.setblocking(False)
        for _ in range(1000):  # far more reads than its small buffer needs
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            self.on_events(self.codec.receive_data(data))
        if self.close_code not in (None, 1008):
            self.chaos.fail(f"{self}: a client that never read was closed with "
                            f"{self.close_code}, not 1008")
        if self.close_code == 1008:
            self.chaos.counts["stalls closed as slow consumers"] += 1


class Chaos:
    """One run: the server, our clients, the messages, the checks; see the module docstring."""

    def __init__(self, seed: int, log: Callable[[str], None] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.tour = self.rng.sample(list(ACTIONS), len(ACTIONS))
        self.log = log or (lambda line: None)
        self.server: Server | None = None
        self.selector = selectors.DefaultSelector()
        self.messages: dict[int, Message] = {}
        self.uids = 0
        self.names = 0
        self.rooms: dict[str, Room] = {}
        self.hostiles: list[Hostile] = []
        self.transient: list[Reader] = []  # readers that leave at the end of the step
        self.counts: Counter[str] = Counter()
        self.step = 0
        self.recent: deque[str] = deque(maxlen=25)  # the last actions, for a failure
        self.baseline: dict = {}
        self.last_stats: dict = {}
        self.peak_rss = 0
        self.log_lines_checked = 0
        self.delivered = 0  # messages our readers received

    # -- bookkeeping ---------------------------------------------------------------

    def next_name(self) -> int:
        self.names += 1
        return self.names

    def new_message(self, sender: str, seq: int, room: str, size: int, binary: bool,
                    status: str) -> int:
        self.uids += 1
        uid = self.uids
        self.messages[uid] = Message(uid, sender, seq, room, size, binary, status)
        self.counts["messages " + status] += 1
        if status == MUST and room in self.rooms:
            self.rooms[room].must.add(uid)
        return uid

    def promote(self, uid: int) -> None:
        """A message that could not arrive now must (its last byte is being sent)."""
        message = self.messages[uid]
        self.counts["messages " + message.status] -= 1
        message.status = MUST
        self.counts["messages " + MUST] += 1
        if message.room in self.rooms:
            self.rooms[message.room].must.add(uid)

    def frame(self, opcode: int, data: bytes, fin: bool = True) -> bytes:
        """A client frame from the codec, its mask from the run's seed."""
        return encode_client_frame(opcode, data, fin, mask=self.rng.randbytes(4))

    def identify(self, data: bytes, binary: bool, room: str | None, who: Peer) -> Message:
        """The message a client received, checked: known, intact, of its room, allowed."""
        uid = parse_uid(data)
        message = self.messages.get(uid) if uid is not None else None
        if message is None:
            self.fail(f"{who} got a message nobody sent (or one long gone: a late "
                      f"duplicate): {data[:40]!r}")
        if message.room != room:
            self.fail(f"{who} in {room} got {message}")
        if message.status == MUST_NOT:
            self.fail(f"{who} got {message}, which the server had to refuse")
        if message.binary != binary or data != payload(uid, message.size, binary):
            self.fail(f"{who} got {message} altered: {data[:40]!r}... ({len(data)} B)")
        return message

    def record(self, room: Room, message: Message) -> None:
        """The witness got ``message``: it is the next in its room's log."""
        if message.uid in room.index:
            self.fail(f"the witness of {room.path} got {message} twice")
        last = room.last_seq.get(message.sender, 0)
        if message.seq <= last:
            self.fail(f"{message} came after #{last} of the same sender in {room.path}")
        room.last_seq[message.sender] = message.seq
        room.index[message.uid] = room.end
        room.log.append(message.uid)
        room.must.discard(message.uid)
        self.delivered += 1

    def fail(self, what: str) -> None:
        server = self.server
        tail = "".join(server.lines[-15:]) if server is not None else ""
        if server is not None and server.proc.poll() is not None:
            time.sleep(0.2)  # its last lines
            tail = "".join(server.lines[-15:])
            what += f" (the server exited with status {server.proc.returncode})"
        elif server is not None:
            try:
                stats = server.stats()
                what += "\n/stats: " + ", ".join(f"{key} {stats[key]}" for key in (
                    "connections", "idle_dropped", "pings_sent", "slow_consumers_closed",
                    "internal_errors", "refused"))
            except OSError as error:
                what += f"\n/stats did not answer: {error!r}"
        raise ChaosFailure(
            f"seed {self.seed}, step {self.step}: {what}\n"
            f"last actions: {', '.join(self.recent)}\nserver log tail:\n{tail}")

    # -- the pump ------------------------------------------------------------------

    def watch(self, peer: Peer) -> None:
        self.selector.register(peer.sock, selectors.EVENT_READ, peer)

    def forget_peer(self, peer: Peer) -> None:
        self.selector.unregister(peer.sock)
        peer.sock.close()

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Read every socket of ours and run what is due, for ``seconds`` or until
        ``until()`` holds; returns whether it held (True when there is no condition)."""
        deadline = time.monotonic() + seconds
        while True:
            if until is not None and until():
                return True
            now = time.monotonic()
            if now >= deadline:
                return until is None
            for key, _ in self.selector.select(min(deadline - now, 0.02)):
                key.data.on_readable()
            now = time.monotonic()
            for hostile in list(self.hostiles):
                hostile.tick(now)
                if hostile.done:
                    self.hostiles.remove(hostile)

    # -- clients -------------------------------------------------------------------

    def source(self) -> str:
        """A loopback source address: spread, so ports never run out in a long soak."""
        return f"127.0.{self.rng.randint(0, 3)}.{self.rng.randint(2, 254)}"

    def connect(self, path: str, rcvbuf: int = 0) -> socket.socket:
        """A websocket to ``path``, once its 101 is read and checked."""
        try:
            sock = connect(self.server.port, path, source=self.source())
        except OSError as error:
            self.fail(f"a new client could not connect to {path}: {error!r}")
        if rcvbuf:  # a client with a small window: its kernel holds little for it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        return sock

    def raw_socket(self) -> socket.socket:
        """A TCP connection to the server, nothing sent yet."""
        try:
            return socket.create_connection(("127.0.0.1", self.server.port), timeout=10,
                                            source_address=(self.source(), 0))
        except OSError as error:
            self.fail(f"a new TCP connection failed: {error!r}")

    def add_reader(self, room: Room, path: str | None = None) -> Reader:
        """A new well-behaved reader of ``room``; it says hello once connected."""
        joined_after = room.end
        name = f"reader-{self.next_name()}"
        reader = Reader(self, name, room, self.connect(path or room.path), joined_after)
        self.watch(reader)
        reader.hello = reader.send(self.rng.randint(1, 200))
        if room.witness is None:
            room.witness = reader
        else:
            room.readers.append(reader)
        return reader

    def add_hostile(self, hostile: Hostile) -> Hostile:
        if hostile.reads:
            self.watch(hostile)
        self.hostiles.append(hostile)
        return hostile

    def random_room(self) -> Room:
        return self.rng.choice(list(self.rooms.values()))

    def lobby_path(self) -> str:
        """The lobby is ``/`` and also ``/rooms/lobby``."""
        return self.rng.choice(("/", "/rooms/lobby"))

    def path_of(self, room: Room) -> str:
        return self.lobby_path() if room.name is None else room.path

    def size(self) -> int:
        """A message size: mostly small, sometimes up to the largest allowed."""
        roll = self.rng.random()
        if roll < 0.7:
            return self.rng.randint(1, 200)
        if roll < 0.95:
            return self.rng.randint(200, 4000)
        return self.rng.randint(4000, MAX_MESSAGE_SIZE)

    # -- the run -------------------------------------------------------------------

    def start(self) -> None:
        self.server = Server(greenchat_argv(), env=SETTINGS).wait_ready()
        # One client in and out first, so what the first connection sets up once (the
        # lobby's entry, the loops' timers) is in the baseline.
        connect(self.server.port).close()
        stats = self.server.wait_stats(
            lambda s: s["connections"] == 0 and {"sweep", "presence"} <= set(s["loops_age_s"]))
        fds = []
        for _ in range(10):  # the fds at rest: /stats's own socket may still be closing
            fds.append(self.open_fds())
            time.sleep(0.03)
        self.baseline = {"active_watchers": stats["active_watchers"], "rooms": stats["rooms"],
                         "fds": min(fds)}
        self.log(f"server pid {self.server.pid} on port {self.server.port}, baseline "
                 f"{self.baseline}, rss {stats['rss_bytes'] >> 20} MB")
        self.rooms["/"] = Room("/", None)
        for name in ROOM_NAMES:
            room_name = f"chaos{self.seed}{name}"
            self.rooms[f"/rooms/{room_name}"] = Room(f"/rooms/{room_name}", room_name)
        for room in self.rooms.values():
            for _ in range(READERS_PER_ROOM):
                self.add_reader(room)
        self.settle()

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.server.pid}/fd"))

    def run_step(self) -> None:
        self.step += 1
        if self.step <= len(ACTIONS):
            # The first steps are every action once, in the seed's order, so a short run
            # covers them all: the draws below depend on timing (how many hostile
            # clients are still open), so a seed alone does not fix which kinds come up.
            kind = self.tour[self.step - 1]
        else:
            kind = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        if len(self.hostiles) >= MAX_HOSTILES and kind in ("stall", "slowloris", "silent",
                                                            "promised_body", "partial_frame"):
            kind = "bad_frame"  # short-lived instead
        self.recent.append(kind)
        getattr(self, "act_" + kind)()
        self.counts[kind] += 1
        self.chat()
        room = self.random_room()
        # A new client can connect, get the history and chat; it leaves once checked, and
        # so does a reader that joined in the middle of a burst, so the readers stay few.
        self.transient.append(self.add_reader(room, self.path_of(room)))
        self.settle()
        for reader in self.transient:
            self.leave(reader)
        self.transient = []
        self.check_server()

    def leave(self, reader: Reader) -> None:
        """A reader leaves cleanly; what it gets until the server closes TCP is checked
        against its room's log at the next settle."""
        room = reader.room
        room.readers.remove(reader)
        reader.leave()
        room.departed.append((reader, reader.pos, reader.received))

    def chat(self) -> None:
        """A few well-behaved messages from the readers, within their rate."""
        readers = [r for room in self.rooms.values() for r in [room.witness, *room.readers]]
        for reader in self.rng.sample(readers, 2):
            if reader.may_send():
                reader.send(self.size(), binary=self.rng.random() < 0.1)

    def settle(self) -> None:
        """Read until every reader has every message of its room, then check each reader's
        stream against its room's log (see the module docstring)."""
        if not self.pump(SETTLE_TIMEOUT, self.aligned):
            self.fail("the readers did not all get their rooms' messages within "
                      f"{SETTLE_TIMEOUT:.0f} s:\n{self.describe_rooms()}")
        for room in self.rooms.values():
            end = room.end
            for reader, pos, tail in room.departed:
                if tail != room.slice(pos, pos + len(tail)):
                    self.fail(f"{reader} got {tail} before it left, the room's log from "
                              f"{pos} is {room.slice(pos, pos + len(tail))}")
            room.departed = []
            for reader in room.readers:
                self.check_reader(room, reader, end)
            room.witness.received = []
            room.witness.pos = end
        now = time.monotonic()
        for room in self.rooms.values():
            # A reader that joins gets HISTORY entries back; a hostile client reading late
            # gets messages sent seconds ago: keep both, forget what is older.
            forget = 0
            while (forget < len(room.log) - HISTORY
                   and now - self.messages[room.log[forget]].sent_at > FORGET_AFTER):
                forget += 1
            for uid in room.log[:forget]:
                del room.index[uid]
                del self.messages[uid]
            del room.log[:forget]
            room.base += forget
        for uid in [uid for uid, m in self.messages.items()
                    if m.status != MUST and now - m.sent_at > FORGET_AFTER
                    and not (m.room in self.rooms and uid in self.rooms[m.room].index)]:
            del self.messages[uid]

    def check_reader(self, room: Room, reader: Reader, end: int) -> None:
        received = reader.received
        if reader.pos is not None:
            expected = room.slice(reader.pos, end)
            if received != expected:
                self.fail(f"{reader} got {received} since log index {reader.pos}; the "
                          f"room's log has {expected}")
        else:
            start = end - len(received)
            if received != room.slice(start, end):
                self.fail(f"{reader} (new) got {received}; the room's log ends with "
                          f"{room.slice(start, end)}")
            # It joined after log entry k, for a k between the log's length when it
            # connected and its hello; its history is what the room kept before k.
            hello = room.index[reader.hello]
            starts = {self.history_start(room, k) for k in range(reader.joined_after, hello + 1)}
            if start not in starts:
                self.fail(f"{reader} joined {room.path} between log indexes "
                          f"{reader.joined_after} and {hello}, so its history had to start "
                          f"at one of {sorted(starts)}; it started at {start}")
            self.counts["joins checked"] += 1
        reader.pos = end
        reader.received = []

    def history_start(self, room: Room, joined: int) -> int:
        """Where the history of a reader that joined after log entry ``joined`` starts:
        the room keeps its newest HISTORY messages whose frames fit in HISTORY_BYTES."""
        start = joined
        kept = 0
        while start > max(0, joined - HISTORY):
            size = self.messages[room.log[start - 1 - room.base]].size
            kept += size + (2 if size < 126 else 4)  # the frame: payload and header
            if kept > HISTORY_BYTES:
                break
            start -= 1
        return start

    def aligned(self) -> bool:
        """Every reader has what its room's witness has, and the witness every MUST."""
        for room in self.rooms.values():
            if room.must:
                return False
            last = room.log[-1] if room.log else None
            for reader in room.readers:
                if reader.received:
                    if reader.received[-1] != last:
                        return False
                elif reader.pos != room.end:
                    return False
                if reader.pos is None and reader.hello not in room.index:
                    return False
            for reader, pos, tail in room.departed:
                if not reader.gone or pos + len(tail) > room.end:
                    return False
        return True

    def describe_rooms(self) -> str:
        lines = []
        for room in self.rooms.values():
            lines.append(f"{room.path}: log ends at {room.end} with {room.log[-8:]}, "
                         f"missing MUST {sorted(room.must)[:10]}")
            for reader in room.readers:
                lines.append(f"  {reader}: pos {reader.pos}, last {reader.received[-8:]}")
            for reader, pos, tail in room.departed:
                lines.append(f"  departed {reader}: pos {pos}, tail {tail[-8:]}, "
                             f"gone {reader.gone}")
        return "\n".join(lines)

    def check_server(self) -> None:
        """/stats, the server's log: no internal error, loops ticking, RSS bounded."""
        stats = self.server.stats()
        if stats["internal_errors"]:
            self.fail(f"internal_errors is {stats['internal_errors']}")
        ages = stats["loops_age_s"]
        for loop in ("sweep", "presence"):
            if ages.get(loop, float("inf")) > LOOP_AGE_BOUND:
                self.fail(f"the {loop} loop has not finished a round for {ages.get(loop)} s")
        self.peak_rss = max(self.peak_rss, stats["rss_bytes"])
        if stats["rooms"] > MAX_ROOMS or stats["history_bytes"] > HISTORY_TOTAL_BYTES:
            self.fail(f"{stats['rooms']} rooms, {stats['history_bytes']} bytes of history: "
                      f"over CHAT_MAX_ROOMS or CHAT_HISTORY_TOTAL_BYTES")
        if stats["rss_bytes"] > RSS_BOUND:
            self.fail(f"RSS {stats['rss_bytes'] >> 20} MB is over {RSS_BOUND >> 20} MB "
                      f"(history of {stats['history_rooms']} rooms)")
        lines = self.server.lines
        new = lines[self.log_lines_checked:]
        self.log_lines_checked += len(new)
        if any("Traceback" in line for line in new):
            self.fail("the server logged a traceback")
        if self.server.proc.poll() is not None:
            self.fail(f"the server exited with {self.server.proc.returncode}")
        self.last_stats = stats

    def finish(self) -> None:
        """Every client leaves; the server is back to its baseline, then stops cleanly."""
        # The last hostile clients run their course: each is checked like the others.
        if not self.pump(HANDSHAKE_TIMEOUT + CLOSE_TIMEOUT + 3 * MARGIN,
                         lambda: not self.hostiles):
            self.fail(f"hostile clients still running at the end: {self.hostiles}")
        # Membership still for longer than the presence notices' interval: each reader's
        # last notice is its room's count.
        self.pump(2.5)
        self.settle()
        for room in self.rooms.values():
            if room.name is None:
                continue
            members = self.server.get_json(room.path)["members"]
            for reader in [room.witness, *room.readers]:
                if reader.presence != members:
                    self.fail(f"{reader}'s last presence notice said {reader.presence}, "
                              f"the room has {members}")
        for room in self.rooms.values():
            for reader in [room.witness, *room.readers]:
                reader.leave()
            readers = [room.witness, *room.readers]
            room.readers = []
            if not self.pump(SETTLE_TIMEOUT, lambda: all(r.gone for r in readers)):
                self.fail(f"readers of {room.path} did not see the server close TCP")
        stats = self.server.wait_stats(
            lambda s: s["connections"] == 0
            and s["active_watchers"] == self.baseline["active_watchers"]
            and s["rooms"] == self.baseline["rooms"], timeout=CLOSE_TIMEOUT + 2 * MARGIN)
        deadline = time.monotonic() + MARGIN
        while self.open_fds() != self.baseline["fds"]:
            if time.monotonic() > deadline:
                self.fail(f"the server holds {self.open_fds()} fds, "
                          f"{self.baseline['fds']} before the run")
            time.sleep(0.05)
        self.check_server()
        self.last_stats = stats
        code = self.server.stop()
        if code != 0 or "Traceback" in self.server.output:
            self.fail(f"the server stopped with status {code}")

    def report(self, seconds: float) -> dict:
        stats = self.last_stats
        return {
            "seed": self.seed,
            "steps": self.step,
            "seconds": round(seconds, 1),
            "actions": {kind: self.counts[kind] for kind in ACTIONS},
            "details": {k: v for k, v in sorted(self.counts.items()) if k not in ACTIONS},
            "delivered_to_witnesses": self.delivered,
            "peak_rss_mb": round(self.peak_rss / (1 << 20), 1),
            "server": {key: stats[key] for key in (
                "handshakes", "messages_received", "deliveries", "refused", "rate_limited",
                "protocol_errors", "slow_consumers_closed", "pings_sent", "idle_dropped",
                "internal_errors", "history_rooms", "history_bytes")},
        }

    # -- hostile actions -------------------------------------------------------------

    def hostile_frame(self, sender: str, seq: int, room: str, size: int, status: str,
                      binary: bool | None = None) -> tuple[int, bytes]:
        """A new message of a hostile client, registered with ``status``: (uid, frame)."""
        if binary is None:
            binary = self.rng.random() < 0.2
        uid = self.new_message(sender, seq, room, size, binary, status)
        opcode = Opcode.BINARY if binary else Opcode.TEXT
        return uid, self.frame(opcode, payload(uid, size, binary))

    def hostile_frames(self, sender: str, first: int, count: int, room: str, status: str,
                       size: int = 0) -> tuple[list[int], bytes]:
        """``count`` messages numbered from ``first``: their uids and frames, joined."""
        uids, data = [], b""
        for seq in range(first, first + count):
            uid, frame = self.hostile_frame(sender, seq, room, size or self.size(), status)
            uids.append(uid)
            data += frame
        return uids, data

    def reset(self, sock: socket.socket) -> None:
        """Close with an RST instead of a FIN."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def act_partial_frame(self) -> None:
        """A message in two pieces up to 0.9 s apart: finished (MUST, echoed to it) or
        abandoned half-way with a FIN or an RST (MUST_NOT); the server keeps the client
        meanwhile."""
        room = self.random_room()
        sock = self.connect(self.path_of(room))
        name = f"partial-{self.next_name()}"
        uid, frame = self.hostile_frame(name, 1, room.path, self.size(), MUST_NOT)
        cut = self.rng.randint(1, len(frame) - 1)
        sock.sendall(frame[:cut])
        delay = self.rng.uniform(0.05, 0.9)
        if self.rng.random() < 0.7:
            self.counts["partial frames finished"] += 1
            later = [(time.monotonic() + delay, frame[cut:], (uid,))]
            self.add_hostile(Hostile(self, "partial", sock, room=room.path, later=later,
                                     expect_own=(uid,), open_until=delay,
                                     deadline=delay + MARGIN, lifetime=delay,
                                     reset=self.rng.random() < 0.3))
        else:
            self.add_hostile(Hostile(self, "partial", sock, room=room.path, open_until=delay,
                                     lifetime=delay, reset=self.rng.random() < 0.5))

    def act_stall(self) -> None:
        """A client that never reads, with a small receive window, for up to 6 s; it may
        send a message now and then (MAY: it may be closed as a slow consumer first)."""
        room = self.random_room()
        name = f"stall-{self.next_name()}"
        if not self.counts["stall"]:
            # The first one says nothing and outlives the idle sweep's ping, so every run
            # sees a client dropped as idle; its normal window holds the room's traffic,
            # so it is not closed as a slow consumer first.
            sock = self.connect(self.path_of(room))
            self.add_hostile(Hostile(self, "stall", sock, room=room.path, reads=False,
                                     lifetime=PING_INTERVAL * 3 + MARGIN))
            return
        sock = self.connect(self.path_of(room), rcvbuf=4096)
        lifetime = self.rng.uniform(0.5, 6.0)
        now = time.monotonic()
        later = []
        for seq in range(1, self.rng.randint(0, 3) + 1):
            _, frame = self.hostile_frame(name, seq, room.path, self.size(), MAY)
            later.append((now + lifetime * seq / 4, frame, ()))
        self.add_hostile(Hostile(self, "stall", sock, room=room.path, reads=False,
                                 lifetime=lifetime, later=later,
                                 reset=self.rng.random() < 0.5))

    def act_overrun(self) -> None:
        """A client that never reads (but talks), in a room where short-lived clients
        each push a full burst of the largest messages (MUST) and close: the kernels hold
        what their buffers take for it (CHAT_SEND_BUFFER on the server's side), then its
        backlog passes CHAT_MAX_BACKLOG; when it reads at last it gets valid frames, then
        1008. The room's readers get every message meanwhile."""
        room = self.random_room()
        stall = self.connect(self.path_of(room))  # a normal window: read fast once it wakes
        closed_before = self.server.stats()["slow_consumers_closed"]
        for pushed in range(1, 81):  # up to 6.5 MB: what loopback's largest buffers hold
            if pushed % 4 == 0:  # it talks, so the idle sweep leaves it alone; it never reads
                try:
                    stall.sendall(self.frame(Opcode.PONG, b""))
                except OSError:  # the server closed it first
                    pass
            sock = self.connect(self.path_of(room))
            _, data = self.hostile_frames(f"pusher-{self.next_name()}", 1, RATE_BURST,
                                          room.path, MUST, MAX_MESSAGE_SIZE)
            sock.sendall(data + self.frame(Opcode.CLOSE, (1000).to_bytes(2, "big")))
            self.add_hostile(Hostile(self, "pusher", sock, room=room.path, expect_eof=True,
                                     expect_close=(1000,), deadline=SETTLE_TIMEOUT))
            self.pump(0.005)
            if self.server.stats()["slow_consumers_closed"] > closed_before:
                break
        else:
            stats = self.server.stats()
            self.fail(f"a client that never read was not closed after {pushed} bursts "
                      f"(slow_consumers_closed {closed_before} -> "
                      f"{stats['slow_consumers_closed']}, idle_dropped {stats['idle_dropped']})")
        self.counts["overrun bursts"] += pushed
        # The count says a slow consumer was closed, not which: a younger stall in the
        # room (its small window makes the kernel hold less for it) may have gone first,
        # and this one is then dropped as idle, without a close frame. So is it when it
        # cannot read its ~4 MB before the close timeout: its 1008 never left the outbox.
        self.add_hostile(Hostile(self, "overrun", stall, room=room.path, expect_eof=True,
                                 expect_close=(1008, None), polite=True,
                                 deadline=CLOSE_TIMEOUT + PING_INTERVAL * 3 + MARGIN))

    def act_rst_mid_frame(self) -> None:
        """Whole messages (MAY), then part of one more (MUST_NOT), then an RST."""
        room = self.random_room()
        sock = self.connect(self.path_of(room))
        name = f"rst-{self.next_name()}"
        count = self.rng.randint(0, 3)
        _, whole = self.hostile_frames(name, 1, count, room.path, MAY)
        _, cut = self.hostile_frame(name, count + 1, room.path, self.size(), MUST_NOT)
        sock.sendall(whole + cut[: self.rng.randint(1, len(cut) - 1)])
        self.reset(sock)

    def act_data_and_close(self) -> None:
        """Messages and a close frame in one segment, sometimes more messages after it:
        those before the close reach everyone, the client included (MUST), its close is
        answered with its code, and what follows the close reaches nobody (MUST_NOT).
        Sometimes the client has a small window and a big message of its own in flight."""
        room = self.random_room()
        rcvbuf = 4096 if self.rng.random() < 0.3 else 0
        sock = self.connect(self.path_of(room), rcvbuf=rcvbuf)
        name = f"close-{self.next_name()}"
        own = []
        if rcvbuf:
            uid, frame = self.hostile_frame(name, 1, room.path, MAX_MESSAGE_SIZE, MUST)
            sock.sendall(frame)
            own.append(uid)
        uids, data = self.hostile_frames(name, len(own) + 1,
                                         self.rng.randint(1, RATE_BURST - len(own)),
                                         room.path, MUST)
        own += uids
        data += self.frame(Opcode.CLOSE, (1000).to_bytes(2, "big"))
        _, after = self.hostile_frames(name, len(own) + 1, self.rng.randint(0, 2), room.path,
                                       MUST_NOT)
        sock.sendall(data + after)
        self.add_hostile(Hostile(self, "close", sock, room=room.path, expect_eof=True,
                                 expect_close=(1000,), expect_own=tuple(own)))

    def act_flood(self) -> None:
        """More messages than the burst allows, in one write: the first RATE_BURST go
        through (MUST), then 1008; the rest may or may not (the bucket refills)."""
        room = self.random_room()
        sock = self.connect(self.path_of(room))
        name = f"flood-{self.next_name()}"
        _, data = self.hostile_frames(name, 1, RATE_BURST, room.path, MUST)
        _, over = self.hostile_frames(name, RATE_BURST + 1, self.rng.randint(1, 20), room.path,
                                      MAY)
        sock.sendall(data + over)
        self.add_hostile(Hostile(self, "flood", sock, room=room.path, expect_eof=True,
                                 expect_close=(1008,), polite=self.rng.random() < 0.5,
                                 deadline=CLOSE_TIMEOUT + MARGIN))

    def act_max_size(self) -> None:
        """A message of exactly CHAT_MAX_MESSAGE_SIZE, whole or in fragments with pings
        between them (MUST, echoed, pings answered); sometimes then one byte more (1009)."""
        room = self.random_room()
        sock = self.connect(self.path_of(room))
        name = f"max-{self.next_name()}"
        binary = self.rng.random() < 0.3
        uid = self.new_message(name, 1, room.path, MAX_MESSAGE_SIZE, binary, MUST)
        data, pings = self.fragmented(Opcode.BINARY if binary else Opcode.TEXT,
                                      payload(uid, MAX_MESSAGE_SIZE, binary))
        too_big = self.rng.random() < 0.4
        if too_big:
            data += self.hostile_frame(name, 2, room.path, MAX_MESSAGE_SIZE + 1, MUST_NOT)[1]
        sock.sendall(data)
        self.add_hostile(Hostile(self, "max", sock, room=room.path, expect_own=(uid,),
                                 expect_pongs=pings, expect_close=(1009,) if too_big else (),
                                 expect_eof=too_big))

    def fragmented(self, opcode: int, body: bytes) -> tuple[bytes, tuple[bytes, ...]]:
        """``body`` as one frame, or cut in random fragments with pings between some;
        returns the bytes and the pings' payloads."""
        if self.rng.random() < 0.5 or len(body) < 2:
            return self.frame(opcode, body), ()
        count = min(len(body) - 1, self.rng.randint(1, 12))
        cuts = sorted(self.rng.sample(range(1, len(body)), count))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        data = b""
        pings = []
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            data += self.frame(opcode if index == 0 else Opcode.CONTINUATION, piece, fin=last)
            if not last and self.rng.random() < 0.5:
                ping = self.rng.randbytes(self.rng.randint(0, 125))
                pings.append(ping)
                data += self.frame(Opcode.PING, ping)
        return data, tuple(pings)

    def http_hostile(self, kind: str, request: bytes, status: bytes,
                     later: list | None = None) -> None:
        """A client whose HTTP exchange never completes: the server closes it within the
        handshake timeout, with an answer starting with ``status`` (b"": none)."""
        sock = self.raw_socket()
        if request:
            sock.sendall(request)
        self.add_hostile(Hostile(self, kind, sock, room=None, websocket=False,
                                 expect_eof=True, expect_status=status, later=later,
                                 deadline=HANDSHAKE_TIMEOUT + MARGIN))

    def act_slowloris(self) -> None:
        """The upgrade request a byte at a time, 0.2-0.4 s apart: dropped unanswered."""
        request = handshake_request(f"127.0.0.1:{self.server.port}", self.random_room().path,
                                    generate_key())
        gap = self.rng.uniform(0.2, 0.4)
        now = time.monotonic()
        count = int((HANDSHAKE_TIMEOUT + MARGIN) / gap)  # never the whole request
        later = [(now + i * gap, request[i:i + 1], ()) for i in range(count)]
        self.http_hostile("slowloris", b"", b"", later)

    def act_silent(self) -> None:
        """A TCP connection that never says anything: dropped unanswered."""
        self.http_hostile("silent", b"", b"")

    def act_promised_body(self) -> None:
        """A request whose body never comes: answered, then closed."""
        room = self.random_room()
        path = room.path if room.name is not None else "/rooms/lobby"
        request, status = self.rng.choice((
            (b"GET /stats HTTP/1.1\r\nHost: chat\r\nContent-Length: 100000\r\n\r\n",
             b"HTTP/1.1 200"),
            (b"GET /stats HTTP/1.1\r\nHost: chat\r\nTransfer-Encoding: chunked\r\n\r\n",
             b"HTTP/1.1 200"),
            # No publish token is configured: the API is off, whatever the body.
            (f"POST {path}/messages HTTP/1.1\r\nHost: chat\r\nContent-Length: 5000\r\n"
             f"\r\nhal".encode(), b"HTTP/1.1 404"),
        ))
        self.http_hostile("promised_body", request, status)

    def act_room_spam(self) -> None:
        """Up to ten new rooms held at once, each left with up to a burst of messages in
        its history (sometimes of the largest size): past CHAT_MAX_ROOMS rooms in use a
        new one gets 503 (``refused.rooms``); then all of them leave, with a FIN or an RST."""
        refused_before = self.server.stats()["refused"].get("rooms", 0)
        held, refused = [], 0
        for _ in range(self.rng.randint(1, 10)):
            path = f"/rooms/spam{self.seed}-{self.next_name()}"
            sock = self.try_connect(path)
            if sock is None:
                refused += 1
                continue
            held.append(sock)
            size = MAX_MESSAGE_SIZE if self.rng.random() < 0.3 else 0
            _, data = self.hostile_frames(f"spam-{self.next_name()}", 1,
                                          self.rng.randint(0, RATE_BURST), path, MAY, size)
            if data:
                sock.sendall(data)
        stats = self.server.stats()
        if stats["rooms"] > MAX_ROOMS:
            self.fail(f"the server holds {stats['rooms']} rooms, over CHAT_MAX_ROOMS")
        if stats["refused"].get("rooms", 0) - refused_before != refused:
            self.fail(f"{refused} refused with 503, but refused.rooms went from "
                      f"{refused_before} to {stats['refused'].get('rooms', 0)}")
        self.counts["spam rooms"] += len(held)
        self.counts["spam rooms refused (503)"] += refused
        for sock in held:
            if self.rng.random() < 0.5:
                self.reset(sock)
            else:
                sock.close()

    def try_connect(self, path: str) -> socket.socket | None:
        """A websocket to a new room, or None when the server answered 503 (CHAT_MAX_ROOMS)."""
        try:
            return connect(self.server.port, path, source=self.source())
        except ConnectionError as error:
            if "HTTP/1.1 503" not in str(error):
                self.fail(f"a client of a new room was refused: {error}")
            return None
        except OSError as error:
            self.fail(f"a new client could not connect to {path}: {error!r}")

    def act_idle_keepalive(self) -> None:
        """A request answered on a keep-alive connection, then silence: closed after
        CHAT_KEEPALIVE_TIMEOUT."""
        self.http_hostile("idle_keepalive", b"GET /stats HTTP/1.1\r\nHost: chat\r\n\r\n",
                          b"HTTP/1.1 200")

    def act_history_join_burst(self) -> None:
        """Well-behaved readers send a burst; a new reader joins in the middle of it (its
        history then live, no gap, no duplicate), sometimes with a client's full burst
        (MUST) arriving at the same time."""
        room = self.random_room()
        senders = [r for r in [room.witness, *room.readers] if r.may_send()]
        burst = [s for s in senders for _ in range(int(s.tokens))]
        self.rng.shuffle(burst)
        split = self.rng.randint(0, len(burst))
        for sender in burst[:split]:
            sender.send(self.size())
        if self.rng.random() < 0.3:
            sock = self.connect(self.path_of(room))
            _, data = self.hostile_frames(f"burst-{self.next_name()}", 1, RATE_BURST,
                                          room.path, MUST)
            sock.sendall(data)  # exactly the burst: all accepted, and it stays
            self.add_hostile(Hostile(self, "burst", sock, room=room.path, polite=True))
        self.transient.append(self.add_reader(room, self.path_of(room)))
        for sender in burst[split:]:
            sender.send(self.size())
        self.counts["burst messages"] += len(burst)

    def act_reader_churn(self) -> None:
        """A reader leaves with a clean close; another joins (with the room's history)."""
        room = self.random_room()
        if room.readers:
            self.leave(self.rng.choice(room.readers))
        self.add_reader(room, self.path_of(room))

    def act_control_frames(self) -> None:
        """Pings (answered in order, payload for payload) and unsolicited pongs, then a
        message in fragments with pings between them (MUST), then a clean close."""
        room = self.random_room()
        sock = self.connect(self.path_of(room))
        name = f"control-{self.next_name()}"
        data = b""
        pings: list[bytes] = []
        for _ in range(self.rng.randint(1, 30)):
            body = self.rng.randbytes(self.rng.randint(0, 125))
            if self.rng.random() < 0.7:
                pings.append(body)
                data += self.frame(Opcode.PING, body)
            else:
                data += self.frame(Opcode.PONG, body)
        binary = self.rng.random() < 0.3
        uid = self.new_message(name, 1, room.path, self.size(), binary, MUST)
        fragments, more = self.fragmented(Opcode.BINARY if binary else Opcode.TEXT,
                                          payload(uid, self.messages[uid].size, binary))
        sock.sendall(data + fragments + self.frame(Opcode.CLOSE, (1000).to_bytes(2, "big")))
        self.add_hostile(Hostile(self, "control", sock, room=room.path, expect_own=(uid,),
                                 expect_pongs=(*pings, *more), expect_close=(1000,),
                                 expect_eof=True))

    def bad_frames(self) -> list[tuple[str, bytes, int]]:
        """(what, bytes, the close code the server owes) for each kind of bad frame: the
        codec's frames with a bit, a byte or a length changed."""
        frame = self.frame

        def first_byte(data: bytes, value: int) -> bytes:
            return bytes((value,)) + data[1:]

        text = frame(Opcode.TEXT, b"bad")
        long = frame(Opcode.BINARY, bytes(65536))[:14]  # its header and mask: 64-bit length
        return [
            ("unmasked", encode_frame(Opcode.TEXT, b"unmasked"), 1002),
            ("a reserved bit", first_byte(text, text[0] | 0x40), 1002),
            ("a reserved opcode", first_byte(text, 0x80 | self.rng.choice((3, 7, 11, 15))),
             1002),
            ("a fragmented ping", first_byte(frame(Opcode.PING, b"p"), 0x09), 1002),
            ("a ping over 125 bytes", first_byte(frame(Opcode.BINARY, bytes(126)), 0x89), 1002),
            ("a continuation first", frame(Opcode.CONTINUATION, b"c"), 1002),
            ("a text inside a fragmented message",
             frame(Opcode.TEXT, b"a", fin=False) + frame(Opcode.TEXT, b"b"), 1002),
            ("a 1-byte close", frame(Opcode.CLOSE, b"\x03"), 1002),
            ("close code 1005", frame(Opcode.CLOSE, (1005).to_bytes(2, "big")), 1002),
            ("close code 999", frame(Opcode.CLOSE, (999).to_bytes(2, "big")), 1002),
            ("a length with the high bit", long[:2] + bytes((long[2] | 0x80,)) + long[3:], 1002),
            ("invalid UTF-8", frame(Opcode.TEXT, b"ok \xff\xfe"), 1007),
            ("a surrogate", frame(Opcode.TEXT, b"\xed\xa0\x80"), 1007),
            ("a code point cut by a bad fragment",
             frame(Opcode.TEXT, b"\xc3", fin=False) + frame(Opcode.CONTINUATION, b"A"), 1007),
            ("invalid UTF-8 in a close reason", frame(Opcode.CLOSE, b"\x03\xe8\xff"), 1007),
            ("one byte over the limit", frame(Opcode.TEXT, b"x" * (MAX_MESSAGE_SIZE + 1)), 1009),
            ("over the limit in fragments",
             frame(Opcode.BINARY, bytes(MAX_MESSAGE_SIZE), fin=False)
             + frame(Opcode.CONTINUATION, b"x"), 1009),
            ("a terabyte announced", long[:2] + (1 << 40).to_bytes(8, "big") + long[10:], 1009),
        ]

    def act_bad_frame(self) -> None:
        """Messages (MUST, echoed to it first), a bad frame, more messages (MUST_NOT): the
        right close code, TCP closed, and nobody ever sees what followed."""
        room = self.random_room()
        sock = self.connect(self.path_of(room))
        name = f"bad-{self.next_name()}"
        what, bad, code = self.rng.choice(self.bad_frames())
        self.counts[f"bad frames {code}"] += 1
        self.recent[-1] = f"bad_frame ({what})"
        own, before = self.hostile_frames(name, 1, self.rng.randint(0, 3), room.path, MUST)
        _, after = self.hostile_frames(name, len(own) + 1, self.rng.randint(0, 2), room.path,
                                       MUST_NOT)
        sock.sendall(before + bad + after)
        self.add_hostile(Hostile(self, "bad", sock, room=room.path, expect_eof=True,
                                 expect_close=(code,), expect_own=tuple(own)))

    def act_eager(self) -> None:
        """The upgrade request and messages in one write (MUST, echoed), sometimes a close
        too (answered), sometimes an RST right after (the messages: MAY)."""
        room = self.random_room()
        sock = self.raw_socket()
        name = f"eager-{self.next_name()}"
        key = generate_key()
        then = self.rng.choice(("stay", "close", "reset"))
        own, frames = self.hostile_frames(name, 1, self.rng.randint(1, 4), room.path,
                                          MAY if then == "reset" else MUST)
        if then == "close":
            frames += self.frame(Opcode.CLOSE, (1000).to_bytes(2, "big"))
        sock.sendall(handshake_request(f"127.0.0.1:{self.server.port}", self.path_of(room), key)
                     + frames)
        if then == "reset":
            self.reset(sock)
            return
        self.expect_upgrade(sock, key)
        self.add_hostile(Hostile(self, "eager", sock, room=room.path, expect_own=tuple(own),
                                 expect_close=(1000,) if then == "close" else (),
                                 expect_eof=then == "close", polite=True))

    def expect_upgrade(self, sock: socket.socket, key: str) -> None:
        head = read_response_head(sock)
        if not head.startswith(b"HTTP/1.1 101") or accept_key(key).encode() not in head:
            self.fail(f"an upgrade was answered {head[:80]!r}")

    def act_pipelined_upgrade(self) -> None:
        """A plain request, then the upgrade request and a message, in one write on one
        keep-alive connection: the answer, the 101, the message's echo."""
        room = self.random_room()
        sock = self.raw_socket()
        key = generate_key()
        (uid,), frame = self.hostile_frames(f"pipelined-{self.next_name()}", 1, 1, room.path,
                                            MUST)
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: chat\r\n\r\n"
                     + handshake_request(f"127.0.0.1:{self.server.port}", self.path_of(room),
                                         key) + frame)
        head = read_response_head(sock)
        if not head.startswith(b"HTTP/1.1 200"):
            self.fail(f"a pipelined GET /stats was answered {head[:80]!r}")
        left = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while left:
            chunk = sock.recv(left)
            if not chunk:
                self.fail("the server closed a keep-alive connection in mid-answer")
            left -= len(chunk)
        self.expect_upgrade(sock, key)
        self.add_hostile(Hostile(self, "pipelined", sock, room=room.path, expect_own=(uid,),
                                 polite=True))

    def act_rst_after_upgrade(self) -> None:
        """The upgrade request, then an RST before or just after the 101 (the server may
        be sending the room's history into a reset socket)."""
        room = self.random_room()
        sock = self.raw_socket()
        sock.sendall(handshake_request(f"127.0.0.1:{self.server.port}", self.path_of(room),
                                       generate_key()))
        if self.rng.random() < 0.5:
            read_response_head(sock)
        self.reset(sock)


def run(seed: int, steps: int, seconds: float,
        log: Callable[[str], None] | None = None) -> dict:
    """One chaos run of at most ``steps`` steps and ``seconds`` seconds (then the end
    checks, bounded too); returns its counts, raises ChaosFailure at the first problem."""
    chaos = Chaos(seed, log)
    started = time.monotonic()
    try:
        chaos.start()
        progress = started
        while chaos.step < steps and time.monotonic() - started < seconds:
            chaos.run_step()
            if log is not None and time.monotonic() - progress > 60:
                progress = time.monotonic()
                log(f"step {chaos.step}, {progress - started:.0f} s: server RSS "
                    f"{chaos.last_stats['rss_bytes'] >> 20} MB, "
                    f"{chaos.last_stats['connections']} connections; our sockets "
                    f"{len(os.listdir('/proc/self/fd'))}; {dict(chaos.counts)}")
        chaos.finish()
    finally:
        if chaos.server is not None:
            chaos.server.stop()
        chaos.selector.close()
    return chaos.report(time.monotonic() - started)
