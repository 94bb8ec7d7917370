"""RFC 6455 as a sans-I/O codec, both sides: bytes in, events out; frames out as bytes.

Why it has no I/O: the connection layer (``chat.connection``) owns the socket, the
watchers and the greenlets; everything a peer can get wrong lives here, where it is
tested with byte strings and nothing else (``tests/test_protocol.py``).

Why it looks the way it does:

- One :class:`ServerProtocol` exists per connection, up to a million of them, so it has
  ``__slots__`` and holds nothing while idle: the input buffer is the shared ``b""``, the
  message-in-progress state is ``None``, the outgoing bytes are ``b""``.
- The common case, one small complete masked text frame per ``recv()``, is the server's
  hot path: it is parsed straight out of the received bytes with no buffering and one
  slice for the payload.
- A data frame that is not all there yet is not buffered: its payload is taken as it
  arrives (unmasked, inflated, checked for UTF-8), so invalid UTF-8 fails in the read
  that brings it, even in the middle of a frame, and a large frame in many small reads
  costs linear work. The input buffer only ever holds an incomplete header or control
  frame (at most 139 bytes).
- Peer input never raises: everything the peer gets wrong becomes a
  :class:`ProtocolViolation` event, and the close frame telling it why is already queued
  in :meth:`ServerProtocol.data_to_send`. Only local misuse raises (``RuntimeError`` for
  closing twice, ``ValueError`` for a close code or frame that may not be sent).
- Server frames are never masked, so one encoded frame can be sent to every client:
  :func:`encode_frame` / :func:`encode_text` are module functions, not methods.
- permessage-deflate (RFC 7692) is always agreed without context takeover either way
  (:func:`negotiate_deflate`), so compressing a message depends on the message alone:
  :func:`compress_frame` turns an encoded frame into its compressed twin once for every
  client that agreed, and a connection keeps no zlib object between messages (one
  inflater lives while a compressed message is coming in). The agreement is the codec's
  ``deflate`` slot: RSV1 is a protocol error without it.
- The client side (the load generator ``chat.bench``, test clients, benchmark scripts)
  uses the same parser: :class:`ClientProtocol` differs from :class:`ServerProtocol` only
  in which frames must be masked (theirs or ours), as wsproto's ``FrameDecoder(client)``
  does. Client frames are encoded by :func:`encode_client_frame` and
  :func:`encode_client_close`; the opening handshake's two pieces a client needs are
  :func:`handshake_request` and :func:`accept_key`.
"""

from __future__ import annotations

import base64
import codecs
import enum
import hashlib
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Final, TypeAlias

from .errors import ChatError

__all__ = [
    "Opcode",
    "CloseCode",
    "ChatError",
    "ProtocolError",
    "TextMessage",
    "BinaryMessage",
    "Ping",
    "Pong",
    "CloseReceived",
    "ProtocolViolation",
    "Event",
    "State",
    "ServerProtocol",
    "ClientProtocol",
    "encode_frame",
    "encode_text",
    "frame_message",
    "encode_close",
    "encode_client_frame",
    "encode_client_close",
    "generate_key",
    "handshake_request",
    "accept_key",
    "PerMessageDeflate",
    "negotiate_deflate",
    "compress_frame",
]


class Opcode(enum.IntEnum):
    """Frame opcodes (RFC 6455 section 5.2); 3-7 and 0xB-0xF are reserved."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """Close status codes from RFC 6455 section 7.4.1 and the IANA registry."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # never on the wire: "the close frame had no code"
    ABNORMAL_CLOSURE = 1006  # never on the wire: "TCP closed without a close frame"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class ProtocolError(ChatError):
    """The peer broke RFC 6455: ``close_code`` is what we tell it, ``reason`` says why.

    A value, not a crash: the codec wraps it in a :class:`ProtocolViolation` event.
    """

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (close code {self.close_code})"


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A complete text message (fragments already joined, UTF-8 already checked)."""

    text: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    """A complete binary message (fragments already joined)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """The peer pinged; while the connection is open the pong is already queued."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """The peer answered a ping (or sent an unsolicited pong, which RFC 6455 allows)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer's close frame; ``code`` is None when it had no payload (status 1005).

    Our answering close frame, if one is owed, is already queued; the codec is CLOSED.
    """

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; emitted once, with our close frame already queued."""

    error: ProtocolError


Event: TypeAlias = TextMessage | BinaryMessage | Ping | Pong | CloseReceived | ProtocolViolation


class State(enum.IntEnum):
    """OPEN until a close frame goes either way; CLOSING after we sent ours; CLOSED when done."""

    OPEN = 1
    CLOSING = 2
    CLOSED = 3


# -- masking --------------------------------------------------------------------------

# Pure-Python masking (XOR with the repeating 4-byte key, RFC 6455 5.3: masking and
# unmasking are the same operation), measured with timeit on this machine kind (best of
# repeats, CPython 3.11): one big-int XOR, int.from_bytes(payload) ^ int.from_bytes(mask * k),
# costs ~1.1 us for 20 bytes, ~15 us for 4 KiB, ~410 us for 64 KiB, ~7 ms for 1 MiB;
# the little-endian form with the key built as "whole repeats + tail" beat slicing
# mask * (n // 4 + 1) and a big-endian shift by a little. bytes.translate over the
# four byte lanes (payload[i::4]) loses below ~16 KiB (2.8 us for 20 bytes) and wins
# above (~290 us for 64 KiB, ~2.5 ms for 1 MiB), so large payloads take that path.
_TRANSLATE_FROM: Final = 16384
_IDENTITY: Final = bytes(range(256))


def _apply_mask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the repeating 4-byte ``mask`` (RFC 6455 5.3); returns bytes."""
    n = len(payload)
    if n < _TRANSLATE_FROM:
        key = mask * (n >> 2) + mask[: n & 3]
        return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )
    out = bytearray(payload)
    for lane in range(4):
        table = _apply_mask(_IDENTITY, bytes((mask[lane],)) * 4)  # byte -> byte ^ mask[lane]
        out[lane::4] = payload[lane::4].translate(table)
    return bytes(out)


# -- encoding -------------------------------------------------------------------------

_FIN: Final = 0x80
_RSV: Final = 0x70
_RSV1: Final = 0x40  # permessage-deflate's "compressed" bit (RFC 7692 6)
_OPCODE: Final = 0x0F
_MASKED: Final = 0x80
_MAX_CONTROL_PAYLOAD: Final = 125
_OPCODES: Final = frozenset(Opcode)
_EMPTY_CLOSE: Final = b"\x88\x00"
_pack_16: Final = struct.Struct("!BBH").pack
_pack_64: Final = struct.Struct("!BBQ").pack


def _header(opcode: int, fin: bool, length: int, mask_bit: int) -> bytes:
    """A frame header up to the masking key, in the shortest of the 7/16/64-bit length forms.

    Raises ValueError for a frame RFC 6455 forbids us to send (either side).
    """
    if opcode not in _OPCODES:
        raise ValueError(f"unknown opcode {opcode!r}")
    if opcode >= Opcode.CLOSE and (length > _MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("a control frame must be final and carry at most 125 bytes")
    first = opcode | _FIN if fin else opcode
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return _pack_16(first, mask_bit | 126, length)
    return _pack_64(first, mask_bit | 127, length)


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """Encode one unmasked server frame, in the shortest of the 7/16/64-bit length forms.

    Encode once and send the same bytes to every client: that is why this is a function
    and not a codec method. Raises ValueError for a frame RFC 6455 forbids us to send.
    """
    return _header(opcode, fin, len(payload), 0) + payload


def _unmasked_frame(first: int, payload: bytes) -> bytes:
    """A frame with first byte ``first``, unmasked, in the shortest length form; no checks."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_16(first, 126, n) + payload
    return _pack_64(first, 127, n) + payload


def encode_text(text: str) -> bytes:
    """Encode a final text frame: the broadcast path, so it skips encode_frame's checks."""
    return _unmasked_frame(0x81, text.encode())


def frame_message(frame: bytes) -> str | bytes:
    """The message in one unmasked, unfragmented, uncompressed text or binary frame as
    :func:`encode_text` / :func:`encode_frame` made it: ``str`` for text, ``bytes`` for
    binary. The hub keeps frames (pending, history) and rewraps them for the JSON
    endpoint with this, so the plain path keeps nothing more per message."""
    length = frame[1] & 0x7F
    payload = frame[2 if length < 126 else 4 if length == 126 else 10:]
    return payload.decode() if frame[0] & 0x0F == Opcode.TEXT else payload


def encode_client_frame(
    opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """Encode one client frame, masked as RFC 6455 5.3 requires of every client frame.

    ``mask`` None takes a fresh random key from ``os.urandom`` (the RFC wants each frame's
    key unpredictable); pass 4 bytes for reproducible output. Raises ValueError for a
    frame we must not send or a key that is not 4 bytes.
    """
    if mask is None:
        mask = os.urandom(4)
    elif len(mask) != 4:
        raise ValueError(f"a masking key is 4 bytes, got {len(mask)}")
    return _header(opcode, fin, len(payload), _MASKED) + mask + _apply_mask(payload, mask)


def _is_valid_close_code(code: int) -> bool:
    """Codes allowed on the wire: RFC 6455 7.4 plus the IANA registry (1012-1014) and 3000-4999.

    1004 is reserved, 1005/1006/1015 are for local reporting only, the rest is unassigned.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _close_payload(code: int | None, reason: str) -> bytes:
    """The payload of a close frame we send; ValueError for what may not be sent (our bug)."""
    if code is None:
        if reason:
            raise ValueError("a close frame without a code cannot carry a reason")
        return b""
    if not _is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    payload = code.to_bytes(2, "big") + reason.encode()
    if len(payload) > _MAX_CONTROL_PAYLOAD:
        raise ValueError("close reason longer than 123 UTF-8 bytes")
    return payload


def encode_close(code: int | None = CloseCode.NORMAL_CLOSURE, reason: str = "") -> bytes:
    """Encode a server close frame; ``code=None`` gives the empty close frame (no status).

    Raises ValueError for a code that may not be sent or a reason over 123 UTF-8 bytes,
    because a close frame we must not send is our bug, not the peer's.
    """
    payload = _close_payload(code, reason)
    return bytes((0x88, len(payload))) + payload if payload else _EMPTY_CLOSE


def encode_client_close(
    code: int | None = CloseCode.NORMAL_CLOSURE, reason: str = "", mask: bytes | None = None
) -> bytes:
    """Encode a masked client close frame; arguments as :func:`encode_close` and
    :func:`encode_client_frame`."""
    return encode_client_frame(Opcode.CLOSE, _close_payload(code, reason), mask=mask)


# -- the opening handshake, client side --------------------------------------------------

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


def generate_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes in base64 (RFC 6455 4.1)."""
    return base64.b64encode(os.urandom(16)).decode()


def handshake_request(host: str, path: str, key: str, extensions: str = "") -> bytes:
    """A client's HTTP upgrade request; ``host`` as in the Host header (``name:port``).

    The minimal request RFC 6455 4.1 asks for, no Origin: what the load generator sends
    18,000 times, so nothing in it is optional. ``extensions``, when given, is the value
    of a Sec-WebSocket-Extensions header (an offer such as ``permessage-deflate``).
    """
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{offer}\r\n").encode()


def accept_key(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept a server must answer for ``key``: base64(SHA-1(key + GUID))."""
    if isinstance(key, str):
        key = key.encode()
    return base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()


# -- permessage-deflate (RFC 7692): the handshake's answer and the server's encoder -----

# An extension list (RFC 6455 9.1): name *( ";" param [ "=" value ] ), separated by commas;
# a value is a token or a quoted string.
_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_EXTENSION_ITEM: Final = re.compile(
    rf'\s*({_TOKEN})\s*(?:=\s*(?:({_TOKEN})|"((?:[^"\\]|\\.)*)")\s*)?([;,]|$)'
)
_WINDOW_BITS: Final = {str(bits): bits for bits in range(8, 16)}  # no leading zeros
# zlib's level for compress_frame, which runs in the hub's flush, on the event loop. On
# 1 MiB of chat-like JSON (2026-11-30, one thread's CPU time, best of 5): level 6 (zlib's
# default) took 45 ms for a ratio of 0.134, level 3 12 ms for 0.161, level 1 10.5 ms for
# 0.206; on 1 KiB all take 9-20 us, mostly making the compressor.
_COMPRESS_LEVEL: Final = 3


def _parse_extensions(header: str) -> list[list[tuple[str, str | None]]] | None:
    """The offers of a Sec-WebSocket-Extensions value, each a list of (name, value) whose
    first item is the extension's name; None when the header does not parse."""
    offers: list[list[tuple[str, str | None]]] = []
    items: list[tuple[str, str | None]] = []
    pos = 0
    while pos < len(header):
        match = _EXTENSION_ITEM.match(header, pos)
        if match is None:
            return None
        name, token, quoted, separator = match.groups()
        if items:
            value = token if quoted is None else re.sub(r"\\(.)", r"\1", quoted)
        elif token is not None or quoted is not None:
            return None  # an extension's name takes no value
        else:
            value = None
        items.append((name.lower(), value))
        if separator != ";":
            offers.append(items)
            items = []
        pos = match.end()
    return offers if not items else None


@dataclass(frozen=True, slots=True)
class PerMessageDeflate:
    """What the server agreed to (see :func:`negotiate_deflate`): the header of its 101
    answer, and the LZ77 window its compressed frames to that client may use."""

    response: str  #: the value of the 101's Sec-WebSocket-Extensions header
    window_bits: int  #: 9-15: compress with a window of at most 2 ** window_bits bytes


def _accept_deflate(params: list[tuple[str, str | None]]) -> PerMessageDeflate | None:
    """Our answer to one permessage-deflate offer, or None to decline it (RFC 7692 7)."""
    window_bits = 15
    asked = set()
    for name, value in params:
        if name in asked:
            return None  # the same parameter twice
        asked.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name == "server_max_window_bits":
            if value not in _WINDOW_BITS:
                return None
            # zlib cannot deflate with a 256-byte window (it refuses -8): decline 8.
            window_bits = _WINDOW_BITS[value]
            if window_bits < 9:
                return None
        elif name == "client_max_window_bits":
            # A bare parameter says the client could limit its window; a value says it
            # will. We never ask it to: our inflater's 32 KiB window takes any.
            if value is not None and value not in _WINDOW_BITS:
                return None
        else:
            return None  # a parameter RFC 7692 does not define
    response = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    if "server_max_window_bits" in asked:
        response += f"; server_max_window_bits={window_bits}"
    return PerMessageDeflate(response, window_bits)


def negotiate_deflate(offers: str | None) -> PerMessageDeflate | None:
    """The first permessage-deflate offer in a client's Sec-WebSocket-Extensions that we
    can honour, as our answer; None when there is none (or the header does not parse),
    and then the 101 carries no Sec-WebSocket-Extensions.

    We always answer ``server_no_context_takeover`` and ``client_no_context_takeover``:
    each message is compressed and inflated on its own, so a connection keeps no zlib
    object between messages (an inflater holds 7.4 KB, 40.1 KB once its 32 KiB window is
    in use: tracemalloc), and one compressed frame can go to every client of a room. An offer with
    ``server_max_window_bits`` is accepted with its value (we compress with that window)
    unless it is 8, which zlib cannot compress with; ``client_max_window_bits`` is
    accepted and left unanswered. An offer with an unknown, repeated or malformed
    parameter is declined, as RFC 7692 7 demands.
    """
    if not offers:
        return None
    parsed = _parse_extensions(offers)
    for params in parsed or ():
        if params[0][0] == "permessage-deflate":
            agreement = _accept_deflate(params[1:])
            if agreement is not None:
                return agreement
    return None


def compress_frame(frame: bytes, window_bits: int = 15) -> bytes:
    """The message of ``frame`` (one final unmasked text or binary frame, as
    :func:`encode_text` and :func:`encode_frame` make) compressed into a frame with RSV1
    set, for the peers whose permessage-deflate agreement has this ``window_bits``.

    No context takeover: a fresh compressor per message (268 KB while it runs with a
    15-bit window, 139 KB with 9: tracemalloc), so the result depends on the message
    alone and one call serves a whole room. The ``00 00 FF FF`` a sync flush
    ends with is removed (RFC 7692 7.2.1). When compressing does not make the frame
    smaller (short messages: a 64-byte JSON message deflates to 65 bytes), ``frame``
    itself is returned: an uncompressed message is always allowed. Raises ValueError
    for any other kind of frame.
    """
    if frame[0] not in (_FIN | _TEXT, _FIN | _BINARY) or frame[1] & _MASKED:
        raise ValueError("not a final unmasked text or binary frame")
    length = frame[1]
    start = 2 if length < 126 else 4 if length == 126 else 10
    compressor = zlib.compressobj(_COMPRESS_LEVEL, zlib.DEFLATED, -window_bits)
    with memoryview(frame) as view:
        data = compressor.compress(view[start:]) + compressor.flush(zlib.Z_SYNC_FLUSH)
    compressed = _unmasked_frame(frame[0] | _RSV1, data[:-4])
    return compressed if len(compressed) < len(frame) else frame


# The empty stored block a deflate sender flushes with, and strips (RFC 7692 7.2.1);
# the receiver puts it back before inflating the last bytes of a message.
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"


# -- decoding (either side: only which frames must be masked differs) ----------------

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def _check_utf8(decoder: codecs.IncrementalDecoder, data: bytes, final: bool) -> None:
    """Feed the next bytes of a text message to ``decoder``; raise as soon as they cannot
    be the start of valid UTF-8 (``final``: they end the message, so nothing may be pending).

    CPython's incremental decoder rejects every invalid prefix at once except ED A0-BF
    (the start of an encoded surrogate), which it keeps pending until the next byte.
    """
    decoder.decode(data, final)
    if not final:
        pending = decoder.getstate()[0]
        if len(pending) >= 2 and pending[0] == 0xED and pending[1] > 0x9F:
            raise UnicodeDecodeError("utf-8", pending, 0, 2, "encoded surrogate")


# Looking up an enum member costs ~0.2 us on CPython 3.11, as much as unmasking a small
# frame, so the parser compares against plain module constants.
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_FIN_RSV1: Final = _FIN | _RSV1
_OPEN: Final = State.OPEN
_CLOSING: Final = State.CLOSING
_CLOSED: Final = State.CLOSED


class _Message:
    """A data message in progress: its payload so far, and where its current frame is.

    Exists only while a message is incomplete: between the fragments of a fragmented
    message, inside a frame whose payload is still arriving, and while a compressed
    message is inflated. A frame's payload is taken as it arrives (unmasked, inflated,
    checked for UTF-8) instead of being buffered whole, so invalid UTF-8 fails at the
    read that brings it, and a large frame in many small reads costs linear work.
    """

    __slots__ = ("data", "decoder", "inflater", "size", "remaining", "mask", "fin")

    def __init__(self, text: bool, compressed: bool) -> None:
        self.data = bytearray()  # the payload so far (inflated when compressed)
        self.decoder = _Utf8Decoder() if text else None  # text: checks UTF-8 as it comes
        # Compressed (RSV1): a fresh raw-deflate inflater, dropped with the message (no
        # context takeover). A 15-bit window inflates what any smaller window made.
        self.inflater = zlib.decompressobj(-15) if compressed else None
        self.size = 0  # payload bytes its frames announced so far, on the wire (compressed)
        self.remaining = 0  # payload bytes of the current frame still to come
        self.mask: bytes | None = None  # its key, turned to the next byte's position
        self.fin = False  # whether the current frame ends the message


class _Protocol:
    """One websocket connection's RFC 6455 state; :class:`ServerProtocol` and
    :class:`ClientProtocol` set which side it is.

    Use: ``events = p.receive_data(data)`` for every chunk read from the socket, then
    send ``p.data_to_send()`` (pongs, close frames). Close the TCP connection once
    :attr:`close_expected` is true and that data is flushed.

    After a protocol violation the codec stays CLOSING and ignores everything except a
    close frame from the peer (which moves it to CLOSED); frames it ignores are skipped
    by length, never buffered.

    The two sides share this one parser, and differ only in class attributes (so a side
    costs no per-connection memory): which mask bit the peer's frames must carry, and
    how our pongs and close frames are encoded. Sharing it costs the server's hot path
    about 1%: one small masked text frame per ``receive_data`` (~2.2 us) took 1.01x the
    CPU time of the server-only parser it replaced (timeit, median of the per-round
    ratios of 3 x 61 interleaved rounds), the ~25 ns of reading ``_peer_mask_bit``.
    """

    # Set by each side: the mask bit every frame from the peer must carry (0x80 from a
    # client, 0 from a server), what to say when it does not, and our frames' encoders.
    _peer_mask_bit: int
    _mask_error: str
    _encode_control: Callable[[int, bytes], bytes]
    _encode_close: Callable[[int | None, str], bytes]

    __slots__ = (
        "state",
        "close_code",
        "max_message_size",
        "_buffer",  # bytes received but not parsed yet: b"" (shared), or a frame's header or
        # a whole control frame still incomplete (at most 139 bytes: payloads are streamed)
        "_outgoing",  # bytes for data_to_send(): b"" (shared) when none
        "_message",  # _Message while a data message is incomplete, else None
        "_skip",  # None while the peer behaves; after a violation, bytes still to discard
        # permessage-deflate: None when not negotiated, else the window bits (9-15) our
        # compressed frames to this peer may use. The eighth slot is free: 7 and 8 slots
        # both fill pymalloc's 96-byte size class (a ninth would cost 16 bytes more).
        "deflate",
    )

    def __init__(self, max_message_size: int = 1 << 20, deflate: int | None = None) -> None:
        self.state: State = _OPEN
        #: The code of the close frame we sent or will send (1005 when we answered an
        #: empty close frame); None until then. For logging.
        self.close_code: int | None = None
        self.max_message_size = max_message_size
        #: None, or the window bits of the permessage-deflate agreement
        #: (:attr:`PerMessageDeflate.window_bits`): then RSV1 marks a compressed message.
        self.deflate = deflate
        self._buffer = b""
        self._outgoing = b""
        self._message: _Message | None = None
        self._skip: int | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.name} close_code={self.close_code}>"

    @property
    def close_expected(self) -> bool:
        """True when the TCP connection may be closed as soon as data_to_send() is flushed.

        That is when the closing handshake is complete (CLOSED), and also right after a
        protocol violation: RFC 6455 7.1.7 lets the endpoint that fails the connection
        drop TCP after its close frame, and waiting for a misbehaving peer only holds a
        socket. After a clean close we started it is False until the peer answers, so
        the peer sees a clean close (give it a timeout).
        """
        return self.state is _CLOSED or self._skip is not None

    def data_to_send(self) -> bytes:
        """Return and forget the bytes the codec wants sent (pongs, close frames); b"" if none."""
        out = self._outgoing
        self._outgoing = b""
        return out

    def send_close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start a close on our side: queue our close frame and move to CLOSING.

        Raises RuntimeError unless the state is OPEN (a close frame was already sent or
        received: a second one would be our bug) and ValueError for a code or reason
        that may not be sent (see :func:`encode_close`).
        """
        if self.state is not _OPEN:
            raise RuntimeError(f"cannot send a close frame: the connection is {self.state.name}")
        self._outgoing += self._encode_close(code, reason)
        self.close_code = code
        self.state = _CLOSING

    # -- parsing ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse the next bytes from the peer; return the events they complete, in order.

        ``data`` may hold any part of a frame, or many frames. Never raises for anything
        the peer sends.
        """
        if self.state is _CLOSED:
            return []
        if type(data) is not bytes:  # we may keep a reference: never to a reusable buffer
            data = bytes(data)
        events: list[Event] = []
        end = len(data)
        pos = 0
        message = self._message
        if message is not None and message.remaining:
            # The next bytes of a data frame whose header came earlier: payload, up to
            # the frame's end (the buffer is empty: the header was parsed, not kept).
            pos = min(message.remaining, end)
            self._take_payload(message, data, 0, pos, events)
            if pos == end:
                return events
            buf = data
        elif self._buffer:
            buf = self._buffer + data  # at most a header or a control frame before it
        else:
            buf = data
        end = len(buf)
        skip = self._skip or 0
        while True:
            if skip:
                if end - pos < skip:
                    skip -= end - pos
                    pos = end
                    break
                pos += skip
                skip = 0
            if end - pos < 2:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            masked = b1 & _MASKED
            if masked:
                header += 4
            frame_end = pos + header + length
            if self._skip is None:
                error = self._header_error(b0, masked, length)
                if error is not None:
                    self._fail(error, events)
                    skip = frame_end - pos  # without buffering the payload
                    continue
            elif b0 & _OPCODE != _CLOSE or length > _MAX_CONTROL_PAYLOAD:
                skip = frame_end - pos  # after a violation only the peer's close matters
                continue
            if frame_end > end:
                if b0 & _OPCODE < _CLOSE and self._skip is None and end - pos >= header:
                    # A data frame whose payload is still coming: take what is here now.
                    message = self._start_frame(b0, length)
                    message.remaining = length
                    message.mask = buf[pos + header - 4 : pos + header] if masked else None
                    self._take_payload(message, buf, pos + header, end, events)
                    pos = end
                    skip = self._skip or 0  # the rest of the frame, if that failed
                break
            if not length:
                payload = b""
            elif masked:
                start = frame_end - length
                payload = _apply_mask(buf[start:frame_end], buf[start - 4 : start])
            else:  # a server's frame, or a client's late close after a violation
                payload = buf[frame_end - length : frame_end]
            pos = frame_end
            self._handle_frame(b0, payload, events)
            if self.state is _CLOSED:
                self._buffer = b""
                self._message = None
                return events
        if self._skip is not None:
            self._skip = skip
        self._buffer = b"" if pos == end else buf[pos:] if pos else buf
        return events

    def _header_error(self, b0: int, masked: int, length: int) -> ProtocolError | None:
        """What is wrong with a frame, judged from its header alone (so nothing is buffered)."""
        if length >> 63:
            return ProtocolError(CloseCode.PROTOCOL_ERROR, "frame length with the high bit set")
        if b0 & _RSV:
            error = self._rsv_error(b0)
            if error is not None:
                return error
        if masked != self._peer_mask_bit:
            return ProtocolError(CloseCode.PROTOCOL_ERROR, self._mask_error)
        opcode = b0 & _OPCODE
        if opcode >= _CLOSE:
            if opcode > _PONG:
                return ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if not b0 & _FIN:
                return ProtocolError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                return ProtocolError(CloseCode.PROTOCOL_ERROR, "control frame over 125 bytes")
            return None
        if opcode > _BINARY:
            return ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        message = self._message
        if opcode == _CONTINUATION:
            if message is None:
                return ProtocolError(CloseCode.PROTOCOL_ERROR, "continuation without a message")
            length += message.size
        elif message is not None:
            return ProtocolError(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
        if length > self.max_message_size:
            return ProtocolError(CloseCode.MESSAGE_TOO_BIG, "message too big")
        return None

    def _rsv_error(self, b0: int) -> ProtocolError | None:
        """RSV bits are an error unless permessage-deflate was negotiated and only RSV1 is
        set, on the first frame of a data message (RFC 7692 6: it marks it compressed)."""
        if b0 & _RSV != _RSV1 or self.deflate is None:
            return ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if b0 & _OPCODE not in (_TEXT, _BINARY):
            return ProtocolError(CloseCode.PROTOCOL_ERROR, "RSV1 on a control or continuation")
        return None

    def _handle_frame(self, b0: int, payload: bytes, events: list[Event]) -> None:
        """Act on one complete frame whose header already passed :meth:`_header_error`."""
        opcode = b0 & _OPCODE
        if opcode == _TEXT and b0 & _FIN_RSV1 == _FIN:  # a whole uncompressed message
            try:
                events.append(TextMessage(payload.decode()))
            except UnicodeDecodeError:
                self._fail(ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8"), events)
        elif opcode == _BINARY and b0 & _FIN_RSV1 == _FIN:
            events.append(BinaryMessage(payload))
        elif opcode < _CLOSE:  # a fragment, or a compressed message
            self._take(self._start_frame(b0, len(payload)), payload, events)
        elif opcode == _PING:
            if self.state is _OPEN:  # nothing may follow our close frame
                self._outgoing += self._encode_control(_PONG, payload)
            events.append(Ping(payload))
        elif opcode == _PONG:
            events.append(Pong(payload))
        else:
            self._handle_close(payload, events)

    def _start_frame(self, b0: int, length: int) -> _Message:
        """The message a data frame of ``length`` payload bytes belongs to: a new one, or
        for a continuation the one in progress (:meth:`_header_error` made sure of it)."""
        if b0 & _OPCODE == _CONTINUATION:
            message = self._message
            assert message is not None
        else:
            message = self._message = _Message(b0 & _OPCODE == _TEXT, bool(b0 & _RSV1))
        message.fin = bool(b0 & _FIN)
        message.size += length
        return message

    def _take_payload(
        self, message: _Message, buf: bytes, start: int, stop: int, events: list[Event]
    ) -> None:
        """Take ``buf[start:stop]``, the next bytes of the current frame's payload, as
        they came (masked or not)."""
        chunk = buf[start:stop]
        message.remaining -= stop - start
        mask = message.mask
        if mask is not None:
            chunk = _apply_mask(chunk, mask)
            turn = (stop - start) & 3
            message.mask = mask[turn:] + mask[:turn]
        self._take(message, chunk, events)

    def _take(self, message: _Message, chunk: bytes, events: list[Event]) -> None:
        """Take the next payload bytes of ``message``, unmasked."""
        if message.inflater is not None:
            self._inflate(message, chunk, events)
        else:
            added = len(message.data)
            message.data += chunk
            self._check(message, added, False, events)

    def _inflate(self, message: _Message, chunk: bytes, events: list[Event]) -> None:
        """Inflate the next compressed bytes of ``message``, never past the size limit: a
        decompression bomb stops at ``max_message_size`` + 1 bytes of output."""
        inflater = message.inflater
        assert inflater is not None
        # Room for one byte more than allowed: getting it means the message is too big.
        room = self.max_message_size - len(message.data) + 1
        try:
            if inflater.eof:  # a final deflate block came: the rest is ignored
                out = b""
            else:
                out = inflater.decompress(chunk, room)
                if not message.remaining and message.fin and len(out) < room:
                    out += inflater.decompress(_DEFLATE_TAIL, room - len(out))
        except zlib.error:
            error = ProtocolError(CloseCode.INVALID_DATA, "invalid compressed data")
            self._fail(error, events, message.remaining)
            return
        too_big = len(out) == room
        added = len(message.data)
        message.data += out[:-1] if too_big else out  # invalid UTF-8 before that byte wins
        self._check(message, added, too_big, events)

    def _check(self, message: _Message, added: int, too_big: bool, events: list[Event]) -> None:
        """Check ``message.data[added:]``, just added, and complete the message at its end."""
        end = not message.remaining and message.fin and not too_big
        if message.decoder is not None:
            try:
                with memoryview(message.data) as data:
                    _check_utf8(message.decoder, data[added:], end)
            except UnicodeDecodeError:
                self._fail(ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8"), events,
                           message.remaining)
                return
        if too_big:
            error = ProtocolError(CloseCode.MESSAGE_TOO_BIG, "message too big")
            self._fail(error, events, message.remaining)
        elif end:
            self._message = None
            if message.decoder is not None:
                events.append(TextMessage(message.data.decode()))
            else:
                events.append(BinaryMessage(bytes(message.data)))

    def _handle_close(self, payload: bytes, events: list[Event]) -> None:
        if self.state is not _OPEN:
            # Our close frame is already out, so this completes the handshake whatever it
            # says: there is nobody left to tell about a malformed one. Report it as-is.
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            events.append(CloseReceived(code, payload[2:].decode(errors="replace")))
            self.state = _CLOSED
            return
        if not payload:
            code = None
            reason = ""
        elif len(payload) == 1:
            self._fail(ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame of 1 byte"), events)
            return
        else:
            code = int.from_bytes(payload[:2], "big")
            if not _is_valid_close_code(code):
                error = ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
                self._fail(error, events)
                return
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                error = ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in close reason")
                self._fail(error, events)
                return
        events.append(CloseReceived(code, reason))
        self._outgoing += self._encode_close(code, "")  # echo the code (none for none)
        self.close_code = CloseCode.NO_STATUS_RCVD if code is None else code
        self.state = _CLOSED

    def _fail(self, error: ProtocolError, events: list[Event], skip: int = 0) -> None:
        """Fail the connection (RFC 6455 7.1.7): report once, queue our close, ignore the
        rest (``skip``: the bytes still to come of the frame that failed it)."""
        events.append(ProtocolViolation(error))
        self._message = None
        self._skip = skip
        if self.state is _OPEN:
            self._outgoing += self._encode_close(error.close_code, error.reason)
            self.close_code = error.close_code
            self.state = _CLOSING


class ServerProtocol(_Protocol):
    """The server side (what greenchat runs per connection): client frames must be masked,
    ours never are."""

    __slots__ = ()
    _peer_mask_bit = _MASKED
    _mask_error = "client frame not masked"
    _encode_control = staticmethod(encode_frame)
    _encode_close = staticmethod(encode_close)


class ClientProtocol(_Protocol):
    """The client side (load generator, test clients): server frames must not be masked,
    ours always are (pongs and close frames get a fresh random key each).

    Send messages with :func:`encode_client_frame`. After the closing handshake RFC 6455
    7.1.1 wants the server to close TCP first (so the server, not the client, holds
    TIME_WAIT): once :attr:`close_expected`, a polite client waits a bounded time for
    the server's EOF before closing its socket.
    """

    __slots__ = ()
    _peer_mask_bit = 0
    _mask_error = "server frame masked"
    _encode_control = staticmethod(encode_client_frame)
    _encode_close = staticmethod(encode_client_close)
