"""The floor: a broadcast chat server with nothing in it but the unavoidable syscalls.

What can a websocket broadcast server in Python cost at the least? This one accepts on
one epoll loop, answers every upgrade with a fixed ``101`` (the right
Sec-WebSocket-Accept, no other parsing or checks), holds the sockets in a dict, and
when a client sends text frames, encodes them once and runs a bare
``for sock in socks: sock.send(frame)``: one non-blocking send per client, the frames of
one read joined (coalesced) into one send. Nothing is queued for a client whose kernel
buffer is full (the send is short and counted, never retried): a real server needs
more, never less. Measured on loopback the per-delivery figure is mostly the kernel's
(the sender's ``send`` also runs the receiver's TCP processing), so a server's CPU per
handshake, per idle connection and per delivery read best as ratios to this one's,
measured in the same run (``greenchat bench --compare floor``, ``bench/idle_broadcast.py``).

    python -m chat.bench.floor --port 0      # prints "floor listening on http://HOST:PORT"

It imports nothing but ``chat.protocol`` (the codec, for the accept key and the sender's
frames). It runs until SIGTERM or SIGINT, or ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import errno
import resource
import select
import socket
import sys
import time

from chat.protocol import (CloseReceived, Opcode, ServerProtocol, TextMessage, accept_key,
                           encode_frame)

__all__ = ["Floor", "send_to_all", "main"]

RESPONSE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n")
KEY_HEADER = b"\r\nsec-websocket-key:"


def send_to_all(socks: list[socket.socket], frame: bytes) -> tuple[int, int]:
    """The floor's delivery: one plain non-blocking ``send`` of ``frame`` per socket.

    Returns (short sends, errors); neither is retried.
    """
    size = len(frame)
    short = errors = 0
    for sock in socks:
        try:
            if sock.send(frame) != size:
                short += 1
        except OSError:
            errors += 1
    return short, errors


class Floor:
    """The server: handshaking sockets, open ones, and a codec only for clients that talk."""

    def __init__(self, host: str, port: int, backlog: int) -> None:
        self.listener = socket.create_server((host, port), backlog=backlog)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.clients: dict[int, socket.socket] = {}  # fd -> socket, handshake done
        self.handshaking: dict[int, tuple[socket.socket, bytes]] = {}  # fd -> (sock, so far)
        # fd -> codec, created the first time a client sends anything: idle clients
        # (all but the probe's sender) cost no codec.
        self.codecs: dict[int, ServerProtocol] = {}
        self.handshake_errors = 0
        self.short_sends = 0
        self.send_errors = 0

    def run(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        listen_fd = self.listener.fileno()
        clients = self.clients
        while time.monotonic() < deadline:
            for fd, _events in self.epoll.poll(1.0):
                if fd == listen_fd:
                    self._accept()
                elif fd in clients:
                    self._client_readable(fd)
                elif fd in self.handshaking:
                    self._handshake_readable(fd)

    def _accept(self) -> None:
        for _ in range(1000):  # bounded: the rest wait for the next turn of the loop
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:  # EMFILE and friends: drop this one, keep serving
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    return
                continue
            sock.setblocking(False)
            self.handshaking[sock.fileno()] = (sock, b"")
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _drop(self, fd: int, sock: socket.socket) -> None:
        self.clients.pop(fd, None)
        self.codecs.pop(fd, None)
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
            if len(request) > 16384:
                self.handshake_errors += 1
                del self.handshaking[fd]
                self._drop(fd, sock)
            else:
                self.handshaking[fd] = (sock, request)
            return
        del self.handshaking[fd]
        head = request[:end + 2]
        start = head.lower().find(KEY_HEADER)
        if start < 0:
            self.handshake_errors += 1
            self._drop(fd, sock)
            return
        start += len(KEY_HEADER)
        key = head[start:head.index(b"\r\n", start)].strip()
        sock.send(RESPONSE % accept_key(key).encode())
        self.clients[fd] = sock
        if len(request) > end + 4:  # a first frame right behind the request
            self._received(fd, sock, request[end + 4:])

    def _client_readable(self, fd: int) -> None:
        sock = self.clients[fd]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd, sock)
            return
        self._received(fd, sock, data)

    def _received(self, fd: int, sock: socket.socket, data: bytes) -> None:
        codec = self.codecs.get(fd)
        if codec is None:
            codec = self.codecs[fd] = ServerProtocol()
        texts = []
        closed = False
        for event in codec.receive_data(data):
            if isinstance(event, TextMessage):
                texts.append(encode_frame(Opcode.TEXT, event.text.encode()))
            elif isinstance(event, CloseReceived):
                closed = True
        if texts:
            short, errors = send_to_all(list(self.clients.values()), b"".join(texts))
            self.short_sends += short
            self.send_errors += errors
        reply = codec.data_to_send()  # pongs, the close answer
        if reply:
            try:
                sock.send(reply)
            except OSError:
                closed = True
        if closed or codec.close_expected:
            self._drop(fd, sock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766, help="0: any free port, printed")
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog (the kernel caps it at net.core.somaxconn)")
    parser.add_argument("--max-seconds", type=float, default=24 * 3600,
                        help="exit after this long whatever happens")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    floor = Floor(args.host, args.port, args.backlog)
    host, port = floor.listener.getsockname()[:2]
    print(f"floor listening on http://{host}:{port}", flush=True)
    try:
        floor.run(args.max_seconds)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
