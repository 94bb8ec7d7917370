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
import ipaddress
import json
import os
import select
import socket
import sys
import time
import zlib
from array import array
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..protocol import (Opcode, accept_key, encode_client_frame, generate_key,
                        handshake_request)
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
    "source_addresses",
]

PROBE_PREFIX = b"greenchat-probe "
# Linux: let connect() pick the source port, so bind() to a source address does not
# reserve a port for every (address, port) pair up front.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
RECV_SIZE = 65536
MAX_HANDSHAKE_RESPONSE = 16384

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_PREFIX_LEN = len(PROBE_PREFIX)
_TEXT, _PONG = Opcode.TEXT, Opcode.PONG
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
                 handshake_timeout: float = 30.0, deflate: bool = False) -> None:
        self.host = host
        self.port = port
        self.inflight = inflight
        self.per_source = per_source
        self.handshake_timeout = handshake_timeout
        key = generate_key()
        self._request = handshake_request(host_header or f"{host}:{port}", path, key,
                                          DEFLATE_OFFER if deflate else "")
        self._accept = accept_key(key).encode()
        self._epoll = select.epoll()
        self._socks: list[socket.socket | None] = []  # index -> socket (None once gone)
        self._index: dict[int, int] = {}  # fd -> index, established connections only
        self._messages = array("q")  # index -> complete data messages received
        self._probes = array("q")  # index -> probe messages received
        self._partial: dict[int, bytes] = {}  # fd -> start of a frame split across reads
        # fd -> [index, request sent?, response so far, deadline, batch]; handshakes only
        self._pending: dict[int, list] = {}
        self._batches: list[Batch] = []
        self._batch_starts: list[int] = []  # first_index of each batch, for bisect
        self._active: Batch | None = None  # the batch still issuing connect() calls
        # (address, connections) still to use; None: no bind, the kernel picks the address
        self._sources: list[tuple[str, int]] | None = None
        self._source_used = 0  # connections made from self._sources[0]
        self._watchers: dict[int, Callable[[], None]] = {}
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
        """Give up on every handshake in flight and every connection not yet started."""
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
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if address:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((address, 0))
            err = sock.connect_ex((self.host, self.port))
        except OSError as error:
            err = error.errno
        if err not in (0, errno.EINPROGRESS):
            batch.fail(_reason("connect", err))
            sock.close()
            self._finish_if_done(batch)
            return
        self._socks[index] = sock
        fd = sock.fileno()
        self._pending[fd] = [index, False, b"", now + self.handshake_timeout, batch]
        self._epoll.register(fd, _EPOLLOUT)

    def _finish_if_done(self, batch: Batch) -> None:
        if batch.done and not batch.finished:
            batch.finished = time.monotonic()

    def _fail_pending(self, fd: int, reason: str) -> None:
        index, _sent, _response, _deadline, batch = self._pending.pop(fd)
        sock = self._socks[index]
        self._socks[index] = None
        self._epoll.unregister(fd)
        sock.close()
        batch.fail(reason)
        self._finish_if_done(batch)

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
        if self._pending and now >= self._next_expiry:
            self._expire(now)
        for fd, _events in self._epoll.poll(timeout):
            self._on_event(fd)

    def _on_event(self, fd: int) -> None:
        state = self._pending.get(fd)
        if state is not None:
            self._on_handshake(fd, state)
        elif fd in self._index:
            self._on_readable(fd)
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

        Why its own count-only parsing and not ``chat.protocol.ClientProtocol`` (which
        the rest of this module's frames come from): measured end to end (greenchat
        serve, 2,000 connections in 2 processes, 20 probes/s for 10 s, less the same run
        without probes, median of 3), this loop spends 13.3 us of generator CPU per
        received message, a ClientProtocol per connection 17.7 us (+33%: UTF-8 checks
        and event objects the count does not need) and 0.31 instead of 0.23 KB per
        connection, while the server spent 8.7-9.6 us per delivery. The load tool must
        not be the bottleneck it measures, so it keeps this loop.
        """
        partial = self._partial.pop(fd, None)
        if partial is not None:
            data = partial + data
        size = len(data)
        pos = 0
        messages = 0
        now_ns = 0
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
                        if not now_ns:
                            now_ns = time.monotonic_ns()
                        self._on_probe(index, probe, now_ns)
                    else:
                        self.other_messages += 1
            elif opcode == 8:
                self.close_frames += 1
                self._lose(fd, index)
                return
            elif opcode == 9:  # ping: answer with a pong carrying the same payload
                if length > 125 or not b0 & 0x80:  # no server may send that (nor we echo it)
                    self._lose(fd, index)
                    return
                try:
                    self._socks[index].send(encode_client_frame(_PONG, data[pos + header:end]))
                except OSError:
                    pass
            pos = end
        if pos < size:
            self._partial[fd] = data[pos:]
        if messages:
            if not self._first_message:
                self._first_message = time.monotonic()
            self._messages[index] += messages

    def _on_probe(self, index: int, payload: bytes, now_ns: int) -> None:
        probe = parse_probe(payload)
        if probe is None:
            self.other_messages += 1  # looks like a probe but is not one of ours
            return
        probe_id, sent_ns = probe
        latency = now_ns - sent_ns
        self._probes[index] += 1
        self.probe_deliveries_open += 1
        self.histogram.record(latency)
        stat = self.probe_stats.get(probe_id)
        if stat is None:
            self.probe_stats[probe_id] = [1, latency]
        else:
            stat[0] += 1
            if latency > stat[1]:
                stat[1] = latency

    def _batch_of(self, index: int) -> Batch:
        return self._batches[bisect.bisect_right(self._batch_starts, index) - 1]

    def _lose(self, fd: int, index: int) -> None:
        sock = self._socks[index]
        self._socks[index] = None
        del self._index[fd]
        self._partial.pop(fd, None)
        self._epoll.unregister(fd)
        sock.close()
        self.lost += 1
        self._batch_of(index).lost += 1
        self.probe_deliveries_open -= self._probes[index]

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
            for fd, _events in epoll.poll(min(0.2, deadline - now)):
                i = index.get(fd)
                if i is None:
                    self._on_event(fd)
                    continue
                before = counts[i]
                on_readable(fd)
                if before < target <= counts[i]:
                    remaining -= 1
            if remaining == 0:
                last = time.monotonic()
            elif self.lost != lost:
                # a lost connection never reaches the target: recount, so we stop waiting
                lost = self.lost
                remaining = sum(1 for i in index.values() if counts[i] < target)
                if remaining == 0:
                    last = time.monotonic()
        for fd, _events in epoll.poll(0):  # anything more already here is a duplicate
            self._on_event(fd)
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
        }

    def close(self) -> int:
        """Close every connection (TCP close, no closing handshake); returns how many."""
        self.cancel("closed")
        closed = 0
        for fd, index in list(self._index.items()):
            self._epoll.unregister(fd)
            self._socks[index].close()
            closed += 1
        self._index.clear()
        self._socks.clear()
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
    - ``{"cmd": "cancel"}``, ``{"cmd": "close"}`` -> ``{"closed": N}``, ``{"cmd": "quit"}``.

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
    args = parser.parse_args(argv)
    open_files_limit()  # raises the soft limit to the hard one: one socket per connection
    client = LoadClient(args.host, args.port, path=args.path, host_header=args.host_header,
                        inflight=args.inflight, per_source=args.per_source,
                        handshake_timeout=args.handshake_timeout, deflate=args.deflate)
    try:
        CommandLoop(client, sys.stdin.fileno(), sys.stdout).run()
    except KeyboardInterrupt:  # the driver's Ctrl-C reaches its load processes too
        pass
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
