"""One websocket client after the upgrade: a socket, its codec state, and nothing else while idle.

Why it looks like this (measurements in docs/design.md): a greenlet parked in
``ws.receive()`` costs ~8 KB of RSS per client, a gevent ``Queue`` and a writer greenlet
as much again, and pywsgi's request state keeps 8 KiB of read buffer alive. So an idle
``Connection`` holds only a non-blocking socket, a libev read watcher and its codec
(~0.4 KB of RSS in all, BENCHMARKS.md). When the socket becomes readable, the watcher's
callback (the connection itself) reads and parses in the gevent hub; control frames
(pings, pongs, closes) and reads that complete no message are dealt with right there,
and only a complete message starts a short-lived greenlet that runs the message handler
(which may block, as in the card's thread-per-client model) and ends.

Writes never wait: ``send_bytes`` tries one non-blocking ``send``; only what the kernel
refuses goes into this client's outbox (created only then), drained by a write watcher
with one ``sendmsg`` of everything queued. The outbox holds references to the frames the
hub encoded once for the whole room, plus an offset into the first: one message of any
size queued for N stalled clients costs its size once plus a few bytes per client, not N
copies. A client whose outbox passes ``CHAT_MAX_BACKLOG`` bytes (checked at every enqueue)
is a slow consumer: it gets close 1008 and is dropped, and nobody else waits for it.

A connection's lifecycle is its ``state``, and nothing else: OPEN (in its room, gets
broadcasts), CLOSING (our close frame has left, or is leaving: out of the room, waiting
for the peer's close or the close timeout), CLOSED (socket closed). The codec is asked
only one thing, whether the frames it hands over carry a close, and every frame the codec
produces leaves through one method (``_send_codec_output``), which is where OPEN ends.

No failure of one connection reaches the others: every method the hub calls
(``send_bytes``, ``send_frames``, ``close``, ``check_alive``) and every callback of the
loop returns normally whatever happens inside; an unexpected error aborts that
connection only and is counted (``internal_errors``) and logged without a storm, and an
exception in the application's message handler closes its client with 1011.

Two more limits cost one slot each: a token bucket (``CHAT_RATE_LIMIT``, a two-item list
made at the client's first message) and a counter of idle sweeps (``CHAT_PING_INTERVAL``:
the hub's one sweep timer pings clients silent for an interval and drops those still
silent after another; no timer per client).
"""

from __future__ import annotations

import _socket
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Sequence

import gevent

from .protocol import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    Ping,
    ProtocolViolation,
    ServerProtocol,
    State,
    TextMessage,
    encode_frame,
)

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Connection", "TlsConnection", "JsonConnection", "TlsJsonConnection", "PlainSocket",
           "READ_SIZE", "OPEN", "CLOSING", "CLOSED"]

log = logging.getLogger(__name__)

READ_SIZE = 65536
_READ = 1
_WRITE = 2

# A connection's lifecycle (``Connection.state``; see the module docstring).
OPEN, CLOSING, CLOSED = 0, 1, 2
_STATE_NAMES = ("OPEN", "CLOSING", "CLOSED")
_CODEC_OPEN = State.OPEN

# Buffers in one sendmsg() when draining an outbox (Linux's IOV_MAX is 1024).
MAX_IOV = 64
# Small frames queued one behind the other are merged into one private bytes object up
# to this size, so a stalled client that misses thousands of tiny messages holds a few
# merged chunks, not thousands of list entries; larger frames stay shared references.
MERGE_BELOW = 4096

# What the idle sweep sends: the same bytes for every client.
PING_FRAME = encode_frame(Opcode.PING, b"")

# The C socket type under the standard library's socket class (``_socket.socket``), which
# gevent never patches: gevent's wrapper would add ~360 bytes and two unused watchers per
# client, and a layer of Python to every send (measured: +0.8 us per send); the stdlib's
# Python subclass adds a weakref slot, io refcounts and a GC header: 88 bytes per client
# against 48, and one more object for the garbage collector to traverse. We only use it
# non-blocking, through the C methods both have (recv, send, sendmsg, close, detach).
PlainSocket: type = _socket.socket


class _Outbox:
    """What the kernel refused, waiting for the socket to be writable: shared frames.

    Created at the first refused byte and dropped when drained, so an idle connection
    pays one ``None`` slot for it. ``frames[0][offset:]`` is what goes out next.
    """

    __slots__ = ("frames", "offset", "size", "writer")

    def __init__(self, data: bytes, offset: int, writer) -> None:
        self.frames: list[bytes] = [data]
        self.offset = offset  # bytes of frames[0] already sent
        self.size = len(data) - offset  # bytes still to send
        self.writer = writer  # the write watcher, running while there is an outbox

    def append(self, data: bytes) -> None:
        frames = self.frames
        last = frames[-1]
        if len(frames) > 1 and len(last) + len(data) < MERGE_BELOW:
            frames[-1] = last + data  # two small ones: a private copy of a few KB at most
        else:
            frames.append(data)  # a reference to the frame the whole room shares
        self.size += len(data)

    def buffers(self) -> list:
        """The next buffers to hand to sendmsg(), the first one starting at the offset."""
        frames = self.frames
        first = memoryview(frames[0])[self.offset:]
        return [first, *frames[1:MAX_IOV]] if len(frames) > 1 else [first]

    def advance(self, sent: int) -> None:
        """Forget the ``sent`` bytes that went out."""
        self.size -= sent
        frames = self.frames
        sent += self.offset
        done = 0
        while done < len(frames) and sent >= len(frames[done]):
            sent -= len(frames[done])
            done += 1
        del frames[:done]
        self.offset = sent


class Connection:
    """A websocket client owned by a :class:`~chat.hub.Hub`; see the module docstring."""

    __slots__ = ("sock", "codec", "hub", "room", "user", "state", "_reader", "_outbox",
                 "_closer", "_silent", "_bucket")

    # False where queued bytes cannot be dropped once queued (TLS records).
    _backlog_droppable = True

    def __init__(self, sock: socket.socket, hub: Hub, room: str = "",
                 max_message_size: int = 1 << 20, reader=None, deflate: int | None = None,
                 user: str | None = None) -> None:
        if sock.gettimeout() != 0.0:  # (no syscall when the caller made it non-blocking)
            sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            # Nagle's algorithm would hold a small frame sent while an earlier one is
            # unacknowledged until the client's delayed ACK (~40 ms on Linux). gunicorn's
            # listener passes TCP_NODELAY on to accepted sockets, gevent's server does not.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hub.send_buffer:
            # The kernel would otherwise let the send buffer of a client that stopped
            # reading grow to tcp_wmem's maximum (4 MiB) before our own bound even starts.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, hub.send_buffer)
        self.sock = sock
        # ``deflate``: the window bits of a permessage-deflate agreement, or None. It is
        # the codec's slot, so a compressing client costs no byte more while idle.
        self.codec = ServerProtocol(max_message_size, deflate)
        self.hub = hub
        self.room = room
        # The identity the app's authorize hook returned (None: anonymous); such a client
        # is also a member of the user's room key (``Hub.publish(..., user=)``).
        self.user = user
        self.state = OPEN
        # The read watcher: the upgrade's own (chat.upgrade hands it over), or a new one.
        self._reader = reader if reader is not None else hub.loop.io(sock.fileno(), _READ)
        self._outbox: _Outbox | None = None
        self._closer = None  # a timer that aborts a close handshake the peer never finishes
        # Idle sweeps since we last heard from the peer: 0, 1 (silent), 2 (pinged).
        self._silent = 0
        # [tokens, last refill time] of the rate limit; made at the first message.
        self._bucket: list[float] | None = None

    def __repr__(self) -> str:
        return f"<Connection {_STATE_NAMES[self.state]} room={self.room!r} {self.codec!r}>"

    # -- lifecycle -----------------------------------------------------------------

    def start(self, first_data: bytes = b"") -> None:
        """Join the hub and begin watching the socket; ``first_data`` is what arrived with
        the handshake."""
        self._enter_hub()
        if self.state == CLOSED:  # dropped while joining (its room's history did not fit)
            return
        # The connection itself is the watcher's callback (``__call__``): a bound method
        # held by the watcher would be one more 64-byte object per idle client.
        self._reader.start(self)  # (replaces the callback of a handed-over watcher)
        if first_data:
            try:
                self._receive(first_data)
            except Exception as error:
                self._fail(error)

    def _enter_hub(self) -> None:
        self.hub.join(self)

    def _leave_hub(self) -> None:
        self.hub.leave(self)

    def _on_message(self, event: TextMessage | BinaryMessage) -> None:
        self.hub.on_message(self, event)

    @property
    def open(self) -> bool:
        """True until a close starts; an open connection receives broadcasts."""
        return self.state == OPEN

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake: send a close frame, stop receiving broadcasts.

        The socket is closed when the peer answers, or after the hub's close timeout.
        Does nothing unless OPEN. When the peer's close has already been parsed (in the
        same read as what made us close), our answer to it is the close frame sent.
        """
        if self.state != OPEN:
            return
        try:
            if self.codec.state is _CODEC_OPEN:
                self.codec.send_close(code, reason)
            self._send_codec_output()
        except Exception as error:
            self._fail(error)

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake (peer gone or too slow)."""
        if self.state == CLOSED:
            return
        if self.state == OPEN:
            self._leave_hub()
        self.state = CLOSED
        self._reader.stop()
        if self._outbox is not None:
            self._outbox.writer.stop()
            self._outbox = None
        if self._closer is not None:
            self._closer.stop()
            self._closer = None
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - close() of a valid fd does not fail on Linux
            pass

    def _send_codec_output(self) -> None:
        """Send what the codec owes the peer (pongs, a close frame): the only way its
        frames leave, so the only place a connection stops being OPEN. Nothing we
        broadcast may follow our close frame, so the connection leaves its room first."""
        if self.state == CLOSED:
            return
        codec = self.codec
        data = codec.data_to_send()
        if self.state == OPEN and codec.state is not _CODEC_OPEN:
            self.state = CLOSING
            self._leave_hub()
            self._closer = self.hub.loop.timer(self.hub.close_timeout)
            self._closer.start(self.abort)
        if data:
            self._enqueue(data)
        if codec.close_expected and self._outbox is None and self.state != CLOSED:
            self.abort()  # the handshake is complete (or the peer failed it) and all is sent

    def _fail(self, error: Exception) -> None:
        """An error nobody planned for: drop this connection only, count it, log rarely."""
        self.hub.fault("connection", error)
        self.abort()

    # -- reading -------------------------------------------------------------------

    def _on_readable(self) -> None:
        """The read watcher's callback, in the gevent hub: must not block.

        One ``recv`` and the codec run right here; only a complete message starts a
        greenlet (the message handler may block). A pong, a ping, a close, or a read
        that completes no message is handled without one: an idle client's pong every
        two ping intervals then costs a syscall and a parse, not a greenlet's start and
        switch (measured in docs/design.md). The watcher is level-triggered, so what
        is left in the kernel buffer comes back on the next loop iteration.
        """
        try:
            data = self._recv()
            if data:
                self._receive(data)
        except Exception as error:
            self._fail(error)

    __call__ = _on_readable

    def _recv(self) -> bytes:
        """One non-blocking ``recv``: the bytes, or b"" when there are none (and then, at
        the peer's EOF or a socket error, the connection is aborted)."""
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:  # the peer closed TCP without a closing handshake, or it failed
            self.abort()
        return data

    def _receive(self, data: bytes) -> None:
        """Parse ``data``; act on control frames here, hand messages to a greenlet."""
        self._silent = 0
        events = self.codec.receive_data(data)
        for event in events:
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                # Stop reading until the handler is done: messages stay in order, and a
                # client cannot make its handler run twice at once.
                self._reader.stop()
                gevent.spawn_raw(self._handle_input, events)
                return
        self._handle_events(events)
        self._send_codec_output()
        if self.codec.close_expected and self.state != CLOSED:
            self._reader.stop()  # our answer is still leaving; nothing more to read

    def _handle_input(self, events: list) -> None:
        """In a greenlet of its own: run the message handler (which may block) on these
        events, then watch the socket again while the connection lives."""
        try:
            self._handle_events(events)
            self._send_codec_output()
            if self.state != CLOSED and not self.codec.close_expected:
                self._reader.start(self)
        except Exception as error:
            self._fail(error)

    def _handle_events(self, events: list) -> None:
        hub = self.hub
        for event in events:
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                if self.state == OPEN:
                    hub.messages_received += 1
                    if hub.rate_limit and not self._within_rate():
                        continue
                    try:
                        self._on_message(event)
                    except Exception as error:  # the application's bug: this client only
                        hub.fault("message handler", error)
                        self.close(CloseCode.INTERNAL_ERROR, "internal error")
            elif kind is CloseReceived or kind is ProtocolViolation:
                if kind is ProtocolViolation:
                    hub.protocol_errors += 1
                    log.debug("closing client: %s", event.error)
                if self.state == OPEN:
                    hub.flush()  # messages it sent before this still reach it
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
        if self.state != OPEN:
            return
        try:
            if self._silent == 0:
                self._silent = 1
            elif self._silent == 1:
                self._silent = 2
                self.hub.pings_sent += 1
                self._enqueue(PING_FRAME)
            else:
                self.hub.idle_dropped += 1
                self.abort()
        except Exception as error:
            self._fail(error)

    # -- writing -------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        """Send already-encoded frames without ever blocking; dropped unless OPEN.

        ``data`` is kept by reference if the kernel does not take it all: pass the bytes
        object every member of a room gets, not a copy.
        """
        if self.state != OPEN:
            return
        try:
            self._enqueue(data)
        except Exception as error:
            self._fail(error)

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send several encoded frames in order (a room's history), each by reference."""
        if self.state != OPEN:
            return
        try:
            for frame in frames:
                self._enqueue(frame)
                if self.state != OPEN:
                    return
        except Exception as error:
            self._fail(error)

    def _enqueue(self, data: bytes) -> None:
        """Send now what the kernel takes; queue the rest; close a slow consumer.

        The bound is checked at every enqueue, the first included, and only while OPEN
        (our own close frame is never what makes a client slow).
        """
        outbox = self._outbox
        if outbox is None:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort()
                return
            if sent == len(data):
                return
            writer = self.hub.loop.io(self.sock.fileno(), _WRITE)
            outbox = self._outbox = _Outbox(data, sent, writer)
            writer.start(self._on_writable)
        else:
            outbox.append(data)
        if self.state == OPEN and outbox.size > self.hub.max_backlog:
            self._close_slow_consumer()

    def _on_writable(self) -> None:
        # Runs in the gevent hub: one sendmsg of everything queued (up to MAX_IOV buffers).
        try:
            self._drain()
        except Exception as error:
            self._fail(error)

    def _drain(self) -> None:
        outbox = self._outbox
        if outbox is None:  # pragma: no cover - the watcher is stopped with the outbox
            return
        buffers = outbox.buffers()
        try:
            sent = self.sock.send(buffers[0]) if len(buffers) == 1 else self.sock.sendmsg(buffers)
        except BlockingIOError:
            return
        except OSError:
            self.abort()
            return
        outbox.advance(sent)
        if outbox.size:
            return
        outbox.writer.stop()
        self._outbox = None
        if self.codec.close_expected and self.state != CLOSED:
            self.abort()

    def _close_slow_consumer(self) -> None:
        """Drop what the client has not started to receive and tell it why (1008)."""
        hub = self.hub
        hub.slow_consumers_closed += 1
        outbox = self._outbox
        assert outbox is not None
        # A frame partly in the kernel must be finished so the stream stays well-formed;
        # everything behind it is dropped. Over TLS every queued byte is already part of
        # the record sequence, so nothing can be dropped: the close frame queues behind.
        if not self._backlog_droppable:
            pass
        elif outbox.offset:
            outbox.frames = outbox.frames[:1]
            outbox.size = len(outbox.frames[0]) - outbox.offset
        else:
            outbox.writer.stop()
            self._outbox = None
        if self.codec.state is _CODEC_OPEN:
            self.codec.send_close(CloseCode.POLICY_VIOLATION, "slow consumer")
        self._send_codec_output()
        log.debug("closed a slow consumer (outbox above %d bytes)", hub.max_backlog)


class TlsConnection(Connection):
    """A websocket over TLS (``wss://``), hibernating like any other.

    The TLS state is an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` (made by
    ``chat.upgrade`` during the TLS handshake), and the socket underneath stays the
    plain non-blocking TCP socket under the same read watcher. So nothing OpenSSL does
    can block, and its rules for non-blocking sockets do not apply: writing to a memory
    BIO never wants a retry with the same bytes, and every read drains what the
    ``SSLObject`` holds decrypted (``pending()`` bytes the socket's readiness would
    not show) until it wants more input. What it encrypts goes out through the same
    send-or-queue path as plain frames, as private bytes per client (a broadcast
    cannot be shared once encrypted), and a slow consumer's backlog is not dropped
    but sent before its close frame, since a dropped record would break the stream.
    """

    __slots__ = ("tls", "_tls_in", "_tls_out")
    _backlog_droppable = False

    def __init__(self, sock: socket.socket, hub: Hub, room: str = "",
                 max_message_size: int = 1 << 20, reader=None, deflate: int | None = None,
                 user: str | None = None, *,
                 tls: ssl.SSLObject, tls_in: ssl.MemoryBIO, tls_out: ssl.MemoryBIO) -> None:
        super().__init__(sock, hub, room, max_message_size, reader, deflate, user)
        self.tls = tls  # the TLS session (handshake done)
        self._tls_in = tls_in  # ciphertext read from the socket, not yet decrypted
        self._tls_out = tls_out  # ciphertext OpenSSL produced, not yet sent

    def _on_readable(self) -> None:
        """As :meth:`Connection._on_readable`, with the bytes decrypted first."""
        try:
            raw = self._recv()
            if not raw:
                return
            self._tls_in.write(raw)
            data = self._decrypt()
            if self._tls_out.pending:  # OpenSSL's own records (alerts, key updates)
                Connection._enqueue(self, self._tls_out.read())
            if data is None:  # a TLS error, or the peer's close_notify
                self.abort()
            elif data:
                self._receive(data)
        except Exception as error:
            self._fail(error)

    __call__ = _on_readable

    def _decrypt(self) -> bytes | None:
        """Everything the received records decrypt to (b"" for none yet); None when the
        TLS session is over (an alert, a bad record, the peer's close_notify)."""
        chunks = []
        while True:
            try:
                chunk = self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                return None
            if not chunk:
                return None
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _enqueue(self, data: bytes) -> None:
        """Encrypt, then send or queue the records (see :meth:`Connection._enqueue`)."""
        self.tls.write(data)  # into a memory BIO: never partial, never "want write"
        Connection._enqueue(self, self._tls_out.read())


class _Multiroom:
    """What a client of the JSON endpoint does differently (``chat.multiroom``): it enters
    the hub in no room, its messages are requests (join, leave, send) the hub answers,
    and on leaving it leaves every room it is in. No slots of its own (a layout-free
    mixin), so the plain and the TLS variant below can each add the ``rooms`` slot."""

    __slots__ = ()

    def _enter_hub(self) -> None:
        self.hub.attach(self)

    def _leave_hub(self) -> None:
        self.hub.detach(self)

    def _on_message(self, event: TextMessage | BinaryMessage) -> None:
        self.hub.handle_request(self, event)


class JsonConnection(_Multiroom, Connection):
    """A client of the JSON endpoint: any number of rooms on one socket.

    ``rooms`` is a tuple of the room keys it is in, the hub's own key objects: 8 bytes
    a room (a set would cost 216 bytes at one room and ~40 a room beyond), and a client
    is in at most ``CHAT_MAX_ROOMS_PER_CONNECTION`` (100) rooms, so a linear search and
    a copy per join or leave are cheaper than the memory a set would keep."""

    __slots__ = ("rooms",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rooms: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<JsonConnection {_STATE_NAMES[self.state]} rooms={len(self.rooms)} {self.codec!r}>"


class TlsJsonConnection(_Multiroom, TlsConnection):
    """:class:`JsonConnection` over TLS."""

    __slots__ = ("rooms",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rooms: tuple[str, ...] = ()
