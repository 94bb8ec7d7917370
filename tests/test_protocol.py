"""chat.protocol: bytes in, events and bytes out. No sockets, no gevent.

Client frames are built here by a small helper with its own (slow, obviously correct)
masking, so the codec's fast masking and unmasking are checked against an independent
implementation. Most tests speak to the server side; the client side shares its parser,
and the properties at the end run the reference model against both.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import itertools
import random
import sys
import tracemalloc
import typing
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.protocol import (
    BinaryMessage,
    ChatError,
    ClientProtocol,
    CloseCode,
    CloseReceived,
    Opcode,
    Ping,
    Pong,
    ProtocolError,
    ProtocolViolation,
    ServerProtocol,
    State,
    TextMessage,
    PerMessageDeflate,
    accept_key,
    compress_frame,
    encode_client_close,
    encode_client_frame,
    encode_close,
    encode_frame,
    encode_text,
    generate_key,
    handshake_request,
    negotiate_deflate,
)
from helpers import inflate_through_window

MASK = b"\x37\xfa\x21\x3d"
CONT, TEXT, BINARY = Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY
CLOSE, PING, PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10


# -- helpers ---------------------------------------------------------------------------


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    return bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length_form: int | None = None,
) -> bytes:
    """A client frame, masked unless ``mask`` is None; ``length_form`` 7/16/64 forces that form."""
    n = len(payload)
    form = length_form or (7 if n < 126 else 16 if n < 65536 else 64)
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if mask is not None else 0
    if form == 7:
        header = bytes((first, mask_bit | n))
    elif form == 16:
        header = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return header + payload
    return header + mask + xor_mask(payload, mask)


def client_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """Just the header of a masked client frame announcing ``length`` bytes (64-bit form)."""
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | 127)) + length.to_bytes(8, "big") + MASK


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def client_deflate(payload: bytes, final_block: bool = False, window_bits: int = 15) -> bytes:
    """A message payload compressed the way RFC 7692 7.2.1 tells a sender, by zlib: a
    fresh compressor (no context takeover), a sync flush, its 00 00 FF FF removed; or
    ``final_block``: ended by a final deflate block instead (RFC 7692 7.2.3.3)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
    data = compressor.compress(payload)
    if final_block:
        return data + compressor.flush(zlib.Z_FINISH)
    data += compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def sent_frames(data: bytes, masked: bool = False) -> list[tuple[bool, int, bytes]]:
    """Split what one side sent into (fin, opcode, payload), checking the side's mask rule:
    a server never masks, a client always does (unmasked here with the test's own XOR)."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert bool(b1 & 0x80) == masked, "clients always mask, servers never do"
        assert not b0 & 0x70, "no reserved bits without an extension"
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        mask = data[pos : pos + 4] if masked else None
        pos += 4 if masked else 0
        assert pos + n <= len(data), "truncated frame"
        payload = data[pos : pos + n]
        frames.append((bool(b0 & 0x80), b0 & 0x0F, xor_mask(payload, mask) if mask else payload))
        pos += n
    return frames


def server_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """Split server output into (fin, opcode, payload), checking it is never masked."""
    return sent_frames(data, masked=False)


def comparable(events: list) -> list:
    """Events with each ProtocolViolation replaced by (code, reason): errors compare by identity."""
    return [
        ("violation", e.error.close_code, e.error.reason) if isinstance(e, ProtocolViolation) else e
        for e in events
    ]


def feed(protocol: ServerProtocol | ClientProtocol, chunks) -> tuple[list, bytes]:
    events: list = []
    sent = b""
    for chunk in chunks:
        events += protocol.receive_data(chunk)
        sent += protocol.data_to_send()
    return comparable(events), sent


def assert_failed_with(protocol: ServerProtocol, events: list, code: int) -> None:
    """The peer broke the protocol: one violation, our close frame with its code, CLOSING."""
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, ProtocolViolation)
    assert event.error.close_code == code
    reason = event.error.reason.encode()
    assert 0 < len(reason) <= 123
    assert server_frames(protocol.data_to_send()) == [(True, CLOSE, close_payload(code, reason))]
    assert protocol.state is State.CLOSING
    assert protocol.close_code == code
    assert protocol.close_expected


def failing(data: bytes, code: int, max_message_size: int = 1 << 20) -> ServerProtocol:
    protocol = ServerProtocol(max_message_size)
    assert_failed_with(protocol, protocol.receive_data(data), code)
    return protocol


# -- messages --------------------------------------------------------------------------


def test_small_masked_text_frame_becomes_a_text_message():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(TEXT, "héllo ☃".encode()))
    assert events == [TextMessage("héllo ☃")]
    assert protocol.data_to_send() == b""
    assert protocol.state is State.OPEN
    assert not protocol.close_expected
    assert protocol.close_code is None


def test_binary_frame_becomes_a_binary_message():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(BINARY, b"\x00\xff\x10"))
    assert events == [BinaryMessage(b"\x00\xff\x10")]


def test_empty_text_and_binary_frames_are_empty_messages():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(TEXT) + client_frame(BINARY))
    assert events == [TextMessage(""), BinaryMessage(b"")]


def test_many_frames_in_one_call_give_events_in_order():
    protocol = ServerProtocol()
    data = b"".join(client_frame(TEXT, str(i).encode()) for i in range(50))
    assert protocol.receive_data(data) == [TextMessage(str(i)) for i in range(50)]


def test_idle_protocol_holds_no_buffer_and_has_no_instance_dict():
    protocol = ServerProtocol()
    protocol.receive_data(client_frame(TEXT, b"hi"))
    assert not hasattr(protocol, "__dict__")
    assert protocol._buffer == b"" and type(protocol._buffer) is bytes
    assert protocol._message is None


def test_events_are_frozen_and_slotted():
    event = TextMessage("x")
    assert not hasattr(event, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.text = "y"  # type: ignore[misc]


def test_receive_data_copies_a_mutable_buffer_it_keeps():
    protocol = ServerProtocol()
    frame = bytearray(client_frame(TEXT, b"hello"))
    assert protocol.receive_data(frame[:4]) == []
    frame[:] = bytes(len(frame))  # the caller reuses its buffer
    assert protocol.receive_data(bytes(client_frame(TEXT, b"hello")[4:])) == [TextMessage("hello")]


# -- lengths ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 16383, 16384, 65535, 65536, 70001])
def test_client_frames_of_every_length_form_are_unmasked_correctly(size):
    payload = bytes(i * 7 % 251 for i in range(size))
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(BINARY, payload)) == [BinaryMessage(payload)]


@pytest.mark.parametrize("form", [16, 64])
def test_non_minimal_length_encodings_are_accepted(form):
    protocol = ServerProtocol()
    frame = client_frame(TEXT, b"short", length_form=form)
    assert protocol.receive_data(frame) == [TextMessage("short")]


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_server_frames_use_the_shortest_length_form_and_are_never_masked(size, header):
    payload = b"x" * size
    frame = encode_frame(BINARY, payload)
    assert frame == header + payload
    assert server_frames(frame) == [(True, BINARY, payload)]


@pytest.mark.parametrize("text", ["", "hi ☃", "é" * 63, "x" * 126, "y" * 70000])
def test_encode_text_equals_encode_frame_of_the_utf8_bytes(text):
    assert encode_text(text) == encode_frame(TEXT, text.encode())


def test_encode_frame_without_fin_clears_the_fin_bit():
    assert encode_frame(TEXT, b"ab", fin=False) == b"\x01\x02ab"
    assert encode_frame(CONT, b"cd") == b"\x80\x02cd"


@pytest.mark.parametrize(
    ("opcode", "payload", "fin"),
    [
        (PING, b"x" * 126, True),
        (CLOSE, b"x" * 126, True),
        (PONG, b"", False),
        (3, b"", True),
        (0xB, b"", True),
    ],
)
def test_encode_frame_refuses_frames_we_must_not_send(opcode, payload, fin):
    with pytest.raises(ValueError):
        encode_frame(opcode, payload, fin)


def test_encode_close_forms():
    assert encode_close() == b"\x88\x02\x03\xe8"
    assert encode_close(None) == b"\x88\x00"
    assert encode_close(4000, "é") == b"\x88\x04\x0f\xa0\xc3\xa9"
    assert len(encode_close(1000, "r" * 123)) == 127


@pytest.mark.parametrize(
    ("code", "reason"),
    [(None, "why"), (1005, ""), (1006, ""), (999, ""), (5000, ""), (1000, "r" * 124)],
)
def test_encode_close_refuses_codes_and_reasons_we_must_not_send(code, reason):
    with pytest.raises(ValueError):
        encode_close(code, reason)


# -- fragmentation ---------------------------------------------------------------------


def test_fragmented_text_is_reassembled_with_characters_split_across_fragments():
    data = "snow ☃ man".encode()
    cut = data.index(b"\xe2") + 1  # inside the snowman
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(TEXT, data[:cut], fin=False)) == []
    assert protocol.receive_data(client_frame(CONT, data[cut : cut + 1], fin=False)) == []
    events = protocol.receive_data(client_frame(CONT, data[cut + 1 :]))
    assert events == [TextMessage("snow ☃ man")]
    assert protocol._message is None


def test_a_message_cut_into_one_byte_and_empty_fragments_is_reassembled():
    data = "héllo ☃".encode()
    frames = [client_frame(TEXT, data[:1], fin=False)]
    for byte in data[1:]:
        frames.append(client_frame(CONT, b"", fin=False))
        frames.append(client_frame(CONT, bytes((byte,)), fin=False))
    frames.append(client_frame(CONT))
    protocol = ServerProtocol()
    assert protocol.receive_data(b"".join(frames)) == [TextMessage("héllo ☃")]


def test_fragmented_binary_is_reassembled():
    protocol = ServerProtocol()
    data = (
        client_frame(BINARY, b"ab", fin=False)
        + client_frame(CONT, b"", fin=False)
        + client_frame(CONT, b"cd")
    )
    assert protocol.receive_data(data) == [BinaryMessage(b"abcd")]


def test_control_frames_between_fragments_are_handled_at_once():
    protocol = ServerProtocol()
    data = (
        client_frame(TEXT, b"he", fin=False)
        + client_frame(PING, b"p1")
        + client_frame(CONT, b"ll", fin=False)
        + client_frame(PONG, b"p2")
        + client_frame(CONT, b"o")
    )
    assert protocol.receive_data(data) == [Ping(b"p1"), Pong(b"p2"), TextMessage("hello")]
    assert protocol.data_to_send() == b"\x8a\x02p1"


def test_close_between_fragments_drops_the_unfinished_message():
    protocol = ServerProtocol()
    data = client_frame(TEXT, b"he", fin=False) + client_frame(CLOSE, close_payload(1001))
    assert protocol.receive_data(data) == [CloseReceived(1001, "")]
    assert protocol.state is State.CLOSED
    assert protocol._message is None


# -- control frames --------------------------------------------------------------------


def test_ping_is_answered_with_a_pong_carrying_the_same_payload():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(PING, b"ping!")) == [Ping(b"ping!")]
    assert protocol.data_to_send() == b"\x8a\x05ping!"
    assert protocol.data_to_send() == b""


def test_empty_and_largest_pings_are_answered():
    protocol = ServerProtocol()
    big = bytes(range(125))
    events = protocol.receive_data(client_frame(PING) + client_frame(PING, big))
    assert events == [Ping(b""), Ping(big)]
    assert server_frames(protocol.data_to_send()) == [(True, PONG, b""), (True, PONG, big)]


def test_pong_is_reported_and_not_answered():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(PONG, b"beat")) == [Pong(b"beat")]
    assert protocol.data_to_send() == b""


# -- closing handshake -----------------------------------------------------------------


def test_client_close_is_echoed_and_closes_the_codec():
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1000, "bye ☃".encode())))
    assert events == [CloseReceived(1000, "bye ☃")]
    assert protocol.data_to_send() == b"\x88\x02\x03\xe8"
    assert protocol.state is State.CLOSED
    assert protocol.close_code == 1000
    assert protocol.close_expected


def test_client_close_without_payload_is_answered_with_an_empty_close():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(CLOSE)) == [CloseReceived(None, "")]
    assert protocol.data_to_send() == b"\x88\x00"
    assert protocol.state is State.CLOSED
    assert protocol.close_code == CloseCode.NO_STATUS_RCVD


VALID_CLOSE_CODES = [*range(1000, 1004), *range(1007, 1015), 3000, 3999, 4000, 4999]
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_every_valid_close_code_is_echoed(code):
    protocol = ServerProtocol()
    events = protocol.receive_data(client_frame(CLOSE, close_payload(code, b"r")))
    assert events == [CloseReceived(code, "r")]
    assert server_frames(protocol.data_to_send()) == [(True, CLOSE, close_payload(code))]


def test_input_after_the_closing_handshake_is_ignored():
    protocol = ServerProtocol()
    data = client_frame(CLOSE, close_payload(1000)) + client_frame(TEXT, b"late")
    assert protocol.receive_data(data) == [CloseReceived(1000, "")]
    protocol.data_to_send()
    assert protocol.receive_data(client_frame(TEXT, b"later") + b"\xff\xff") == []
    assert protocol.data_to_send() == b""
    assert protocol._buffer == b""


def test_server_close_waits_for_the_client_close_and_sends_no_second_frame():
    protocol = ServerProtocol()
    protocol.send_close(CloseCode.GOING_AWAY, "restart")
    assert protocol.data_to_send() == encode_close(1001, "restart")
    assert protocol.state is State.CLOSING
    assert protocol.close_code == 1001
    assert not protocol.close_expected
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1001)))
    assert events == [CloseReceived(1001, "")]
    assert protocol.data_to_send() == b""
    assert protocol.state is State.CLOSED
    assert protocol.close_expected
    assert protocol.close_code == 1001


def test_messages_after_server_close_are_still_delivered_but_pings_are_not_answered():
    protocol = ServerProtocol()
    protocol.send_close()
    protocol.data_to_send()
    data = client_frame(TEXT, b"in flight") + client_frame(PING, b"p")
    assert protocol.receive_data(data) == [TextMessage("in flight"), Ping(b"p")]
    assert protocol.data_to_send() == b""


def test_malformed_close_answering_a_server_close_still_completes_the_handshake():
    protocol = ServerProtocol()
    protocol.send_close()
    protocol.data_to_send()
    assert protocol.receive_data(client_frame(CLOSE, b"\x03")) == [CloseReceived(None, "")]
    assert protocol.state is State.CLOSED
    assert protocol.data_to_send() == b""


def test_violation_after_server_close_is_reported_without_a_second_close_frame():
    protocol = ServerProtocol()
    protocol.send_close(1001)
    protocol.data_to_send()
    events = protocol.receive_data(client_frame(TEXT, b"x", mask=None) + client_frame(TEXT, b"y"))
    assert comparable(events) == [("violation", 1002, "client frame not masked")]
    assert protocol.data_to_send() == b""
    assert protocol.close_code == 1001
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1000)))
    assert events == [CloseReceived(1000, "")]
    assert protocol.state is State.CLOSED


def test_sending_close_twice_is_a_local_error():
    protocol = ServerProtocol()
    protocol.send_close()
    with pytest.raises(RuntimeError):
        protocol.send_close()


def test_sending_close_after_the_handshake_is_a_local_error():
    protocol = ServerProtocol()
    protocol.receive_data(client_frame(CLOSE))
    with pytest.raises(RuntimeError):
        protocol.send_close()


@pytest.mark.parametrize(("code", "reason"), [(1005, ""), (999, ""), (1000, "r" * 124)])
def test_send_close_refuses_what_may_not_be_sent_and_stays_open(code, reason):
    protocol = ServerProtocol()
    with pytest.raises(ValueError):
        protocol.send_close(code, reason)
    assert protocol.state is State.OPEN
    assert protocol.data_to_send() == b""


# -- protocol violations: 1002 -----------------------------------------------------------


def test_unmasked_frame_is_closed_with_1002():
    failing(client_frame(TEXT, b"hello", mask=None), 1002)


@pytest.mark.parametrize("rsv", [RSV1, RSV2, RSV3])
def test_reserved_bit_without_extension_is_closed_with_1002(rsv):
    failing(client_frame(TEXT, b"hello", rsv=rsv), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcode_is_closed_with_1002(opcode):
    failing(client_frame(opcode, b"x"), 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_control_frame_over_125_bytes_is_closed_with_1002(opcode):
    failing(client_frame(opcode, close_payload(1000, b"x" * 124)), 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_fragmented_control_frame_is_closed_with_1002(opcode):
    failing(client_frame(opcode, b"", fin=False), 1002)


def test_continuation_without_a_message_in_progress_is_closed_with_1002():
    failing(client_frame(CONT, b"orphan"), 1002)


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_new_message_inside_a_fragmented_message_is_closed_with_1002(opcode):
    failing(client_frame(BINARY, b"part", fin=False) + client_frame(opcode, b"new"), 1002)


def test_64_bit_length_with_the_high_bit_set_is_closed_with_1002():
    failing(client_header(BINARY, 1 << 63), 1002)


def test_close_frame_of_one_byte_is_closed_with_1002():
    failing(client_frame(CLOSE, b"\x03"), 1002)


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_invalid_close_code_is_closed_with_1002(code):
    failing(client_frame(CLOSE, close_payload(code)), 1002)


# -- protocol violations: 1007 -----------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"abc\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"],
    ids=["invalid-byte", "truncated", "surrogate", "above-U+10FFFF", "overlong"],
)
def test_invalid_utf8_text_is_closed_with_1007(payload):
    failing(client_frame(TEXT, payload), 1007)


@pytest.mark.parametrize(
    "bad", [b"\xed\xa0", b"\xed\xa0\x80", b"\xf4\x90", b"\xe0\x80", b"\xc0", b"\xff"],
    ids=["surrogate-start", "surrogate", "above-U+10FFFF-start", "overlong-start", "c0", "ff"],
)
def test_invalid_utf8_fails_at_the_fragment_where_it_occurs(bad):
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(TEXT, b"ok", fin=False)) == []
    events = protocol.receive_data(client_frame(CONT, "κόσμε".encode() + bad, fin=False))
    assert_failed_with(protocol, events, 1007)


def test_invalid_utf8_in_the_first_fragment_fails_at_once():
    failing(client_frame(TEXT, b"ok\xed\xa0", fin=False), 1007)


def test_text_message_ending_inside_a_character_is_closed_with_1007():
    protocol = ServerProtocol()
    data = client_frame(TEXT, b"ok", fin=False) + client_frame(CONT, b"\xe2\x98")
    assert_failed_with(protocol, protocol.receive_data(data), 1007)


def test_close_reason_that_is_not_utf8_is_closed_with_1007():
    failing(client_frame(CLOSE, close_payload(1000, b"\xce\xba\xed\xa0\x80")), 1007)


def test_invalid_utf8_in_binary_messages_is_fine():
    protocol = ServerProtocol()
    assert protocol.receive_data(client_frame(BINARY, b"\xff\xfe")) == [BinaryMessage(b"\xff\xfe")]


# -- protocol violations: 1009 -----------------------------------------------------------


def test_frame_of_exactly_the_maximum_size_is_accepted():
    protocol = ServerProtocol(max_message_size=10)
    events = protocol.receive_data(client_frame(BINARY, b"0123456789"))
    assert events == [BinaryMessage(b"0123456789")]


def test_frame_over_the_maximum_is_closed_with_1009_from_its_header_alone():
    protocol = ServerProtocol(max_message_size=1000)
    assert_failed_with(protocol, protocol.receive_data(client_header(BINARY, 1001)), 1009)
    for _ in range(10):  # the announced payload arrives, and is skipped, not buffered
        assert protocol.receive_data(b"\x00" * 100) == []
        assert len(protocol._buffer) == 0
    assert protocol.receive_data(b"\x00" + client_frame(CLOSE)) == [CloseReceived(None, "")]
    assert protocol.state is State.CLOSED


def test_huge_announced_frame_is_closed_with_1009_not_buffered():
    failing(client_header(TEXT, 1 << 40), 1009)


def test_fragments_adding_up_to_over_the_maximum_are_closed_with_1009():
    protocol = ServerProtocol(max_message_size=10)
    data = client_frame(TEXT, b"12345", fin=False) + client_frame(CONT, b"67890", fin=False)
    assert protocol.receive_data(data) == []
    assert_failed_with(protocol, protocol.receive_data(client_header(CONT, 1)), 1009)


def test_fragments_adding_up_to_exactly_the_maximum_are_accepted():
    protocol = ServerProtocol(max_message_size=10)
    data = client_frame(TEXT, b"12345", fin=False) + client_frame(CONT, b"67890")
    assert protocol.receive_data(data) == [TextMessage("1234567890")]


def test_control_frames_do_not_count_towards_the_message_size():
    protocol = ServerProtocol(max_message_size=4)
    data = (
        client_frame(TEXT, b"12", fin=False)
        + client_frame(PING, b"x" * 100)
        + client_frame(CONT, b"34")
    )
    assert protocol.receive_data(data) == [Ping(b"x" * 100), TextMessage("1234")]


# -- after a violation -------------------------------------------------------------------


def test_input_after_a_violation_is_ignored_until_the_peer_closes():
    protocol = failing(client_frame(TEXT, b"\xff"), 1007)
    ignored = (
        client_frame(TEXT, b"more") + client_frame(PING, b"p") + client_frame(BINARY, b"b" * 300)
    )
    assert protocol.receive_data(ignored) == []
    assert protocol.data_to_send() == b""  # no pong, no second close frame
    assert protocol.state is State.CLOSING
    data = client_frame(CLOSE, close_payload(1002)) + client_frame(TEXT, b"x")
    events = protocol.receive_data(data)
    assert events == [CloseReceived(1002, "")]
    assert protocol.data_to_send() == b""
    assert protocol.state is State.CLOSED
    assert protocol.close_code == 1007


def test_a_violation_is_reported_only_once():
    data = (
        client_frame(TEXT, b"x", mask=None)
        + client_frame(7)
        + client_frame(CONT, b"x")
        + client_frame(TEXT, b"\xff")
    )
    failing(data, 1002)


def test_unmasked_close_after_a_violation_still_ends_the_connection():
    protocol = failing(client_frame(9, b"x" * 126), 1002)
    events = protocol.receive_data(client_frame(CLOSE, close_payload(1000), mask=None))
    assert events == [CloseReceived(1000, "")]
    assert protocol.state is State.CLOSED


def test_protocol_error_carries_its_close_code_and_reason():
    error = ProtocolError(CloseCode.PROTOCOL_ERROR, "client frame not masked")
    assert isinstance(error, ChatError)
    assert (error.close_code, error.reason) == (1002, "client frame not masked")
    assert "client frame not masked" in str(error) and "1002" in str(error)


# -- incremental parsing ---------------------------------------------------------------

def make_stream(mask: bytes | None = MASK) -> bytes:
    """A valid conversation from the peer: masked from a client, ``mask=None`` from a server."""
    return b"".join(
        [
            client_frame(TEXT, "héllo".encode(), mask=mask),
            client_frame(TEXT, "snow ☃".encode()[:6], fin=False, mask=mask),
            client_frame(PING, b"ping", mask=mask),
            client_frame(CONT, "snow ☃".encode()[6:], fin=False, length_form=16, mask=mask),
            client_frame(CONT, b"!", mask=mask),
            client_frame(BINARY, bytes(range(200)) + bytes(100), mask=mask),
            client_frame(BINARY, b"tiny", length_form=64, mask=mask),
            client_frame(PONG, mask=mask),
            client_frame(TEXT, mask=mask),
            client_frame(CLOSE, close_payload(1000, b"done"), mask=mask),
            client_frame(TEXT, b"after close", mask=mask),
        ]
    )


STREAM = make_stream()
STREAM_EVENTS = [
    TextMessage("héllo"),
    Ping(b"ping"),
    TextMessage("snow ☃!"),
    BinaryMessage(bytes(range(200)) + bytes(100)),
    BinaryMessage(b"tiny"),
    Pong(b""),
    TextMessage(""),
    CloseReceived(1000, "done"),
]
STREAM_SENT = encode_frame(PONG, b"ping") + encode_close(1000)

def make_bad_stream(mask: bytes | None = MASK) -> bytes:
    """A conversation with one violation in the middle, from a client or (``None``) a server."""
    return b"".join(
        [
            client_frame(TEXT, b"fine", mask=mask),
            client_frame(BINARY, b"a", fin=False, mask=mask),
            client_frame(CONT, b"b" * 130, fin=False, mask=mask),
            client_frame(TEXT, b"\xe2\x82", fin=False, mask=mask),  # a new message mid-message
            client_frame(PING, b"ignored", mask=mask),
            client_frame(TEXT, b"ignored" * 40, mask=mask),
            client_frame(CLOSE, close_payload(1000), mask=mask),
            client_frame(TEXT, b"after close", mask=mask),
        ]
    )


BAD_STREAM = make_bad_stream()
BAD_STREAM_EVENTS = [
    TextMessage("fine"),
    ("violation", 1002, "new message inside a fragmented one"),
    CloseReceived(1000, ""),
]
BAD_STREAM_SENT = encode_close(1002, "new message inside a fragmented one")


@pytest.mark.parametrize(
    ("stream", "expected_events", "expected_sent"),
    [(STREAM, STREAM_EVENTS, STREAM_SENT), (BAD_STREAM, BAD_STREAM_EVENTS, BAD_STREAM_SENT)],
    ids=["valid", "violation"],
)
def test_a_stream_split_at_every_byte_boundary_gives_the_same_events(
    stream, expected_events, expected_sent
):
    expected = (expected_events, expected_sent)
    assert feed(ServerProtocol(), [stream]) == expected
    for cut in range(len(stream) + 1):
        assert feed(ServerProtocol(), [stream[:cut], stream[cut:]]) == expected, cut


@pytest.mark.parametrize(
    ("stream", "expected_events", "expected_sent"),
    [(STREAM, STREAM_EVENTS, STREAM_SENT), (BAD_STREAM, BAD_STREAM_EVENTS, BAD_STREAM_SENT)],
    ids=["valid", "violation"],
)
def test_a_stream_fed_byte_by_byte_gives_the_same_events(stream, expected_events, expected_sent):
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert feed(ServerProtocol(), chunks) == (expected_events, expected_sent)


def test_a_large_frame_arriving_in_small_reads_is_reassembled():
    payload = bytes(i % 256 for i in range(40000))  # above the translate threshold
    frame = client_frame(BINARY, payload)
    protocol = ServerProtocol()
    events = []
    for i in range(0, len(frame), 1448):
        events += protocol.receive_data(frame[i : i + 1448])
    assert events == [BinaryMessage(payload)]
    assert protocol._buffer == b""


# -- the client side ------------------------------------------------------------------
#
# ClientProtocol is the same parser with the mask rule turned around; these tests pin
# what differs (masks both ways, what it sends back) and the round trips between sides.

RFC_KEY, RFC_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3


def test_accept_key_gives_the_answer_of_the_rfc_example():
    assert accept_key(RFC_KEY) == RFC_ACCEPT
    assert accept_key(RFC_KEY.encode()) == RFC_ACCEPT


def test_generate_key_gives_16_fresh_random_bytes_in_base64():
    keys = {generate_key() for _ in range(10)}
    assert len(keys) == 10
    assert all(len(base64.b64decode(key, validate=True)) == 16 for key in keys)


def test_handshake_request_is_the_upgrade_rfc_6455_asks_for():
    request = handshake_request("example.com:8080", "/rooms/a?x=1", RFC_KEY)
    head, rest = request.split(b"\r\n\r\n")
    assert rest == b""
    request_line, *lines = head.decode().split("\r\n")
    assert request_line == "GET /rooms/a?x=1 HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines)
    assert headers == {"Host": "example.com:8080", "Upgrade": "websocket",
                       "Connection": "Upgrade", "Sec-WebSocket-Key": RFC_KEY,
                       "Sec-WebSocket-Version": "13"}


@pytest.mark.parametrize("size", [0, 1, 3, 125, 126, 16383, 16384, 65535, 65536, 70001])
def test_client_frames_are_masked_like_the_tests_own_xor_in_every_length_form(size):
    payload = bytes(i * 7 % 251 for i in range(size))
    assert encode_client_frame(BINARY, payload, mask=MASK) == client_frame(BINARY, payload)
    fragment = encode_client_frame(TEXT, payload, fin=False, mask=MASK)
    assert fragment == client_frame(TEXT, payload, fin=False)


def test_client_frames_get_a_fresh_random_mask_each():
    frames = [encode_client_frame(TEXT, b"same") for _ in range(10)]
    assert len({frame[2:6] for frame in frames}) > 1
    for frame in frames:
        assert sent_frames(frame, masked=True) == [(True, TEXT, b"same")]


@pytest.mark.parametrize(
    ("opcode", "payload", "fin", "mask"),
    [
        (PING, b"x" * 126, True, None),
        (CLOSE, b"", False, None),
        (3, b"", True, None),
        (TEXT, b"x", True, b"abc"),
        (TEXT, b"x", True, b"abcde"),
    ],
)
def test_encode_client_frame_refuses_frames_and_masks_we_must_not_send(opcode, payload, fin, mask):
    with pytest.raises(ValueError):
        encode_client_frame(opcode, payload, fin, mask)


def test_encode_client_close_forms():
    assert encode_client_close(mask=MASK) == client_frame(CLOSE, close_payload(1000))
    assert encode_client_close(None, mask=MASK) == client_frame(CLOSE)
    close = encode_client_close(4000, "é", mask=MASK)
    assert close == client_frame(CLOSE, close_payload(4000, "é".encode()))
    assert sent_frames(encode_client_close(1001), masked=True) == [(True, CLOSE, b"\x03\xe9")]
    for code, reason in [(None, "why"), (1005, ""), (1000, "r" * 124)]:
        with pytest.raises(ValueError):
            encode_client_close(code, reason)


def test_server_frames_become_the_same_events_on_the_client():
    protocol = ClientProtocol()
    data = (
        encode_text("héllo ☃")
        + encode_frame(BINARY, b"\x00\xff")
        + encode_frame(TEXT, b"frag", fin=False)
        + encode_frame(PONG, b"beat")
        + encode_frame(CONT, "ment é".encode())
        + encode_text("x" * 70000)
    )
    assert protocol.receive_data(data) == [
        TextMessage("héllo ☃"), BinaryMessage(b"\x00\xff"), Pong(b"beat"),
        TextMessage("fragment é"), TextMessage("x" * 70000),
    ]
    assert protocol.data_to_send() == b""
    assert not hasattr(protocol, "__dict__")
    assert protocol._buffer == b"" and protocol.state is State.OPEN


def test_a_masked_server_frame_is_closed_with_1002_by_a_masked_close():
    protocol = ClientProtocol()
    events = comparable(protocol.receive_data(client_frame(TEXT, b"masked")))
    assert events == [("violation", 1002, "server frame masked")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [
        (True, CLOSE, close_payload(1002, b"server frame masked"))
    ]
    assert protocol.state is State.CLOSING and protocol.close_expected


def test_the_client_answers_a_ping_with_a_masked_pong():
    protocol = ClientProtocol()
    assert protocol.receive_data(encode_frame(PING, b"are you there")) == [Ping(b"are you there")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [(True, PONG, b"are you there")]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_the_client_echoes_every_valid_server_close_code_masked(code):
    protocol = ClientProtocol()
    events = protocol.receive_data(encode_frame(CLOSE, close_payload(code, b"bye")))
    assert events == [CloseReceived(code, "bye")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [(True, CLOSE, close_payload(code))]
    assert protocol.state is State.CLOSED and protocol.close_code == code


def test_the_client_answers_an_empty_server_close_with_an_empty_masked_close():
    protocol = ClientProtocol()
    assert protocol.receive_data(encode_close(None)) == [CloseReceived(None, "")]
    assert sent_frames(protocol.data_to_send(), masked=True) == [(True, CLOSE, b"")]
    assert protocol.close_code == CloseCode.NO_STATUS_RCVD


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_an_invalid_server_close_code_is_closed_with_1002_by_the_client(code):
    protocol = ClientProtocol()
    events = comparable(protocol.receive_data(encode_frame(CLOSE, close_payload(code))))
    assert events == [("violation", 1002, f"invalid close code {code}")]
    ((fin, opcode, payload),) = sent_frames(protocol.data_to_send(), masked=True)
    assert (opcode, payload[:2]) == (CLOSE, close_payload(1002))


def feed_both_ways(client: ClientProtocol, server: ServerProtocol, rounds: int = 4) -> list:
    """Carry each side's data_to_send() to the other, a bounded number of times; the events."""
    events = []
    for _ in range(rounds):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        events += [("server", e) for e in server.receive_data(to_server)]
        events += [("client", e) for e in client.receive_data(to_client)]
    return events


def test_a_close_started_by_the_client_completes_on_both_sides():
    client, server = ClientProtocol(), ServerProtocol()
    client.send_close(CloseCode.GOING_AWAY, "leaving")
    assert client.state is State.CLOSING and not client.close_expected
    events = feed_both_ways(client, server)
    assert events == [
        ("server", CloseReceived(1001, "leaving")), ("client", CloseReceived(1001, ""))
    ]
    assert client.state is server.state is State.CLOSED
    assert client.close_expected and server.close_expected


def test_a_close_started_by_the_server_completes_on_both_sides():
    client, server = ClientProtocol(), ServerProtocol()
    server.send_close(CloseCode.SERVICE_RESTART)
    events = feed_both_ways(client, server)
    assert events == [("client", CloseReceived(1012, "")), ("server", CloseReceived(1012, ""))]
    assert client.state is server.state is State.CLOSED


def test_pings_both_ways_are_answered_across_the_link():
    client, server = ClientProtocol(), ServerProtocol()
    to_server = encode_client_frame(PING, b"c?") + encode_client_frame(TEXT, "hé".encode())
    assert server.receive_data(to_server) == [Ping(b"c?"), TextMessage("hé")]
    assert client.receive_data(server.data_to_send() + encode_frame(PING, b"s?")) == [
        Pong(b"c?"), Ping(b"s?")
    ]
    assert server.receive_data(client.data_to_send()) == [Pong(b"s?")]


def test_a_server_stream_split_at_every_byte_boundary_gives_the_client_the_same_events():
    for stream, expected_events, expected_sent in [
        (make_stream(None), STREAM_EVENTS, [(True, PONG, b"ping"), (True, CLOSE, b"\x03\xe8")]),
        (make_bad_stream(None), BAD_STREAM_EVENTS,
         [(True, CLOSE, close_payload(1002, b"new message inside a fragmented one"))]),
    ]:
        for cut in range(len(stream) + 1):
            events, sent = feed(ClientProtocol(), [stream[:cut], stream[cut:]])
            assert (events, sent_frames(sent, masked=True)) == (expected_events, expected_sent), cut
        events, sent = feed(ClientProtocol(), [stream[i : i + 1] for i in range(len(stream))])
        assert (events, sent_frames(sent, masked=True)) == (expected_events, expected_sent)


# -- permessage-deflate (RFC 7692): negotiation --------------------------------------------

AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    ("offers", "response", "window_bits"),
    [
        ("permessage-deflate", AGREED, 15),
        ("permessage-deflate; client_max_window_bits", AGREED, 15),  # what browsers offer
        ("permessage-deflate; client_max_window_bits=10", AGREED, 15),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", AGREED, 15),
        ("permessage-deflate; server_max_window_bits=9", AGREED + "; server_max_window_bits=9", 9),
        ("permessage-deflate;server_max_window_bits=15",
         AGREED + "; server_max_window_bits=15", 15),
        ('permessage-deflate; server_max_window_bits="12"', AGREED + "; server_max_window_bits=12",
         12),
        ("Permessage-Deflate ; Client_Max_Window_Bits", AGREED, 15),
        ("x-webkit-deflate-frame, permessage-deflate", AGREED, 15),
        # the first offer we can honour wins: zlib cannot deflate with a 256-byte window
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate; "
         "server_max_window_bits=10", AGREED + "; server_max_window_bits=10", 10),
        ("permessage-deflate; foo, permessage-deflate", AGREED, 15),
    ],
)
def test_a_permessage_deflate_offer_we_can_honour_is_accepted(offers, response, window_bits):
    agreement = negotiate_deflate(offers)
    assert agreement == PerMessageDeflate(response, window_bits)


@pytest.mark.parametrize(
    "offers",
    [
        None, "", "x-webkit-deflate-frame",
        *(f"permessage-deflate; {param}" for param in [
            "server_max_window_bits=8", "server_max_window_bits", "server_max_window_bits=16",
            "server_max_window_bits=09", "client_max_window_bits=7", "client_max_window_bits=x",
            "server_no_context_takeover=1", "mux", "server_max_window_bits=10 11",
            "client_no_context_takeover; client_no_context_takeover"]),
        "permessage-deflate;", "permessage-deflate=1", '"permessage-deflate"', ", ;",
    ],
)
def test_an_offer_we_cannot_honour_or_parse_is_declined(offers):
    assert negotiate_deflate(offers) is None


def test_every_offer_autobahn_makes_in_cases_12_and_13_is_accepted():
    """wstest's offers (autobahn's PerMessageDeflateOffer), as it sends them."""
    offers = {
        "permessage-deflate; client_max_window_bits": 15,
        "permessage-deflate; client_no_context_takeover; client_max_window_bits": 15,
        "permessage-deflate; client_max_window_bits; server_max_window_bits=9": 9,
        "permessage-deflate; client_max_window_bits; server_max_window_bits=15": 15,
        "permessage-deflate; client_no_context_takeover; client_max_window_bits; "
        "server_no_context_takeover; server_max_window_bits=9": 9,
    }
    for offer, window_bits in offers.items():
        agreement = negotiate_deflate(offer)
        assert agreement is not None and agreement.window_bits == window_bits, offer


# -- permessage-deflate: the server's encoder ----------------------------------------------


def split_frame(frame: bytes) -> tuple[int, bytes]:
    """(first byte, payload) of exactly one unmasked frame."""
    n = frame[1]
    start = 2 if n < 126 else 4 if n == 126 else 10
    assert int.from_bytes(frame[2:start], "big") if start > 2 else n == len(frame) - start
    return frame[0], frame[start:]


def inflate(data: bytes, window_bits: int = 15) -> bytes:
    """What a receiver does with a compressed message (RFC 7692 7.2.2), by plain zlib."""
    return zlib.decompressobj(-window_bits).decompress(data + b"\x00\x00\xff\xff")


@pytest.mark.parametrize("size", [200, 125_000, 70_000 * 3])
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_compress_frame_sets_rsv1_strips_the_tail_and_inflates_back_with_zlib(opcode, size):
    payload = ("greenchat says hello to everyone " * (size // 30 + 1))[:size].encode()
    first, data = split_frame(compress_frame(encode_frame(opcode, payload)))
    assert first == 0x80 | RSV1 | opcode
    assert not data.endswith(b"\x00\x00\xff\xff")
    assert len(data) < len(payload) // 4
    assert inflate(data) == payload


def test_compress_frame_gives_the_same_bytes_for_the_same_message():
    """No context takeover: the output depends on the message alone, so one compressed
    frame can go to every client of a room, whatever each was sent before."""
    frame = encode_text("bonjour " * 40)
    assert compress_frame(frame) == compress_frame(encode_text("something else " * 9) and frame)


@pytest.mark.parametrize("payload", [b"", b"hi", random.Random(7).randbytes(1000),
                                     b'{"user":"alice","text":"hello everyone, how is it going?"}'])
def test_compress_frame_returns_the_frame_itself_when_compressing_does_not_shrink_it(payload):
    frame = encode_frame(BINARY, payload)
    assert compress_frame(frame) is frame


@pytest.mark.parametrize(
    "frame",
    [encode_frame(PING, b"x"), encode_frame(TEXT, b"x" * 300, fin=False),
     encode_frame(CONT, b"x" * 300), client_frame(TEXT, b"x" * 300),
     compress_frame(encode_text("x" * 300))],
    ids=["ping", "fragment", "continuation", "masked", "already-compressed"],
)
def test_compress_frame_refuses_anything_but_one_final_unmasked_data_frame(frame):
    with pytest.raises(ValueError):
        compress_frame(frame)


def test_a_frame_compressed_for_a_9_bit_window_inflates_through_a_9_bit_window():
    """server_max_window_bits=9: no back-reference may reach more than 512 bytes back."""
    block = random.Random(9).randbytes(600)  # repeats only 600 bytes later
    frame = encode_frame(BINARY, block * 4)
    _, narrow = split_frame(compress_frame(frame, window_bits=9))
    assert inflate_through_window(narrow, 9) == block * 4
    _, wide = split_frame(compress_frame(frame, window_bits=15))
    assert len(wide) < len(narrow) / 2  # the repeats were found with the default window...
    with pytest.raises(zlib.error, match="too far back"):  # ...a 512-byte one cannot follow
        inflate_through_window(wide, 9)


# -- permessage-deflate: the decoder ---------------------------------------------------------

# The examples of RFC 7692 7.2.3, each "Hello": the frames' first bytes and payloads.
RFC_7692_EXAMPLES = [
    [(0xC1, "f248cdc9c90700")],  # 7.2.3.1, one frame
    [(0x41, "f248cd"), (0x80, "c9c90700")],  # 7.2.3.1, two fragments
    [(0xC1, "f348cdc9c9070000")],  # 7.2.3.3: a final (BFINAL) block
    [(0xC1, "000500faff48656c6c6f00")],  # 7.2.3.4: a stored block
    [(0xC1, "f248050000" "00ffff" "cac9c90700")],  # 7.2.3.5: two blocks
]


def example_frames(example: list[tuple[int, str]], mask: bytes | None = None) -> bytes:
    """An RFC 7692 example as a server sends it, or masked (``mask``) as a client does."""
    return b"".join(client_frame(b0 & 0x0F, bytes.fromhex(payload), fin=bool(b0 & 0x80),
                                 rsv=b0 & 0x70, mask=mask) for b0, payload in example)


@pytest.mark.parametrize("example", RFC_7692_EXAMPLES)
def test_the_rfc_7692_examples_decode_on_both_sides(example):
    hello = ([TextMessage("Hello")], b"")
    assert feed(ClientProtocol(deflate=15), [example_frames(example)]) == hello
    masked = example_frames(example, MASK)
    server = ServerProtocol(deflate=15)
    byte_by_byte = [masked[i : i + 1] for i in range(len(masked))]
    assert feed(server, byte_by_byte) == hello
    assert server._message is None


def test_an_empty_compressed_message_is_one_zero_byte():
    assert compress_frame(encode_text("")) == b"\x81\x00"  # not smaller: sent as it is
    assert ServerProtocol(deflate=15).receive_data(client_frame(TEXT, b"\x00", rsv=RSV1)) == [
        TextMessage("")]


def test_a_compressed_message_is_the_message_whatever_the_fragments():
    payload = "fragments of a compressed message ☃ ".encode() * 50
    compressed = client_deflate(payload)
    frames = (client_frame(TEXT, compressed[:5], fin=False, rsv=RSV1)
              + client_frame(CONT, b"", fin=False)
              + client_frame(PING, b"between")
              + client_frame(CONT, compressed[5:]))
    protocol = ServerProtocol(deflate=15)
    assert protocol.receive_data(frames) == [Ping(b"between"), TextMessage(payload.decode())]


def test_uncompressed_and_compressed_messages_mix_on_one_connection():
    protocol = ServerProtocol(deflate=15)
    data = (client_frame(TEXT, b"plain")
            + client_frame(BINARY, client_deflate(b"\x00" * 50), rsv=RSV1)
            + client_frame(TEXT, client_deflate(b"squeezed"), rsv=RSV1)
            + client_frame(BINARY, b"\x01"))
    assert protocol.receive_data(data) == [TextMessage("plain"), BinaryMessage(bytes(50)),
                                           TextMessage("squeezed"), BinaryMessage(b"\x01")]


def test_a_message_that_needs_the_previous_ones_window_is_closed_with_1007():
    """We asked for client_no_context_takeover: RFC 7692 7.2.3.2's second message, which
    refers back into the first, cannot be inflated on its own."""
    protocol = ServerProtocol(deflate=15)
    assert protocol.receive_data(client_frame(TEXT, bytes.fromhex("f248cdc9c90700"), rsv=RSV1)) == [
        TextMessage("Hello")]
    assert_failed_with(protocol, protocol.receive_data(
        client_frame(TEXT, bytes.fromhex("f200110000"), rsv=RSV1)), 1007)


def test_invalid_compressed_data_is_closed_with_1007():
    protocol = ServerProtocol(deflate=15)
    events = protocol.receive_data(client_frame(BINARY, b"\xff\xff\xff", rsv=RSV1))
    assert_failed_with(protocol, events, 1007)


def test_a_compressed_text_message_that_inflates_to_invalid_utf8_is_closed_with_1007():
    protocol = ServerProtocol(deflate=15)
    frame = client_frame(TEXT, client_deflate("κόσμε".encode() + b"\xed\xa0\x80"), rsv=RSV1)
    assert_failed_with(protocol, protocol.receive_data(frame), 1007)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE, CONT])
def test_rsv1_on_a_control_or_continuation_frame_is_closed_with_1002(opcode):
    protocol = ServerProtocol(deflate=15)
    start = b""
    if opcode == CONT:
        start = client_frame(BINARY, client_deflate(b"abc"), fin=False, rsv=RSV1)
    payload = close_payload(1000) if opcode == CLOSE else b""
    events = protocol.receive_data(start + client_frame(opcode, payload, rsv=RSV1))
    assert_failed_with(protocol, events, 1002)


@pytest.mark.parametrize("rsv", [RSV2, RSV3, RSV1 | RSV2, RSV1 | RSV3])
def test_other_reserved_bits_are_closed_with_1002_even_with_deflate(rsv):
    protocol = ServerProtocol(deflate=15)
    assert_failed_with(protocol, protocol.receive_data(client_frame(TEXT, b"x", rsv=rsv)), 1002)


def test_a_compressed_message_inflating_to_exactly_the_limit_is_accepted_one_more_byte_is_1009():
    protocol = ServerProtocol(max_message_size=1000, deflate=15)
    frame = client_frame(BINARY, client_deflate(b"a" * 1000), rsv=RSV1)
    assert protocol.receive_data(frame) == [BinaryMessage(b"a" * 1000)]
    frame = client_frame(BINARY, client_deflate(b"a" * 1001), rsv=RSV1)
    assert_failed_with(protocol, protocol.receive_data(frame), 1009)


def test_a_compressed_text_over_the_limit_is_1009_whatever_its_first_byte_over_the_limit():
    """The byte over the limit is never decoded: UTF-8 only decides within the limit."""
    for text, code in [(b"a" * 10 + b"\xff", 1009), (b"a" * 9 + b"\xff" + b"a", 1007)]:
        protocol = ServerProtocol(max_message_size=10, deflate=15)
        frame = client_frame(TEXT, client_deflate(text), rsv=RSV1)
        assert_failed_with(protocol, protocol.receive_data(frame), code)


def test_what_follows_a_final_deflate_block_is_ignored_not_kept():
    """RFC 7692 7.2.3.3 lets a message end with a final block; the bytes after it in the
    message's later fragments are dropped as they come."""
    protocol = ServerProtocol(max_message_size=4 << 20, deflate=15)
    first = client_frame(TEXT, client_deflate(b"kept", final_block=True), fin=False, rsv=RSV1)
    assert protocol.receive_data(first) == []
    tracemalloc.start()
    try:
        for _ in range(16):
            assert protocol.receive_data(client_frame(CONT, bytes(65536), fin=False)) == []
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 65536  # the last read's frame may still be around; not a megabyte
    assert protocol.receive_data(client_frame(CONT, b"\xff")) == [TextMessage("kept")]


@pytest.mark.parametrize("read_size", [1 << 20, 1448])
def test_a_decompression_bomb_is_closed_with_1009_without_ever_holding_its_inflated_size(read_size):
    """100 MiB of zeros deflate to ~100 KB; with a 1 MiB limit the codec inflates a
    little over 1 MiB, never the 100 MiB (tracemalloc sees zlib's allocations too)."""
    bomb = client_frame(BINARY, client_deflate(bytes(100 << 20)), rsv=RSV1)
    assert len(bomb) < 120_000
    protocol = ServerProtocol(max_message_size=1 << 20, deflate=15)
    events = []
    tracemalloc.start()
    try:
        for i in range(0, len(bomb), read_size):
            events += protocol.receive_data(bomb[i : i + read_size])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert comparable(events) == [("violation", 1009, "message too big")]
    assert peak < 4 << 20
    assert protocol._message is None and protocol.close_expected


def test_an_idle_connection_keeps_no_zlib_object_between_compressed_messages():
    protocol = ServerProtocol(deflate=15)
    compressed = client_deflate(b"first half, second half")
    assert protocol.receive_data(client_frame(BINARY, compressed[:6], fin=False, rsv=RSV1)) == []
    assert protocol._message is not None and protocol._message.inflater is not None
    assert protocol.receive_data(client_frame(CONT, compressed[6:])) == [
        BinaryMessage(b"first half, second half")]
    assert protocol._message is None
    assert protocol.receive_data(client_frame(TEXT, client_deflate(b"x" * 99), rsv=RSV1)) == [
        TextMessage("x" * 99)]
    assert protocol._message is None and protocol._buffer == b""


def test_a_codec_that_agreed_to_deflate_holds_no_more_memory_idle_than_one_that_did_not():
    """The agreement is one slot that both kinds have (8 slots fill the same 96-byte
    pymalloc block as 7); after a compressed message nothing else stays allocated."""
    assert sys.getsizeof(ServerProtocol(deflate=15)) == sys.getsizeof(ServerProtocol()) <= 96
    message = client_frame(TEXT, client_deflate(b"hello hello hello hello"), rsv=RSV1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        codecs = [ServerProtocol(deflate=15) for _ in range(1000)]
        for codec in codecs:
            assert codec.receive_data(message) == [TextMessage("hello hello hello hello")]
        per_codec = (tracemalloc.get_traced_memory()[0] - before) / len(codecs)
    finally:
        tracemalloc.stop()
    assert per_codec < sys.getsizeof(codecs[0]) + 16  # the object and its list entry


# -- invalid UTF-8 fails in the read that brings it ------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "third"),
    [("κόσμε".encode() + b"\xce", b"\xba\xed\xa0", b"\x80edited"),  # Autobahn 6.4.3's chops
     ("κόσμε".encode(), b"\xf4", b"\x90\x80\x80edited")],  # 6.4.4: U+110000 from its 2nd byte
)
def test_invalid_utf8_fails_in_the_read_that_brings_it_even_inside_one_frame(first, second, third):
    frame = client_frame(TEXT, first + second + third)
    header = len(frame) - len(first + second + third)
    protocol = ServerProtocol()
    assert protocol.receive_data(frame[: header + len(first)]) == []
    events = protocol.receive_data(frame[header + len(first) : header + len(first + second)])
    if second == b"\xf4":  # F4 alone can still start U+10FFFF: the next byte decides
        assert events == []
        events = protocol.receive_data(frame[header + len(first + second) :][:1])
    assert_failed_with(protocol, events, 1007)
    rest = frame[header + len(first + second) + (1 if second == b"\xf4" else 0) :]
    assert protocol.receive_data(rest + client_frame(CLOSE)) == [CloseReceived(None, "")]


def test_a_large_text_frame_in_small_reads_is_checked_as_it_arrives_and_never_buffered_raw():
    """Each read's payload is unmasked, checked and appended once: linear work, and the
    codec's raw buffer stays empty (a header is all it ever keeps)."""
    payload = ("ÿ☃ a large text message " * 50_000).encode()
    frame = client_frame(TEXT, payload)
    protocol = ServerProtocol(max_message_size=len(payload))
    events = []
    for i in range(0, len(frame), 1448):
        events += protocol.receive_data(frame[i : i + 1448])
        assert protocol._buffer == b""
        if protocol._message is not None:
            assert len(protocol._message.data) == min(i + 1448, len(frame)) - 10 - 4
    assert events == [TextMessage(payload.decode())]
    assert protocol._message is None


def test_a_header_split_across_reads_is_all_the_buffer_ever_holds():
    frame = client_frame(BINARY, b"b" * 70000)  # 2 + 8 + 4 bytes of header
    protocol = ServerProtocol()
    for i in range(13):
        assert protocol.receive_data(frame[i : i + 1]) == []
        assert protocol._buffer == frame[: i + 1]
    assert protocol.receive_data(frame[13:]) == [BinaryMessage(b"b" * 70000)]


# -- properties ------------------------------------------------------------------------


def cut_into(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=200, deadline=None)
@given(
    message=st.one_of(st.text(max_size=300), st.binary(max_size=300)),
    mask=st.binary(min_size=4, max_size=4),
    fragment_cuts=st.lists(st.integers(min_value=0), max_size=4),
    read_cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_any_message_survives_masking_fragmentation_and_arbitrary_reads_both_ways(
    message, mask, fragment_cuts, read_cuts
):
    """To the server: frames masked by the tests' own XOR and by the codec's encoder (with
    ``mask`` and with a random key); to the client: the server's encoder; both compressed."""
    is_text = isinstance(message, str)
    payload = message.encode() if is_text else message
    pieces = cut_into(payload, fragment_cuts)  # may split a character across fragments
    fragments = [(CONT if i else TEXT if is_text else BINARY, piece, i == len(pieces) - 1)
                 for i, piece in enumerate(pieces)]
    expected = ([TextMessage(message) if is_text else BinaryMessage(message)], b"")
    encoders = [
        lambda opcode, piece, fin: client_frame(opcode, piece, fin=fin, mask=mask),
        lambda opcode, piece, fin: encode_client_frame(opcode, piece, fin, mask),
        encode_client_frame,  # a random key for each frame
    ]
    for encode in encoders:
        frames = b"".join(encode(*fragment) for fragment in fragments)
        assert feed(ServerProtocol(), cut_into(frames, read_cuts)) == expected
    to_client = b"".join(encode_frame(*fragment) for fragment in fragments)
    assert feed(ClientProtocol(), cut_into(to_client, read_cuts)) == expected
    # Compressed: by a client's zlib, its bytes cut into the same fragments, RSV1 on the
    # first; and to the client, the server's one compressed frame (or its plain frame).
    compressed = cut_into(client_deflate(payload), fragment_cuts)
    frames = b"".join(client_frame(CONT if i else TEXT if is_text else BINARY, piece,
                                   fin=i == len(compressed) - 1, rsv=0 if i else RSV1, mask=mask)
                      for i, piece in enumerate(compressed))
    assert feed(ServerProtocol(deflate=15), cut_into(frames, read_cuts)) == expected
    frame = compress_frame(encode_frame(TEXT if is_text else BINARY, payload))
    assert feed(ClientProtocol(deflate=15), cut_into(frame, read_cuts)) == expected


# -- properties: fuzzing against a reference model ----------------------------------------
#
# The codec parses incrementally, with a fast path, skipping, payloads taken as they
# arrive and inflated as they come; the model below reads the whole stream at once,
# frame by frame and byte by byte, with RFC 6455's and RFC 7692's rules written out
# plainly, its own UTF-8 prefix check, and zlib fed one byte at a time. It also says at
# which byte of the stream each event becomes known: a frame's event at its last byte, a
# bad header at the end of its length field, invalid UTF-8 at the first byte that no
# valid UTF-8 can start with, inflated output over the limit at the byte that makes it.
# Hypothesis feeds both random, mutated and valid streams, the codec in random read
# sizes, and the two must agree on every event, every close code and every frame sent
# back, and on the read in which each comes.

VALID_CODES = frozenset([1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)])
# Every way to finish a character cut short: the second byte's range depends on the
# lead byte (E0: A0-BF, ED: 80-9F, F0: 90-BF, F4: 80-8F), later bytes are 80-BF.
UTF8_COMPLETIONS = [b""] + [
    bytes((second,)) + b"\x80" * more
    for second in (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)
    for more in range(3)
]


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def is_utf8_prefix(data: bytes) -> bool:
    """True when some bytes appended to ``data`` make valid UTF-8."""
    return any(is_utf8(data + completion) for completion in UTF8_COMPLETIONS)


def first_invalid(data: bytes) -> int:
    """The length of the shortest prefix of ``data`` that no valid UTF-8 starts with
    (``data`` is one); bisection, since every longer prefix is invalid too."""
    valid, invalid = 0, len(data)
    while invalid - valid > 1:
        middle = (valid + invalid) // 2
        if is_utf8_prefix(data[:middle]):
            valid = middle
        else:
            invalid = middle
    return invalid


def frame_error(
    b0: int, b1: int, length: int, message: ModelMessage | None, max_size: int, client: bool,
    deflate: bool,
) -> int | None:
    """The close code a frame header earns, or None: framing errors beat size (1002, 1009).

    ``client``: we are the client, so frames must come unmasked (masked to a server).
    ``deflate``: permessage-deflate was agreed, so RSV1 alone may mark a message's first
    frame as compressed.
    """
    fin, rsv, opcode, masked = b0 & 0x80, b0 & 0x70, b0 & 0x0F, bool(b1 & 0x80)
    known = opcode in (CONT, TEXT, BINARY, CLOSE, PING, PONG)
    compressed = deflate and rsv == RSV1 and opcode in (TEXT, BINARY)
    if length >= 1 << 63 or (rsv and not compressed) or masked == client or not known:
        return 1002
    if opcode >= CLOSE:
        return 1002 if not fin or length > 125 else None
    if (opcode == CONT) != (message is not None):
        return 1002  # a continuation with no message, or a new message inside one
    if length + (message.size if opcode == CONT else 0) > max_size:
        return 1009  # on the wire: a compressed message is bounded before and after inflating
    return None


@dataclasses.dataclass
class ModelMessage:
    """The model's data message in progress."""

    text: bool
    inflater: typing.Any  # a raw-deflate zlib decompressor when compressed, else None
    data: bytearray = dataclasses.field(default_factory=bytearray)  # inflated, if so
    size: int = 0  # payload bytes on the wire


def reference(
    stream: bytes, max_size: int, closing: bool = False, client: bool = False,
    deflate: bool = False,
) -> tuple[list, list]:
    """(events, frames sent back) for ``stream`` read whole, each as (at, item), where
    ``at`` is how many bytes of the stream it takes to know it; a violation is
    ("violation", code).

    ``closing``: we sent our close frame (1001) before the stream arrived. ``client``: we
    are the client side (the peer must not mask). ``deflate``: permessage-deflate was
    agreed (no context takeover).
    """
    events: list = []
    sent: list = []
    state = State.CLOSING if closing else State.OPEN
    failed = False
    message: ModelMessage | None = None

    def fail(code: int, at: int) -> None:
        nonlocal state, failed, message
        events.append((at, ("violation", code)))
        if state is State.OPEN:
            sent.append((at, ("close", code)))
            state = State.CLOSING
        failed, message = True, None

    def take(payload: bytes, at: int, ends: bool) -> None:
        """The payload bytes of a data frame that are here, the first at stream offset
        ``at``; ``ends``: they are the whole frame, and it ends the message."""
        nonlocal message
        assert message is not None
        data, inflater = message.data, message.inflater
        marks = []  # (stream offset after an input byte, len(data) then)
        error = None
        for i, byte in enumerate(payload):
            if inflater is None:
                data.append(byte)
            elif not inflater.eof:  # after a final deflate block the rest is ignored
                try:
                    data += inflater.decompress(bytes((byte,)), max_size + 1 - len(data))
                except zlib.error:
                    error = (1007, at + i + 1)
                    break
            marks.append((at + i + 1, len(data)))
            if len(data) > max_size:
                error = (1009, at + i + 1)
                break
        message.size += len(payload)
        end = at + len(payload)
        if ends and error is None and inflater is not None and not inflater.eof:
            try:  # RFC 7692 7.2.2: the tail the sender removed
                data += inflater.decompress(b"\x00\x00\xff\xff", max_size + 1 - len(data))
            except zlib.error:
                error = (1007, end)
            else:
                marks.append((end, len(data)))
                if len(data) > max_size:
                    error = (1009, end)
        if message.text:
            within = bytes(data[:max_size])  # a byte over the limit is never decoded
            if not is_utf8_prefix(within):  # before any other error, or with it
                bad = first_invalid(within)
                error = (1007, next(offset for offset, n in marks if n >= bad))
            elif ends and error is None and not is_utf8(within):
                error = (1007, end)
        if error is not None:
            fail(*error)
        elif ends:
            complete = TextMessage(data.decode()) if message.text else BinaryMessage(bytes(data))
            events.append((end, complete))
            message = None

    pos = 0
    while state is not State.CLOSED and len(stream) - pos >= 2:
        b0, b1 = stream[pos], stream[pos + 1]
        opcode, fin = b0 & 0x0F, b0 & 0x80
        length, header = b1 & 0x7F, 2
        if length >= 126:
            header = 4 if length == 126 else 10
            if len(stream) - pos < header:
                break
            length = int.from_bytes(stream[pos + 2 : pos + header], "big")
        known = pos + header  # all a header can say is known once its length field is
        start = known + (4 if b1 & 0x80 else 0)  # the payload's first byte
        end = start + length
        if failed:  # only the peer's close still matters, masked or not
            if opcode != CLOSE or length > 125:
                pos = end
                continue
        else:
            code = frame_error(b0, b1, length, message, max_size, client, deflate)
            if code is not None:
                fail(code, known)
                pos = end
                continue
        if len(stream) < start:
            break
        payload = stream[start:end]
        if start > known:
            payload = xor_mask(payload, stream[known:start])
        pos = end
        if opcode in (CONT, TEXT, BINARY):  # acted on byte by byte, even before its end
            if opcode != CONT:
                inflater = zlib.decompressobj(-15) if b0 & RSV1 else None
                message = ModelMessage(opcode == TEXT, inflater)
            take(payload, start, bool(fin) and end <= len(stream))
            continue
        if end > len(stream):
            break
        if opcode == PING:
            if state is State.OPEN:
                sent.append((end, (PONG, payload)))
            events.append((end, Ping(payload)))
        elif opcode == PONG:
            events.append((end, Pong(payload)))
        elif state is not State.OPEN:  # our close is out: any close completes the handshake
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            events.append((end, CloseReceived(code, payload[2:].decode(errors="replace"))))
            state = State.CLOSED
        elif len(payload) == 1 or len(payload) >= 2 and int.from_bytes(payload[:2], "big") not in VALID_CODES:
            fail(1002, end)
        elif not is_utf8(payload[2:]):
            fail(1007, end)
        else:
            code = int.from_bytes(payload[:2], "big") if payload else None
            events.append((end, CloseReceived(code, payload[2:].decode())))
            sent.append((end, ("close", code)))
            state = State.CLOSED
    return events, sent


def untimed(result: tuple[list, list]) -> tuple[list, list]:
    """The model's (events, frames sent) without the offsets."""
    events, sent = result
    return [event for _, event in events], [frame for _, frame in sent]


def expected_reads(
    stream: bytes, cuts: list[int], max_size: int, closing: bool = False, client: bool = False,
    deflate: bool = False,
) -> list[tuple[list, list]]:
    """The model's events and frames sent back, in the read (``stream`` cut at ``cuts``)
    that brings the byte that makes each known."""
    events, sent = reference(stream, max_size, closing, client, deflate)
    ends = list(itertools.accumulate(len(chunk) for chunk in cut_into(stream, cuts)))
    reads: list[tuple[list, list]] = [([], []) for _ in ends]
    for at, event in events:
        reads[bisect.bisect_left(ends, at)][0].append(event)
    for at, frame in sent:
        reads[bisect.bisect_left(ends, at)][1].append(frame)
    return reads


def run_codec(
    stream: bytes, cuts: list[int], max_size: int, closing: bool = False, client: bool = False,
    deflate: bool = False,
) -> list[tuple[list, list]]:
    """Feed ``stream`` to a fresh codec in reads cut at ``cuts``; per read, (events,
    frames sent) as the model gives them."""
    side = ClientProtocol if client else ServerProtocol
    protocol = side(max_message_size=max_size, deflate=15 if deflate else None)
    if closing:
        protocol.send_close(CloseCode.GOING_AWAY)
        protocol.data_to_send()
    reads = []
    all_events: list = []
    all_sent = b""
    for chunk in cut_into(stream, cuts):
        events = comparable(protocol.receive_data(chunk))
        sent = protocol.data_to_send()
        all_events += events
        all_sent += sent
        frames = []
        for fin, opcode, payload in sent_frames(sent, masked=client):
            assert fin
            if opcode == CLOSE:
                frames.append(("close", int.from_bytes(payload[:2], "big") if payload else None))
            else:
                frames.append((opcode, payload))
        reasons_are_ours_to_word = [e[:2] if isinstance(e, tuple) else e for e in events]
        reads.append((reasons_are_ours_to_word, frames))
    check_invariants(protocol, all_events, all_sent)
    return reads


def flat(reads: list[tuple[list, list]]) -> tuple[list, list]:
    """All the events and all the frames sent, whatever the read."""
    return [e for events, _ in reads for e in events], [f for _, frames in reads for f in frames]


def check_invariants(protocol: ServerProtocol | ClientProtocol, events: list, sent: bytes) -> None:
    """What holds whatever the input: one violation at most, nothing after a close, and
    no message left half-read (and no inflater) once the codec stopped reading."""
    violations = [e for e in events if isinstance(e, tuple)]
    assert len(violations) <= 1
    assert all(code in (1002, 1007, 1009) for _, code, _ in violations)
    if violations:
        after = events[events.index(violations[0]) + 1 :]
        assert all(isinstance(e, CloseReceived) for e in after)
        assert protocol.close_expected
        assert protocol._message is None
    closes = [e for e in events if isinstance(e, CloseReceived)]
    assert len(closes) <= 1 and (not closes or events[-1] is closes[0])
    frames = sent_frames(sent, masked=isinstance(protocol, ClientProtocol))
    close_frames = [f for f in frames if f[1] == CLOSE]
    assert len(close_frames) <= 1 and (not close_frames or frames[-1] == close_frames[0])
    assert len(protocol._buffer) <= 10 + 4 + 125  # a header, or one whole control frame


def test_the_reference_model_agrees_with_the_hand_written_streams():
    """The model is checked too, on the streams whose events are spelled out above."""
    stream_sent = [(PONG, b"ping"), ("close", 1000)]
    assert untimed(reference(STREAM, 1 << 20)) == (STREAM_EVENTS, stream_sent)
    violation = [e[:2] if isinstance(e, tuple) else e for e in BAD_STREAM_EVENTS]
    assert untimed(reference(BAD_STREAM, 1 << 20)) == (violation, [("close", 1002)])
    assert untimed(reference(client_frame(TEXT, b"ok\xed\xa0", fin=False), 100)) == (
        [("violation", 1007)], [("close", 1007)])
    assert untimed(reference(client_header(BINARY, 101), 100)) == (
        [("violation", 1009)], [("close", 1009)])
    assert untimed(reference(make_stream(None), 1 << 20, client=True)) == untimed(
        reference(STREAM, 1 << 20))
    masked_to_a_client = ([("violation", 1002), CloseReceived(1000, "done")], [("close", 1002)])
    assert untimed(reference(STREAM, 1 << 20, client=True)) == masked_to_a_client
    for example in RFC_7692_EXAMPLES:
        assert untimed(reference(example_frames(example), 1 << 20, client=True, deflate=True)) == (
            [TextMessage("Hello")], [])


def test_the_reference_model_knows_each_event_at_the_byte_that_decides_it():
    """Hand-counted offsets: 2 bytes of header and 4 of mask before a payload."""
    hello = client_frame(TEXT, b"hello")
    assert reference(hello + client_frame(PING, b"p"), 100)[0] == [
        (11, TextMessage("hello")), (11 + 7, Ping(b"p"))]
    # "\xce\xba" is a whole character; "\xed\xa0" can start none (a surrogate)
    failing_at = [(6 + 5, ("violation", 1007))]
    assert reference(client_frame(TEXT, b"a\xce\xba\xed\xa0zz"), 100)[0] == failing_at
    split = client_frame(TEXT, b"\xce", fin=False) + client_frame(CONT, b"\xba\xff")
    assert reference(split, 100)[0] == [(7 + 6 + 2, ("violation", 1007))]
    assert reference(client_frame(TEXT, b"ab\xe2\x98"), 100)[0] == [(10, ("violation", 1007))]
    assert reference(client_frame(BINARY, b"x" * 200), 100)[0] == [(4, ("violation", 1009))]
    # 200 zero bytes deflate to 5 bytes; with a limit of 100, the byte that inflates the
    # 101st is the one that fails
    bomb = client_deflate(bytes(200))
    for at, event in reference(client_frame(BINARY, bomb, rsv=RSV1), 100, deflate=True)[0]:
        assert event == ("violation", 1009)
        assert len(zlib.decompressobj(-15).decompress(bomb[: at - 6 - 1])) <= 100
        assert len(zlib.decompressobj(-15).decompress(bomb[: at - 6])) > 100


reads = st.lists(st.integers(min_value=0), max_size=8)
masks = st.one_of(st.binary(min_size=4, max_size=4), st.just(b"\x00\x00\x00\x00"))
length_forms = st.sampled_from([None, None, None, 16, 64])
max_sizes = st.sampled_from([1 << 20, 100, 10])
BAD_UTF8 = [b"\xff", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xa0",
            b"\xf4\x90\x80\x80", b"\xf4\x90", b"\xe2\x82", b"\xf0\x9f\x98"]
close_payloads = st.builds(
    lambda code, reason: code.to_bytes(2, "big") + reason,
    st.sampled_from(VALID_CLOSE_CODES + INVALID_CLOSE_CODES),
    st.one_of(st.text(max_size=20).map(str.encode), st.sampled_from(BAD_UTF8)),
)
texts_with_bad_utf8 = st.builds(lambda a, bad, b: a.encode() + bad + b.encode(),
                                st.text(max_size=8), st.sampled_from(BAD_UTF8), st.text(max_size=8))
# What a client's deflater makes (RFC 7692 7.2.1), of text, bad text, bytes and zeros
# (which inflate to past the small limits), flushed or ended by a final block.
deflated = st.builds(
    client_deflate,
    st.one_of(st.text(max_size=40).map(str.encode), texts_with_bad_utf8, st.binary(max_size=60),
              st.integers(0, 400).map(bytes)),
    st.booleans(),
)
payloads = st.one_of(
    st.binary(max_size=140),
    st.text(max_size=40).map(str.encode),
    texts_with_bad_utf8,
    close_payloads,
    st.sampled_from([b"", b"\x03"]),
    deflated,
)


def peer_frames(client: bool = False) -> st.SearchStrategy[bytes]:
    """Random frames, three in four with the mask rule of the peer (a client masks; to a
    ``client`` codec the peer is a server, which does not)."""
    right, wrong = (st.none(), masks) if client else (masks, st.none())
    return st.builds(
        lambda opcode, fin, rsv, mask, payload, form: client_frame(
            opcode, payload, fin=fin, rsv=rsv, mask=mask, length_form=form),
        st.one_of(st.sampled_from([CONT, TEXT, BINARY, CLOSE, PING, PONG]), st.integers(0, 15)),
        st.sampled_from([True, True, False]),
        st.sampled_from([0] * 9 + [RSV1] * 4 + [RSV2, RSV3]),
        st.one_of(right, right, right, wrong),
        payloads,
        length_forms,
    )


frames = peer_frames()


@st.composite
def valid_streams(
    draw, bad_utf8: bool = False, masked: bool = True, deflate: bool = False
) -> tuple[bytes, list]:
    """Valid client frames (fragmented messages with pings and pongs between the
    fragments, any mask, any length form) and the events they must give.

    ``bad_utf8``: the text messages get an invalid UTF-8 sequence at a random place,
    and the expected events are left to the reference model. ``masked`` False: server
    frames instead (never masked). ``deflate``: about half the messages compressed as
    RFC 7692 says, their compressed bytes cut into the fragments.
    """
    peer_mask = masks if masked else st.none()
    stream = b""
    expected: list = []
    for _ in range(draw(st.integers(1, 4))):
        message = draw(st.one_of(st.text(max_size=80), st.binary(max_size=200)))
        is_text = isinstance(message, str)
        payload = message.encode() if is_text else message
        if is_text and bad_utf8:
            at = draw(st.integers(0, len(payload)))
            cut = len(payload[:at].decode(errors="ignore").encode())  # between characters
            payload = payload[:cut] + draw(st.sampled_from(BAD_UTF8)) + payload[cut:]
        compressed = deflate and draw(st.booleans())
        if compressed:
            payload = client_deflate(payload, draw(st.booleans()))
        pieces = cut_into(payload, draw(st.lists(st.integers(min_value=0), max_size=3)))
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            opcode = CONT if i else TEXT if is_text else BINARY
            rsv = RSV1 if compressed and not i else 0
            stream += client_frame(opcode, piece, fin=last, rsv=rsv, mask=draw(peer_mask),
                                   length_form=draw(length_forms))
            if last:
                expected.append(TextMessage(message) if is_text else BinaryMessage(message))
            if draw(st.integers(0, 3)) == 0:
                control = draw(st.sampled_from([PING, PONG]))
                data = draw(st.binary(max_size=125))
                stream += client_frame(control, data, mask=draw(peer_mask))
                expected.append(Ping(data) if control == PING else Pong(data))
    if draw(st.booleans()) and not bad_utf8:
        code = draw(st.sampled_from(VALID_CLOSE_CODES))
        reason = draw(st.text(max_size=30).filter(lambda r: len(r.encode()) <= 123))
        stream += client_frame(CLOSE, close_payload(code, reason.encode()), mask=draw(peer_mask))
        expected.append(CloseReceived(code, reason))
    return stream, expected


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(valid=valid_streams(), cuts=reads)
def test_valid_streams_give_the_same_events_however_the_reads_split_them(valid, cuts):
    stream, expected = valid
    assert flat(run_codec(stream, [], 1 << 20))[0] == expected
    assert run_codec(stream, cuts, 1 << 20) == expected_reads(stream, cuts, 1 << 20)
    one_byte_reads = range(0, len(stream), max(1, len(stream) // 50))  # up to 50 tiny reads
    tiny = [*one_byte_reads, *(c + 1 for c in one_byte_reads)]
    assert run_codec(stream, tiny, 1 << 20) == expected_reads(stream, tiny, 1 << 20)


@settings(max_examples=300, deadline=None)
@given(valid=valid_streams(deflate=True), cuts=reads)
def test_valid_compressed_streams_give_the_same_events_however_the_reads_split_them(valid, cuts):
    stream, expected = valid
    assert flat(run_codec(stream, [], 1 << 20, deflate=True))[0] == expected
    assert run_codec(stream, cuts, 1 << 20, deflate=True) == expected_reads(
        stream, cuts, 1 << 20, deflate=True)


@pytest.mark.slow
@settings(max_examples=1200, deadline=None)
@given(stream=st.lists(frames, max_size=8).map(b"".join), cuts=reads, max_size=max_sizes,
       closing=st.sampled_from([False, False, False, True]), deflate=st.booleans())
def test_random_frames_give_the_events_and_close_codes_the_rfc_demands(
    stream, cuts, max_size, closing, deflate
):
    expected = expected_reads(stream, cuts, max_size, closing, deflate=deflate)
    assert run_codec(stream, cuts, max_size, closing, deflate=deflate) == expected


@settings(max_examples=500, deadline=None)
@given(stream=valid_streams(bad_utf8=True), cuts=reads)
def test_invalid_utf8_anywhere_in_a_text_message_fails_with_1007_in_the_read_that_brings_it(
    stream, cuts
):
    """The model fails at the first byte that cannot start valid UTF-8, even in the middle
    of a frame still arriving; so must the codec, in the read that brings that byte."""
    data, would_be = stream
    expected = expected_reads(data, cuts, 1 << 20)
    assert run_codec(data, cuts, 1 << 20) == expected
    if any(isinstance(event, TextMessage) for event in would_be):  # one was corrupted
        assert ("violation", 1007) in flat(expected)[0]


@settings(max_examples=300, deadline=None)
@given(stream=valid_streams(bad_utf8=True, deflate=True), cuts=reads)
def test_invalid_utf8_in_a_compressed_text_message_fails_with_1007_in_the_read_that_inflates_it(
    stream, cuts
):
    data, would_be = stream
    expected = expected_reads(data, cuts, 1 << 20, deflate=True)
    assert run_codec(data, cuts, 1 << 20, deflate=True) == expected
    if any(isinstance(event, TextMessage) for event in would_be):
        assert ("violation", 1007) in flat(expected)[0]


@settings(max_examples=400, deadline=None)
@given(
    code=st.one_of(st.integers(0, 65535), st.sampled_from(VALID_CLOSE_CODES + INVALID_CLOSE_CODES)),
    reason=st.one_of(st.text(max_size=40).map(str.encode), payloads),
    before=valid_streams(),
    closing=st.booleans(),
    cuts=reads,
)
def test_close_frames_with_any_code_and_reason_get_the_answer_the_rfc_demands(
    code, reason, before, closing, cuts
):
    stream = before[0] + client_frame(CLOSE, code.to_bytes(2, "big") + reason[:123])
    expected = expected_reads(stream, cuts, 1 << 20, closing)
    assert run_codec(stream, cuts, 1 << 20, closing) == expected


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
              st.integers(min_value=0), st.integers(0, 255)),
    min_size=1, max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """Apply byte-level edits: flip a bit, set a byte, insert, delete, truncate."""
    out = bytearray(data)
    for kind, position, value in edits:
        at = position % (len(out) + 1)
        if kind == "insert":
            out[at:at] = bytes((value,)) * (1 + value % 3)
        elif kind == "truncate":
            del out[at:]
        elif at < len(out):
            if kind == "flip":
                out[at] ^= 1 << (value % 8)
            elif kind == "set":
                out[at] = value
            else:
                del out[at : at + 1 + value % 4]
    return bytes(out)


@pytest.mark.slow
@settings(max_examples=1600, deadline=None)
@given(valid=valid_streams(deflate=True), edits=mutations, cuts=reads, max_size=max_sizes,
       deflate=st.booleans())
def test_mutated_valid_streams_give_the_events_and_close_codes_the_rfc_demands(
    valid, edits, cuts, max_size, deflate
):
    """Half the messages compressed, to a codec that agreed to deflate or (1002) did not."""
    stream = mutate(valid[0], edits)
    expected = expected_reads(stream, cuts, max_size, deflate=deflate)
    assert run_codec(stream, cuts, max_size, deflate=deflate) == expected


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=400), cuts=reads, max_size=st.sampled_from([64, 1 << 20]),
       deflate=st.booleans())
def test_random_garbage_gives_the_events_and_close_codes_the_rfc_demands(
    garbage, cuts, max_size, deflate
):
    expected = expected_reads(garbage, cuts, max_size, deflate=deflate)
    assert run_codec(garbage, cuts, max_size, deflate=deflate) == expected


# The client side: the same model with the mask rule turned around, fed server streams.


@settings(max_examples=400, deadline=None)
@given(valid=valid_streams(masked=False, deflate=True), cuts=reads)
def test_valid_server_streams_give_the_client_the_same_events_however_the_reads_split_them(
    valid, cuts
):
    stream, expected = valid
    assert flat(run_codec(stream, [], 1 << 20, client=True, deflate=True))[0] == expected
    assert run_codec(stream, cuts, 1 << 20, client=True, deflate=True) == expected_reads(
        stream, cuts, 1 << 20, client=True, deflate=True)


@settings(max_examples=400, deadline=None)
@given(stream=st.lists(peer_frames(client=True), max_size=8).map(b"".join), cuts=reads,
       max_size=max_sizes, closing=st.sampled_from([False, False, False, True]),
       deflate=st.booleans())
def test_random_server_frames_give_the_client_the_events_and_close_codes_the_rfc_demands(
    stream, cuts, max_size, closing, deflate
):
    expected = expected_reads(stream, cuts, max_size, closing, client=True, deflate=deflate)
    assert run_codec(stream, cuts, max_size, closing, client=True, deflate=deflate) == expected


@settings(max_examples=400, deadline=None)
@given(valid=valid_streams(masked=False, deflate=True), edits=mutations, cuts=reads,
       max_size=max_sizes, deflate=st.booleans())
def test_mutated_server_streams_give_the_client_the_events_and_close_codes_the_rfc_demands(
    valid, edits, cuts, max_size, deflate
):
    stream = mutate(valid[0], edits)
    expected = expected_reads(stream, cuts, max_size, client=True, deflate=deflate)
    assert run_codec(stream, cuts, max_size, client=True, deflate=deflate) == expected
