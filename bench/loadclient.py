"""A lean websocket load client: many idle connections on one epoll loop per process.

Why it looks like this: a load tool that spends a greenlet, thread or coroutine per
connection runs out of memory or CPU before the server does (tsung died at ~500k in the
experiment this project answers). Here one process holds up to ~19,900 sockets (the
open-files limit) with, per connection, a socket object, one slot in a counter array and
one dict entry from file descriptor to index; nothing else unless a frame arrives split.

Only the standard library is used, so the module can move into ``chat`` for a future
``greenchat bench`` command. Two ways to use it:

- in-process: ``LoadClient(host, port).connect(n, sources)``, then ``send_text`` /
  ``expect`` / ``close``; every call runs the epoll loop until its goal or its timeout;
- as a worker process driven over pipes (``python bench/loadclient.py --host H --port P``):
  one JSON object per line on stdin is a command, one JSON line on stdout the reply.
  See ``serve_commands`` for the commands. ``bench/idle_broadcast.py`` drives two.

Connections to one server ``host:port`` from one source address are limited by the
ephemeral port range (``net.ipv4.ip_local_port_range``), so connections are spread over
source addresses 127.0.0.2, 127.0.0.3, ... (loopback: no ``ip addr add`` needed).
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import ipaddress
import json
import os
import resource
import select
import socket
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field

__all__ = [
    "LoadClient",
    "ConnectResult",
    "ExpectResult",
    "masked_frame",
    "accept_key",
    "source_addresses",
    "serve_commands",
]

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Linux: let connect() pick the source port, so bind() to a source address does not
# reserve a port for every (address, port) pair up front.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
RECV_SIZE = 65536
MAX_HANDSHAKE_RESPONSE = 16384

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT


def accept_key(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept value a server must answer for ``key`` (RFC 6455 4.2.2)."""
    if isinstance(key, str):
        key = key.encode()
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame, masked as RFC 6455 requires of clients."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return header + mask + body


def source_addresses(first: int, count: int) -> list[str]:
    """``count`` loopback source addresses starting at 127.0.0.2 + ``first``."""
    base = int(ipaddress.IPv4Address("127.0.0.2")) + first
    last = base + count - 1
    if count < 0 or last > int(ipaddress.IPv4Address("127.255.255.254")):
        raise ValueError(f"not enough loopback source addresses for {first}+{count}")
    return [str(ipaddress.IPv4Address(base + i)) for i in range(count)]


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
    """Whether every open connection has received ``target`` messages, and when."""

    target: int
    connections: int  # connections this client should hold
    reached: int  # connections that received at least ``target`` messages
    extra: int  # connections that received more than ``target`` (a duplicate is a failure)
    lost: int  # connections lost since connect (closed by the server, reset, ...)
    close_frames: int  # close frames received since connect
    started: float = 0.0
    first: float = 0.0  # monotonic time of the first message received during this call
    last: float = 0.0  # monotonic time when the last connection reached ``target``

    @property
    def ok(self) -> bool:
        return self.reached == self.connections and not self.extra and not self.lost


class LoadClient:
    """Websocket clients on one epoll loop; see the module docstring.

    ``inflight`` bounds the handshakes in progress at once; ``per_source`` bounds the
    connections made from one source address (keep it under the ephemeral port range).
    """

    def __init__(self, host: str, port: int, *, path: str = "/", inflight: int = 200,
                 per_source: int = 30000) -> None:
        self.host = host
        self.port = port
        self.inflight = inflight
        self.per_source = per_source
        key = base64.b64encode(os.urandom(16)).decode()
        self._request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self._accept = accept_key(key).encode()
        self._epoll = select.epoll()
        self._socks: list[socket.socket | None] = []  # index -> socket (None once lost)
        self._index: dict[int, int] = {}  # fd -> index, established connections only
        self._counts = array("q")  # index -> messages received
        self._partial: dict[int, bytes] = {}  # fd -> start of a frame split across reads
        self.lost = 0
        self.close_frames = 0
        self._first_message = 0.0

    # -- connecting ------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections currently open."""
        return len(self._index)

    def connect(self, n: int, sources: list[str], timeout: float = 60.0) -> ConnectResult:
        """Open ``n`` more websockets, at most ``inflight`` handshakes at a time."""
        needed = -(-n // self.per_source)
        if len(sources) < needed:
            raise ValueError(f"{n} connections need {needed} source addresses "
                             f"({self.per_source} each), got {len(sources)}")
        result = ConnectResult(requested=n, connected=0)
        failures = result.failures
        epoll = self._epoll
        socks = self._socks
        first = len(socks)
        socks.extend([None] * n)
        self._counts.extend(array("q", bytes(8 * n)))
        # fd -> [index, request sent?, response bytes so far]; only during the handshake
        pending: dict[int, list] = {}
        next_i = 0
        done = 0
        result.started = time.monotonic()
        deadline = result.started + timeout

        def fail(fd: int, reason: str) -> None:
            sock = socks[pending.pop(fd)[0]]
            failures[reason] = failures.get(reason, 0) + 1
            epoll.unregister(fd)
            sock.close()

        while done < n:
            while len(pending) < self.inflight and next_i < n:
                index = first + next_i
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                try:
                    sock.bind((sources[next_i // self.per_source], 0))
                    err = sock.connect_ex((self.host, self.port))
                except OSError as error:
                    err = error.errno
                next_i += 1
                if err not in (0, errno.EINPROGRESS):
                    reason = f"connect: {errno.errorcode.get(err, err)}"
                    failures[reason] = failures.get(reason, 0) + 1
                    sock.close()
                    done += 1
                    continue
                socks[index] = sock
                pending[sock.fileno()] = [index, False, b""]
                epoll.register(sock.fileno(), _EPOLLOUT)
            now = time.monotonic()
            if now >= deadline:
                for fd in list(pending):
                    fail(fd, "timeout")
                    done += 1
                done += n - next_i
                if next_i < n:
                    failures["not started (timeout)"] = n - next_i
                break
            for fd, events in epoll.poll(min(0.2, deadline - now)):
                state = pending.get(fd)
                if state is None:
                    self._on_readable(fd)  # an established connection got data
                    continue
                index, requested, response = state
                sock = socks[index]
                if not requested:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        fail(fd, f"connect: {errno.errorcode.get(err, err)}")
                        done += 1
                        continue
                    try:
                        sent = sock.send(self._request)
                    except OSError as error:
                        fail(fd, f"send request: {errno.errorcode.get(error.errno, error)}")
                        done += 1
                        continue
                    if sent != len(self._request):
                        fail(fd, "send request: short write")
                        done += 1
                        continue
                    state[1] = True
                    epoll.modify(fd, _EPOLLIN)
                    continue
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as error:
                    fail(fd, f"handshake: {errno.errorcode.get(error.errno, error)}")
                    done += 1
                    continue
                if not data:
                    fail(fd, "handshake: server closed the connection")
                    done += 1
                    continue
                response = state[2] = response + data
                end = response.find(b"\r\n\r\n")
                if end < 0:
                    if len(response) > MAX_HANDSHAKE_RESPONSE:
                        fail(fd, "handshake: response too long")
                        done += 1
                    continue
                head = response[:end + 4]
                status = head.split(b"\r\n", 1)[0]
                if not status.startswith(b"HTTP/1.1 101"):
                    fail(fd, f"handshake: {status.decode('latin-1')[:60]}")
                    done += 1
                    continue
                if self._accept not in head:
                    fail(fd, "handshake: wrong or missing Sec-WebSocket-Accept")
                    done += 1
                    continue
                del pending[fd]
                done += 1
                result.connected += 1
                self._index[fd] = index
                rest = response[end + 4:]
                if rest:
                    self._on_data(fd, index, rest)
        result.finished = time.monotonic()
        return result

    # -- receiving -------------------------------------------------------------------

    def _on_readable(self, fd: int) -> None:
        index = self._index.get(fd)
        if index is None:  # pragma: no cover - unregistered before the event was handled
            return
        sock = self._socks[index]
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lose(fd, index)
            return
        self._on_data(fd, index, data)

    def _on_data(self, fd: int, index: int, data: bytes) -> None:
        """Count complete server frames; keep a split frame's start for the next read."""
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
            elif opcode == 8:
                self.close_frames += 1
                self._lose(fd, index)
                return
            elif opcode == 9:  # ping: answer with a pong carrying the same payload
                try:
                    self._socks[index].send(masked_frame(data[pos + header:end], 0xA))
                except OSError:
                    pass
            pos = end
        if pos < size:
            self._partial[fd] = data[pos:]
        if messages:
            if not self._first_message:
                self._first_message = time.monotonic()
            self._counts[index] += messages

    def _lose(self, fd: int, index: int) -> None:
        sock = self._socks[index]
        self._socks[index] = None
        del self._index[fd]
        self._partial.pop(fd, None)
        self._epoll.unregister(fd)
        sock.close()
        self.lost += 1

    def expect(self, target: int, timeout: float = 30.0) -> ExpectResult:
        """Read until every open connection has received ``target`` messages in all.

        Returns at once when that is reached (``last`` is that moment), after one final
        non-blocking pass that catches duplicates; or at the timeout.
        """
        counts = self._counts
        index = self._index
        started = time.monotonic()
        self._first_message = 0.0
        deadline = started + timeout
        remaining = sum(1 for i in index.values() if counts[i] < target)
        last = started if remaining == 0 else 0.0
        epoll = self._epoll
        on_readable = self._on_readable
        while remaining > 0:
            now = time.monotonic()
            if now >= deadline:
                break
            for fd, _events in epoll.poll(min(0.2, deadline - now)):
                i = index.get(fd)
                before = counts[i] if i is not None else target
                on_readable(fd)
                if before < target <= counts[i]:
                    remaining -= 1
            if remaining == 0:
                last = time.monotonic()
            elif self.lost:
                # a lost connection never reaches the target: recount, so we stop waiting
                remaining = sum(1 for i in index.values() if counts[i] < target)
                if remaining == 0:
                    last = time.monotonic()
        for fd, _events in epoll.poll(0):  # anything more already here is a duplicate
            on_readable(fd)
        reached = sum(1 for i in index.values() if counts[i] >= target)
        extra = sum(1 for i in index.values() if counts[i] > target)
        return ExpectResult(target=target, connections=len(index) + self.lost, reached=reached,
                            extra=extra, lost=self.lost, close_frames=self.close_frames,
                            started=started, first=self._first_message, last=last)

    # -- sending ---------------------------------------------------------------------

    def send_text(self, index: int, payloads: list[bytes]) -> float:
        """Send one masked text frame per payload from connection ``index``, in ONE write.

        Returns the monotonic time just before the write.
        """
        sock = self._socks[index]
        if sock is None:
            raise ConnectionError(f"connection {index} is lost")
        data = b"".join(masked_frame(p) for p in payloads)
        started = time.monotonic()
        sent = sock.send(data)
        if sent != len(data):
            raise ConnectionError(f"short write on connection {index}: {sent}/{len(data)} bytes")
        return started

    def close(self) -> int:
        """Close every connection (TCP close, no closing handshake); returns how many."""
        closed = 0
        for fd, index in list(self._index.items()):
            self._epoll.unregister(fd)
            self._socks[index].close()
            closed += 1
        self._index.clear()
        self._socks.clear()
        self._partial.clear()
        self._counts = array("q")
        self.lost = 0
        self.close_frames = 0
        return closed


# -- worker process -----------------------------------------------------------------

def serve_commands(client: LoadClient, lines, out) -> None:
    """Run JSON-line commands from ``lines``, answering each with one JSON line on ``out``.

    Commands (every reply has ``"ok"``, and ``"error"`` when a command raised):

    - ``{"cmd": "connect", "n": N, "sources": [...], "timeout": S}`` -> ConnectResult fields
    - ``{"cmd": "expect", "target": K, "timeout": S}`` -> ExpectResult fields
    - ``{"cmd": "send_expect", "index": I, "payloads": [str, ...], "target": K,
      "timeout": S}``: send the payloads as text frames in one write, then expect;
      the reply adds ``"sent"`` (monotonic time of the write)
    - ``{"cmd": "close"}`` -> ``{"closed": N}``;  ``{"cmd": "quit"}`` ends the loop
    """
    for line in lines:
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            name = command["cmd"]
            if name == "quit":
                out.write(json.dumps({"ok": True}) + "\n")
                out.flush()
                return
            if name == "connect":
                result = client.connect(command["n"], command["sources"],
                                        command.get("timeout", 60.0))
                reply = {"ok": result.ok, **asdict(result)}
            elif name == "expect":
                result = client.expect(command["target"], command.get("timeout", 30.0))
                reply = {"ok": result.ok, **asdict(result)}
            elif name == "send_expect":
                sent = client.send_text(command["index"],
                                        [p.encode() for p in command["payloads"]])
                result = client.expect(command["target"], command.get("timeout", 30.0))
                reply = {"ok": result.ok, "sent": sent, **asdict(result)}
            elif name == "close":
                reply = {"ok": True, "closed": client.close()}
            else:
                reply = {"ok": False, "error": f"unknown command {name!r}"}
        except Exception as error:  # reported to the driver, which fails loudly
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="websocket load client worker: JSON-line "
                                     "commands on stdin, replies on stdout")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--inflight", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--per-source", type=int, default=30000,
                        help="connections per source address")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    client = LoadClient(args.host, args.port, path=args.path, inflight=args.inflight,
                        per_source=args.per_source)
    serve_commands(client, sys.stdin, sys.stdout)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
