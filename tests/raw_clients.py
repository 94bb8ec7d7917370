"""Many cheap websocket clients for tests: plain blocking sockets, no threads, and the
client side of greenchat's own codec (``chat.protocol``) for the frames and the handshake."""

from __future__ import annotations

import socket
import zlib

from chat.protocol import (BinaryMessage, ClientProtocol, CloseReceived, Opcode, Ping,
                           ProtocolViolation, TextMessage, accept_key, encode_client_frame,
                           generate_key, handshake_request)

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

# The codec's upgrade request with {path}, {port} and {key} still to fill in, for tests
# that send it by hand or break it one header at a time.
HANDSHAKE = handshake_request("127.0.0.1:{port}", "{path}", "{key}").decode()


def masked_frame(payload: bytes, opcode: int = Opcode.TEXT) -> bytes:
    """A final client frame (masked with a fresh key, as RFC 6455 requires of clients)."""
    return encode_client_frame(opcode, payload)


def compressed_frame(text: str) -> bytes:
    """A final masked text frame compressed as RFC 7692 7.2.1 tells a sender (a fresh
    compressor, a sync flush, its 00 00 FF FF removed), RSV1 set: for a connection whose
    101 agreed to permessage-deflate."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
    frame = bytearray(encode_client_frame(Opcode.TEXT, data[:-4]))
    frame[0] |= 0x40  # RSV1: compressed
    return bytes(frame)


def connect(port: int, path: str = "/", source: str = "127.0.0.1",
            timeout: float = 10.0, source_port: int = 0) -> socket.socket:
    """Open one websocket: returns the socket once the 101 response has been read and its
    Sec-WebSocket-Accept checked. ``source_port``: connect from that port (a client
    that comes back with the same address and port every time), else from any."""
    sock = socket.socket()
    sock.settimeout(timeout)
    if source_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    else:
        # Pick the source port at connect(), unique per destination, not at bind():
        # ports still in TIME_WAIT from earlier tests then cannot make bind() fail.
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    try:
        sock.bind((source, source_port))
        sock.connect(("127.0.0.1", port))
        key = generate_key()
        sock.sendall(handshake_request(f"127.0.0.1:{port}", path, key))
        head = read_response_head(sock)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"handshake refused: {status!r}")
        if accept_key(key).encode() not in head:
            raise ConnectionError(f"wrong or missing Sec-WebSocket-Accept: {head!r}")
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


def read_raw_frame(sock: socket.socket) -> bytes:
    """One whole server frame, header included, exactly as it came (blocking, bounded by
    the socket's timeout).

    Reads exactly the frame's bytes, as its header announces them, and not one more:
    callers read the same socket in other ways too.
    """
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed mid-frame")
            data += chunk
        return data

    frame = exactly(2)
    length = frame[1] & 0x7F
    if length > 125:
        frame += exactly(2 if length == 126 else 8)
    return frame + exactly(int.from_bytes(frame[2:], "big") if length > 125 else length)


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """Read one server frame as (opcode, payload), decoded by the client codec, so a frame
    no server may send fails the test (a compressed one too: this client agreed to no
    extension). A close frame's payload is its code and reason as sent; greenchat never
    fragments, so a fragment is an error here.
    """
    frame = read_raw_frame(sock)
    events = ClientProtocol(max_message_size=len(frame)).receive_data(frame)
    assert len(events) == 1, f"not one whole frame: {frame[:40]!r} gave {events}"
    (event,) = events
    if isinstance(event, ProtocolViolation):
        raise AssertionError(f"the server broke RFC 6455: {event.error}")
    if isinstance(event, TextMessage):
        return Opcode.TEXT, event.text.encode()
    if isinstance(event, BinaryMessage):
        return Opcode.BINARY, event.data
    if isinstance(event, CloseReceived):
        code = b"" if event.code is None else event.code.to_bytes(2, "big")
        return Opcode.CLOSE, code + event.reason.encode()
    return (Opcode.PING if isinstance(event, Ping) else Opcode.PONG), event.payload
