"""One websocket client after the upgrade: a socket, its codec state, and nothing else while idle.

Why it looks like this (measurements in docs/design.md): a greenlet parked in
``ws.receive()`` costs ~8 KB of RSS per client, a gevent ``Queue`` and a writer greenlet
as much again, and pywsgi's request state keeps 8 KiB of read buffer alive. So an idle
``Connection`` holds only a non-blocking socket, a libev read watcher and its codec.
When the socket becomes readable the watcher starts a short-lived greenlet that reads
everything available, handles it (the message handler may block, as in the card's
thread-per-client model) and ends.

Writes never wait: ``send_bytes`` tries one non-blocking ``send``; only what the kernel
refuses goes into this client's backlog (created only then), drained by a write watcher
that joins everything queued into one ``send``. A client whose backlog passes the bound
is a slow consumer: it gets close 1008 and is dropped, and nobody else waits for it.

Two more limits cost one slot each: a token bucket (``CHAT_RATE_LIMIT``, a two-item list
made at the client's first message) and a counter of idle sweeps (``CHAT_PING_INTERVAL``:
the hub's one sweep timer pings clients silent for an interval and drops those still
silent after another; no timer per client).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import gevent
from gevent.monkey import get_original

from .protocol import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    Ping,
    ProtocolViolation,
    ServerProtocol,
    TextMessage,
    encode_frame,
)

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Connection", "PlainSocket", "READ_SIZE"]

log = logging.getLogger(__name__)

READ_SIZE = 65536
# Reads handled in one wake-up before giving other clients a turn (the watcher is
# level-triggered, so anything left is picked up on the next loop iteration).
MAX_READS_PER_WAKEUP = 16

_READ = 1
_WRITE = 2

# What the idle sweep sends: the same bytes for every client.
PING_FRAME = encode_frame(Opcode.PING, b"")

# The standard library's socket class even when gevent has monkey-patched ``socket``:
# gevent's wrapper would add ~360 bytes and two unused watchers per client, and a layer
# of Python to every send (measured: +0.8 us per send). We only ever use it non-blocking.
PlainSocket: type[socket.socket] = get_original("socket", "socket")


class Connection:
    """A websocket client owned by a :class:`~chat.hub.Hub`; see the module docstring."""

    __slots__ = ("sock", "codec", "hub", "room", "_reader", "_writer", "_backlog",
                 "_backlog_size", "_closer", "_closing", "_silent", "_bucket")

    def __init__(self, sock: socket.socket, hub: Hub, room: str = "",
                 max_message_size: int = 1 << 20) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.codec = ServerProtocol(max_message_size)
        self.hub = hub
        self.room = room
        self._reader = hub.loop.io(sock.fileno(), _READ)
        self._writer = None
        self._backlog: list[bytes] | None = None
        self._backlog_size = 0
        self._closer = None  # a timer that aborts a close handshake the peer never finishes
        self._closing = False
        # Idle sweeps since we last heard from the peer: 0, 1 (silent), 2 (pinged).
        self._silent = 0
        # [tokens, last refill time] of the rate limit; made at the first message.
        self._bucket: list[float] | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self, first_data: bytes = b"") -> None:
        """Join the hub and begin watching the socket; ``first_data`` is what arrived with the handshake."""
        self.hub.join(self)
        if first_data:
            gevent.spawn_raw(self._handle_input, first_data)
        else:
            self._reader.start(self._on_readable)

    @property
    def open(self) -> bool:
        """True until a close starts; an open connection receives broadcasts."""
        return not self._closing

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake: send a close frame, stop receiving broadcasts.

        The socket is closed when the peer answers, or after the hub's close timeout.
        """
        if self._closing:
            return
        self.codec.send_close(code, reason)
        self._begin_closing()
        self._send_now(self.codec.data_to_send())
        self._finish_if_done()

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake (peer gone or too slow)."""
        if not self._closing:
            self._closing = True
            self.hub.leave(self)
        self._reader.stop()
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        if self._closer is not None:
            self._closer.stop()
            self._closer = None
        self._backlog = None
        self._backlog_size = 0
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - close() of a valid fd does not fail on Linux
            pass

    def _begin_closing(self) -> None:
        self._closing = True
        self.hub.leave(self)
        self._closer = self.hub.loop.timer(self.hub.close_timeout)
        self._closer.start(self.abort)

    def _finish_if_done(self) -> None:
        """Close the TCP socket once the codec is done and everything we owe is sent."""
        if self.codec.close_expected and self._backlog is None:
            self.abort()

    # -- reading -------------------------------------------------------------------

    def _on_readable(self) -> None:
        # Runs in the gevent hub: must not block. Hand the work to a fresh greenlet.
        self._reader.stop()
        gevent.spawn_raw(self._handle_input, b"")

    def _handle_input(self, data: bytes) -> None:
        """Read what is available, act on it, and end (rearming the watcher if still open)."""
        sock = self.sock
        self._silent = 0
        for _ in range(MAX_READS_PER_WAKEUP):
            if not data:
                try:
                    data = sock.recv(READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    self.abort()
                    return
                if not data:  # the peer closed TCP without a closing handshake
                    self.abort()
                    return
            self._handle_events(self.codec.receive_data(data))
            reply = self.codec.data_to_send()
            if reply:
                self._send_now(reply)
            if self.codec.close_expected:
                self._finish_if_done()
                return
            if self.sock.fileno() < 0:  # aborted while handling (slow consumer, close timeout)
                return
            more = len(data) == READ_SIZE
            data = b""
            if not more:
                break
        self._reader.start(self._on_readable)

    def _handle_events(self, events: list) -> None:
        hub = self.hub
        for event in events:
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                if not self._closing:
                    hub.messages_received += 1
                    if hub.rate_limit and not self._within_rate():
                        continue
                    hub.on_message(self, event)
            elif kind is CloseReceived or kind is ProtocolViolation:
                if kind is ProtocolViolation:
                    hub.protocol_errors += 1
                    log.debug("closing client: %s", event.error)
                if not self._closing:
                    hub.flush()  # messages it sent before this still reach it
                    self._begin_closing()
            elif kind is Ping:
                pass  # the codec already queued the pong

    def _within_rate(self) -> bool:
        """Token bucket: False for a message over the client's rate (dropped, or the
        client closed with 1008, as configured)."""
        hub = self.hub
        now = hub.loop.now()
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = [float(hub.rate_burst), now]
        tokens = min(float(hub.rate_burst), bucket[0] + (now - bucket[1]) * hub.rate_limit)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        hub.limit_rate(f"{hub.rate_limit:g} messages/s")
        if not hub.rate_limit_drops:
            self.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        return False

    def check_alive(self) -> None:
        """The hub's idle sweep: ping a client silent for a whole interval, drop one that
        stayed silent for an interval after its ping (a dead peer, gone without a FIN)."""
        if self._closing:
            return
        if self._silent == 0:
            self._silent = 1
        elif self._silent == 1:
            self._silent = 2
            self.hub.pings_sent += 1
            self._send_now(PING_FRAME)
        else:
            self.hub.idle_dropped += 1
            self.abort()

    # -- writing -------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        """Send already-encoded frames without ever blocking; dropped once closing."""
        if not self._closing:
            self._send_now(data)

    def _send_now(self, data: bytes) -> None:
        if not data:
            return
        if self._backlog is not None:
            self._backlog.append(data)
            self._backlog_size += len(data)
            if self._backlog_size > self.hub.max_backlog and not self._closing:
                self._close_slow_consumer()
            return
        self._write(data)

    def _write(self, data: bytes) -> bool:
        """One non-blocking send; what the kernel refuses becomes the backlog.

        Returns True when everything went out. The write watcher is created the first
        time something is left over and kept until the backlog is drained.
        """
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return False
        if sent == len(data):
            return True
        self._backlog = [data[sent:]]
        self._backlog_size = len(data) - sent
        if self._writer is None:
            self._writer = self.hub.loop.io(self.sock.fileno(), _WRITE)
            self._writer.start(self._on_writable)
        return False

    def _on_writable(self) -> None:
        # Runs in the gevent hub; coalesces every queued frame into one send.
        backlog = self._backlog
        if backlog is None:  # pragma: no cover - the watcher is stopped with the backlog
            return
        if not self._write(backlog[0] if len(backlog) == 1 else b"".join(backlog)):
            return  # still backlogged (or aborted)
        self._writer.stop()
        self._writer = None
        self._backlog = None
        self._backlog_size = 0
        self._finish_if_done()

    def _close_slow_consumer(self) -> None:
        """Drop what the client has not started to receive and tell it why (1008)."""
        self.hub.slow_consumers_closed += 1
        assert self._backlog is not None
        # The first entry is the frame(s) already partly in the kernel: keep them so the
        # stream stays well-formed; everything behind them is dropped.
        self._backlog = self._backlog[:1]
        self._backlog_size = len(self._backlog[0])
        self.codec.send_close(CloseCode.POLICY_VIOLATION, "slow consumer")
        self._begin_closing()
        closing_frame = self.codec.data_to_send()
        self._backlog.append(closing_frame)
        self._backlog_size += len(closing_frame)
        log.debug("closed a slow consumer (backlog above %d bytes)", self.hub.max_backlog)

