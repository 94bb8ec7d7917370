"""The physical floor for a broadcast delivery: a bare loop of non-blocking ``send()``.

A websocket server in Python cannot deliver one small frame to N loopback clients for
less CPU than ``for sock in socks: sock.send(frame)`` with the frame encoded once: on
loopback that syscall also runs the receiver's TCP processing (~7 us here, ~0.4 us of
it Python). This process accepts websocket connections (a fixed 101 answer with the
right Sec-WebSocket-Accept, nothing else), and on command runs exactly that loop and
reports its CPU, so a server's per-delivery CPU can be read as a ratio to it.

Commands, one per line on stdin; one JSON line answers each on stdout:

- ``send``: one pre-encoded text frame to every connection, one ``send`` each;
- ``burst K``: K frames joined, one ``send`` per connection (the coalesced floor);
- ``count``: connections held;  ``quit``: exit.

The first stdout line says ``listening on http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat.protocol import Opcode, accept_key, encode_frame  # noqa: E402

RESPONSE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n")


def send_to_all(socks: list[socket.socket], frame: bytes) -> dict:
    """The measured loop: one plain non-blocking send of ``frame`` per socket."""
    size = len(frame)
    short = errors = 0
    wall = time.monotonic()
    cpu0 = time.process_time_ns()
    for sock in socks:
        try:
            if sock.send(frame) != size:
                short += 1
        except OSError:
            errors += 1
    cpu = time.process_time_ns() - cpu0
    return {"ok": not short and not errors, "sends": len(socks), "bytes": size, "cpu_ns": cpu,
            "started": wall, "short": short, "errors": errors}


class Floor:
    def __init__(self, host: str, port: int, backlog: int, payload: bytes) -> None:
        self.listener = socket.create_server((host, port), backlog=backlog)
        self.listener.setblocking(False)
        self.frame = encode_frame(Opcode.TEXT, payload)  # encoded once, as a server does
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(sys.stdin.fileno(), select.EPOLLIN)
        self.clients: dict[int, socket.socket] = {}  # fd -> socket, handshake done
        self.handshaking: dict[int, tuple[socket.socket, bytes]] = {}
        self.handshake_errors = 0
        self._stdin = b""

    def run(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        listen_fd = self.listener.fileno()
        stdin_fd = sys.stdin.fileno()
        while time.monotonic() < deadline:
            for fd, _events in self.epoll.poll(1.0):
                if fd == listen_fd:
                    self._accept()
                elif fd == stdin_fd:
                    if not self._command():
                        return
                elif fd in self.clients:
                    self._client_readable(fd)
                else:
                    self._handshake_readable(fd)

    def _accept(self) -> None:
        for _ in range(1000):
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self.handshaking[sock.fileno()] = (sock, b"")
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _drop(self, fd: int, sock: socket.socket) -> None:
        self.epoll.unregister(fd)
        sock.close()

    def _handshake_readable(self, fd: int) -> None:
        sock, request = self.handshaking[fd]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            del self.handshaking[fd]
            self._drop(fd, sock)
            return
        request += data
        end = request.find(b"\r\n\r\n")
        if end < 0:
            self.handshaking[fd] = (sock, request)
            return
        del self.handshaking[fd]
        key = None
        for line in request[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if key is None:
            self.handshake_errors += 1
            self._drop(fd, sock)
            return
        sock.send(RESPONSE % accept_key(key).encode())
        self.clients[fd] = sock

    def _client_readable(self, fd: int) -> None:
        sock = self.clients[fd]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client closed: forget it (what clients send otherwise is ignored)
            del self.clients[fd]
            self._drop(fd, sock)

    def _command(self) -> bool:
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            return False
        self._stdin += chunk
        while b"\n" in self._stdin:
            line, self._stdin = self._stdin.split(b"\n", 1)
            words = line.decode().split()
            if not words:
                continue
            if words[0] == "quit":
                return False
            if words[0] == "send":
                reply = send_to_all(list(self.clients.values()), self.frame)
            elif words[0] == "burst":
                count = int(words[1])
                reply = send_to_all(list(self.clients.values()), self.frame * count)
                reply["frames"] = count
            elif words[0] == "count":
                reply = {"ok": True, "connections": len(self.clients),
                         "handshaking": len(self.handshaking),
                         "handshake_errors": self.handshake_errors}
            else:
                reply = {"ok": False, "error": f"unknown command {line!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--payload-size", type=int, default=16,
                        help="bytes of text in the frame (match the probe's)")
    parser.add_argument("--max-seconds", type=float, default=3600,
                        help="exit after this long whatever happens")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    floor = Floor(args.host, args.port, args.backlog, b"f" * args.payload_size)
    host, port = floor.listener.getsockname()[:2]
    print(f"floor listening on http://{host}:{port}", flush=True)
    floor.run(args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
