"""A lean websocket load client: many idle connections on one epoll loop per process.

Why it looks like this: a load tool that spends a greenlet, thread or coroutine per
connection runs out of memory or CPU before the server does (tsung died at ~500k in the
experiment this project answers). Here one process holds up to ~19,000 sockets (the
open-files limit) with, per connection, a socket object, two slots in counter arrays and
one dict entry from file descriptor to index; nothing else unless a frame arrives split.
Idle connections cost no Python stack at all: epoll wakes the loop only for sockets
with data.

Two ways to use it:

- in-process: ``LoadClient(host, port).connect(n, sources)``, then ``send_text`` /
  ``expect`` / ``close``; each of those runs the epoll loop until its goal or timeout.
  ``start`` (a batch of connections at an arrival rate) and ``step`` (one loop turn)
  let a caller do other work while connections are being made;
- as a load process driven over pipes (``python -m chat.bench.loadclient --host H
  --port P``): one JSON object per line on stdin is a command, one JSON line on stdout
  the reply (see ``CommandLoop``). The loop keeps running between commands, so a status
  request is answered while thousands of handshakes are in flight.
  ``greenchat bench`` and ``bench/idle_broadcast.py`` drive these.

Broadcast probes: a probe is a text message ``greenchat-probe ID SENT_NS [padding]``,
where SENT_NS is the sender's ``time.monotonic_ns()``. CLOCK_MONOTONIC is one clock for
every process of a machine, so a receiver in another load process subtracts it from its
own ``time.monotonic_ns()`` to get the delivery latency. That only holds when all the
generator's processes run on one machine. Any other message a client receives (someone
else chatting) is counted apart and never confuses the probe counts.

Connections to one server ``host:port`` from one source address are limited by the
ephemeral port range (``net.ipv4.ip_local_port_range``), so the caller hands each client
a list of (source address, connections) pairs: 127.0.0.2, 127.0.0.3, ... on loopback
(no ``ip addr add`` needed), real interface addresses otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import errno
import heapq
import ipaddress
import json
import os
import random
import select
import socket
import sys
import time
import zlib
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..protocol import (Opcode, accept_key, encode_client_close, encode_client_frame,
                        encode_frame, generate_key, handshake_request)
from ..system import open_files_limit
from .histogram import LogHistogram

__all__ = [
    "LoadClient",
    "Batch",
    "ConnectResult",
    "ExpectResult",
    "CommandLoop",
    "parse_probe",
    "probe_payload",
    "reconnect_delay",
    "source_addresses",
]

PROBE_PREFIX = b"greenchat-probe "
# The web page's reconnect policy (chat/static/index.html: BACKOFF_MIN_MS, BACKOFF_MAX_MS):
# the delay before attempt k after a drop is drawn from [d/2, d], d = min(MAX, MIN * 2**(k-1)).
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
# Linux: let connect() pick the source port, so bind() to a source address does not
# reserve a port for every (address, port) pair up front.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
RECV_SIZE = 65536
MAX_HANDSHAKE_RESPONSE = 16384
# Events per epoll wait: more per wait, fewer waits (each a syscall and a list) when a
# broadcast makes thousands of sockets readable at once.
MAX_EVENTS = 4096
# While handshakes are in flight and a wait returned fewer than NAP_BELOW events, sleep
# NAP seconds before the next wait (see step). Not while only probes arrive: their
# latency is read when a wait returns, and the same nap there measured no saving.
NAP_BELOW = 16
NAP = 0.002
# Reconnections started per turn of the loop at most (as many as one wait reads), so
# that answers are read and the driver's commands answered between them when tens of
# thousands fall due at once. Unbounded, one turn took ~27 s in a 100,000 client storm;
# at 256, the drops read per turn (up to MAX_EVENTS) outran the reconnections started.
RECONNECT_BATCH = MAX_EVENTS
# Seconds we wait for the server's EOF after answering its close frame before closing
# the socket ourselves (the server's own wait for our answer, CHAT_CLOSE_TIMEOUT,
# defaults to the same): a server that never closes costs a socket only that long.
CLOSE_WAIT = 5.0
_PARSED_CACHE = 64  # probe payloads whose (id, send time) are kept, to parse each once

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_PREFIX_LEN = len(PROBE_PREFIX)
_TEXT, _PONG = Opcode.TEXT, Opcode.PONG
# A server's keepalive ping carries nothing (greenchat's does not): the pong to it is made
# once. Its masking key is fixed, which costs nothing here: the key exists to scramble the
# payload's bytes, and there are none. A fresh key for each pong is a getrandom syscall
# and a frame built, for each of the ~8,300 pings a second a million idle clients get.
_EMPTY_PING = encode_frame(Opcode.PING, b"")
_EMPTY_PONG = encode_client_frame(_PONG, b"")
# What a client offering compression asks for (``deflate=True``), as browsers do.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
_RSV1 = 0x40
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


def probe_payload(probe_id: int, sent_ns: int, size: int = 0) -> bytes:
    """The text of probe ``probe_id`` sent at ``sent_ns``, padded to ``size`` bytes."""
    text = b"%s%d %d" % (PROBE_PREFIX, probe_id, sent_ns)
    if len(text) + 1 < size:
        text += b" " + b"x" * (size - len(text) - 1)
    return text


def parse_probe(payload: bytes) -> tuple[int, int] | None:
    """(probe id, send time in ns) of a probe message; None for any other message."""
    if not payload.startswith(PROBE_PREFIX):
        return None
    fields = payload[_PREFIX_LEN:].split(b" ", 2)
    try:
        return int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return None


def reconnect_delay(failures: int, rng: random.Random) -> float:
    """Seconds to wait before reconnecting after ``failures`` closes or failed attempts in a
    row: exponential backoff with "equal jitter", the web page's policy. Without the
    jitter every client of a restarted server would come back in the same instant."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(failures - 1, 16))
    return ceiling / 2 + rng.random() * ceiling / 2


def source_addresses(first: int, count: int) -> list[str]:
    """``count`` loopback source addresses starting at 127.0.0.2 + ``first``."""
    base = int(ipaddress.IPv4Address("127.0.0.2")) + first
    last = base + count - 1
    if count < 0 or last > int(ipaddress.IPv4Address("127.255.255.254")):
        raise ValueError(f"not enough loopback source addresses for {first}+{count}")
    return [str(ipaddress.IPv4Address(base + i)) for i in range(count)]


def _reason(prefix: str, code: int | None) -> str:
    return f"{prefix}: {errno.errorcode.get(code, code) if code else 'error'}"


@dataclass(eq=False)
class Batch:
    """Connections asked for by one ``start``: how far they got.

    Connection indexes ``first_index .. first_index + requested - 1`` belong to it; a
    connection of this batch is expected to receive every probe from ``first_probe`` on.
    """

    requested: int
    rate: float  # connections per second; 0: as fast as ``inflight`` allows
    first_index: int
    first_probe: int
    began: float  # time.monotonic() of the start
    issued: int = 0  # connect() calls made
    connected: int = 0  # handshakes completed (101 and the right accept key)
    lost: int = 0  # of those, closed since (by the server, a reset, a close frame)
    failures: dict[str, int] = field(default_factory=dict)
    finished: float = 0.0  # monotonic time when the last handshake ended either way

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def done(self) -> bool:
        return self.connected + self.failed >= self.requested

    def fail(self, reason: str, count: int = 1) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + count


@dataclass
class ConnectResult:
    """What one ``connect`` call achieved; ``ok`` only when every connection got its 101."""

    requested: int
    connected: int
    failures: dict[str, int] = field(default_factory=dict)
    started: float = 0.0  # time.monotonic() when the first connect() was issued
    finished: float = 0.0  # time.monotonic() when the last 101 was read (or we gave up)

    @property
    def ok(self) -> bool:
        return self.connected == self.requested and not self.failures


@dataclass
class ExpectResult:
    """Whether every open connection has received ``endpoint`` messages, and when."""

    target: int
    connections: int  # connections this client should hold
    reached: int  # connections that received at least ``endpoint`` messages
    extra: int  # connections that received more than ``endpoint`` (a duplicate is a failure)
    lost: int  # connections lost since connect (closed by the server, reset, ...)
    close_frames: int  # close frames received since connect
    started: float = 0.0
    first: float = 0.0  # monotonic time of the first message received during this call
    last: float = 0.0  # monotonic time when the last connection reached ``endpoint``

    @property
    def ok(self) -> bool:
        return self.reached == self.connections and not self.extra and not self.lost


@dataclass
class Storm:
    """Reconnecting after a server restart, as the web page does (``reconnect``).

    Armed with ``LoadClient.arm_reconnect``: from then on a connection that is lost is
    opened again after ``reconnect_delay``, from the same source address, until it
    succeeds; each failed attempt doubles the delay's ceiling.
    """

    armed_at: float  # time.monotonic() when armed
    drops: int = 0  # connections lost since (a connection lost twice counts twice)
    first_drop: float = 0.0
    last_drop: float = 0.0
    attempts: int = 0  # connect() calls made to reconnect
    connected: int = 0  # reconnections completed (101 and the right accept key)
    failures: dict[str, int] = field(default_factory=dict)

    # The Batch interface the handshake code uses (a reconnection is never "done").
    requested = 0
    finished = 0.0
    done = False

    def fail(self, reason: str, count: int = 1) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + count


class LoadClient:
    """Websocket clients on one epoll loop; see the module docstring.

    ``inflight`` bounds the handshakes in progress at once; ``per_source`` is how many
    connections ``connect`` makes from each address it is given (keep it under the
    ephemeral port range); a handshake not done within ``handshake_timeout`` seconds of
    its connect() fails. ``deflate`` offers permessage-deflate and inflates compressed
    text frames (a fresh inflater each: the server takes over no context).
    """

    def __init__(self, host: str, port: int, *, path: str = "/", host_header: str = "",
                 inflight: int = 200, per_source: int = 30000,
                 handshake_timeout: float = 30.0, deflate: bool = False,
                 read_nap: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.inflight = inflight
        self.per_source = per_source
        self.handshake_timeout = handshake_timeout
        # Messages arriving a few at a time in a stream (a wait that returned within NAP
        # with fewer than NAP_BELOW): sleep read_nap seconds before the next wait (0:
        # never). At a million clients each of 53 load processes read ~2 messages per
        # wait, 230 waits a second, and the waits cost more than the messages. A latency
        # read after the nap may be up to read_nap late, so it is off unless asked for
        # (bench/one_box.py asks: its broadcasts take seconds); after a quiet spell a
        # message is read at once. Handshake answers are read a nap apart too (at least
        # NAP apart, see step).
        self.read_nap = read_nap
        key = generate_key()
        self._request = handshake_request(host_header or f"{host}:{port}", path, key,
                                          DEFLATE_OFFER if deflate else "")
        self._accept = accept_key(key).encode()
        self._epoll = select.epoll()
        self._socks: list[socket.socket | None] = []  # index -> socket (None once gone)
        self._addresses: list[str] = []  # index -> its source address ("" for none)
        # index -> time.monotonic() of its latest completed handshake (reconnect storms)
        self._connected_at = array("d")
        self._index: dict[int, int] = {}  # fd -> index, established connections only
        self._messages = array("q")  # index -> complete data messages received
        self._probes = array("q")  # index -> probe messages received
        self._partial: dict[int, bytes] = {}  # fd -> start of a frame split across reads
        # fd -> socket of a connection whose close frame we answered, until the server's EOF
        self._closing: dict[int, socket.socket] = {}
        # (deadline, fd, socket) per entry of _closing, oldest first (one CLOSE_WAIT each)
        self._closing_since: deque[tuple[float, int, socket.socket]] = deque()
        # fd -> [index, request sent?, response so far, deadline, batch]; handshakes only
        self._pending: dict[int, list] = {}
        self._batches: list[Batch] = []
        self._batch_starts: list[int] = []  # first_index of each batch, for bisect
        self._active: Batch | None = None  # the batch still issuing connect() calls
        # (address, connections) still to use; None: no bind, the kernel picks the address
        self._sources: list[tuple[str, int]] | None = None
        self._source_used = 0  # connections made from self._sources[0]
        self._watchers: dict[int, Callable[[], None]] = {}
        self._storm: Storm | None = None
        self._retry: list[tuple[float, int]] = []  # heap of (due, index) to reconnect
        self._failed_in_row: dict[int, int] = {}  # index -> closes/failures since it was up
        self._rng = random.Random()
        self._next_expiry = 0.0
        self.histogram = LogHistogram()  # probe delivery latency, ns
        self.probe_stats: dict[int, list[int]] = {}  # probe id -> [deliveries, max ns]
        self.probe_deliveries_open = 0  # probe deliveries to connections still open
        self.other_messages = 0  # data messages that are not our probes
        self.sent_by: dict[int, int] = {}  # connection index -> probes it sent
        self._sender = -1  # index of the connection that sends probes
        self.lost = 0
        self.close_frames = 0
        self._first_message = 0.0
        # Receiving, per epoll wait (see _dispatch): when it returned, probe id -> how
        # many deliveries of it this wait saw, and payload -> (id, send time) parsed.
        self._now_ns = 0
        self._seen: dict[int, int] = {}
        self._parsed: dict[bytes, tuple[int, int] | None] = {}
        self._sent_ns: dict[int, int] = {}  # probe id -> its send time
        # The bytes of the last probe frame that came alone in one read: most reads of a
        # broadcast are exactly that frame, and are counted without parsing.
        self._probe_frame: bytes | None = None
        self._probe_frame_id = -1

    # -- connecting ------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections currently open."""
        return len(self._index)

    @property
    def connecting(self) -> bool:
        return self._active is not None or bool(self._pending)

    def set_sources(self, sources: list[tuple[str, int]]) -> None:
        """Addresses to connect from, each for at most that many connections, in order.

        An empty address means "let the kernel choose" (no bind).
        """
        self._sources = [(address, count) for address, count in sources if count > 0]
        self._source_used = 0

    def start(self, n: int, rate: float = 0.0, first_probe: int = 0,
              sources: list[tuple[str, int]] | None = None) -> Batch:
        """Begin ``n`` more connections at ``rate`` per second; ``step`` makes them."""
        if self._active is not None:
            raise RuntimeError("a batch of connections is still being started")
        if sources is not None:
            self.set_sources(sources)
        batch = Batch(requested=n, rate=rate, first_index=len(self._socks),
                      first_probe=first_probe, began=time.monotonic())
        self._socks.extend([None] * n)
        self._addresses.extend([""] * n)
        self._connected_at.extend(array("d", bytes(8 * n)))
        zeros = array("q", bytes(8 * n))
        self._messages.extend(zeros)
        self._probes.extend(zeros)
        self._batches.append(batch)
        self._batch_starts.append(batch.first_index)
        self._active = batch if n else None
        if not n:
            batch.finished = batch.began
        return batch

    def cancel(self, reason: str = "timeout") -> None:
        """Give up on every handshake in flight and every connection not yet started, and
        on reconnecting (a storm armed is disarmed)."""
        self._storm = None
        self._retry.clear()
        for fd in list(self._pending):
            self._fail_pending(fd, f"handshake: {reason}")
        batch = self._active
        if batch is not None:
            batch.fail(f"not started ({reason})", batch.requested - batch.issued)
            batch.issued = batch.requested
            batch.finished = time.monotonic()
            self._active = None

    def connect(self, n: int, sources: list[str], timeout: float = 60.0) -> ConnectResult:
        """Open ``n`` more websockets from ``sources`` (``per_source`` each) and wait."""
        needed = -(-n // self.per_source)
        if len(sources) < needed:
            raise ValueError(f"{n} connections need {needed} source addresses "
                             f"({self.per_source} each), got {len(sources)}")
        deadline = time.monotonic() + timeout
        batch = self.start(n, sources=[(address, self.per_source) for address in sources])
        while not batch.done:
            now = time.monotonic()
            if now >= deadline:
                self.cancel()
                break
            self.step(min(0.2, deadline - now))
        return ConnectResult(requested=n, connected=batch.connected,
                             failures=dict(batch.failures), started=batch.began,
                             finished=batch.finished or time.monotonic())

    def _source(self) -> str | None:
        """The address for the next connection: "" for no bind, None when all are used up."""
        sources = self._sources
        if sources is None:
            return ""
        while sources and self._source_used >= sources[0][1]:
            sources.pop(0)
            self._source_used = 0
        if not sources:
            return None
        self._source_used += 1
        return sources[0][0]

    def _issue(self, batch: Batch, now: float) -> float:
        """Start the connections due by now; returns seconds until the next one is due."""
        due = batch.requested
        if batch.rate > 0:
            due = min(due, int((now - batch.began) * batch.rate) + 1)
        pending = self._pending
        while batch.issued < due and len(pending) < self.inflight:
            self._open(batch, now)
        if batch.issued >= batch.requested:
            self._active = None
            return 1.0
        if batch.issued < due or batch.rate <= 0:
            return 1.0  # waiting for a handshake slot: an epoll event ends the wait
        return max(0.0, batch.began + batch.issued / batch.rate - now)

    def _open(self, batch: Batch, now: float) -> None:
        index = batch.first_index + batch.issued
        batch.issued += 1
        address = self._source()
        if address is None:
            batch.fail("no source address left (plan more sources)")
            self._finish_if_done(batch)
            return
        self._addresses[index] = address
        self._connect(index, address, batch, now)

    def _connect(self, index: int, address: str, batch: Batch | Storm, now: float) -> None:
        """Start connection ``index`` from ``address``: connect(), then the request."""
        # Non-blocking from the start (no separate fcntl call).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            if address:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((address, 0))
            err = sock.connect_ex((self.host, self.port))
        except OSError as error:
            err = error.errno
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._attempt_failed(index, batch, _reason("connect", err))
            return
        self._socks[index] = sock
        fd = sock.fileno()
        # On loopback connect() has usually finished the TCP handshake by the time it
        # returns (EINPROGRESS all the same), so the request goes out at once and the
        # socket waits only for the answer; EAGAIN means not yet: wait until writable.
        # That saves an epoll round, a getsockopt and an epoll_ctl per connection.
        try:
            sent = sock.send(self._request)
        except BlockingIOError:
            self._pending[fd] = [index, False, b"", now + self.handshake_timeout, batch]
            self._epoll.register(fd, _EPOLLOUT)
            return
        except OSError as error:
            self._socks[index] = None
            sock.close()
            self._attempt_failed(index, batch, _reason("connect", error.errno))
            return
        self._pending[fd] = [index, True, b"", now + self.handshake_timeout, batch]
        self._epoll.register(fd, _EPOLLIN)
        if sent != len(self._request):
            self._fail_pending(fd, "send request: short write")

    def _finish_if_done(self, batch: Batch) -> None:
        if batch.done and not batch.finished:
            batch.finished = time.monotonic()

    def _attempt_failed(self, index: int, batch: Batch | Storm, reason: str) -> None:
        batch.fail(reason)
        if batch is self._storm:
            self._schedule_reconnect(index)
        else:
            self._finish_if_done(batch)

    def _fail_pending(self, fd: int, reason: str) -> None:
        index, _sent, _response, _deadline, batch = self._pending.pop(fd)
        sock = self._socks[index]
        self._socks[index] = None
        self._epoll.unregister(fd)
        sock.close()
        self._attempt_failed(index, batch, reason)

    # -- reconnect storms ------------------------------------------------------------

    def arm_reconnect(self) -> Storm:
        """From now on, reconnect every lost connection with the web page's backoff."""
        self._storm = Storm(armed_at=time.monotonic())
        self._failed_in_row.clear()
        return self._storm

    def _schedule_reconnect(self, index: int) -> None:
        failures = self._failed_in_row.get(index, 0) + 1
        self._failed_in_row[index] = failures
        due = time.monotonic() + reconnect_delay(failures, self._rng)
        heapq.heappush(self._retry, (due, index))

    def _reconnect_due(self, now: float) -> float:
        """Start the reconnections that are due; seconds until the next one."""
        retry = self._retry
        storm = self._storm
        for _ in range(RECONNECT_BATCH):
            if not retry or retry[0][0] > now:
                break
            _due, index = heapq.heappop(retry)
            storm.attempts += 1
            self._connect(index, self._addresses[index], storm, now)
        return max(0.0, retry[0][0] - now) if retry else 1.0

    def storm_tally(self, since: float) -> dict:
        """Where the storm stands: for the open connections, how long after ``since`` (a
        monotonic time, the restart) their latest handshake completed, as a histogram in
        ns (0 for those never dropped); the drops, attempts and failures since armed."""
        storm = self._storm
        if storm is None:
            raise RuntimeError("no reconnect storm armed")
        back = LogHistogram()
        not_dropped = 0
        connected_at = self._connected_at
        for index in self._index.values():
            delay = connected_at[index] - since
            if delay <= 0:
                not_dropped += 1
                back.record(0)
            else:
                back.record(int(delay * 1e9))
        return {"open": len(self._index), "not_dropped": not_dropped,
                "back": back.to_dict(), "drops": storm.drops,
                "first_drop": storm.first_drop, "last_drop": storm.last_drop,
                "attempts": storm.attempts, "reconnected": storm.connected,
                "waiting": len(self._retry), "connecting": len(self._pending),
                "failures": dict(storm.failures)}

    def _expire(self, now: float) -> None:
        """Fail the handshakes that passed their deadline (checked twice a second)."""
        self._next_expiry = now + 0.5
        for fd in [fd for fd, state in self._pending.items() if state[3] <= now]:
            self._fail_pending(fd, "handshake: timeout")

    def _on_handshake(self, fd: int, state: list) -> None:
        index, requested, response, _deadline, batch = state
        sock = self._socks[index]
        if not requested:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail_pending(fd, _reason("connect", err))
                return
            try:
                sent = sock.send(self._request)
            except OSError as error:
                self._fail_pending(fd, _reason("send request", error.errno))
                return
            if sent != len(self._request):
                self._fail_pending(fd, "send request: short write")
                return
            state[1] = True
            self._epoll.modify(fd, _EPOLLIN)
            return
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail_pending(fd, _reason("handshake", error.errno))
            return
        if not data:
            self._fail_pending(fd, "handshake: server closed the connection")
            return
        response = state[2] = response + data
        end = response.find(b"\r\n\r\n")
        if end < 0:
            if len(response) > MAX_HANDSHAKE_RESPONSE:
                self._fail_pending(fd, "handshake: response too long")
            return
        head = response[:end + 4]
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 101"):
            self._fail_pending(fd, f"handshake: {status.decode('latin-1')[:60]}")
            return
        if self._accept not in head:
            self._fail_pending(fd, "handshake: wrong or missing Sec-WebSocket-Accept")
            return
        del self._pending[fd]
        batch.connected += 1
        self._finish_if_done(batch)
        self._connected_at[index] = time.monotonic()
        if batch is self._storm:
            self._failed_in_row.pop(index, None)
        self._index[fd] = index
        rest = response[end + 4:]
        if rest:
            self._on_data(fd, index, rest)

    # -- the loop --------------------------------------------------------------------

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from ``step`` whenever ``fd`` is readable (the process's stdin)."""
        self._watchers[fd] = callback
        self._epoll.register(fd, _EPOLLIN)

    def unwatch(self, fd: int) -> None:
        if self._watchers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def step(self, timeout: float) -> None:
        """One turn of the loop: start due connections, then handle what epoll reports."""
        now = time.monotonic()
        if self._active is not None:
            timeout = min(timeout, self._issue(self._active, now))
        if self._retry:
            timeout = min(timeout, self._reconnect_due(now))
        if self._pending and now >= self._next_expiry:
            self._expire(now)
        if self._closing_since and self._closing_since[0][0] <= now:
            self._close_overdue(now)
        waited = time.monotonic_ns() if self.read_nap else 0
        events = self._epoll.poll(timeout, MAX_EVENTS)
        self._dispatch(events)  # sets _now_ns when there are events
        if self._pending and len(events) < NAP_BELOW:
            # Handshakes in flight, answers trickling in: wait for a few at once. Waking
            # for each answer alone cost the load process more than the server's whole
            # handshake (py-spy: 58% of its CPU in epoll_wait, against greenchat serve,
            # ~1 event per wait): a wake-up is a cross-CPU interrupt, dear on a VM.
            # A 101 read a nap late delays nothing the run measures; a longer read nap,
            # when asked for, applies here too (each of a million's 53 load processes
            # got ~50 answers a second: at NAP, one wake-up per answer again).
            time.sleep(max(NAP, self.read_nap))
        elif (self.read_nap and events and len(events) < NAP_BELOW
              and self._now_ns - waited < NAP * 1e9):  # the wait returned within NAP
            time.sleep(self.read_nap)

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        """Handle what one epoll wait reported: the load process's hot path.

        Profiled (py-spy on a load process, greenchat serve, 2,000 connections, 20
        probes/s): the time went into one method call chain, a frame parse and a probe
        parse per message received. Here a read that is exactly the last probe frame seen
        (what most reads of a broadcast are) costs one comparison and two counter
        increments; latency is taken once per wait, when epoll returned (the data was
        in the socket by then), and recorded once per probe per wait.
        """
        if not events:
            return
        self._now_ns = time.monotonic_ns()
        index_of = self._index.get
        socks = self._socks
        partial = self._partial
        messages = self._messages
        probes = self._probes
        frame = self._probe_frame
        same = 0  # reads equal to ``frame``
        for fd, _event in events:
            index = index_of(fd)
            if index is None or fd in partial:
                self._on_event(fd)
                continue
            try:
                data = socks[index].recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data == frame:
                same += 1
                messages[index] += 1
                probes[index] += 1
            elif data == _EMPTY_PING:
                try:
                    socks[index].send(_EMPTY_PONG)
                except OSError:
                    pass
            elif data:
                if same:  # counted against the frame they matched, before it changes
                    self._count_probe(self._probe_frame_id, same)
                    same = 0
                self._on_data(fd, index, data)
                frame = self._probe_frame
            else:
                self._lose(fd, index)
        if same:
            self._count_probe(self._probe_frame_id, same)
        self._record_probes()

    def _on_event(self, fd: int) -> None:
        state = self._pending.get(fd)
        if state is not None:
            self._on_handshake(fd, state)
        elif fd in self._index:
            self._on_readable(fd)
        elif fd in self._closing:
            self._on_closing(fd)
        else:
            callback = self._watchers.get(fd)
            if callback is not None:
                callback()

    # -- receiving -------------------------------------------------------------------

    def _on_readable(self, fd: int) -> None:
        index = self._index[fd]
        try:
            data = self._socks[index].recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lose(fd, index)
            return
        self._on_data(fd, index, data)

    def _on_data(self, fd: int, index: int, data: bytes) -> None:
        """Count complete server frames and probes; keep a split frame's start for later.

        Probes count toward this epoll wait's tally (``_record_probes`` records them).

        Why its own count-only parsing and not ``chat.protocol.ClientProtocol`` (which
        the rest of this module's frames come from): measured end to end (greenchat
        serve, 2,000 connections in 2 processes, 20 probes/s for 10 s, less the same run
        without probes, median of 3), this loop spends 13.3 us of generator CPU per
        received message, a ClientProtocol per connection 17.7 us (+33%: UTF-8 checks
        and event objects the count does not need) and 0.31 instead of 0.23 KB per
        connection, while the server spent 8.7-9.6 us per delivery. The load tool must
        not be the bottleneck it measures, so it keeps this loop. (That was before
        ``_dispatch`` counted most reads without calling this at all.)
        """
        partial = self._partial.pop(fd, None)
        if partial is not None:
            data = partial + data
        size = len(data)
        pos = 0
        messages = 0
        while size - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                header = 10
            if data[pos + 1] & 0x80:  # a server must not mask: treat it as a lost connection
                self._lose(fd, index)
                return
            end = pos + header + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode <= 2:
                if b0 & 0x80:  # FIN: a complete message (text, binary or last fragment)
                    messages += 1
                    start = pos + header
                    if opcode == 1 and b0 & _RSV1:  # compressed (only when we offered it)
                        probe = zlib.decompressobj(-15).decompress(data[start:end] + _DEFLATE_TAIL)
                    elif opcode == 1 and data.startswith(PROBE_PREFIX, start, end):
                        probe = data[start:end]
                    else:
                        probe = b""
                    if probe.startswith(PROBE_PREFIX):
                        probe_id = self._on_probe(index, probe)
                        if pos == 0 and end == size and probe_id >= 0:
                            self._probe_frame, self._probe_frame_id = data, probe_id
                    else:
                        self.other_messages += 1
            elif opcode == 8:
                self.close_frames += 1
                self._lose(fd, index, closing=True)
                return
            elif opcode == 9:  # ping: answer with a pong carrying the same payload
                if length > 125 or not b0 & 0x80:  # no server may send that (nor we echo it)
                    self._lose(fd, index)
                    return
                payload = data[pos + header:end]
                try:
                    self._socks[index].send(encode_client_frame(_PONG, payload) if payload
                                            else _EMPTY_PONG)
                except OSError:
                    pass
            pos = end
        if pos < size:
            self._partial[fd] = data[pos:]
        if messages:
            if not self._first_message:
                self._first_message = time.monotonic()
            self._messages[index] += messages

    def _on_probe(self, index: int, payload: bytes) -> int:
        """Count one probe for connection ``index``; its id, or -1 if it is not one of ours.

        Every client of a broadcast gets the same payload: it is parsed once.
        """
        parsed = self._parsed
        probe = parsed.get(payload, False)
        if probe is False:
            if len(parsed) >= _PARSED_CACHE:
                parsed.clear()
            probe = parsed[payload] = parse_probe(payload)
            if probe is not None:
                self._sent_ns[probe[0]] = probe[1]
        if probe is None:
            self.other_messages += 1  # looks like a probe but is not one of ours
            return -1
        probe_id = probe[0]
        self._probes[index] += 1
        self._count_probe(probe_id, 1)
        return probe_id

    def _count_probe(self, probe_id: int, count: int) -> None:
        seen = self._seen
        seen[probe_id] = seen.get(probe_id, 0) + count

    def _record_probes(self) -> None:
        """Record the probes counted since the last call: their latency is the time the
        epoll wait that reported them returned, less their send time."""
        if not self._seen:
            return
        now_ns = self._now_ns
        if not self._first_message:
            self._first_message = time.monotonic()
        for probe_id, count in self._seen.items():
            latency = now_ns - self._sent_ns[probe_id]
            self.probe_deliveries_open += count
            self.histogram.record(latency, count)
            stat = self.probe_stats.get(probe_id)
            if stat is None:
                self.probe_stats[probe_id] = [count, latency]
            else:
                stat[0] += count
                if latency > stat[1]:
                    stat[1] = latency
        self._seen.clear()

    def _batch_of(self, index: int) -> Batch:
        return self._batches[bisect.bisect_right(self._batch_starts, index) - 1]

    def _lose(self, fd: int, index: int, closing: bool = False) -> None:
        """Connection ``index`` is gone: closed by the server, reset, or (``closing``) a
        close frame came. That one is answered with ours, and the socket stays only
        until the server closes TCP (``_on_closing``), as RFC 6455 7.1.1 wants: the
        server then holds the TIME_WAIT. A load client that closed first would keep one
        per connection for 60 s, on the source address it reconnects from: in a 100,000
        client storm the kernel's search for a free port then blocked the load processes
        for tens of seconds."""
        sock = self._socks[index]
        self._socks[index] = None
        del self._index[fd]
        self._partial.pop(fd, None)
        if closing:
            try:
                sock.send(encode_client_close())
                self._closing[fd] = sock
                self._closing_since.append((time.monotonic() + CLOSE_WAIT, fd, sock))
            except OSError:
                closing = False
        if not closing:
            self._epoll.unregister(fd)
            sock.close()
        self.lost += 1
        self._batch_of(index).lost += 1
        self.probe_deliveries_open -= self._probes[index]
        storm = self._storm
        if storm is not None:
            now = time.monotonic()
            storm.drops += 1
            storm.first_drop = storm.first_drop or now
            storm.last_drop = now
            self._schedule_reconnect(index)

    def _on_closing(self, fd: int) -> None:
        """A connection we answered a close frame on: wait for the server's EOF."""
        sock = self._closing[fd]
        try:
            if sock.recv(RECV_SIZE):
                return  # frames after the close frame: ignored
        except BlockingIOError:
            return
        except OSError:
            pass
        del self._closing[fd]
        self._epoll.unregister(fd)
        sock.close()

    def _close_overdue(self, now: float) -> None:
        """Close the sockets whose server has not closed within CLOSE_WAIT of our answer."""
        since = self._closing_since
        while since and since[0][0] <= now:
            _deadline, fd, sock = since.popleft()
            if self._closing.get(fd) is sock:  # not closed by its EOF (the fd may be reused)
                del self._closing[fd]
                self._epoll.unregister(fd)
                sock.close()

    def expect(self, target: int, timeout: float = 30.0) -> ExpectResult:
        """Read until every open connection has received ``endpoint`` messages in all.

        Returns at once when that is reached (``last`` is that moment), after one final
        non-blocking pass that catches duplicates; or at the timeout.
        """
        counts = self._messages
        index = self._index
        started = time.monotonic()
        self._first_message = 0.0
        deadline = started + timeout
        remaining = sum(1 for i in index.values() if counts[i] < target)
        last = started if remaining == 0 else 0.0
        epoll = self._epoll
        on_readable = self._on_readable
        lost = self.lost
        while remaining > 0:
            now = time.monotonic()
            if now >= deadline:
                break
            events = epoll.poll(min(0.2, deadline - now), MAX_EVENTS)
            self._now_ns = time.monotonic_ns()
            for fd, _events in events:
                i = index.get(fd)
                if i is None:
                    self._on_event(fd)
                    continue
                before = counts[i]
                on_readable(fd)
                if before < target <= counts[i]:
                    remaining -= 1
            self._record_probes()
            if remaining == 0:
                last = time.monotonic()
            elif self.lost != lost:
                # a lost connection never reaches the target: recount, so we stop waiting
                lost = self.lost
                remaining = sum(1 for i in index.values() if counts[i] < target)
                if remaining == 0:
                    last = time.monotonic()
        self._dispatch(epoll.poll(0, MAX_EVENTS))  # anything more here is a duplicate
        reached = sum(1 for i in index.values() if counts[i] >= target)
        extra = sum(1 for i in index.values() if counts[i] > target)
        return ExpectResult(target=target, connections=len(index) + self.lost, reached=reached,
                            extra=extra, lost=self.lost, close_frames=self.close_frames,
                            started=started, first=self._first_message, last=last)

    # -- probes ----------------------------------------------------------------------

    def expected_probes(self, probes_sent: int, echo: bool = True) -> int:
        """Probe deliveries the open connections should have had, ``probes_sent`` so far."""
        expected = sum((b.connected - b.lost) * max(0, probes_sent - b.first_probe)
                       for b in self._batches)
        if not echo:  # a server that does not send a message back to its sender
            expected -= sum(n for i, n in self.sent_by.items() if self._socks[i] is not None)
        return expected

    def tally(self, probes_sent: int, echo: bool = True) -> dict:
        """Per open connection, probes missing and probes received twice (O(connections))."""
        short = extra = 0
        probes = self._probes
        for index in self._index.values():
            want = max(0, probes_sent - self._batch_of(index).first_probe)
            if not echo:
                want -= self.sent_by.get(index, 0)
            got = probes[index]
            if got < want:
                short += want - got
            elif got > want:
                extra += got - want
        return {"expected": self.expected_probes(probes_sent, echo),
                "received": self.probe_deliveries_open, "missing": short, "duplicated": extra}

    # -- sending ---------------------------------------------------------------------

    def send_text(self, index: int, payloads: list[bytes]) -> float:
        """Send one masked text frame per payload from connection ``index``, in ONE write.

        Returns the monotonic time just before the write.
        """
        sock = self._socks[index]
        if sock is None:
            raise ConnectionError(f"connection {index} is lost")
        data = b"".join(encode_client_frame(_TEXT, p) for p in payloads)
        started = time.monotonic()
        sent = sock.send(data)
        if sent != len(data):
            raise ConnectionError(f"short write on connection {index}: {sent}/{len(data)} bytes")
        return started

    def send_probe(self, probe_id: int, size: int = 0) -> int | None:
        """Send probe ``probe_id`` from the oldest open connection; returns its send time (ns).

        None when no connection is open any more (the server dropped them all): the
        driver then stops probing and reports the lost connections.
        """
        index = self._sender
        sock = self._socks[index] if 0 <= index < len(self._socks) else None
        if sock is None:  # never chosen yet, or lost since
            if not self._index:
                return None
            index = self._sender = min(self._index.values())
            sock = self._socks[index]
        sent_ns = time.monotonic_ns()
        frame = encode_client_frame(_TEXT, probe_payload(probe_id, sent_ns, size))
        if sock.send(frame) != len(frame):
            raise ConnectionError(f"short write of probe {probe_id}")
        self.sent_by[index] = self.sent_by.get(index, 0) + 1
        return sent_ns

    def failures(self) -> dict[str, int]:
        """Why connections failed, over every batch: reason -> count."""
        failures: dict[str, int] = {}
        for batch in self._batches:
            for reason, count in batch.failures.items():
                failures[reason] = failures.get(reason, 0) + count
        return failures

    def status(self, probes_sent: int = 0, echo: bool = True) -> dict:
        """Counters a driver polls once a second (cheap: no pass over the connections)."""
        return {
            "started": sum(b.issued for b in self._batches),
            "established": sum(b.connected for b in self._batches),
            "open": len(self._index),
            "failed": sum(b.failed for b in self._batches),
            "pending": len(self._pending),
            "connecting": self.connecting,
            "lost": self.lost,
            "close_frames": self.close_frames,
            "deliveries": self.probe_deliveries_open,
            "expected": self.expected_probes(probes_sent, echo),
            "other_messages": self.other_messages,
            # the latest batch: when its first connect() was due, when its last handshake
            # ended (monotonic; 0 while still going)
            "batch": [self._batches[-1].began, self._batches[-1].finished]
            if self._batches else None,
            # a reconnect storm's counters since armed (None when not armed)
            "storm": None if self._storm is None else {
                "drops": self._storm.drops, "attempts": self._storm.attempts,
                "reconnected": self._storm.connected, "waiting": len(self._retry),
                "failures": dict(self._storm.failures)},
        }

    def close(self) -> int:
        """Close every connection (TCP close, no closing handshake); returns how many."""
        self.cancel("closed")
        closed = 0
        for fd, index in list(self._index.items()):
            self._epoll.unregister(fd)
            self._socks[index].close()
            closed += 1
        for fd, sock in self._closing.items():
            self._epoll.unregister(fd)
            sock.close()
        self._closing.clear()
        self._closing_since.clear()
        self._index.clear()
        self._socks.clear()
        self._addresses.clear()
        self._connected_at = array("d")
        self._failed_in_row.clear()
        self._partial.clear()
        self._messages = array("q")
        self._probes = array("q")
        self._batches.clear()
        self._batch_starts.clear()
        self.sent_by.clear()
        self._sender = -1
        self.probe_deliveries_open = 0
        self.lost = 0
        self.close_frames = 0
        self._seen.clear()
        self._parsed.clear()
        self._probe_frame, self._probe_frame_id = None, -1
        return closed


# -- load process -------------------------------------------------------------------

class CommandLoop:
    """A ``LoadClient`` driven by JSON-line commands on a file descriptor (stdin).

    Every command gets one JSON line back on ``out``, with ``"ok"`` (and ``"error"``
    when the command raised). Immediate commands, answered while connections are made:

    - ``{"cmd": "start", "n": N, "rate": R, "first_probe": P, "sources": [[addr, n], ...]}``
      begins N connections at R per second (0: as fast as ``--inflight`` allows);
    - ``{"cmd": "status", "probes": P, "echo": true}`` -> ``LoadClient.status`` fields;
    - ``{"cmd": "probe", "id": I, "size": S}`` -> ``{"sent_ns": T}`` (null: no connection
      left to send from);
    - ``{"cmd": "tally", "probes": P, "echo": true}`` -> ``LoadClient.tally`` fields plus
      ``histogram``, ``probe_stats`` (id -> [deliveries, max ns]) and ``failures``;
    - ``{"cmd": "cancel"}``, ``{"cmd": "close"}`` -> ``{"closed": N}``, ``{"cmd": "quit"}``;
    - ``{"cmd": "arm_reconnect"}``: from now on reconnect lost connections (a storm);
    - ``{"cmd": "storm", "since": T}`` -> ``LoadClient.storm_tally(T)`` fields;
    - ``{"cmd": "deliveries", "id": I}`` -> ``{"deliveries": N}`` of probe I so far.

    Blocking commands, answered when done (what ``bench/idle_broadcast.py`` uses):

    - ``{"cmd": "connect", "n": N, "sources": [...], "timeout": S}`` -> ConnectResult fields
    - ``{"cmd": "expect", "target": K, "timeout": S}`` -> ExpectResult fields
    - ``{"cmd": "send_expect", "index": I, "payloads": [str, ...], "target": K,
      "timeout": S}``: send the payloads as text frames in one write, then expect;
      the reply adds ``"sent"`` (monotonic time of the write)
    """

    def __init__(self, client: LoadClient, infd: int, out) -> None:
        self.client = client
        self.infd = infd
        self.out = out
        self._buffer = b""
        self._eof = False
        os.set_blocking(infd, False)
        client.watch(infd, self._fill)

    def _fill(self) -> None:
        try:
            chunk = os.read(self.infd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._eof = True
            self.client.unwatch(self.infd)
        self._buffer += chunk

    def run(self) -> None:
        """Answer commands until ``quit`` or the end of input, making connections meanwhile."""
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if line.strip() and not self.handle(line):
                    return
            if self._eof:
                return
            self.client.step(1.0)

    def handle(self, line: bytes) -> bool:
        """Run one command and write its reply; False after ``quit``."""
        name = None
        try:
            command = json.loads(line)
            name = command["cmd"]
            reply = self._dispatch(command)
        except Exception as error:  # reported to the driver, which fails loudly
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        self.out.write(json.dumps(reply) + "\n")
        self.out.flush()
        return name != "quit"

    def _dispatch(self, command: dict) -> dict:
        client = self.client
        name = command["cmd"]
        echo = command.get("echo", True)
        if name == "quit":
            return {"ok": True}
        if name == "start":
            client.start(command["n"], command.get("rate", 0.0), command.get("first_probe", 0),
                         [tuple(s) for s in command["sources"]] if "sources" in command
                         else None)
            return {"ok": True}
        if name == "status":
            return {"ok": True, **client.status(command.get("probes", 0), echo)}
        if name == "probe":
            return {"ok": True, "sent_ns": client.send_probe(command["id"],
                                                              command.get("size", 0))}
        if name == "tally":
            return {"ok": True, **client.status(command.get("probes", 0), echo),
                    **client.tally(command.get("probes", 0), echo),
                    "failures": client.failures(), "histogram": client.histogram.to_dict(),
                    "probe_stats": client.probe_stats}
        if name == "cancel":
            client.cancel()
            return {"ok": True}
        if name == "arm_reconnect":
            client.arm_reconnect()
            return {"ok": True}
        if name == "storm":
            return {"ok": True, **client.storm_tally(command["since"])}
        if name == "deliveries":
            return {"ok": True,
                    "deliveries": client.probe_stats.get(command["id"], [0, 0])[0]}
        if name == "close":
            return {"ok": True, "closed": client.close()}
        if name == "connect":
            result = client.connect(command["n"], command["sources"],
                                    command.get("timeout", 60.0))
            return {"ok": result.ok, **asdict(result)}
        if name == "expect":
            result = client.expect(command["target"], command.get("timeout", 30.0))
            return {"ok": result.ok, **asdict(result)}
        if name == "send_expect":
            sent = client.send_text(command["index"], [p.encode() for p in command["payloads"]])
            result = client.expect(command["target"], command.get("timeout", 30.0))
            return {"ok": result.ok, "sent": sent, **asdict(result)}
        return {"ok": False, "error": f"unknown command {name!r}"}


SCHED_POLICIES = ("batch", "normal")


def set_sched(policy: str) -> None:
    """Run this process as SCHED_BATCH (``batch``) or leave it SCHED_OTHER (``normal``).

    Why: a load process is woken by every message the server sends it, and a woken
    normal process takes the core from the server at once, reads that one message and
    sleeps again. Measured at a million clients (63 workers, 53 load processes, two
    cores), the load processes switched ~20,000 times a second while 20,000 messages a
    second arrived: one wake-up per message, and 3x the server's CPU. A batch process is
    never given the core on waking (the tick decides), so the server goes on sending and
    the load process finds many messages ready when its turn comes. Where the policy
    does not exist (not Linux), nothing changes.
    """
    if policy == "batch" and hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="websocket load client worker: JSON-line "
                                     "commands on stdin, replies on stdout")
    parser.add_argument("--host", default="127.0.0.1", help="server address (an IP)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--host-header", default="", help="Host header (default: HOST:PORT)")
    parser.add_argument("--inflight", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--per-source", type=int, default=30000,
                        help="connections per source address (the connect command)")
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    parser.add_argument("--deflate", action="store_true",
                        help=f"offer compression ({DEFLATE_OFFER}) and inflate what comes")
    parser.add_argument("--sched", choices=SCHED_POLICIES, default="batch",
                        help="scheduling policy (see set_sched)")
    parser.add_argument("--read-nap", type=float, default=0.0,
                        help="seconds to sleep after a wait that found a few messages of a "
                        "stream (LoadClient's read_nap; 0: never)")
    args = parser.parse_args(argv)
    open_files_limit()  # raises the soft limit to the hard one: one socket per connection
    set_sched(args.sched)
    client = LoadClient(args.host, args.port, path=args.path, host_header=args.host_header,
                        inflight=args.inflight, per_source=args.per_source,
                        handshake_timeout=args.handshake_timeout, deflate=args.deflate,
                        read_nap=args.read_nap)
    try:
        CommandLoop(client, sys.stdin.fileno(), sys.stdout).run()
    except KeyboardInterrupt:  # the driver's Ctrl-C reaches its load processes too
        pass
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
