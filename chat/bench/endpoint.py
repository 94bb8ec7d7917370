"""The endpoint under test: a ws:// URL, checked with one handshake before any load.

Why check first: a typo in the port or path would otherwise show up as 18,000 identical
connection failures spread over load processes. One blocking handshake gives one clear
line instead ("Connection refused", "HTTP/1.1 404 NOT FOUND").
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..protocol import accept_key, encode_client_close, generate_key, handshake_request
from .errors import BenchError

__all__ = ["Endpoint", "parse_url", "check_endpoint"]


@dataclass(frozen=True)
class Endpoint:
    """The websocket endpoint under test: ``address`` is the IPv4 address clients connect to."""

    url: str
    host: str  # as written in the URL (the Host header)
    address: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stats_url(self) -> str:
        """Where a greenchat server at this address answers ``GET /stats``."""
        return f"http://{self.host}:{self.port}/stats"

    @property
    def loopback(self) -> bool:
        return self.address.startswith("127.")


def parse_url(text: str) -> Endpoint:
    """A ``ws://host[:port][/path]`` URL; ValueError with a one-line reason otherwise."""
    parts = urlsplit(text)
    if parts.scheme == "wss":
        raise ValueError("wss:// is not supported (no TLS in the load client): use ws://")
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"expected a ws://HOST[:PORT]/PATH URL, got {text!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    try:
        address = socket.getaddrinfo(parts.hostname, port, socket.AF_INET,
                                     socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve {parts.hostname!r}: {error.strerror}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(url=text, host=parts.hostname, address=address, port=port, path=path)


def check_endpoint(endpoint: Endpoint, timeout: float = 5.0) -> None:
    """One websocket handshake, then a clean close; BenchError saying what went wrong."""
    key = generate_key()
    try:
        sock = socket.create_connection((endpoint.address, endpoint.port), timeout=timeout)
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise BenchError(f"cannot connect to {endpoint.url}: {reason}") from None
    with sock:
        try:
            sock.sendall(handshake_request(endpoint.host_header, endpoint.path, key))
            response = b""
            while b"\r\n\r\n" not in response and len(response) < 16384:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                response += chunk
        except OSError as error:
            raise BenchError(f"{endpoint.url}: handshake failed: "
                             f"{error.strerror or type(error).__name__}") from None
        status = response.split(b"\r\n", 1)[0].decode("latin-1").strip()
        if not status:
            raise BenchError(f"{endpoint.url}: the server closed the connection without an "
                             "HTTP answer")
        if not status.startswith("HTTP/1.1 101"):
            raise BenchError(f"{endpoint.url} is not a websocket endpoint: {status}")
        if accept_key(key).encode() not in response:
            raise BenchError(f"{endpoint.url}: wrong or missing Sec-WebSocket-Accept in the "
                             "handshake answer")
        _close_politely(sock)


def _close_politely(sock: socket.socket) -> None:
    """Send a close frame and wait (bounded) for the server to close, so it counts us gone."""
    try:
        sock.sendall(encode_client_close())  # 1000 normal closure
        sock.settimeout(2.0)
        while sock.recv(4096):
            pass
    except OSError:
        pass
