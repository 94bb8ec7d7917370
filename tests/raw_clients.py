"""Many cheap websocket clients for tests: plain blocking sockets, no library, no threads."""

from __future__ import annotations

import base64
import os
import socket

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (always masked, as RFC 6455 requires), payload under 64 KiB."""
    mask = os.urandom(4)
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")
    if len(payload) < 126:
        header = bytes([0x80 | opcode, 0x80 | len(payload)])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + mask + body


def connect(port: int, path: str = "/", source: str = "127.0.0.1",
            timeout: float = 10.0) -> socket.socket:
    """Open one websocket: returns the socket once the 101 response has been read."""
    sock = socket.socket()
    sock.settimeout(timeout)
    # Pick the source port at connect(), unique per destination, not at bind(): ports
    # still in TIME_WAIT from earlier tests then cannot make bind() fail.
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(HANDSHAKE.format(path=path, port=port, key=key).encode())
        status = read_response_head(sock).split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"handshake refused: {status!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def read_response_head(sock: socket.socket) -> bytes:
    """The HTTP response head, and not one byte more: frames may follow it at once."""
    head = b""
    while True:
        peeked = sock.recv(4096, socket.MSG_PEEK)
        if not peeked:
            raise ConnectionError(f"server closed during handshake: {head!r}")
        end = (head + peeked).find(b"\r\n\r\n")
        if end >= 0:
            return head + sock.recv(end + 4 - len(head))
        head += sock.recv(len(peeked))


def connect_many(port: int, count: int, per_source: int = 5000) -> list[socket.socket]:
    """``count`` websockets, spread over source addresses 127.0.0.2+."""
    sockets = []
    try:
        for i in range(count):
            sockets.append(connect(port, source=f"127.0.0.{2 + i // per_source}"))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """Read one unmasked server frame (blocking, bounded by the socket's timeout)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed mid-frame")
            data += chunk
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    return first & 0x0F, exactly(length)
