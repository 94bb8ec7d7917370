"""An echo server made of chat.protocol and plain sockets, for wstest's compression cases.

Until the handshake and the hub negotiate permessage-deflate, this is how Autobahn's
cases 12 and 13 reach the codec: the opening handshake answered with
``negotiate_deflate``, every message echoed through ``compress_frame`` when deflate was
agreed, everything else (pings, closes, violations) left to ``ServerProtocol``. One
thread per connection (wstest opens one at a time). It also answers ``GET /stats``, so
the tests' fixtures see it as ready.

    python tests/autobahn/codec_echo.py --port 0     # prints "... listening on http://HOST:PORT"
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from chat.protocol import (  # noqa: E402
    BinaryMessage,
    Opcode,
    ServerProtocol,
    TextMessage,
    accept_key,
    compress_frame,
    encode_frame,
    encode_text,
    negotiate_deflate,
)

MAX_MESSAGE_SIZE = 16 << 20  # case 9 sends 16 MiB messages
MAX_REQUEST = 65536
TIMEOUT = 60.0  # seconds a connection may stay silent (wstest's longest case waits less)


def read_request(sock: socket.socket) -> tuple[str, dict[str, str], bytes] | None:
    """The request line, the headers (names lower-cased, repeats joined by commas) and
    the bytes that came after them; None if the peer went away first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > MAX_REQUEST:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    request_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    return request_line, headers, rest


def serve_connection(sock: socket.socket) -> None:
    with sock:
        sock.settimeout(TIMEOUT)
        try:
            request = read_request(sock)
            if request is None:
                return
            request_line, headers, data = request
            if request_line.startswith("GET /stats "):
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
                return
            key = headers.get("sec-websocket-key")
            if key is None:
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            agreement = negotiate_deflate(headers.get("sec-websocket-extensions"))
            extensions = f"Sec-WebSocket-Extensions: {agreement.response}\r\n" if agreement else ""
            sock.sendall((f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_key(key)}\r\n"
                          f"{extensions}\r\n").encode())
            codec = ServerProtocol(MAX_MESSAGE_SIZE,
                                   deflate=agreement.window_bits if agreement else None)
            echo(sock, codec, data)
        except OSError:  # the peer reset or went silent: nothing to tell it
            return


def echo(sock: socket.socket, codec: ServerProtocol, data: bytes) -> None:
    """Send every message back as it came (compressed when deflate was agreed)."""
    while True:
        if data:
            out = []
            for event in codec.receive_data(data):
                if type(event) is TextMessage:
                    frame = encode_text(event.text)
                elif type(event) is BinaryMessage:
                    frame = encode_frame(Opcode.BINARY, event.data)
                else:
                    continue
                out.append(compress_frame(frame, codec.deflate) if codec.deflate else frame)
            out.append(codec.data_to_send())
            sock.sendall(b"".join(out))
            if codec.close_expected:
                return
        data = sock.recv(65536)
        if not data:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    listener = socket.create_server((args.host, args.port), backlog=64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host, port = listener.getsockname()[:2]
    print(f"codec echo listening on http://{host}:{port}", flush=True)
    with listener:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=serve_connection, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
