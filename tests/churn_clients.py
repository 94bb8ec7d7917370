"""Connect/disconnect churn for the scale tests: many short websocket lives, a bounded
number at once, each ended the way real clients end (a TCP reset, a clean closing
handshake, a frame cut in half).

One epoll loop drives every socket as a small state machine (connect, handshake, end),
so a single test process can run hundreds of thousands of cycles without a thread or a
greenlet per client. Source addresses rotate over 127.0.0.2+ so neither ephemeral ports
nor TIME_WAIT run out.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from chat.protocol import (ClientProtocol, CloseReceived, Opcode, encode_client_close,
                           encode_client_frame, generate_key, handshake_request)
from raw_clients import IP_BIND_ADDRESS_NO_PORT

__all__ = ["MODES", "ChurnResult", "churn"]

# How a cycle ends, chosen round-robin by cycle number:
#   reset             101 received, then SO_LINGER 0 and close: the server sees a RST
#   clean             a masked close frame (1000); wait for the server's close frame and
#                     its FIN, then close (the server closes TCP first)
#   half_frame_fin    half of a masked text frame, then close (FIN mid-frame)
#   half_frame_reset  half of a masked text frame, then a RST
MODES = ("reset", "clean", "half_frame_fin", "half_frame_reset")

_LINGER_ZERO = struct.pack("ii", 1, 0)
_CLOSE_FRAME = encode_client_close(1000)
_HALF_FRAME = encode_client_frame(Opcode.TEXT, b"x" * 200)[:100]


@dataclass
class ChurnResult:
    """What a churn run did: finished cycles per mode, and every failure by kind."""

    completed: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def cycles(self) -> int:
        return sum(self.completed.values())


class _Client:
    __slots__ = ("sock", "mode", "state", "buffer", "deadline")

    def __init__(self, sock: socket.socket, mode: str, deadline: float) -> None:
        self.sock = sock
        self.mode = mode
        self.state = "connecting"
        self.buffer = b""
        self.deadline = deadline


def churn(port: int, cycles: int, in_flight: int = 400, sources: int = 100,
          first_source: int = 2, cycle_timeout: float = 15.0,
          total_timeout: float = 600.0) -> ChurnResult:
    """Run ``cycles`` connect/handshake/disconnect cycles against ``ws://127.0.0.1:port/``,
    at most ``in_flight`` at once, from source addresses 127.0.0.<first_source>.. (one
    per cycle, round-robin over ``sources`` of them).

    A cycle that fails (refused, reset before the 101, a wrong answer, no progress within
    ``cycle_timeout``) is counted in ``failures`` by kind, never retried. The whole run
    stops after ``total_timeout`` seconds, counting what is left as ``unfinished``.
    """
    result = ChurnResult()
    epoll = select.epoll()
    clients: dict[int, _Client] = {}
    started = time.monotonic()
    stop_at = started + total_timeout
    next_cycle = 0
    last_sweep = started

    def finish(client: _Client, failure: str | None = None) -> None:
        fd = client.sock.fileno()
        epoll.unregister(fd)
        del clients[fd]
        if failure is None:
            result.completed[client.mode] += 1
        else:
            result.failures[f"{client.mode}: {failure}"] += 1
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        client.sock.close()

    def begin(cycle: int, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.0.0.{first_source + cycle % sources}", 0))
        client = _Client(sock, MODES[cycle % len(MODES)], now + cycle_timeout)
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            result.failures[f"{client.mode}: connect {errno.errorcode.get(code, code)}"] += 1
            sock.close()
            return
        clients[sock.fileno()] = client
        epoll.register(sock.fileno(), select.EPOLLOUT)

    def step(client: _Client) -> None:
        sock = client.sock
        if client.state == "connecting":
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                return finish(client, f"connect {errno.errorcode.get(code, code)}")
            # ~150 bytes into an empty send buffer: a non-blocking send takes it whole.
            sock.send(handshake_request(f"127.0.0.1:{port}", "/", generate_key()))
            client.state = "handshake"
            epoll.modify(sock.fileno(), select.EPOLLIN)
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            return finish(client, f"{client.state}: {errno.errorcode.get(error.errno, error)}")
        if not data and client.state == "handshake":
            return finish(client, "handshake: EOF")
        client.buffer += data
        if client.state == "handshake":
            end = client.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in client.buffer.split(b"\r\n", 1)[0]:
                return finish(client, f"refused: {client.buffer[:40]!r}")
            client.buffer = client.buffer[end + 4:]
            return end_connection(client)
        # "closing" (clean mode): wait for the server's close frame, then its FIN.
        if data:
            return
        if ClientProtocol().receive_data(client.buffer) != [CloseReceived(1000, "")]:
            return finish(client, f"clean: expected close 1000, got {client.buffer[:8]!r}")
        finish(client)

    def end_connection(client: _Client) -> None:
        sock = client.sock
        if client.mode == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        elif client.mode == "clean":
            sock.send(_CLOSE_FRAME)
            client.state = "closing"
            return
        else:
            sock.send(_HALF_FRAME)
            if client.mode == "half_frame_reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        finish(client)

    try:
        while (next_cycle < cycles or clients) and time.monotonic() < stop_at:
            now = time.monotonic()
            while next_cycle < cycles and len(clients) < in_flight:
                begin(next_cycle, now)
                next_cycle += 1
            for fd, _ in epoll.poll(0.5):
                client = clients.get(fd)
                if client is not None:
                    step(client)
            if now - last_sweep > 1.0:
                last_sweep = now
                for client in [c for c in clients.values() if c.deadline < now]:
                    finish(client, f"{client.state}: no progress in {cycle_timeout}s")
    finally:
        for client in list(clients.values()):
            finish(client, f"{client.state}: unfinished")
        result.failures["not started"] += cycles - next_cycle
        if not result.failures["not started"]:
            del result.failures["not started"]
        epoll.close()
        result.seconds = time.monotonic() - started
    return result
